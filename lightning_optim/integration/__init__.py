"""The Lightning side of lightning_optim: the callbacks, the loggers, and the hooks into Lightning.

Everything that imports Lightning lives in this subpackage; the optimizers, the partition and
the step's surroundings below it are plain PyTorch.
"""
