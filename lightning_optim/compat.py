"""Every touch of a private Lightning or torch attribute, each behind one small named function.

Lightning and torch give no promise about names that start with an underscore, and a few of
them are the only way to do what the callbacks need (run Lightning's own zero-grad path at a
window start the loop would not zero, ask the loop whether this micro-batch accumulates, drop
a train loader set up too early, keep a CSV log across a resume, defer a checkpoint write).
They are all here, so that an upgrade that moves one breaks in one file, and
``tests/test_compat.py`` names the function that broke: it checks each row of
:data:`ACCESSES` against the installed versions, and it fails when a private access appears
anywhere else in the package.

Each function says the versions it was checked on. "present since 2.4.0" means the
attribute was read in the source of Lightning 2.4.0 (the oldest release ``pyproject.toml``
allows) with the same meaning; torch's entries were checked on the installed torch only.

Not counted as private here:

- ``torch._foreach_*``: the multi-tensor op namespace that ``torch.optim`` is itself built on,
  used by the foreach backend, the clipping and the statistics.
- Attributes our own code defines and sets, such as the ``_lightning_optim_*`` markers on the
  functions we install, or one module of ours reading another's underscore helper.

Nothing here imports Lightning at module level, nor anything of ``lightning_optim``: the
plain-PyTorch modules (``clipping.py``) import this leaf module for torch's helpers, and
``import lightning_optim`` must not load Lightning. The base classes that override a private
method (of ``ModelCheckpoint``, Lightning's CSV writer, torch's ``DataLoader``) are built on
first use and cached, so each is one class.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ACCESSES",
    "Access",
    "drop_train_dataloader",
    "dtensor_local_storage",
    "fused_optimizer_kernel",
    "group_tensors_by_device_and_dtype",
    "has_foreach_support",
    "hooked_data_loader",
    "hooked_experiment_writer",
    "hooked_model_checkpoint",
    "lightning_log_step",
    "save_last_checkpoint_if_due",
    "scaler_ready_to_unscale",
    "set_csv_experiment",
    "set_scheduler_last_lr",
    "should_accumulate",
    "takes_amp_scale",
    "zero_grad_as_lightning",
]

LIGHTNING_CHECKED = "lightning 2.6.6; present since 2.4.0"
TORCH_CHECKED = "torch 2.13.0"


@dataclass(frozen=True)
class Access:
    """One private attribute one of our functions relies on.

    Args:
        function: the function of this module (or the method of ours) that touches it.
        owner: where the attribute lives, ``"module:Qualname"`` (``"module"`` for a function).
        attribute: its name.
        kind: ``"method"`` (a function on the class; ``params`` are its parameter names after
            ``self``), ``"property"`` (a property of the class), ``"function"`` (module level;
            ``params`` its parameter names), ``"op"`` (an ATen operator, ``torch.ops.aten.<attribute>``:
            ``params`` the argument names of its schema), ``"instance"`` (set on each instance: checked on a
            fresh one), or ``"source"`` (the owner's source must still name it: an attribute
            the owner reads from objects of ours, or one set where no instance is cheap to make).
        params: the parameter names the call relies on, in order.
        checked: the versions it was checked on.
    """

    function: str
    owner: str
    attribute: str
    kind: str
    params: tuple[str, ...] = ()
    checked: str = LIGHTNING_CHECKED


_FIT_LOOP = "lightning.pytorch.loops.fit_loop:_FitLoop"
_AUTOMATIC = "lightning.pytorch.loops.optimization.automatic:_AutomaticOptimization"
_EPOCH_LOOP = "lightning.pytorch.loops.training_epoch_loop:_TrainingEpochLoop"
_CHECKPOINT = "lightning.pytorch.callbacks.model_checkpoint:ModelCheckpoint"
_CSV_LOGGER = "lightning.pytorch.loggers.csv_logs:CSVLogger"
_CSV_WRITER = "lightning.pytorch.loggers.csv_logs:ExperimentWriter"

# torch's fused optimizer kernels (what torch.optim's fused=True runs), with the argument
# names of their schemas on torch 2.13.0, which backends/torch_kernels.py passes by keyword.
_ADAM_ARGS = ("self", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "lr", "beta1",
              "beta2", "weight_decay", "eps", "amsgrad", "maximize", "grad_scale", "found_inf")
_FUSED_KERNELS = {
    "_fused_adam_": _ADAM_ARGS,
    "_fused_adamw_": _ADAM_ARGS,
    "_fused_sgd_": ("self", "grads", "momentum_buffer_list", "weight_decay", "momentum", "lr", "dampening",
                    "nesterov", "maximize", "is_first_step", "grad_scale", "found_inf"),
    "_fused_adagrad_": ("self", "grads", "state_sums", "state_steps", "lr", "lr_decay", "weight_decay", "eps",
                        "maximize", "grad_scale", "found_inf"),
}

ACCESSES: tuple[Access, ...] = (
    Access("group_tensors_by_device_and_dtype", "torch.utils._foreach_utils", "_group_tensors_by_device_and_dtype",
           "function", ("tensorlistlist", "with_indices"), TORCH_CHECKED),
    Access("has_foreach_support", "torch.utils._foreach_utils", "_has_foreach_support", "function",
           ("tensors", "device"), TORCH_CHECKED),
    *(Access("fused_optimizer_kernel", "torch.ops.aten", name, "op", params, TORCH_CHECKED)
      for name, params in _FUSED_KERNELS.items()),
    Access("takes_amp_scale", "torch.amp.grad_scaler:GradScaler.step", "_step_supports_amp_scaling", "source",
           checked=TORCH_CHECKED),
    Access("takes_amp_scale", "lightning.fabric.plugins.precision.amp:_optimizer_handles_unscaling",
           "_step_supports_amp_scaling", "source"),
    Access("scaler_ready_to_unscale", "torch.amp.grad_scaler:GradScaler", "_per_optimizer_states", "instance",
           checked=TORCH_CHECKED),
    Access("set_scheduler_last_lr", "torch.optim.lr_scheduler:LambdaLR", "_last_lr", "instance",
           checked=TORCH_CHECKED),
    Access("dtensor_local_storage", "torch.distributed.tensor:DTensor", "_local_tensor", "instance",
           checked=TORCH_CHECKED),
    Access("hooked_data_loader", "torch.utils.data:DataLoader", "_index_sampler", "property", checked=TORCH_CHECKED),
    Access("zero_grad_as_lightning", _AUTOMATIC, "_on_before_zero_grad", "method", ("optimizer",)),
    Access("zero_grad_as_lightning", _AUTOMATIC, "_optimizer_zero_grad", "method", ("batch_idx", "optimizer")),
    Access("should_accumulate", _FIT_LOOP, "_should_accumulate", "method", ()),
    Access("drop_train_dataloader", _FIT_LOOP, "_combined_loader", "instance"),
    Access("drop_train_dataloader", _FIT_LOOP, "_data_fetcher", "instance"),
    Access("lightning_log_step", _EPOCH_LOOP, "_batches_that_stepped", "instance"),
    Access("hooked_model_checkpoint", _CHECKPOINT, "_save_checkpoint", "method", ("trainer", "filepath")),
    Access("save_last_checkpoint_if_due", _CHECKPOINT, "_last_global_step_saved", "instance"),
    Access("save_last_checkpoint_if_due", _CHECKPOINT, "_monitor_candidates", "method", ("trainer",)),
    Access("save_last_checkpoint_if_due", _CHECKPOINT, "_save_last_checkpoint", "method",
           ("trainer", "monitor_candidates")),
    Access("hooked_experiment_writer", _CSV_WRITER, "_check_log_dir_exists", "method", ()),
    Access("hooked_experiment_writer", _CSV_WRITER, "_rewrite_with_new_header", "method", ("fieldnames",)),
    Access("hooked_experiment_writer", _CSV_WRITER, "_fs", "instance"),
    Access("set_csv_experiment", _CSV_LOGGER, "_experiment", "instance"),
    Access("set_csv_experiment", _CSV_LOGGER, "_fs", "instance"),
    # Not an attribute we read: the order in Trainer._run that OptimizerCallback's ``log`` setter
    # relies on (see OptimizerCallback.log); test_compat checks both halves of it.
    Access("OptimizerCallback.log", "lightning.pytorch.trainer.connectors.callback_connector:_CallbackConnector",
           "_attach_model_logging_functions", "method", ()),
)


# ----- torch ---------------------------------------------------------------------------------


def group_tensors_by_device_and_dtype(
    tensorlistlist: list[list[Tensor | None]], with_indices: bool = False
) -> dict[tuple[torch.device, torch.dtype], tuple[list[list[Tensor | None]], list[int]]]:
    """torch's own bucketing of parallel tensor lists by (device, dtype), the one
    ``torch.nn.utils.clip_grad_norm_`` uses (a C++ pass, no Python loop over tensors).
    Checked on torch 2.13.0: ``torch.utils._foreach_utils._group_tensors_by_device_and_dtype``."""
    from torch.utils import _foreach_utils

    return _foreach_utils._group_tensors_by_device_and_dtype(tensorlistlist, with_indices)


def has_foreach_support(tensors: list[Tensor], device: torch.device) -> bool:
    """Whether ``torch._foreach_*`` ops take these tensors on ``device`` (plain tensors only:
    subclasses such as DTensor go one at a time). Checked on torch 2.13.0:
    ``torch.utils._foreach_utils._has_foreach_support``."""
    from torch.utils import _foreach_utils

    return _foreach_utils._has_foreach_support(tensors, device)


def fused_optimizer_kernel(name: str) -> Callable[..., None]:
    """torch's fused multi-tensor optimizer kernel ``name`` (``"_fused_adam_"``,
    ``"_fused_adamw_"``, ``"_fused_sgd_"`` or ``"_fused_adagrad_"``), the one
    ``torch.optim``'s ``fused=True`` calls: updates lists of tensors in place, in one pass.
    Checked on torch 2.13.0: ``torch._fused_*`` (``torch.ops.aten._fused_*``), arguments by
    the names in ``_FUSED_KERNELS``."""
    if name not in _FUSED_KERNELS:
        raise KeyError(f"no fused torch kernel named {name!r}: {sorted(_FUSED_KERNELS)}")
    return getattr(torch, name)


def takes_amp_scale(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` takes AMP's ``grad_scale``/``found_inf`` itself (torch's
    ``fused=True`` optimizers, our ``triton`` backend), so that ``GradScaler.step`` and
    Lightning's ``MixedPrecision`` plugin leave its gradients scaled. Checked on torch 2.13.0
    and lightning 2.6.6 (present since 2.4.0): the ``_step_supports_amp_scaling`` flag both read."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def scaler_ready_to_unscale(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` may run now: not yet unscaled nor stepped this
    iteration (``unscale_`` raises on a second call). Checked on torch 2.13.0:
    ``GradScaler._per_optimizer_states[id(optimizer)]["stage"]``."""
    from torch.amp.grad_scaler import OptState

    return scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY


