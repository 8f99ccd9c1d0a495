"""``OptimizerCallback``: the optimizer, schedule, clipping and accumulation for any LightningModule.

What it does, in the order Lightning calls it:

1. ``setup``: refuses what cannot work (manual optimization, the Trainer's own
   ``gradient_clip_val`` or ``accumulate_grad_batches`` next to ours) and puts its own
   ``configure_optimizers`` on the module, so that Lightning builds our optimizer (already
   done when Lightning assigned the callback's ``log``, before it checks that the module has
   a ``configure_optimizers``: see the ``log`` setter).
2. ``configure_optimizers`` (ours): splits the module with :func:`param_groups`, builds the
   optimizer from the registry and the LR schedule, and logs once what it replaced.
   The optimizer's ``step`` is wrapped so that a step can be skipped and the schedule
   advances only with steps actually taken.
3. ``on_train_batch_start``: sets ``trainer.accumulate_grad_batches`` from the
   accumulation schedule, and zeroes the gradients at the start of a window that Lightning
   would not zero (see :mod:`lightning_optim.accumulation`); ``on_after_backward`` of a
   window's last micro-batch turns the summed gradients into the window's mean.
4. ``on_before_optimizer_step`` (grads complete, and unscaled under 16-mixed): clips,
   checks for non-finite gradients (the one host sync of a step) and logs the pre-clip norms.
5. ``state_dict``: the schedule, the clip counters, the accumulation position (and, written
   mid-window in one process, the gradients accumulated so far) and the count of steps
   taken, so a resumed run continues exactly.

Lightning's private attributes and torch's AMP internals are reached only through
:mod:`lightning_optim.compat`.

The LR schedule is stepped by this callback after each step taken, not by Lightning, so a
skipped step leaves it unchanged; it is therefore not in ``trainer.lr_scheduler_configs``,
and the callback logs ``optim/lr/<group>`` itself.
"""

from __future__ import annotations

import logging
import math
import types
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from ..accumulation import Accumulator
from ..config import accumulation_config, clipping_config, optimizer_config, partition_config, scheduler_config
from ..partition import param_groups, summarize
from ..registry import REGISTRY, create_optimizer
from ..schedules import build_scheduler, describe
from ..validation import ConfigurationError, LightningOptimWarning
from .. import compat
from .checkpoint_guard import guard_checkpoint_loading
from .loggers import log_metrics

__all__ = ["OptimizerCallback", "unscale_for_fused_amp"]

log = logging.getLogger("lightning_optim")


