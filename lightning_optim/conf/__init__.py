"""Hydra configs of lightning_optim, shipped in the wheel.

Another Hydra app gets these groups by adding ``pkg://lightning_optim.conf`` to its
``hydra.searchpath``. Hydra imports this package to read the files, which registers the
schemas below in its ConfigStore, so ``optimizer.lrr=1`` (a typo) or ``optimizer.lr=abc``
(a wrong type) fails at compose time in that app too.
"""

from hydra.core.config_store import ConfigStore

from ..config import (
    AccumulationConfig,
    ClippingConfig,
    MonitorConfig,
    OptimizerConfig,
    PartitionConfig,
    SchedulerConfig,
)

SCHEMAS = {
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "clipping": ClippingConfig,
    "accumulation": AccumulationConfig,
    "partition": PartitionConfig,
    "monitor": MonitorConfig,
}


def register_configs() -> None:
    """Store each dataclass as ``<group>/schema``; the YAML files extend it."""
    cs = ConfigStore.instance()
    for group, node in SCHEMAS.items():
        cs.store(group=group, name="schema", node=node)


register_configs()
