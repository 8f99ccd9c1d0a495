"""Runs you can kill: atomic, committed checkpoints and the choice of what to resume from.

Used by ``python -m lightning_optim.train`` (``checkpoint.every_n_steps``, ``resume``); the
two Lightning pieces work in any Trainer.

**Atomic.** :class:`AtomicCheckpointIO` (a ``Trainer(plugins=[...])`` CheckpointIO) writes
every checkpoint with :func:`lightning_optim.checkpoint.atomic_write`: temporary file, fsync,
``os.replace``. Lightning's own ``TorchCheckpointIO`` goes through an fsspec transaction,
which moves a temporary file too but does not fsync it; and a kill during that move on
another file system leaves a cut file.

**Committed.** Lightning saves an ``every_n_train_steps`` checkpoint in
``on_train_batch_end`` of the batch that made optimizer step k, but the metrics of that batch
are logged afterwards (at Lightning's step k-1), and so is a validation that falls on it; a
run resumed from that checkpoint skips both (Lightning fast-forwards them), so a kill in
between would leave them missing for good. :class:`StepCheckpoint` therefore serializes the
checkpoint at that moment (its content is Lightning's, unchanged) but writes it only when the
iteration is over: at the next batch's start or at the end of training, after the loggers
have saved what they hold. Whatever checkpoint is on disk, the metrics of every step before
it are on disk too; rows of later steps are cut by the resumed run
(:func:`lightning_optim.integration.loggers.cut_metrics`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ..checkpoint import CheckpointError, atomic_write, checkpoint_step, newest_intact_checkpoint, verify_checkpoint
from ..compat import hooked_model_checkpoint, save_last_checkpoint_if_due
from ..validation import ConfigurationError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` that writes each file atomically (see the module
    docstring); while :attr:`defer` is set, saves are kept in memory, serialized, until
    :meth:`flush`. Local paths only."""

    def __init__(self) -> None:
        super().__init__()
        self.defer = False
        self.pending: dict[str, bytes] = {}  # path -> serialized checkpoint, in save order

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        if self.defer:
            self.pending.pop(os.fspath(path), None)  # a re-save goes to the end of the queue
            self.pending[os.fspath(path)] = buffer.getvalue()
        else:
            atomic_write(buffer.getvalue(), path)

    def remove_checkpoint(self, path: Any) -> None:
        if self.pending.pop(os.fspath(path), None) is not None and not os.path.exists(path):
            return
        super().remove_checkpoint(path)

    def flush(self) -> None:
        """Write the deferred checkpoints, oldest first."""
        while self.pending:
            path = next(iter(self.pending))
            atomic_write(self.pending.pop(path), path)


