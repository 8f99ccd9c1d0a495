"""Backends: interchangeable implementations of the same update rules.

- ``reference``: one tensor at a time, the readable specification and the test oracle;
- ``foreach``: multi-tensor ``torch._foreach_*`` ops, several passes over memory per step;
- ``triton``: one fused multi-tensor kernel per (device, dtype) bucket
  (:mod:`.triton`): CUDA tensors with Triton installed (``pip install lightning_optim[triton]``),
  or CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, for tests: slow);
- ``compiled``: one pass over memory per step on any device Inductor has (:mod:`.compiled`):
  where torch ships a fused kernel that computes the rule exactly (Adam, AdamW, SGD, Adagrad
  on dense fp32/fp64 CPU tensors: :mod:`.torch_kernels`) it runs that kernel, nothing to
  compile; every other bucket is compiled by Inductor (seconds to a minute per bucket
  configuration on the first step, ``foreach`` with one warning where compiling fails).

``auto`` (:func:`choose_auto`) picks, once, at construction:

- CUDA tensors of fp32, bf16 or fp16 with Triton importable: ``triton``. The Triton kernels
  are checked against the reference under the interpreter on every CI run; on a GPU, an
  optimizer that ``auto`` gave ``triton`` first runs :func:`.triton.selfcheck.verify` for
  each of its param groups (two steps of the kernel on scratch tensors against the
  reference, once per configuration and process) and falls back to ``compiled`` (Inductor's
  own kernels, or foreach where it cannot compile), with a warning that says why, when a
  kernel fails to compile or disagrees. An explicit ``backend="triton"`` is trusted as asked.
- CPU tensors where torch's fused kernels compute every group's rule: ``compiled``, which
  runs them (the very kernels of ``torch.optim.AdamW(fused=True)``, bit for bit).
- Other CPU optimizers with at least :data:`AUTO_COMPILE_MIN_PARAMS` (10M) parameters:
  ``compiled`` (Inductor). Below that, ``foreach``: a cold compile costs 25-70 s on 2 cores
  (3-8 s from Inductor's on-disk cache) against ~3 ns saved per parameter and step, so on
  a small model (the main job's 0.9M parameters, a few hundred steps) compiling would take
  longer than the whole run's optimizer steps. ``backend="compiled"`` compiles anyway.
- Else ``foreach`` on every device torch has foreach ops for, else ``reference``.

The optimizer keeps the reason next to the name (``backend_reason``), and
:class:`~lightning_optim.OptimizerCallback`'s one log line states both.

An optimizer resolves its ``backend`` argument once, at construction, with
:func:`resolve`, and takes the :class:`~.protocol.Backend` of that name from :func:`get`:
every backend is called the same way, ``backend.step(spec, bucket, group, ...)``, and
declares what it can do (``device_steps``, ``fused_grad_transform``, ``step_tensors``, ``proves_itself``;
see :mod:`.protocol`), which the optimizers and the clipper read instead of its name. Under
it each backend module has the low-level ``run(rule, params, grads, state, steps, group)``:
``steps`` are the step counts after this step's increment, Python floats for ``reference``
and ``foreach`` (read from CPU step tensors), those CPU tensors themselves for ``compiled``
(``step_tensors``: torch's kernels read them), the float32 0-d device step tensors
themselves for ``triton``, which counts and reads them on the device (so its step needs no
host sync and can be captured in a CUDA graph; see :mod:`.triton`).

torch's own keywords (:func:`from_torch_keywords`), so code written for ``torch.optim`` runs
unchanged; they only choose the backend, and ``backend`` stays the one attribute that says
what runs:

- ``foreach=True``: ``foreach``; ``foreach=False``: ``reference`` (torch's per-tensor loop);
- ``fused=True``: the single-pass path, ``triton`` (under ``auto``'s self-check) when every
  param is a CUDA tensor of a dtype it has and Triton is installed; on CPU, ``compiled`` where
  torch's fused kernels compute every group's rule (the kernels ``torch.optim``'s
  ``fused=True`` runs there); else ``foreach`` with one
  :class:`~lightning_optim.validation.LightningOptimWarning` that says why;
  ``fused=False``: anything but a single-pass backend (``triton``, ``compiled``);
- ``capturable=True``: the step counts live on the device on ``triton`` already; on another
  backend with CUDA params the step is the same but reads the counts on the host (not
  capturable in a CUDA graph), which warns once; CPU params: nothing to capture, a no-op;
- ``differentiable=True``: refused (``ValueError``): the step is in place under ``no_grad``.

An explicit ``backend`` that a keyword contradicts (``backend="reference", foreach=True``),
or ``foreach=True`` with ``fused=True``, raises
:class:`~lightning_optim.validation.ConflictingOptions` (a ``ValueError`` and, as torch raises
for the latter, a ``RuntimeError``).

Complex parameters reach a backend as real views (``torch.view_as_real``, done by
``Optimizer.step``), so every backend sees real tensors; the dtype a backend is checked
against is the real one (complex64: float32, complex128: float64).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..validation import ConfigurationError, ConflictingOptions, boolean, choice, invalid, optional_boolean
from . import compiled, foreach, reference, torch_kernels
from . import triton as triton_backend
from .protocol import Backend, Bucket

__all__ = ["BACKENDS", "SINGLE_PASS", "AUTO_COMPILE_MIN_PARAMS", "Backend", "Bucket", "get", "resolve",
           "resolve_why", "choose_auto", "confirm_auto", "from_torch_keywords", "capturable_warning", "real_dtype",
           "runner", "TORCH_KEYWORDS"]

BACKENDS = ("auto", "reference", "foreach", "triton", "compiled")
# The backends that update a bucket in one pass: what torch's ``fused=True`` asks for.
SINGLE_PASS = ("triton", "compiled")

# Devices whose foreach ops are known to work. torch falls back to a per-tensor C++ loop
# where it has no fused kernel, which still beats a Python loop.
_FOREACH_DEVICES = {"cpu", "cuda", "xpu", "mps", "hpu"}
_TRITON_DTYPES = {torch.float32, torch.bfloat16, torch.float16}
# Where ``auto`` may pick triton. (Tests add "cpu" to reach the same code under the interpreter.)
AUTO_TRITON_DEVICES = {"cuda"}

Runner = Callable[..., None]
# torch.optim's keywords that pick an implementation; accepted by every optimizer.
TORCH_KEYWORDS = ("foreach", "fused", "capturable", "differentiable")


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a backend computes in for ``dtype`` params: complex ones as their real view."""
    return dtype.to_real() if dtype.is_complex else dtype


