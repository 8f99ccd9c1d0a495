"""The main job: ``python -m lightning_optim.train``, a small GPT on an embedded corpus.

An application of the library, kept apart from it: the Hydra entry point (:mod:`.train`), the
corpus (:mod:`.corpus`), the model (:mod:`.models`), step checkpoints and resume
(:mod:`.resume`) and the one-minute tour (:mod:`.demo`). Needs the ``app`` extra.
"""
