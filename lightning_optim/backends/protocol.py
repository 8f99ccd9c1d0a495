"""The backend protocol: one bucket type, one call, and what each backend can do.

``Optimizer.step`` hands every backend the same things: the rule (its
:class:`~lightning_optim.rules.RuleSpec`, or its name), one :class:`Bucket`, the param
group (hyperparameters by torch's names) and, optionally, a gradient scale, a clip bound,
GradScaler's found-inf flag and Coupled Adam's row-mean hook. It calls
:meth:`Backend.step`; what differs between backends is declared, not tested by name:

- ``device_steps``: the backend counts the step itself, on the device (``step`` and NAdam's
  ``mu_product`` live on the param's device and are never read by the host), and takes
  GradScaler's ``grad_scale``/``found_inf`` (``_step_supports_amp_scaling``). Otherwise the
  step counts are CPU tensors, counted here and passed on as Python floats, and GradScaler
  unscales and skips on the host as for any torch optimizer.
- ``fused_grad_transform``: the backend multiplies the gradients by ``grad_scale`` and clamps
  them to ``clip_value`` inside the update (one read of g instead of two passes; triton,
  compiled), and the ``.grad`` tensors are left unclipped; otherwise
  :meth:`Backend.step` applies both to the bucket's gradients, in place, before the update.
- ``step_tensors``: with host step counts, the backend is handed the counted CPU step tensors
  themselves rather than their values as floats, and reads them only where it needs them
  (compiled: torch's fused kernels read the tensors; its Inductor graphs need the floats).
- ``proves_itself``: when ``auto`` picks the backend, its kernels are checked against the
  reference on the device before they are trusted (:func:`lightning_optim.backends.confirm_auto`).

Each backend module keeps its own low-level ``run(rule, params, grads, state, steps,
group, row_mean=None)`` (what the tests and benchmarks drive directly); the
:class:`Backend` object is the one call the optimizers make.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor


class Bucket(NamedTuple):
    """One backend call's tensors: a group's params of one (device, dtype).

    ``params``/``grads``: the tensors the update writes and reads (real views of complex
    params, local shards of DTensors); ``state``: the rule's state lists by torch's key, plus
    ``master_param`` when the group keeps fp32 masters; ``steps``: the ``state["step"]``
    tensors themselves (CPU float32, or on the device for a ``device_steps`` backend);
    ``originals``: the params as the user holds them (for the row-mean hook of sharded ones).
    """

    params: list[Tensor]
    grads: list[Tensor]
    state: dict[str, list[Tensor]]
    steps: list[Tensor]
    originals: list[Tensor]


# Coupled Adam's hook: ``row_mean(i, local_row_sum) -> mean`` over dim 0 of tensor ``i``.
RowMean = Callable[[int, Tensor], Tensor]


@dataclass(frozen=True)
class Backend:
    """A resolved backend: its name, its low-level ``run`` and its capabilities."""

    name: str
    run: Callable[..., None]
    device_steps: bool = False
    fused_grad_transform: bool = False
    step_tensors: bool = False
    proves_itself: bool = False

    def step(self, rule: Any, bucket: Bucket, group: dict, *, row_mean: RowMean | None = None,
             grad_scale: Tensor | None = None, clip_value: float | None = None,
             found_inf: Tensor | None = None) -> None:
        """Update one bucket: count the step and apply ``rule`` (see the module docstring).

        ``grad_scale``: a 0-d fp32 tensor every gradient is multiplied by (clip-by-norm
        coefficient, AMP unscale); ``clip_value``: then clamp to ``[-clip_value, clip_value]``;
        ``found_inf``: a 0-d device flag that makes the step a no-op (``device_steps`` only)."""
        if self.device_steps:
            # The step tensors themselves: the backend counts the step on the device (t += 1,
            # taken back when found_inf is set, as torch's fused Adam does) and reads t there.
            self.run(rule, bucket.params, bucket.grads, bucket.state, bucket.steps, group, row_mean,
                     grad_scale=grad_scale, clip_value=clip_value, found_inf=found_inf, advance=True)
            return
        if found_inf is not None:
            raise ValueError(f"backend {self.name!r} does not take found_inf: GradScaler skips its steps on the host")
        transform = {}
        if grad_scale is not None or clip_value is not None:
            if self.fused_grad_transform:  # host step counts, transform in the update (compiled)
                transform = {"grad_scale": grad_scale, "clip_value": clip_value}
            else:
                apply_grad_transform(bucket.grads, grad_scale, clip_value)
        torch._foreach_add_(bucket.steps, 1.0)
        steps = bucket.steps if self.step_tensors else torch.stack(bucket.steps).tolist()
        self.run(rule, bucket.params, bucket.grads, bucket.state, steps, group, row_mean, **transform)


def apply_grad_transform(grads: list[Tensor], grad_scale: Tensor | None, clip_value: float | None) -> None:
    """What a fused backend does in registers, as passes over ``grads`` (in place): multiply
    by the fp32 coefficient ``grad_scale`` (as the clipper's own pass multiplies), then clamp."""
    if grad_scale is not None:
        torch._foreach_mul_(grads, grad_scale)
    if clip_value is not None:
        torch._foreach_clamp_min_(grads, -clip_value)
        torch._foreach_clamp_max_(grads, clip_value)