def set_scheduler_last_lr(scheduler: torch.optim.lr_scheduler.LRScheduler, lrs: list[Any]) -> None:
    """Set what ``scheduler.get_last_lr()`` returns, after the groups' LRs were set by hand.
    Checked on torch 2.13.0: ``LRScheduler._last_lr``."""
    scheduler._last_lr = lrs


def dtensor_local_storage(t: Any) -> Tensor:
    """This rank's shard of the DTensor ``t``, as the DTensor's own storage (in-place updates
    of it update ``t``; ``to_local()`` would go through autograd). Checked on torch 2.13.0:
    ``DTensor._local_tensor``."""
    return t._local_tensor


@functools.cache
def hooked_data_loader() -> type:
    """torch's ``DataLoader`` whose batch sampler (or sampler) passes through the public method
    ``wrap_index_sampler(inner)`` (the default returns it unchanged). ``DataLoader`` reads that
    sampler for its length and whenever it starts an iterator (also a persistent-workers
    iterator's reset). Checked on torch 2.13.0: the property ``DataLoader._index_sampler``."""
    from torch.utils.data import DataLoader

    class HookedDataLoader(DataLoader):
        @property
        def _index_sampler(self) -> Any:
            return self.wrap_index_sampler(super()._index_sampler)

        def wrap_index_sampler(self, inner: Any) -> Any:
            return inner

    return HookedDataLoader


