"""lightning_optim: fast, inspectable optimizers for PyTorch Lightning.

The optimizers work in plain PyTorch; the Lightning and Hydra pieces live in their own
modules. The data flow, partition -> optimizer -> statistics -> loggers, is described in
docs/architecture.md.
"""

from .checkpoint import CheckpointError, verify_checkpoint
from .convert import convert_checkpoint, convert_optimizer_state
from .data import ResumableDataLoader, ResumableSampler
from .optim import SGD, Adagrad, Adam, AdamW, CoupledAdam, Lion, NAdam, RAdam, RMSprop, Yogi
from .partition import param_groups, summarize
from .registry import create_optimizer, optimizers
from .validation import LightningOptimWarning

__version__ = "0.1.0"

# The Lightning side loads on first use, so the optimizers stay plain PyTorch.
_LAZY = {"OptimizerCallback": "integration.optimizer_callback", "MomentMonitor": "integration.moment_monitor"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lightning_optim' has no attribute {name!r}")

__all__ = [
    "SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "NAdam", "RAdam", "Lion", "Yogi", "CoupledAdam",
    "param_groups", "summarize", "create_optimizer", "optimizers", "LightningOptimWarning", "OptimizerCallback",
    "MomentMonitor", "CheckpointError", "verify_checkpoint", "ResumableDataLoader", "ResumableSampler",
    "convert_optimizer_state", "convert_checkpoint",
]
