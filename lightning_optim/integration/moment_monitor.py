"""``MomentMonitor``: optimizer moment statistics, logged through the Trainer's loggers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from ..compat import lightning_log_step
from .loggers import log_histograms, log_metrics
from .optimizer_callback import OptimizerCallback, unscale_for_fused_amp

__all__ = ["MomentMonitor"]


class MomentMonitor(Callback):
    """Log optimizer moment statistics through the Trainer's loggers.

    Every ``every_n_steps`` optimizer steps it logs, per monitored parameter,
    ``optim/<stat>/<parameter name>`` for the stats of :data:`lightning_optim.stats.STATS`
    (grad norm before clipping, param norm, update ratio, ||m_hat||, mean and max of
    sqrt(v_hat), second-moment drift and log-ratio since the previous log, pseudo-SNR, dead
    fraction); per group ``optim/clipped_fraction/<group>`` (with an OptimizerCallback) and
    ``optim/lr/<group>`` (without one, which logs it every step). Every
    ``expensive_every_n_steps`` it adds, for each embedding (a tensor in a coupled group, or
    an ``nn.Embedding`` weight), ``embedding/mean_norm|mean_ratio|isotropy/<name>``, and for
    W&B histograms ``optim/log10_sqrt_v/<name>``.

    The statistics are device tensors (:mod:`lightning_optim.stats`); they reach the host
    once per log, in :func:`lightning_optim.integration.loggers.log_metrics`, on rank zero. Steps that
    do not log cost nothing. Under DDP the gradients and parameters are identical on every
    rank after the all-reduce, so the statistics are too.

    Works with the lightning_optim optimizers and with ``torch.optim`` Adam/AdamW/SGD. To see
    gradients before clipping it runs its ``on_before_optimizer_step`` before any
    OptimizerCallback's (it moves itself ahead of them in ``trainer.callbacks``).

    **Cadence and step axis.** It logs after the optimizer steps ``k = every_n_steps,
    2*every_n_steps, ...`` (``k`` counts the steps Lightning has run, 1-based, skipped ones
    included: ``trainer.global_step`` once the step is done), whatever the Trainer's
    ``log_every_n_steps``: it writes to ``trainer.loggers`` itself, as Lightning's
    ``LearningRateMonitor`` does, not through ``LightningModule.log``. The metrics of step ``k``
    are logged at step ``k - 1``: the step value Lightning gives that batch's own metrics
    (``self.log("train/loss", ...)`` in ``training_step``, ``LearningRateMonitor``), so a
    monitor row and the loss of the batch that completed the same optimizer step share one
    x value. With ``every_n_steps=10`` the rows are at steps 9, 19, 29, where
    ``log_every_n_steps=10`` puts Lightning's. Under gradient accumulation an optimizer step
    spans several batches; its statistics are taken on the last one, the one that steps, and
    share its step value.

    Args: the fields of :class:`lightning_optim.config.MonitorConfig` (the ``monitor`` node),
    by the same names, so ``MomentMonitor(**node)`` builds it from the Hydra node or a plain
    dict. ``enabled=False`` (the ``off`` node) gives a monitor that does nothing: no
    statistics, no logging, no state.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        expensive_every_n_steps: int = 500,
        stats: Sequence[str] | None = None,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        update_ratio: bool = True,
        embeddings: bool = True,
        histograms: bool = True,
        drift_max_elements: int = 1 << 20,
        enabled: bool = True,
    ) -> None:
        super().__init__()
        from ..config import MonitorConfig

        self.config = MonitorConfig(
            every_n_steps=every_n_steps, expensive_every_n_steps=expensive_every_n_steps,
            stats=stats, include=include, exclude=exclude, update_ratio=update_ratio,
            embeddings=embeddings, histograms=histograms, drift_max_elements=drift_max_elements,
            enabled=enabled,
        )
        self.stats: Any = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending_step: int | None = None
        self._last_clips: dict[str, int] = {}
        self._last_step = 0
        self._pending_state: dict[str, Any] | None = None

    @override
    def state_dict(self) -> dict[str, Any]:
        """What the first log after a resume needs to read as an uninterrupted run's: the
        drift references (``v_drift``, ``v_log_ratio``) and the clip counts and step of the
        previous log (``clipped_fraction``)."""
        if self.stats is None and self._pending_state is not None:
            return dict(self._pending_state)  # resumed, no log yet (or disabled): pass the state on
        if not self.config.enabled:
            return {}
        return {"stats": self.stats.state_dict() if self.stats is not None else None,
                "last_clips": dict(self._last_clips), "last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_clips = dict(state_dict.get("last_clips", {}))
        self._last_step = int(state_dict.get("last_step", 0))
        self._pending_state = dict(state_dict)  # the stats are built at the first log
        if self.stats is not None:
            self._apply_pending_state()

    def _apply_pending_state(self) -> None:
        state, self._pending_state = self._pending_state, None
        if state is not None and state.get("stats") is not None:
            self.stats.load_state_dict(state["stats"])

    @classmethod
    def from_config(cls, node: Any) -> MomentMonitor | None:
        """The older spelling of ``MomentMonitor(**node)``, kept for code that uses it: the
        same monitor, except that a node with ``enabled: false`` gives None."""
        from ..config import monitor_config

        cfg = monitor_config(node)
        return cls(**vars(cfg)) if cfg.enabled else None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.config.enabled:
            return
        callbacks = trainer.callbacks
        mine = callbacks.index(self)
        first = next((i for i, cb in enumerate(callbacks) if isinstance(cb, OptimizerCallback)), None)
        if first is not None and first < mine:
            callbacks.insert(first, callbacks.pop(mine))

    def _optimizer_callback(self, trainer: pl.Trainer) -> OptimizerCallback | None:
        return next((cb for cb in trainer.callbacks if isinstance(cb, OptimizerCallback)), None)

    def _ensure_stats(self, optimizer: torch.optim.Optimizer) -> None:
        if self.stats is None or self._optimizer is not optimizer:
            from ..stats import MomentStats

            c = self.config
            self.stats = MomentStats(optimizer, stats=c.stats, include=c.include, exclude=c.exclude,
                                     drift_max_elements=c.drift_max_elements)
            self._optimizer = optimizer
            self._apply_pending_state()

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        step = trainer.global_step + 1  # the step about to be taken, 1-based
        if not self.config.enabled or step % self.config.every_n_steps:
            return
        unscale_for_fused_amp(trainer, optimizer)
        self._ensure_stats(optimizer)
        self.stats.before_step(update_ratio=self.config.update_ratio)
        self._pending_step = step

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._pending_step is None or trainer.global_step < self._pending_step:
            return  # no log this step, or still accumulating toward it
        step, self._pending_step = self._pending_step, None
        metrics: dict[str, Any] = dict(self.stats.after_step())
        optimizer = self._optimizer
        names = [g.get("name", f"group{i}") for i, g in enumerate(optimizer.param_groups)]
        owner = self._optimizer_callback(trainer)
        if owner is None:
            for name, group in zip(names, optimizer.param_groups):
                metrics[f"optim/lr/{name}"] = float(group["lr"])
        else:
            clips = owner.clipper.group_clipped_steps
            steps = max(step - self._last_step, 1)
            for name in names:
                metrics[f"optim/clipped_fraction/{name}"] = (clips.get(name, 0) - self._last_clips.get(name, 0)) / steps
            self._last_clips, self._last_step = dict(clips), step
        expensive = step % self.config.expensive_every_n_steps == 0
        if self.config.embeddings:
            metrics.update(self.stats.embedding_stats(self._embeddings(pl_module, optimizer), isotropy=expensive))
        at = lightning_log_step(trainer)
        log_metrics(trainer, metrics, at)
        if expensive and self.config.histograms:
            log_histograms(trainer, {f"optim/log10_sqrt_v/{k}": v.clamp_min(1e-30).log10() for k, v in self.stats.sqrt_v().items()}, at)

    @staticmethod
    def _embeddings(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        """Tensors whose rows are embeddings: coupled groups, and nn.Embedding weights."""
        found: dict[str, torch.Tensor] = {}
        for group in optimizer.param_groups:
            if group.get("coupled"):
                for i, p in enumerate(group["params"]):
                    name = (group.get("param_names") or [f"{group.get('name', 'group')}.{i}"] * len(group["params"]))[i]
                    found[name] = p
        for name, mod in module.named_modules():
            if isinstance(mod, torch.nn.Embedding) and mod.weight.requires_grad:
                if not any(mod.weight is t for t in found.values()):
                    found[f"{name}.weight" if name else "weight"] = mod.weight
        return found