class OptimizerCallback(Callback):
    """Plug a lightning_optim optimizer, LR schedule, clipping and accumulation into a LightningModule.

    Each argument takes the mapping of its Hydra config node, a name, or the dataclass of
    :mod:`lightning_optim.config`::

        OptimizerCallback(
            optimizer={"name": "coupled_adam", "lr": 3e-4, "betas": [0.9, 0.95]},
            scheduler={"name": "warmup_cosine", "warmup_steps": 100},
            clipping={"mode": "norm", "max_norm": 1.0},
            accumulation={0: 1, 200: 4},
            partition={"rules": [{"match": "lm_head.*", "lr": 1e-4}]},
        )

    Everything is checked here, before training starts. The module's own
    ``configure_optimizers`` (if any) is replaced; the log says what it returned.
    Manual optimization is not supported: it raises in ``setup``.
    """

    def __init__(
        self,
        optimizer: Any = "adamw",
        scheduler: Any = None,
        clipping: Any = None,
        accumulation: Any = None,
        partition: Any = None,
    ) -> None:
        super().__init__()
        self.optimizer_config = optimizer_config(optimizer)
        self.scheduler_config = scheduler_config(scheduler) if scheduler is not None else None
        self.clipping_config = clipping_config(clipping)
        self.accumulation_config = accumulation_config(accumulation)
        self.partition_config = partition_config(partition)
        self.partition_config.check_options(self.optimizer_config)
        self.clipper = self.clipping_config.build()
        schedule = self.accumulation_config.build()
        self.accumulator = None if schedule.points == {0: 1} else Accumulator(schedule)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.steps_taken = 0
        self._skip = False
        self._pending_state: dict[str, Any] | None = None
        self._window_scaled = False  # the open window's gradients already hold its mean
        self._pending_grads: list[torch.Tensor | None] | None = None  # an open window's, from a checkpoint
        self._resumed_open_window = False
        self._warned_mid_window = False
        self._fit_trainer: pl.Trainer | None = None  # set in setup, for the hooks Lightning calls without it

    # ----- setup --------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ConfigurationError(
                "OptimizerCallback: automatic_optimization=False is not supported: with manual "
                "optimization your training_step calls the optimizer itself, so the callback cannot "
                "clip, skip or accumulate around it. Use automatic optimization, or build the "
                "optimizer with lightning_optim.create_optimizer(config, self) in configure_optimizers."
            )
        if trainer.gradient_clip_val is not None and self.clipping_config.mode != "none":
            raise ConfigurationError(
                f"OptimizerCallback: Trainer(gradient_clip_val={trainer.gradient_clip_val!r}) and "
                f"clipping mode {self.clipping_config.mode!r} are both set: choose one. Drop "
                "gradient_clip_val, or pass clipping={'mode': 'none'}."
            )
        if self.accumulator is not None and trainer.accumulate_grad_batches != 1:
            raise ConfigurationError(
                f"OptimizerCallback: Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches!r}) "
                f"and an accumulation schedule ({self.accumulator.schedule.describe()}) are both set: "
                "choose one."
            )
        if self.accumulator is not None and trainer.strategy.handles_gradient_accumulation:
            raise ConfigurationError(
                f"OptimizerCallback: strategy {type(trainer.strategy).__name__} accumulates gradients itself, "
                f"so an accumulation schedule ({self.accumulator.schedule.describe()}) cannot set its windows: "
                "drop the schedule and use the strategy's own accumulation setting."
            )
        if isinstance(trainer.strategy, FSDPStrategy):
            raise ConfigurationError(
                "OptimizerCallback: strategy=FSDPStrategy (FSDP1) is not supported: it hands the "
                "optimizer flattened 1-D shards, which have lost the shapes the partition, CoupledAdam's "
                "shared rows and the clip norm need. Use ModelParallelStrategy with fully_shard in "
                "configure_model (FSDP2): see README, 'Distributed training'."
            )
        self._install(pl_module)
        self._fit_trainer = trainer
        # Refuse a truncated or corrupted checkpoint by name before Lightning loads it. The
        # path is not known yet (trainer.ckpt_path is set in the same call that loads the
        # file, after this hook), so the check wraps the strategy's load_checkpoint.
        guard_checkpoint_loading(trainer.strategy)

    def _install(self, pl_module: pl.LightningModule) -> None:
        """Put our configure_optimizers on the module (once per module)."""
        current = pl_module.configure_optimizers
        if getattr(current, "_lightning_optim_callback", None) is self:
            return
        # A second fit() finds an earlier callback's function in place: reach for the module's own.
        original = getattr(current, "_lightning_optim_original", current)
        overridden = original is not current or is_overridden("configure_optimizers", pl_module)
        callback = self

        def configure_optimizers() -> Any:
            return callback._configure(pl_module.trainer, pl_module, original if overridden else None)

        # An instance attribute wins over the class method, and Lightning's override check
        # compares code objects, so a module without configure_optimizers passes it too.
        configure_optimizers._lightning_optim_original = original  # type: ignore[attr-defined]
        configure_optimizers._lightning_optim_callback = self  # type: ignore[attr-defined]
        pl_module.configure_optimizers = configure_optimizers

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """After fit, take our configure_optimizers off the module again (the next fit puts it
        back): it is a closure over this callback and so over the trainer, which would make
        the trained module fail to pickle (``torch.save(model)``) and drag the trainer into a
        ``copy.deepcopy(model)``."""
        current = pl_module.__dict__.get("configure_optimizers")
        if stage != "fit" or getattr(current, "_lightning_optim_callback", None) is not self:
            return
        original = current._lightning_optim_original
        if (getattr(original, "__self__", None) is pl_module
                and getattr(original, "__func__", None) is getattr(type(pl_module), "configure_optimizers", None)):
            del pl_module.__dict__["configure_optimizers"]  # the class's method shows through again
        else:
            pl_module.__dict__["configure_optimizers"] = original  # the module's own attribute

    # Why a ``log`` setter and not just ``setup``: Trainer._run checks that the module overrides
    # configure_optimizers (``_verify_loop_configurations``) before it calls any callback hook,
    # so for a module that defines none, ``setup`` comes too late and Lightning raises "No
    # `configure_optimizers()` method defined". Just before that check it hands every callback
    # the module's ``log`` (``_CallbackConnector._attach_model_logging_functions``): the earliest
    # moment a callback sees the module, so install there. Checked on lightning 2.6.6, present
    # since 2.4.0 (tests/test_compat.py checks the order; test_callback.py's
    # test_log_setter_is_what_lets_a_module_without_configure_optimizers_train shows the failure
    # without it). ``setup`` installs again, which is all a module with its own method needs.
    @property
    def log(self) -> Any:
        return self.__dict__.get("_log")

    @log.setter
    def log(self, fn: Any) -> None:
        self.__dict__["_log"] = fn
        module = getattr(fn, "__self__", None)
        if isinstance(module, pl.LightningModule):
            self._install(module)

    def _configure(self, trainer: pl.Trainer, module: pl.LightningModule, original: Any) -> Any:
        cfg, part = self.optimizer_config, self.partition_config
        cls = REGISTRY[cfg.name].cls
        groups = param_groups(
            module, rules=part.rules, weight_decay=part.weight_decay,
            coupled=cls.couples if part.coupled is None else part.coupled,
        )
        optimizer = create_optimizer(cfg.name, groups, **cfg.kwargs())
        replaced = _describe(original()) if original is not None else None
        self.optimizer = optimizer
        self._wrap_step(optimizer)
        if self.scheduler_config is not None:
            total = self.scheduler_config.total_steps or self._total_steps(trainer)
            try:
                self.scheduler = build_scheduler(optimizer, self.scheduler_config.name, **self.scheduler_config.options(total))
            except ValueError as err:
                raise ConfigurationError(f"{err} (this run takes {total} optimizer steps)") from err
        self._apply_pending_state()
        what = f"{type(optimizer).__name__}({', '.join(f'{k}={v}' for k, v in cfg.kwargs().items())}) over {summarize(groups)}"
        what += f" on backend {optimizer.backend} ({optimizer.backend_reason})"
        if self.scheduler_config is not None:
            what += f"; schedule {describe(self.scheduler_config.name, **self.scheduler_config.options(total))}"
        what += f"; clipping {self.clipper.describe()}"
        if self.accumulator is not None:
            what += f"; {self.accumulator.schedule.describe()}"
        if replaced is None:
            rank_zero_info(f"OptimizerCallback: the module defines no configure_optimizers(); using {what}")
        else:
            rank_zero_info(f"OptimizerCallback: replacing the module's configure_optimizers() result ({replaced}) with {what}")
        return optimizer

    def _total_steps(self, trainer: pl.Trainer) -> int:
        """Optimizer steps in the whole run, for a schedule given no ``total_steps``."""
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return trainer.max_steps
        estimated = trainer.estimated_stepping_batches  # also sizes the train dataloader
        if self.accumulator is None:
            return int(estimated)
        batches = trainer.num_training_batches
        if trainer.max_epochs is None or trainer.max_epochs < 0 or batches == float("inf"):
            raise ConfigurationError(
                f"OptimizerCallback: scheduler {self.scheduler_config.name!r} needs total_steps, and this "
                "run has neither max_steps nor a finite max_epochs: set scheduler.total_steps."
            )
        return self.accumulator.count_steps(int(batches), int(trainer.max_epochs))

    def _wrap_step(self, optimizer: torch.optim.Optimizer) -> None:
        inner = optimizer.step
        callback = self

        def step(self: torch.optim.Optimizer, closure: Any = None, **kwargs: Any) -> Any:
            # The closure runs forward, backward and on_before_optimizer_step, where the
            # skip decision is made; under 16-mixed the scaler calls us without a closure.
            loss = closure() if closure is not None else None
            if callback._skip:
                return loss
            inner(**kwargs)
            callback.steps_taken += 1
            if callback.scheduler is not None:
                callback.scheduler.step()
            return loss

        optimizer.step = types.MethodType(step, optimizer)

    # ----- around each step ---------------------------------------------------------------

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        acc = self.accumulator
        if acc is None:
            return
        resumed_open = self._resumed_open_window
        self._resumed_open_window = False
        if resumed_open and self._pending_grads is not None:
            # The first batch after a mid-window checkpoint: put back what the window had summed.
            params = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
            for p, saved in zip(params, self._pending_grads, strict=True):
                p.grad = None if saved is None else saved.to(device=p.device, dtype=p.dtype)
            resumed_open = False
        self._pending_grads = None
        trainer.accumulate_grad_batches = acc.on_batch_start(batch_idx, self.steps_taken, trainer.current_epoch)
        if acc.seen == 1:
            self._window_scaled = False
        if acc.must_zero_grad(batch_idx) or resumed_open:
            # Lightning zeroes only where batch_idx % accumulate_grad_batches == 0; run its own
            # zero_grad path (hooks, the module's optimizer_zero_grad, its progress counters).
            compat.zero_grad_as_lightning(trainer, batch_idx, trainer.optimizers[0])

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release_accumulation(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release_accumulation(trainer)

    def _release_accumulation(self, trainer: pl.Trainer) -> None:
        """Give the Trainer back its accumulate_grad_batches = 1: the last window's k left there
        would read as the user's own setting in the next fit's setup check."""
        if self.accumulator is not None:
            trainer.accumulate_grad_batches = 1

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the window's last backward (under DDP: the synchronized one) the gradients are
        # sum_b g_b / k; make them the mean here, before any on_before_optimizer_step (the
        # MomentMonitor's gradient statistics, clipping) reads them.
        if self.accumulator is not None and not compat.should_accumulate(trainer):
            self._scale_window(trainer.optimizers[0])

    def _scale_window(self, optimizer: torch.optim.Optimizer) -> None:
        if self._window_scaled:
            return
        self._window_scaled = True
        scale = self.accumulator.step_scale()
        if scale != 1.0:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch._foreach_mul_(grads, scale)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Lightning reports the loss divided by accumulate_grad_batches (k); report it divided by
        # the window's size n, as with a fixed accumulate_grad_batches = n.
        if self.accumulator is not None and isinstance(outputs, dict) and torch.is_tensor(outputs.get("loss")):
            scale = self.accumulator.loss_scale()
            if scale != 1.0:
                outputs["loss"] = outputs["loss"] * scale

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        unscale_for_fused_amp(trainer, optimizer)
        if self.accumulator is not None:
            self._scale_window(optimizer)  # not done yet if the last micro-batch had no backward
            self.accumulator.close()
        report = self.clipper.clip_(optimizer)
        self._skip = self.clipper.should_skip(report)
        if self._skip:
            self._say_skipped(trainer, report)
        metrics: dict[str, Any] = {"optim/grad_norm_total": report.total_norm}
        for name, norm in report.group_norms.items():
            metrics[f"optim/grad_norm/{name}"] = norm
            metrics[f"optim/clipped/{name}"] = report.clipped[name].float()
        for i, group in enumerate(optimizer.param_groups):
            metrics[f"optim/lr/{group.get('name', f'group{i}')}"] = float(group["lr"])
        metrics["optim/skipped_steps"] = float(self.clipper.skipped_steps)
        metrics["optim/clipped_steps"] = float(self.clipper.clipped_steps)
        if self.accumulator is not None:
            metrics["optim/accumulation"] = float(self.accumulator.micro_batches)  # what this step averaged
        # Two paths, one job each; neither can do the other's. To the loggers directly (rank zero):
        # every optimizer step whatever the Trainer's log_every_n_steps, at the step value Lightning
        # gives this batch's own metrics, as MomentMonitor does (self.log would follow
        # log_every_n_steps). Into callback_metrics through log_dict(logger=False): Lightning's public
        # way to feed a ModelCheckpoint/EarlyStopping monitor or the progress bar (writing to the
        # loggers does not, and callback_metrics has no public setter). should_skip has just waited
        # for the norms, so reading them here costs no stall.
        log_metrics(trainer, metrics, compat.lightning_log_step(trainer))
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=False)

    def _say_skipped(self, trainer: pl.Trainer, report: Any) -> None:
        """One console line (rank zero, the ``lightning_optim`` logger) at the 1st, 2nd, 4th,
        8th, ... skipped step of the run: a burst of non-finite steps prints a few lines, a
        diverging run cannot flood the console, and the count of skips is in the line."""
        skipped = self.clipper.skipped_steps
        if skipped & (skipped - 1) or not trainer.is_global_zero:  # not a power of two
            return
        bad = [name for name, norm in report.group_norms.items() if not math.isfinite(float(norm))]
        where = f"in group(s) {', '.join(bad)}" if bad else "(the total norm overflowed)"
        since = f", {skipped - skipped // 2} since the last message" if skipped > 1 else ""
        log.warning(
            f"OptimizerCallback: skipped the optimizer step at global_step {trainer.global_step}: non-finite "
            f"gradients {where}; parameters, optimizer state and LR schedule unchanged. {skipped} step(s) "
            f"skipped so far{since}; they count toward max_steps. Next message at {2 * skipped} skips."
        )

    # ----- checkpoints --------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {
            "steps_taken": self.steps_taken,
            "clipper": self.clipper.state_dict(),
            "accumulator": self.accumulator.state_dict() if self.accumulator is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "optimizer_name": self.optimizer_config.name,
        }
        if self.accumulator is not None and self.accumulator.open and self.optimizer is not None:
            state["accumulated_grads"] = self._open_window_grads()
        return state

    def _open_window_grads(self) -> list[torch.Tensor | None] | None:
        """The gradients an open window has summed so far, for a checkpoint written mid-window;
        None under several processes, where each rank holds its own partial sum (warned once)."""
        trainer = self._fit_trainer
        if trainer is not None and trainer.world_size > 1:
            if not self._warned_mid_window:
                self._warned_mid_window = True
                rank_zero_warn(
                    "OptimizerCallback: this checkpoint is written in the middle of an accumulation window "
                    f"({self.accumulator.seen} of {self.accumulator.size} micro-batches) under "
                    f"{trainer.world_size} processes; the ranks' partial gradients are not saved, so a run "
                    "resumed from it averages only the window's micro-batches after the checkpoint. "
                    "ModelCheckpoint(every_n_train_steps=...) writes after a step, where no window is open.",
                    category=LightningOptimWarning,
                )
            return None
        return [None if p.grad is None else p.grad.detach().clone()
                for g in self.optimizer.param_groups for p in g["params"]]

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("optimizer_name")
        if saved is not None and saved != self.optimizer_config.name:
            raise ConfigurationError(
                f"OptimizerCallback: the checkpoint was trained with optimizer {saved!r}, this run "
                f"asks for {self.optimizer_config.name!r}: their states are not interchangeable."
            )
        self._pending_state = dict(state_dict)
        if self.optimizer is not None:  # strategies that restore after setup
            self._apply_pending_state()

    def _apply_pending_state(self) -> None:
        state, self._pending_state = self._pending_state, None
        if state is None:
            return
        self.steps_taken = int(state["steps_taken"])
        self.clipper.load_state_dict(state["clipper"])
        if self.accumulator is not None and state.get("accumulator") is not None:
            self.accumulator.load_state_dict(state["accumulator"])
            if self.accumulator.open:  # written mid-window: its gradients come back at the next batch
                self._pending_grads = state.get("accumulated_grads")
                self._resumed_open_window = True
                self._window_scaled = False
                if self._pending_grads is None:
                    self.accumulator.lose_window()
                    rank_zero_warn(
                        "OptimizerCallback: resuming in the middle of an accumulation window whose gradients "
                        f"the checkpoint does not hold ({self.accumulator.lost} of {self.accumulator.size} "
                        "micro-batches lost): the window's step averages the micro-batches after the resume.",
                        category=LightningOptimWarning,
                    )
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        # Let Lightning set the train loader up again once it has restored its loops. A schedule
        # without total_steps reads trainer.estimated_stepping_batches in configure_optimizers,
        # which sets the train loader up (and starts its iterator) before the loops are restored;
        # Lightning then keeps that loader and never loads the checkpoint's dataloader state into
        # it, so a stateful loader (data.ResumableDataLoader) would start the interrupted
        # epoch over. Dropping it, as Lightning's own tuner does, makes the fit loop build it
        # again after the restore, with the saved state.
        if self._fit_trainer is not None:
            compat.drop_train_dataloader(self._fit_trainer)


