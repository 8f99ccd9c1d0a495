"""Backends: interchangeable implementations of the same update rules.

- ``reference``: one tensor at a time, the readable specification and the test oracle;
- ``foreach``: multi-tensor ``torch._foreach_*`` ops, the default on every device;
- ``triton``: fused multi-tensor GPU kernels (not in this release: selecting it raises).

An optimizer resolves its ``backend`` argument once, at construction, with
:func:`resolve`, and calls :func:`runner` for the function that updates a bucket.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..validation import ConfigurationError, choice
from . import foreach, reference

BACKENDS = ("auto", "reference", "foreach", "triton")

# Devices whose foreach ops are known to work. torch falls back to a per-tensor C++ loop
# where it has no fused kernel, which still beats a Python loop.
_FOREACH_DEVICES = {"cpu", "cuda", "xpu", "mps", "hpu"}

Runner = Callable[..., None]


def resolve(owner: str, backend: str, params: Iterable[torch.Tensor]) -> str:
    """The concrete backend for ``backend`` on the devices of ``params``."""
    choice(owner, "backend", backend, BACKENDS)
    if backend == "triton":
        raise ConfigurationError(
            f"{owner}: backend='triton' is not available in this release: the fused Triton "
            "kernels are not built yet. Use backend='foreach' (the GPU default) or 'auto'."
        )
    if backend != "auto":
        return backend
    devices = {p.device.type for p in params}
    return "foreach" if devices <= _FOREACH_DEVICES else "reference"


def runner(backend: str) -> Runner:
    """``run(rule, params, grads, state, steps, group)`` of a resolved backend."""
    return {"reference": reference.run, "foreach": foreach.run}[backend]
