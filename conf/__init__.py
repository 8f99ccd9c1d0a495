"""Hydra configs of lightning_optim, shipped in the wheel.

Another Hydra app gets these groups by adding ``pkg://lightning_optim.conf`` to its
``hydra.searchpath``. Hydra imports this package to read the files, which registers the
schemas below in its ConfigStore, so ``optimizer.lrr=1`` (a typo) or ``optimizer.lr=abc``
(a wrong type) fails at compose time in that app too.
"""

from hydra.core.config_store import ConfigStore

from ..config import SCHEMAS  # group -> dataclass, kept next to the dataclasses


def schema_name(group: str) -> str:
    """The ConfigStore name of ``group``'s schema, e.g. ``lightning_optim_optimizer_schema``."""
    return f"lightning_optim_{group}_schema"


def register_configs() -> None:
    """Store each dataclass as a root-level config, ``schema_name(group)``; every YAML file of
    the group extends it (``- /lightning_optim_<group>_schema@_here_`` in its defaults list).

    Not as ``<group>/schema``: a config stored inside a group is one of that group's options,
    so ``optimizer=schema`` would compose (and run the dataclass defaults, AdamW) and Hydra's
    ``--help`` would list it among the choices. A root-level config is no group's option.
    """
    cs = ConfigStore.instance()
    for group, node in SCHEMAS.items():
        cs.store(name=schema_name(group), node=node)


register_configs()