class StepCheckpoint(hooked_model_checkpoint()):  # type: ignore[misc]
    """A checkpoint every ``every_n_steps`` optimizer steps (``epoch=E-step=S.ckpt``, the
    newest ``keep`` of them kept, -1 all) and ``last.ckpt``, committed after the iteration's
    metrics (module docstring; needs :class:`AtomicCheckpointIO` as the Trainer's CheckpointIO,
    else it saves as ``ModelCheckpoint`` does). ``last.ckpt`` is also written at the end of
    training when the last step is no multiple of ``every_n_steps``.

    A ``ModelCheckpoint`` whose base (:func:`.compat.hooked_model_checkpoint`) routes each
    file write through :meth:`around_save`; Lightning's own step for that is private."""

    def __init__(self, dirpath: str | os.PathLike, every_n_steps: int, keep: int = 2) -> None:
        # Without a monitor Lightning keeps 1 or all; "step" (always among its candidates)
        # with mode max keeps the newest `keep`.
        ranked = {"monitor": "step", "mode": "max"} if keep > 1 else {}
        # No "-v1" names: a resumed run rewrites the files of the steps after its checkpoint
        # (the killed run's, or damaged ones), atomically, under the names they had.
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_steps, save_top_k=keep, save_last=True,
                         enable_version_counter=False, **ranked)

    @staticmethod
    def _io(trainer: pl.Trainer) -> AtomicCheckpointIO | None:
        checkpoint_io = trainer.strategy.checkpoint_io
        return checkpoint_io if isinstance(checkpoint_io, AtomicCheckpointIO) else None

    def around_save(self, trainer: pl.Trainer, save: Callable[[], None]) -> None:
        checkpoint_io = self._io(trainer)
        if checkpoint_io is None:
            return save()
        checkpoint_io.defer = True
        try:
            save()
        finally:
            checkpoint_io.defer = False

    def _commit(self, trainer: pl.Trainer) -> None:
        checkpoint_io = self._io(trainer)
        if checkpoint_io is None or not checkpoint_io.pending:
            return
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.save()  # the metrics before the checkpoint's step reach the disk first
        checkpoint_io.flush()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._commit(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        save_last_checkpoint_if_due(self, trainer)
        self._commit(trainer)


def _used(run_dir: Path) -> list[str]:
    """What in ``run_dir`` belongs to an earlier run: checkpoints, a metrics log, W&B runs."""
    found = sorted(str(p) for p in (run_dir / "checkpoints").glob("*.ckpt"))
    found += [str(p) for p in [run_dir / "logs" / "metrics.csv"] if p.is_file()]
    found += sorted(str(p) for p in (run_dir / "wandb").glob("*run-*") if p.is_dir())
    found += sorted(str(p) for p in (run_dir / "logs").glob("events.out.tfevents.*"))
    return found


def resolve_resume(resume: Any, run_dir: str | os.PathLike) -> tuple[Path | None, int, list[str]]:
    """The checkpoint a run in ``run_dir`` starts from, for the config value ``resume``.

    - ``None``: a new run, so ``run_dir`` must not hold an earlier run's checkpoints or
      metrics (refused, naming both ways on: ``resume=auto`` or another ``hydra.run.dir``).
    - ``"auto"``: the newest intact checkpoint of ``run_dir/checkpoints``
      (:func:`~lightning_optim.checkpoint.newest_intact_checkpoint`; damaged ones are passed
      over, each named in the returned notes); None when there is none yet (the run starts
      from its first step).
    - a path: that file, verified.

    Returns ``(checkpoint or None, its global_step (0 for None), notes)``. Raises
    ``ConfigurationError`` naming ``resume``.
    """
    run_dir = Path(run_dir)
    if resume is None:
        used = _used(run_dir)
        if used:
            shown = ", ".join(used[:3]) + (f" and {len(used) - 3} more" if len(used) > 3 else "")
            raise ConfigurationError(
                f"resume: the run directory {str(run_dir)!r} holds an earlier run ({shown}): continue it with "
                f"resume=auto, or start a new run with another hydra.run.dir=...; nothing was changed"
            )
        return None, 0, []
    if not isinstance(resume, str) or not resume:
        raise ConfigurationError(f"resume: resume={resume!r} is invalid: must be auto or the path of a .ckpt file")
    if resume == "auto":
        try:
            found = newest_intact_checkpoint(run_dir / "checkpoints")
        except CheckpointError as err:
            raise ConfigurationError(f"resume: {err}") from err
        if found is None:
            return None, 0, [f"resume=auto: no checkpoint in {str(run_dir / 'checkpoints')!r} yet: the run starts "
                          "from its first step"]
        path, step, skipped = found
        notes = [f"warning: resume=auto skipped {message}" for message in skipped]
        return path, step, [*notes, f"resume=auto: continuing from {str(path)!r} (step {step})"]
    path = Path(resume)
    try:
        verify_checkpoint(path)
        step = checkpoint_step(path)
    except (CheckpointError, FileNotFoundError) as err:
        raise ConfigurationError(f"resume: {err}") from err
    return path, step, [f"resume: continuing from {str(path)!r} (step {step})"]


# Keys a resumed run must share with the run it continues: other values would load the
# checkpoint into another model or train it on other data.
FIXED = ("model", "data", "seed")


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def config_changes(cfg: DictConfig, run_dir: str | os.PathLike) -> list[str]:
    """What a run resumed in ``run_dir`` with ``cfg`` changes against the config the run was
    started with (Hydra's ``run_dir/.hydra/config.yaml``, before this run replaces it): one
    ``key (old there, new here)`` per differing key, ``resume`` and ``hydra`` aside.

    Raises ``ConfigurationError`` when a key of :data:`FIXED` differs (``data.cache_dir``
    aside); a run continued with other values elsewhere (a longer ``trainer.max_steps``, another
    logger) is no longer the uninterrupted run's twin, which the caller says.
    """
    stored = Path(run_dir) / ".hydra" / "config.yaml"
    if not stored.is_file():
        return []
    old = _flat(OmegaConf.to_container(OmegaConf.load(stored), resolve=False))
    new = _flat(OmegaConf.to_container(cfg, resolve=False))
    keys = sorted(k for k in old.keys() | new.keys()
                  if k.split(".")[0] not in ("hydra", "resume") and old.get(k, "<unset>") != new.get(k, "<unset>"))
    changes = [f"{k} ({old.get(k, '<unset>')!r} there, {new.get(k, '<unset>')!r} here)" for k in keys]
    fixed = [c for k, c in zip(keys, changes) if k.split(".")[0] in FIXED and k != "data.cache_dir"]
    if fixed:
        raise ConfigurationError(
            f"resume: the run in {str(run_dir)!r} was started with another model or data: {'; '.join(fixed)}; "
            f"resume it with the overrides it was started with ({stored.parent / 'overrides.yaml'})"
        )
    return changes
