"""The Triton backend: every rule of :mod:`..reference` as one fused multi-tensor kernel.

Why fused
    An optimizer step is memory-bound: a few flops per element against reading and writing
    p, g and the state. The foreach backend makes one pass over memory per op (an Adam step
    is about ten), torch's ``fused=True`` makes one pass but exists for Adam(W), SGD and
    Adagrad only. Here every rule makes exactly one pass, whatever its options.

One launch per bucket
    ``run`` gets a (device, dtype) bucket of tensors from ``Optimizer.step``. A device-side
    int64 table holds, per tensor, its numel, its row length and the addresses of p, g,
    every state tensor and the optional fp32 master copy; an int32 block list holds
    (tensor index, block index) for every ``BLOCK`` elements of every tensor. Program
    ``pid`` reads its entry, casts the addresses to typed pointers and updates one block:
    one launch for 150 tensors as for one. The table is cached by addresses and sizes
    (:mod:`.table`): in steady state a step uploads nothing and rebuilds nothing.

What reaches the kernel, and how
    Hyperparameters (lr, betas, eps, the decay factor ``1 - lr * wd``...) are runtime fp32
    kernel arguments: Triton never specializes on float values, so a scheduler changing lr
    every step reuses the same compiled kernel. Step-dependent factors (bias corrections
    folded into ``-lr / (1 - beta1^t)`` and ``1 / sqrt(1 - beta2^t)``, AdaGrad's decayed
    lr, NAdam's momentum-schedule coefficients, RAdam's rectification, SGD's first-step
    dampening) are computed on the host in float64 from the ``steps`` floats that
    ``Optimizer.step`` reads from CPU step tensors (no device sync), exactly as the
    reference computes them. When every tensor of the bucket is on the same step (the
    usual case) they are three more scalar arguments; when the counts differ (a param
    that first got a gradient late) they go in one small fp32 ``(n, 4)`` array, uploaded
    from pinned memory without blocking. Only options that change the code (amsgrad,
    nesterov, centered, maximize, weight decay on/off, decoupled, dtype) are compile-time
    switches: a handful of variants per rule, each compiled once.

    Per-step host work: one ``data_ptr`` per tensor and slot (the cache key), the factors
    (O(#tensors) floats only when counts differ, else O(1)), one launch. What stops a
    CUDA graph from capturing the step is that host work: the step counts and factors are
    Python floats, and a captured launch would replay them frozen. A capturable variant
    needs device-side step counts (``capturable=True`` in torch) and the factors computed
    in-kernel from them; NAdam's ``mu_product`` would move to the device too.

Precision
    Loads upcast to fp32, the math is fp32 in registers, stores round once (bf16 by hand to
    nearest-even, identical under the interpreter). State of bf16/fp16 params is fp32, as
    ``Optimizer`` allocates it. Optional fp32 master weights: when the state has
    ``master_param`` (an fp32 copy of a bf16/fp16 param), the kernel reads and writes the
    master and writes the param as its rounding. float64 is rejected
    (:class:`~lightning_optim.validation.ConfigurationError`): use the foreach backend.

Fused clipping hooks (for :mod:`lightning_optim.clipping`)
    ``run(..., grad_scale=t, found_inf=f, clip_value=c)``: every gradient is multiplied by
    the 0-d device tensor ``t`` (clip-by-norm coefficient, AMP unscale), then clamped to
    [-c, c], before the rule; when the 0-d tensor ``f`` is nonzero every load and store of
    the launch is masked off, so the step changes no tensor (the host-side step counts,
    and NAdam's CPU ``mu_product``, still advance: the caller owns those). ``grad_norm``
    is the matching multi-tensor norm (2 or inf) with a finite flag, without a host sync.

Bytes moved per parameter (E = bytes of a param/grad element: 4 fp32, 2 bf16/fp16; state
is fp32, 4 bytes; "rw" = read and written). Each is the minimum for the rule, and the
fused kernel moves exactly that (the table, factors and Coupled Adam's (1, H) rows are
per tensor, not per element)::

    sgd               p rw, g r                        3E        (fp32 12 B)
      + momentum      + buf rw                         3E + 8    (fp32 20 B)
    adagrad           p rw, g r, sum rw                3E + 8    (fp32 20 B)
    rmsprop           p rw, g r, square_avg rw         3E + 8    (fp32 20 B)
      + centered      + grad_avg rw                    + 8
      + momentum      + momentum_buffer rw             + 8
    adam, adamw       p rw, g r, m rw, v rw            3E + 16   (fp32 28 B, bf16 22 B)
      + amsgrad       + max_exp_avg_sq rw              + 8
    coupled_adam      row pass: g r; then p rw, g r,   4E + 8    (fp32 24 B)
      (coupled group)   m rw (v is a (1, H) row)
    nadam, radam,     p rw, g r, m rw, v rw            3E + 16   (fp32 28 B)
      yogi
    lion              p rw, g r, m rw                  3E + 8    (fp32 20 B)
    master weights    master rw (8) replaces p r (E)   + 8 - E   (bf16 adamw 28 B)

:func:`bytes_per_param` computes these; ``benchmarks/step.py`` divides by the time.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

__all__ = ["available", "why_unavailable", "interpreter_enabled", "run", "grad_norm", "bytes_per_param"]


def available() -> bool:
    """True when Triton can be imported."""
    return why_unavailable() is None


def why_unavailable() -> str | None:
    """Why Triton cannot be used, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed: pip install lightning_optim[triton]"
    return None


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1: run the kernels on CPU tensors in Triton's interpreter (slow; tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def run(rule, params, grads, state, steps, group, row_mean=None, *, grad_scale=None, found_inf=None,
        clip_value=None) -> None:
    """Apply ``rule`` to one (device, dtype) bucket in one fused launch.

    The backend signature ``run(rule, params, grads, state, steps, group, row_mean=None)``
    plus the fused-clip hooks ``grad_scale``, ``found_inf`` and ``clip_value`` (see the
    module docstring). ``row_mean(i, local_sum)``: Coupled Adam's hook turning the local
    sum over dim 0 of g^2 (fp32, shape (1, *shape[1:])) into the global mean.
    """
    from . import launcher

    launcher.run(rule, params, grads, state, steps, group, row_mean, grad_scale=grad_scale,
                 found_inf=found_inf, clip_value=clip_value)


def grad_norm(grads, norm_type: float = 2.0) -> tuple[Tensor, Tensor]:
    """``(total_norm, finite)`` of ``grads`` (0-d fp32 device tensors), as
    ``torch.nn.utils.get_total_norm``, for norm_type 2 and inf, in one launch per dtype."""
    from . import launcher

    return launcher.grad_norm(grads, norm_type)


def bytes_per_param(rule: str, group: dict, dtype: torch.dtype, *, master: bool = False) -> int:
    """The bytes one step of ``rule`` must move per parameter element (table above)."""
    e = torch.empty((), dtype=dtype).element_size()
    extra = {
        "sgd": 8 if group.get("momentum", 0) != 0 else 0,
        "adagrad": 8,
        "rmsprop": 8 + 8 * bool(group.get("centered")) + 8 * (group.get("momentum", 0) > 0),
        "adam": 16 + 8 * bool(group.get("amsgrad")),
        "coupled_adam": e + 8,
        "nadam": 16,
        "radam": 16,
        "lion": 8,
        "yogi": 16,
    }[rule]
    return 3 * e + extra + ((8 - e) if master and e < 4 else 0)
