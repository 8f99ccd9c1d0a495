"""Backends: interchangeable implementations of the same update rules.

- ``reference``: one tensor at a time, the readable specification and the test oracle;
- ``foreach``: multi-tensor ``torch._foreach_*`` ops, the default wherever Triton is not used;
- ``triton``: one fused multi-tensor kernel per (device, dtype) bucket
  (:mod:`.triton`): CUDA tensors with Triton installed (``pip install lightning_optim[triton]``),
  or CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, for tests: slow).

``auto`` picks ``triton`` when every param is a CUDA tensor of fp32, bf16 or fp16 and
Triton is importable, else ``foreach`` on every device torch has foreach ops for, else
``reference``. The Triton kernels are checked against the reference under the interpreter
on every CI run; on a GPU, an optimizer that ``auto`` gave ``triton`` first runs
:func:`.triton.selfcheck.verify` for each of its param groups (two steps of the kernel on
scratch tensors against the reference, once per configuration and process) and falls back
to ``foreach``, with a warning that says why, when a kernel fails to compile or disagrees.
An explicit ``backend="triton"`` is trusted as asked.

An optimizer resolves its ``backend`` argument once, at construction, with
:func:`resolve`, and calls :func:`runner` for the function that updates a bucket:
``run(rule, params, grads, state, steps, group)``. ``steps`` are the step counts after this
step's increment: Python floats for ``reference`` and ``foreach`` (read from CPU step tensors),
the float32 0-d device step tensors themselves for ``triton``, which reads them on the device
(so its step needs no host sync and can be captured in a CUDA graph; see :mod:`.triton`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..validation import ConfigurationError, choice
from . import foreach, reference
from . import triton as triton_backend

BACKENDS = ("auto", "reference", "foreach", "triton")

# Devices whose foreach ops are known to work. torch falls back to a per-tensor C++ loop
# where it has no fused kernel, which still beats a Python loop.
_FOREACH_DEVICES = {"cpu", "cuda", "xpu", "mps", "hpu"}
_TRITON_DTYPES = {torch.float32, torch.bfloat16, torch.float16}
# Where ``auto`` may pick triton. (Tests add "cpu" to reach the same code under the interpreter.)
AUTO_TRITON_DEVICES = {"cuda"}

Runner = Callable[..., None]


def resolve(owner: str, backend: str, params: Iterable[torch.Tensor]) -> str:
    """The concrete backend for ``backend`` on the devices of ``params``."""
    choice(owner, "backend", backend, BACKENDS)
    params = list(params)
    devices = {p.device.type for p in params}
    if backend == "triton":
        _check_triton(owner, params, devices)
        return backend
    if backend != "auto":
        return backend
    if (params and devices <= AUTO_TRITON_DEVICES and triton_backend.available()
            and (devices != {"cpu"} or triton_backend.interpreter_enabled())
            and all(p.dtype in _TRITON_DTYPES for p in params)):
        return "triton"
    return "foreach" if devices <= _FOREACH_DEVICES else "reference"


def _check_triton(owner: str, params: list[torch.Tensor], devices: set[str]) -> None:
    why = triton_backend.why_unavailable()
    if why is not None:
        raise ConfigurationError(f"{owner}: backend='triton' is unavailable: {why}. Or use backend='foreach'.")
    if "cpu" in devices and not triton_backend.interpreter_enabled():
        raise ConfigurationError(
            f"{owner}: backend='triton' got CPU parameters: the kernels run on CUDA tensors, or on CPU "
            "tensors only under Triton's interpreter (set TRITON_INTERPRET=1; slow, for tests). "
            "Use backend='foreach' (or 'auto') on CPU."
        )
    unsupported = devices - {"cuda", "cpu"}
    if unsupported:
        raise ConfigurationError(
            f"{owner}: backend='triton' supports CUDA tensors (and CPU under TRITON_INTERPRET=1), "
            f"not {sorted(unsupported)}: use backend='foreach'."
        )
    dtypes = {p.dtype for p in params} - _TRITON_DTYPES
    if dtypes:
        raise ConfigurationError(
            f"{owner}: backend='triton' supports float32, bfloat16 and float16 parameters, not "
            f"{sorted(str(d) for d in dtypes)}: use backend='foreach' for those."
        )


def runner(backend: str) -> Runner:
    """``run(rule, params, grads, state, steps, group)`` of a resolved backend."""
    return {"reference": reference.run, "foreach": foreach.run, "triton": triton_backend.run}[backend]