# From how many parameters ``auto`` compiles on CPU a rule that torch has no kernel for
# (where a compile pays for itself: compiled.WORTH_COMPILING_FROM says why).
AUTO_COMPILE_MIN_PARAMS = compiled.WORTH_COMPILING_FROM

# (rule spec, param group) of each group, as the optimizer will run them.
Groups = Iterable[tuple[object, dict]]


def resolve(owner: str, backend: str, params: Iterable[torch.Tensor], groups: Groups = ()) -> str:
    """The concrete backend for ``backend`` on the devices of ``params``; ``groups``: each
    group's (rule spec, group), which ``auto`` reads on CPU (see :func:`choose_auto`)."""
    return resolve_why(owner, backend, params, groups)[0]


def resolve_why(owner: str, backend: str, params: Iterable[torch.Tensor], groups: Groups = ()) -> tuple[str, str]:
    """:func:`resolve`, and why: the reason ``auto`` gives for its choice (for the one-line
    log), or "asked for" for an explicit backend."""
    choice(owner, "backend", backend, BACKENDS)
    params = list(params)
    devices = {p.device.type for p in params}
    if backend == "triton":
        _check_triton(owner, params, devices)
        return backend, "asked for"
    if backend != "auto":
        return backend, "asked for"
    return choose_auto(params, list(groups))


def choose_auto(params: list[torch.Tensor], groups: list[tuple[object, dict]]) -> tuple[str, str]:
    """``auto``'s choice for ``params`` in ``groups``, and the reason it gives.

    - CUDA tensors of fp32/bf16/fp16 with Triton importable: ``triton`` (checked on the device
      before it is trusted, :func:`confirm_auto`; ``compiled`` if the check fails);
    - CPU tensors where every group's rule and options are computed exactly by one of torch's
      fused kernels (Adam, AdamW, SGD, Adagrad: :mod:`.torch_kernels`): ``compiled``, which runs
      those kernels, one pass, nothing to compile;
    - other CPU optimizers of at least :data:`AUTO_COMPILE_MIN_PARAMS` parameters: ``compiled``
      (Inductor, one pass per step, compiled once per process);
    - else ``foreach`` wherever torch has foreach ops, else ``reference``."""
    devices = {p.device.type for p in params}
    if (params and devices <= AUTO_TRITON_DEVICES and triton_backend.available()
            and (devices != {"cpu"} or triton_backend.interpreter_enabled())
            and all(real_dtype(p.dtype) in _TRITON_DTYPES for p in params)):
        return "triton", "CUDA tensors and Triton: one fused kernel per bucket"
    if not devices <= _FOREACH_DEVICES:
        return "reference", f"no foreach ops on {', '.join(sorted(devices - _FOREACH_DEVICES))}"
    if not params or devices != {"cpu"}:
        return "foreach", "multi-tensor ops"
    if groups and all(_torch_kernel_takes(spec, group) for spec, group in groups):
        return "compiled", "torch's fused kernels compute every group's rule: one pass, nothing to compile"
    n = sum(p.numel() for p in params)
    if n >= AUTO_COMPILE_MIN_PARAMS and compiled.why_unavailable() is None:
        return "compiled", (f"{n / 1e6:.1f}M parameters: one Inductor-compiled pass per step, worth its compile "
                            f"(once per process) from {AUTO_COMPILE_MIN_PARAMS / 1e6:g}M")
    why = compiled.why_unavailable()
    if why is not None:
        return "foreach", f"compiling is unavailable here ({why})"
    return "foreach", (f"{n / 1e6:.2f}M parameters: compiling a single pass (tens of seconds, once) would cost "
                       f"more than it saves below {AUTO_COMPILE_MIN_PARAMS / 1e6:g}M; backend='compiled' compiles anyway")