# ----- Lightning's loops ----------------------------------------------------------------------


def _automatic(trainer: Any) -> Any:
    return trainer.fit_loop.epoch_loop.automatic_optimization


def zero_grad_as_lightning(trainer: Any, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
    """Zero the gradients through Lightning's own path: the ``on_before_zero_grad`` hooks, the
    module's ``optimizer_zero_grad`` and the loop's progress counters, as the loop does where
    ``batch_idx % accumulate_grad_batches == 0``. Checked on lightning 2.6.6, present since
    2.4.0: ``_AutomaticOptimization._on_before_zero_grad(optimizer)`` and
    ``._optimizer_zero_grad(batch_idx, optimizer)``."""
    loop = _automatic(trainer)
    loop._on_before_zero_grad(optimizer)
    loop._optimizer_zero_grad(batch_idx, optimizer)


def should_accumulate(trainer: Any) -> bool:
    """Whether the micro-batch now running only accumulates (no optimizer step after it).
    Checked on lightning 2.6.6, present since 2.4.0: ``_FitLoop._should_accumulate()``."""
    return trainer.fit_loop._should_accumulate()


def drop_train_dataloader(trainer: Any) -> None:
    """Make the fit loop set its train loader up again, as Lightning's own tuner does: a loader
    set up before the loops are restored (``trainer.estimated_stepping_batches`` in
    ``configure_optimizers``) would never receive the checkpoint's loader state. Stops the
    early iterator's workers first. Not while the loop is restarting (it has restored them).
    Checked on lightning 2.6.6, present since 2.4.0: ``_FitLoop._combined_loader`` and
    ``._data_fetcher``."""
    fit_loop = getattr(trainer, "fit_loop", None)
    if fit_loop is None or fit_loop.restarting or fit_loop._combined_loader is None:
        return
    if fit_loop._data_fetcher is not None:
        fit_loop._data_fetcher.teardown()
        fit_loop._data_fetcher = None
    fit_loop._combined_loader = None


def lightning_log_step(trainer: Any) -> int:
    """The step value Lightning's own logging gives the batch now ending.

    ``LightningModule.log`` in ``training_step`` and Lightning's ``LearningRateMonitor`` log at
    the fit loop's count of batches that stepped the optimizer, which it increments only after
    ``on_train_batch_end`` and after writing the batch's metrics: for the batch that runs
    optimizer step ``k`` (1-based) it is ``k - 1``, also across a resume (Lightning restores and
    adjusts it). Reading that counter, as ``LearningRateMonitor`` does, puts our rows on the
    same x value as the loss of the same batch; ``global_step - 1`` is the same number where
    the counter is missing. Checked on lightning 2.6.6, present since 2.4.0:
    ``_TrainingEpochLoop._batches_that_stepped``."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    counted = getattr(loop, "_batches_that_stepped", None)
    return int(counted) if counted is not None else trainer.global_step - 1


# ----- ModelCheckpoint ------------------------------------------------------------------------


@functools.cache
def hooked_model_checkpoint() -> type:
    """``ModelCheckpoint`` whose every file write goes through the public method
    ``around_save(trainer, save)``, ``save`` being the write itself (a no-argument callable);
    the default just calls it. Built on first use (Lightning is imported here). Checked on
    lightning 2.6.6, present since 2.4.0: ``ModelCheckpoint._save_checkpoint(trainer, filepath)``,
    through which every save of the callback (top-k, last, every_n) goes."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    class HookedModelCheckpoint(ModelCheckpoint):
        def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
            self.around_save(trainer, functools.partial(super()._save_checkpoint, trainer, filepath))

        def around_save(self, trainer: Any, save: Callable[[], None]) -> None:
            save()

    return HookedModelCheckpoint


def save_last_checkpoint_if_due(callback: Any, trainer: Any) -> None:
    """Write ``callback``'s last checkpoint unless it has already saved at this global step,
    as ``ModelCheckpoint`` does at its own save points. Checked on lightning 2.6.6, present
    since 2.4.0: ``ModelCheckpoint._last_global_step_saved``, ``._monitor_candidates(trainer)``,
    ``._save_last_checkpoint(trainer, monitor_candidates)``."""
    if callback._last_global_step_saved != trainer.global_step:
        callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


# ----- CSV logs -------------------------------------------------------------------------------


@functools.cache
def hooked_experiment_writer() -> type:
    """Lightning's CSV ``ExperimentWriter`` with its two private steps as public methods to
    override: ``prepare_log_dir()`` (run in ``__init__``; Lightning's deletes an existing
    ``metrics.csv``) and ``rewrite_with_header(fieldnames)`` (a new column rewrites the file),
    and its file system as ``fs``. Built on first use. Checked on lightning 2.6.6, present
    since 2.4.0: ``_ExperimentWriter._check_log_dir_exists()``,
    ``._rewrite_with_new_header(fieldnames)``, ``._fs``."""
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class HookedExperimentWriter(ExperimentWriter):
        @property
        def fs(self) -> Any:
            return self._fs

        def _check_log_dir_exists(self) -> None:
            self.prepare_log_dir()

        def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
            self.rewrite_with_header(fieldnames)

        def prepare_log_dir(self) -> None:
            super()._check_log_dir_exists()

        def rewrite_with_header(self, fieldnames: list[str]) -> None:
            super()._rewrite_with_new_header(fieldnames)

    return HookedExperimentWriter


def set_csv_experiment(logger: Any, writer_cls: type) -> Any:
    """``CSVLogger.experiment``, built with ``writer_cls`` instead of Lightning's writer (once;
    later calls return the same writer). Checked on lightning 2.6.6, present since 2.4.0:
    ``CSVLogger._experiment``, ``._fs``."""
    if logger._experiment is None:
        logger._fs.makedirs(logger.root_dir, exist_ok=True)
        logger._experiment = writer_cls(log_dir=logger.log_dir)
    return logger._experiment
