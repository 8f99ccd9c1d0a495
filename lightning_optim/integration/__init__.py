"""The Lightning side of lightning_optim: the callbacks, the loggers, and the hooks into Lightning.

Everything that imports Lightning lives in this subpackage; the optimizers, the partition and
the step's surroundings below it are plain PyTorch.

- ``optimizer_callback.py``: :class:`OptimizerCallback` (optimizer, schedule, clipping, accumulation).
- ``moment_monitor.py``: :class:`MomentMonitor` (moment statistics to the loggers).
- ``loggers.py``: the CSV / TensorBoard / W&B loggers and the one host read of logged statistics.
- ``checkpoint_guard.py``: a checkpoint file is verified before Lightning loads it.
- ``compat.py``: every access to a private Lightning or torch attribute, each checked by
  ``tests/test_compat.py``.

Importing this package loads no Lightning (``compat`` is imported by the plain-PyTorch
clipping); the two callbacks are imported on first access.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MomentMonitor", "OptimizerCallback"]

_LAZY = {"OptimizerCallback": "optimizer_callback", "MomentMonitor": "moment_monitor"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
