"""torch's own fused optimizer kernels, where one computes a rule of ours exactly.

torch ships single-pass multi-tensor kernels for four of its optimizers, the ones
``torch.optim``'s ``fused=True`` runs: Adam, AdamW, SGD (momentum, dampening, Nesterov) and
Adagrad. On CPU each is a vectorised loop that reads p, g and the state once and writes p
and the state once, as an Inductor-compiled step does, with nothing to compile. A rule
declares in its spec which kernel computes it for a group's options (``torch_kernel``:
Adam/AdamW when bias-corrected, SGD always, Adagrad always; none for Coupled Adam's coupled
groups, whose second moment is a shared row), and the compiled backend hands a bucket to
that kernel when :func:`kernel_for` says it can, instead of compiling the same loop.

What the kernels compute, against :mod:`.reference`'s numbered steps: the same steps, in
torch's order of operations. The one difference is rounding: the reference folds
``sqrt(1 - beta2^t)`` into Adam's step size and eps, torch divides ``sqrt(v)`` by it, so the
two agree to a few ulps per step, as torch's fused and foreach Adam agree with each other.
The step counts are the ``state["step"]`` tensors, read by the kernel (counted already by
:meth:`.protocol.Backend.step`); they stay CPU float32 tensors, as torch keeps them.

When a bucket goes to a kernel (:func:`kernel_for`): CPU tensors (torch's CUDA kernels want
their step counts on the device, which only the triton backend keeps), float32 or float64
(the low-precision params with their fp32 state and masters go through Inductor, which
keeps our rounding: fp32 math, one rounding of p), no fp32 master copies, and dense tensors
(the kernels index a strided view's storage as if it were dense: a param that is a slice of
a larger tensor would be updated in the wrong places).

The gradient transform (``fused_grad_transform``): the kernels take torch's AMP
``grad_scale`` and divide every gradient by it as they read it; the clip-by-norm coefficient
``c`` therefore enters as ``1 / c``. Unlike the Inductor graphs, the kernels write the
transformed gradient back into ``.grad`` (so a clipped step leaves the ``.grad`` tensors
clipped, as after ``clip_grad_norm_``): 4 more bytes per parameter than the Inductor graph,
4 fewer than ``clip_grad_norm_`` followed by the same kernel. The kernels cannot clamp: a
clip-by-value bound is applied to the ``.grad`` tensors first, in passes, as on foreach
(still cheaper than compiling a graph for it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import compat, rules
from .protocol import apply_grad_transform

__all__ = ["kernel_for", "run", "KERNEL_DTYPES"]

KERNEL_DTYPES = (torch.float32, torch.float64)


def kernel_for(spec: rules.RuleSpec, group: dict, params: list[Tensor], grads: list[Tensor],
               state: dict[str, list[Tensor]]) -> str | None:
    """The name of torch's fused kernel that updates this bucket of ``spec`` in ``group``
    exactly as the rule does, or None where none can (see the module docstring for the
    conditions)."""
    if (spec.torch_kernel is None or not params or "master_param" in state
            or params[0].device.type != "cpu" or params[0].dtype not in KERNEL_DTYPES):
        return None
    # The kernels walk each tensor's storage as if it were dense: a strided view (a param that
    # is a slice of a larger tensor) would be updated in the wrong places.
    for tensors in (params, grads, *state.values()):
        if not all(map(_contiguous, tensors)):
            return None
    return spec.torch_kernel(group)


_contiguous = Tensor.is_contiguous


def run(kernel: str, params: list[Tensor], grads: list[Tensor], state: dict[str, list[Tensor]],
        steps: list[Tensor], group: dict, *, grad_scale: Tensor | None = None,
        clip_value: float | None = None) -> None:
    """Update one bucket in place with torch's fused ``kernel`` (a name from
    :func:`kernel_for`). ``steps``: the params' ``state["step"]`` tensors, already counted
    for this step; ``grad_scale``: the 0-d fp32 coefficient every gradient is multiplied by
    (passed to the kernel as its reciprocal, which the kernel divides by; see the module
    docstring); ``clip_value``: then clamp them to ``[-clip_value, clip_value]`` (in place,
    before the kernel)."""
    fn = compat.fused_optimizer_kernel(kernel)
    if clip_value is not None:  # the kernels cannot clamp: both transforms as passes, in order
        apply_grad_transform(grads, grad_scale, clip_value)
        grad_scale = None
    divide_by = None if grad_scale is None else torch.reciprocal(grad_scale)
    common = dict(maximize=bool(group.get("maximize", False)), grad_scale=divide_by, found_inf=None)
    if kernel in ("_fused_adam_", "_fused_adamw_"):
        beta1, beta2 = group["betas"]
        amsgrad = bool(group.get("amsgrad", False))
        fn(params, grads, state["exp_avg"], state["exp_avg_sq"], state["max_exp_avg_sq"] if amsgrad else [], steps,
           lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
           amsgrad=amsgrad, **common)
    elif kernel == "_fused_adagrad_":
        fn(params, grads, state["sum"], steps, lr=group["lr"], lr_decay=group["lr_decay"],
           weight_decay=group["weight_decay"], eps=group["eps"], **common)
    elif kernel == "_fused_sgd_":
        _sgd(fn, params, grads, state, steps, group, common)
    else:
        raise KeyError(f"torch_kernels.run: no call written for {kernel!r}")


def _sgd(fn, params, grads, state, steps, group, common) -> None:
    momentum, dampening = group["momentum"], group["dampening"]
    options = dict(weight_decay=group["weight_decay"], momentum=momentum, lr=group["lr"], dampening=dampening,
                   nesterov=bool(group["nesterov"]), **common)
    if momentum == 0:
        fn(params, grads, [], is_first_step=False, **options)
        return
    buffers = state["momentum_buffer"]
    if dampening == 0:
        # Our buffers start at zero, so mu * 0 + g is the first step's buf = g: one call.
        fn(params, grads, buffers, is_first_step=False, **options)
        return
    # With dampening the first step differs (buf_1 = g, not (1 - dampening) * g), and
    # a param that first got a gradient late is on its first step while the others are not.
    first = torch.stack(steps).eq(1).tolist()
    for flag in (True, False):
        idx = [i for i, f in enumerate(first) if f is flag]
        if idx:
            fn([params[i] for i in idx], [grads[i] for i in idx], [buffers[i] for i in idx],
               is_first_step=flag, **options)