def _torch_kernel_takes(spec, group: dict) -> bool:
    """Whether torch's fused kernels update every param of ``group``, as far as the params
    tell before the first step (:func:`.torch_kernels.kernel_for` decides per bucket and step):
    dense CPU tensors of float32/float64 (complex ones as their real view), which never get
    fp32 masters."""
    if getattr(spec, "torch_kernel", None) is None or spec.torch_kernel(group) is None:
        return False
    return all(p.device.type == "cpu" and real_dtype(p.dtype) in torch_kernels.KERNEL_DTYPES and p.is_contiguous()
               for p in group["params"])


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
    dtypes = {p.dtype for p in params if real_dtype(p.dtype) not in _TRITON_DTYPES}
    if dtypes:
        raise ConfigurationError(
            f"{owner}: backend='triton' supports float32, bfloat16 and float16 parameters (and "
            f"complex64, as float32 pairs), not {sorted(str(d) for d in dtypes)}: use backend='foreach' for those."
        )


def from_torch_keywords(owner: str, backend: str, params: Iterable[torch.Tensor], *, foreach: bool | None = None,
                        fused: bool | None = None, capturable: bool = False,
                        differentiable: bool = False, torch_name: str | None = None,
                        groups: Groups = ()) -> tuple[str, str | None]:
    """The ``backend`` argument that torch's keywords ask for, to pass on to :func:`resolve`,
    and a warning to give once (or None). See the module docstring for the mapping.
    ``torch_name``: the ``torch.optim`` class with the same rule, for the advice; ``groups``:
    each group's (rule spec, group), as for :func:`resolve`."""
    choice(owner, "backend", backend, BACKENDS)
    foreach = optional_boolean(owner, "foreach", foreach)
    fused = optional_boolean(owner, "fused", fused)
    boolean(owner, "capturable", capturable)
    if boolean(owner, "differentiable", differentiable):
        where = f"torch.optim.{torch_name}(..., differentiable=True)" if torch_name else \
            "a torch.optim optimizer with differentiable=True"
        raise invalid(
            owner, "differentiable", True,
            "not supported: the step updates the parameters in place under torch.no_grad(), so no "
            f"autograd graph runs through it. To differentiate through optimizer steps use {where}, "
            "or write the update with torch.func; for training, leave differentiable=False",
        )
    if foreach and fused:
        raise ConflictingOptions(f"{owner}: foreach=True and fused=True ask for two implementations "
                                 "(`fused` and `foreach` cannot be `True` together, as in torch): pass one of them.")
    if backend != "auto":
        # A keyword contradicts an explicit backend when it asks for another one (True) or
        # rules this one out (False); foreach=False with backend="triton" agrees, as in torch.
        asks = {"foreach": ("foreach",), "fused": SINGLE_PASS}
        for key, value in (("foreach", foreach), ("fused", fused)):
            if (value is True and backend not in asks[key]) or (value is False and backend in asks[key]):
                wanted = (" or ".join(f"backend={b!r}" for b in asks[key]) if value
                          else f"a backend other than {backend!r}")
                raise ConflictingOptions(
                    f"{owner}: backend={backend!r} conflicts with {key}={value!r}, which asks for {wanted}: "
                    "pass one of them (backend is the one argument that picks what runs)."
                )
        return backend, None
    params = list(params)
    groups = list(groups)
    if fused:
        why = _why_not_fused(params)
        if why is None:
            return "auto", None  # auto's triton, under its self-check on the device
        if groups and {p.device.type for p in params} == {"cpu"} and all(_torch_kernel_takes(*sg) for sg in groups):
            return "compiled", None  # the very kernels torch.optim's fused=True runs on CPU
        fallback = "foreach" if {p.device.type for p in params} <= _FOREACH_DEVICES else "reference"
        return fallback, (f"{owner}: fused=True, but {why}; using backend={fallback!r} instead (the same update "
                          f"in several passes over memory instead of one). backend={fallback!r} silences this.")
    if foreach is not None:
        return "foreach" if foreach else "reference", None
    if fused is False and resolve(owner, "auto", params, groups) in SINGLE_PASS:
        return "foreach", None
    return "auto", None