def unscale_for_fused_amp(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
    """Unscale the AMP gradients before clipping and statistics read them, once per step.

    Lightning's ``MixedPrecision`` plugin unscales before ``on_before_optimizer_step``, except
    for optimizers that take the scale themselves (:func:`.compat.takes_amp_scale`: our
    ``triton`` backend, torch's ``fused=True`` Adam): for those it leaves the gradients
    scaled, and a clip norm or a statistic would be off by the scale. ``GradScaler.unscale_``
    launches kernels only (no host sync) and records ``found_inf``; the fused step then
    gets ``grad_scale=None`` and applies only ``found_inf``, on the device."""
    if not compat.takes_amp_scale(optimizer):
        return
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return
    if compat.scaler_ready_to_unscale(scaler, optimizer):
        scaler.unscale_(optimizer)


def _describe(result: Any) -> str:
    """Name what a configure_optimizers() returned: optimizers and schedulers by class."""
    if result is None:
        return "None"
    if isinstance(result, torch.optim.Optimizer):
        return type(result).__name__
    if isinstance(result, torch.optim.lr_scheduler.LRScheduler):
        return type(result).__name__
    if isinstance(result, dict):
        parts = [_describe(result.get("optimizer"))]
        sched = result.get("lr_scheduler")
        if isinstance(sched, dict):
            sched = sched.get("scheduler")
        if sched is not None:
            parts.append(_describe(sched))
        return " + ".join(parts)
    if isinstance(result, (list, tuple)):
        return " + ".join(_describe(r) for r in result)
    return type(result).__name__
