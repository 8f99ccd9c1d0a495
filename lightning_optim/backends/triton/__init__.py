"""The Triton backend: every rule of :mod:`..reference` as one fused multi-tensor kernel.

One launch per (device, dtype) bucket and one pass over memory, whatever the rule and its
options. The step counts live on the params' device and GradScaler's ``grad_scale`` and
``found_inf`` are taken inside the kernel, so a step has no host sync and can be captured in
a CUDA graph. The package: :mod:`.kernels` (the ``@triton.jit`` kernels), :mod:`.table` (the
cached device-side table of tensor addresses), :mod:`.launcher` (from a bucket to one launch,
with the step prologue) and :mod:`.selfcheck` (the kernels against the reference on the GPU
before ``auto`` trusts them).

The design, the device-step and AMP contract with ``Optimizer.step`` and ``torch.amp``,
CUDA-graph capture, and the bytes each rule moves per parameter (what
:func:`bytes_per_param` computes) are written once, in ``docs/triton.md``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ... import rules

__all__ = ["available", "why_unavailable", "interpreter_enabled", "run", "bytes_per_param"]


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
        clip_value=None, advance=False) -> None:
    """Apply ``rule`` to one (device, dtype) bucket in one fused launch.

    The backend signature ``run(rule, params, grads, state, steps, group, row_mean=None)``
    (``steps``: this step's counts, float32 0-d tensors on the params' device, or Python
    floats; see ``docs/triton.md``) plus the fused-clip hooks ``grad_scale``,
    ``found_inf`` and ``clip_value`` (the same page), and ``advance``: the step
    tensors hold the previous counts and the step prologue counts this step on the device
    (what ``Optimizer.step`` passes). ``row_mean(i, local_sum)``: Coupled Adam's hook
    turning the local sum over dim 0 of g^2 (fp32, shape (1, *shape[1:])) into the global
    mean.
    """
    from . import launcher

    launcher.run(rule, params, grads, state, steps, group, row_mean, grad_scale=grad_scale,
                 found_inf=found_inf, clip_value=clip_value, advance=advance)


def bytes_per_param(rule, group: dict, dtype: torch.dtype, *, master: bool = False) -> int:
    """The bytes one step of ``rule`` (its :class:`~lightning_optim.rules.RuleSpec` or name)
    must move per parameter element (the table in ``docs/triton.md``): the param read and written and the
    gradient read, ``3E``, plus what the rule's spec declares for its state."""
    e = torch.empty((), dtype=dtype).element_size()
    return 3 * e + rules.get(rule).bytes_per_element(group, e) + ((8 - e) if master and e < 4 else 0)