def _why_not_fused(params: list[torch.Tensor]) -> str | None:
    """Why the fused (Triton) kernels cannot take ``params``, or None when they can."""
    devices = {p.device.type for p in params}
    if not devices or not devices <= AUTO_TRITON_DEVICES or (
            devices == {"cpu"} and not triton_backend.interpreter_enabled()):
        return (f"the parameters are on {', '.join(sorted(devices)) or 'no device'}, and the fused kernels "
                "are Triton kernels for CUDA tensors")
    why = triton_backend.why_unavailable()
    if why is not None:
        return f"the fused kernels are unavailable: {why}"
    dtypes = {p.dtype for p in params if real_dtype(p.dtype) not in _TRITON_DTYPES}
    if dtypes:
        return (f"the fused kernels take float32, bfloat16, float16 and complex64 parameters, not "
                f"{', '.join(sorted(str(d) for d in dtypes))}")
    return None


def capturable_warning(owner: str, resolved: str, params: Iterable[torch.Tensor]) -> str | None:
    """The warning for ``capturable=True`` on ``resolved``, or None where it holds or is moot."""
    if resolved == "triton" or all(p.device.type == "cpu" for p in params):
        return None  # triton counts on the device; CPU params have no CUDA graph to capture
    return (f"{owner}: capturable=True, but backend={resolved!r} keeps the step counts on the CPU and reads "
            "them on the host each step: the update is the same, but the step cannot be captured in a CUDA "
            "graph. backend='triton' (or fused=True) keeps them on the device.")


# The resolved backends and what each can do (see :mod:`.protocol`).
_RESOLVED: dict[str, Backend] = {
    "reference": Backend("reference", reference.run),
    "foreach": Backend("foreach", foreach.run),
    "triton": Backend("triton", triton_backend.run, device_steps=True, fused_grad_transform=True,
                      proves_itself=True),
    "compiled": Backend("compiled", compiled.run, fused_grad_transform=True, step_tensors=True),
}
# Where an ``auto`` choice that failed its check on the device goes instead: a CUDA
# optimizer to the compiled backend (Inductor's own Triton kernels, or foreach if it cannot
# compile), any other to foreach.
FALLBACK = "foreach"
CUDA_FALLBACK = "compiled"


def get(backend: str) -> Backend:
    """The :class:`~.protocol.Backend` of a resolved backend name."""
    return _RESOLVED[backend]


def capabilities(optimizer: object) -> Backend | None:
    """The backend an optimizer runs on (its ``backend`` attribute, resolved), or None for an
    optimizer that has none (a ``torch.optim`` one)."""
    name = getattr(optimizer, "backend", None)
    return _RESOLVED.get(name) if isinstance(name, str) else None


def runner(backend: str) -> Runner:
    """``run(rule, params, grads, state, steps, group)`` of a resolved backend."""
    return _RESOLVED[backend].run


def confirm_auto(owner: str, backend: str, checks: Iterable[tuple[object, dict]],
                 init_state: Callable) -> tuple[str, str] | None:
    """Whether ``auto``'s choice of ``backend`` stands for these (rule spec, group) pairs.

    None when the backend needs no proof or every group's kernel agrees with the reference
    on the group's devices and dtypes (:func:`.triton.selfcheck.verify`, cached per
    configuration and process); else ``(the backend to use instead, the warning to give)``.
    ``init_state(p, group)``: the optimizer's fresh state for a param."""
    if not _RESOLVED[backend].proves_itself:
        return None
    from .triton import selfcheck

    for spec, group in checks:
        for dtype, device in {(real_dtype(p.dtype), p.device) for p in group["params"]}:
            reason = selfcheck.verify(spec, group, dtype, device, init_state)
            if reason is not None:
                fallback = CUDA_FALLBACK if device.type == "cuda" else FALLBACK
                return fallback, (
                    f"{owner}: backend='auto' chose the fused Triton kernels, but their check against the "
                    f"reference failed on this machine: {reason}. Using backend={fallback!r} instead (same "
                    f"results). Please report this with your GPU, driver and Triton versions; "
                    f"backend={fallback!r} silences this warning."
                )
    return None
