"""Verify a checkpoint file before Lightning loads it (``Trainer.fit(ckpt_path=...)``)."""

from __future__ import annotations

import os
from typing import Any

from ..checkpoint import _legacy_error, _verify

__all__ = ["guard_checkpoint_loading"]


def guard_checkpoint_loading(strategy: Any) -> None:
    """Make ``strategy.load_checkpoint`` verify a local checkpoint file before it loads it.

    Why there. ``Trainer.fit(ckpt_path=...)`` resolves ``"last"``/``"best"`` to a file before it
    runs, but ``trainer.ckpt_path`` is only set in ``_checkpoint_connector.resume_start``, after
    every ``setup`` hook, and that same call loads the file; no callback hook runs in between.
    ``Strategy.load_checkpoint(path, weights_only)`` is the public method that call goes
    through (strategies that load sharded directories override it), so the check goes there.
    Directories and remote URLs pass unchecked. A legacy-format file is checked by the load
    itself: a failure to read it becomes a :class:`CheckpointError` naming the file.
    Installing twice is a no-op.
    """
    current = strategy.load_checkpoint
    if getattr(current, "_lightning_optim_verifies", False):
        return

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        name = os.fspath(checkpoint_path) if isinstance(checkpoint_path, (str, os.PathLike)) else None
        if name is None or not os.path.isfile(name):
            return current(checkpoint_path, *args, **kwargs)
        if _verify(name, load_legacy=False) == "legacy":
            try:
                return current(checkpoint_path, *args, **kwargs)
            except Exception as err:
                raise _legacy_error(name, err) from err
        return current(checkpoint_path, *args, **kwargs)

    load_checkpoint._lightning_optim_verifies = True  # type: ignore[attr-defined]
    strategy.load_checkpoint = load_checkpoint
