"""The launcher: from a bucket of tensors to one kernel launch.

``run`` does, per (device, dtype) bucket: check dtypes; bring every tensor into a layout
the kernel can walk linearly (see :func:`_layouts`); Coupled Adam's row pre-pass; the
lr- and step-dependent factors (the prologue kernel, :func:`_device_factors`);
the table from the cache; one launch; copy back any work copies. The design: ``docs/triton.md``.
"""

from __future__ import annotations

import importlib.util
import struct
import sys
from collections.abc import Callable, Sequence
from operator import attrgetter
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from ... import rules
from ...rules import Launch, RuleSpec
from ...validation import invalid
from .table import TableCache

_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# Elements per program. On GPUs 2048 fp32 (8 KiB per stream) with 4 warps is 16 elements
# per thread: four 16-byte vector accesses per stream, enough in flight to saturate HBM.
# The interpreter executes programs one by one in numpy, so smaller blocks keep "more
# than one block" cheap to test there.
BLOCK = {"cuda": 2048, "cpu": 128}
NUM_WARPS = 4

TABLES = TableCache()

RowMean = Callable[[int, Tensor], Tensor]

_kernel_modules: dict[bool, ModuleType] = {}
_dummies: dict[torch.device, Tensor] = {}


def kernels(device: torch.device) -> ModuleType:
    """The kernels, compiled for a GPU or, for CPU tensors, run by Triton's interpreter.

    ``@triton.jit`` decides between the two when it decorates (from TRITON_INTERPRET), so
    ``kernels.py`` is loaded once per mode with the switch set for that load only: CPU
    tests and CUDA tests can then share one process.
    """
    interpret = device.type == "cpu"
    module = _kernel_modules.get(interpret)
    if module is None:
        import triton

        name = f"{__package__}.kernels_{'interpreted' if interpret else 'compiled'}"
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("kernels.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.interpret = interpret
            spec.loader.exec_module(module)
        _kernel_modules[interpret] = module
    return module


def _dummy(device: torch.device) -> Tensor:
    """A one-element fp32 tensor for pointer arguments a launch does not use."""
    t = _dummies.get(device)
    if t is None:
        t = _dummies[device] = torch.zeros(4, dtype=torch.float32, device=device)
    return t


def _kind(owner: str, dtype: torch.dtype) -> int:
    if dtype not in _KIND:
        raise invalid(owner, "dtype", dtype, "the Triton backend supports float32, bfloat16 and float16 "
                      "tensors only; use backend='foreach' for float64")
    return _KIND[dtype]


# ----- layouts -----------------------------------------------------------------------------


def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill [data_ptr, data_ptr + numel) exactly,
    in some order of the dims (a transposed param is fine, a slice is not)."""
    if t.is_contiguous():
        return True
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Same shape and, wherever a dim has more than one element, the same strides: then
    element k of one storage is element k of the other."""
    if a.shape != b.shape:
        return False
    if a.is_contiguous() and b.is_contiguous():
        return True
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n != 1)


def _layouts(params: Sequence[Tensor], grads: Sequence[Tensor], states: list[list[Tensor]],
             coupled: bool) -> tuple[list[Tensor], list[Tensor], list[list[Tensor]], list[tuple[Tensor, Tensor]]]:
    """Tensors the kernel can walk as flat arrays, and the (original, copy) pairs to write back.

    The kernel indexes p, g and every state tensor of one param by the same flat offset, so
    they must share a dense layout. A dense param (contiguous, or e.g. transposed) is used
    in place with its own layout; a param that is not dense (a slice of a larger tensor)
    is updated through a contiguous copy and copied back, as is any state tensor whose
    layout differs from its param's (e.g. loaded from a state dict). Grads are only read:
    a grad with another layout is copied into the param's. Coupled params must be
    row-major (the row of the shared second moment is indexed by offset % H).
    """
    if _all_plain(params, grads, states):
        return params, grads, states, []  # as given: nothing to copy
    ps, gs, ss, back = [], [], [[] for _ in states], []
    for i, p in enumerate(params):
        work = p if (p.is_contiguous() if coupled else _dense(p)) else p.contiguous()
        if work is not p:
            back.append((p, work))
        ps.append(work)
        g = grads[i]
        if not _same_layout(g, work):
            g = torch.empty_like(work, dtype=g.dtype).copy_(g)
        gs.append(g)
        for j, slot in enumerate(states):
            s = slot[i]
            row = s.shape != work.shape  # Coupled Adam's (1, H) row
            if not (s.dtype == torch.float32 and (s.is_contiguous() if row else _same_layout(s, work))):
                copy = (s.to(torch.float32, memory_format=torch.contiguous_format, copy=True) if row
                        else torch.empty_like(work, dtype=torch.float32).copy_(s))
                back.append((s, copy))
                s = copy
            ss[j].append(s)
    # One grad dtype per launch: grads that differ from the first are cast to the param's.
    gdtype = gs[0].dtype
    gs = [g if g.dtype == gdtype else g.to(gdtype) for g in gs]
    return ps, gs, ss, back


_shape = attrgetter("shape")
_dtype = attrgetter("dtype")
_device = attrgetter("device")


def _all_plain(params: Sequence[Tensor], grads: Sequence[Tensor], states: list[list[Tensor]]) -> bool:
    """The common case, checked for the whole bucket with C-level ``map`` (this runs every
    step, and a Python loop over 150 tensors costs more than the launch): every param and
    grad contiguous with equal shapes, one grad dtype, every state tensor contiguous fp32
    (then it is in its param's layout, or is Coupled Adam's (1, H) row)."""
    contiguous = Tensor.is_contiguous
    if not (all(map(contiguous, params)) and all(map(contiguous, grads))
            and list(map(_shape, params)) == list(map(_shape, grads)) and len(set(map(_dtype, grads))) == 1):
        return False
    return all(all(map(contiguous, slot)) and set(map(_dtype, slot)) <= {torch.float32} for slot in states)


# ----- per-rule host work: factors, slots, arguments ----------------------------------------
# Everything rule-specific comes from the rule's spec (:mod:`lightning_optim.rules`):
# ``spec.launch(group)`` names the kernel, its state slots, its runtime floats and switches,
# and the prologue's code and arguments.


# Tensors per program of the step prologue (a power of two).
PROLOGUE_BLOCK = 128
# Columns per program of Coupled Adam's row update (H is a model width: a few programs).
ROW_BLOCK = 1024


def _split(x: float) -> tuple[float, float]:
    """``x`` as fp32 ``hi + lo`` (Triton passes Python floats as fp32): hi is x rounded to
    fp32, lo the rest, so hi + lo in fp64 is x to ~2^-48 relative."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


def _lr(lr: float | Tensor, device: torch.device) -> tuple[Tensor | None, float]:
    """(the lr tensor the prologue reads, or None; the float it takes otherwise).

    A tensor lr stays a tensor all the way to the kernel: read on the device at launch
    time, so a scheduler's in-place ``fill_`` reaches a replayed CUDA graph. One on another
    device or of another dtype is converted (an op, not a host read: still capturable)."""
    if not isinstance(lr, Tensor):
        return None, float(lr)
    if lr.numel() != 1:
        raise invalid("backend 'triton'", "lr", f"a tensor of shape {list(lr.shape)}",
                      "a tensor lr must have one element")
    if lr.device != device or lr.dtype not in (torch.float32, torch.float64):
        lr = lr.to(device=device, dtype=torch.float32, non_blocking=True)
    return lr, 0.0


def _check_device_scalars(key: str, tensors: Sequence[Tensor], device: torch.device) -> None:
    """Every tensor a float32 one-element tensor on ``device`` (the step counts and NAdam's
    ``mu_product`` on this backend), checked with C-level ``map``: this runs every step for
    every tensor; the loop only names the culprit."""
    if (set(map(_device, tensors)) <= {device} and set(map(_dtype, tensors)) <= {torch.float32}
            and set(map(Tensor.numel, tensors)) <= {1}):
        return
    for t in tensors:
        if t.device != device or t.dtype != torch.float32 or t.numel() != 1:
            raise invalid("backend 'triton'", key, f"a {t.dtype} tensor of shape {list(t.shape)} on {t.device}",
                          f"device {key} tensors must be float32 0-d tensors on the params' device ({device})")


def _device_factors(spec: RuleSpec, plan: Launch, h: dict, state: dict[str, list[Tensor]],
                    steps: Sequence[Tensor], found_inf: Tensor | None, device: torch.device,
                    advance: bool = False) -> Tensor:
    """The per-tensor factors of a bucket: one launch of the step prologue, reading each
    ``t`` (and the rule's scalar state, NAdam's ``mu_product``) through a cached table of
    their addresses and lr from its tensor or argument, writing an fp32 ``(n, 4)`` device
    array. ``advance``: the prologue counts this step first (``t += 1 - found_inf``, in place)."""
    _check_device_scalars("step", steps, device)
    lr_tensor, lr = _lr(h["lr"], device)
    scalars = [list(state[k]) for k in spec.scalar_state]
    for key, values in zip(spec.scalar_state, scalars):
        _check_device_scalars(key, values, device)
    n = len(steps)
    tab = TABLES.get([list(steps)] + scalars, None, BLOCK["cpu"])
    out = torch.empty((n, 4), dtype=torch.float32, device=device)
    args = [a for v in (lr, *plan.prologue_args) for a in _split(v)]
    dummy = _dummy(device)
    kernels(device).factors_kernel[(_cdiv(n, PROLOGUE_BLOCK),)](
        tab.table, out, dummy if found_inf is None else found_inf, dummy if lr_tensor is None else lr_tensor,
        n, *args, W=tab.width, BLOCK=PROLOGUE_BLOCK, RULE=int(plan.prologue), BIAS=plan.bias,
        HAS_FOUND=found_inf is not None,
        # Unfused, as the host's float64 formulas (explicit: Triton's default is changing).
        LR_TENSOR=lr_tensor is not None, ADVANCE=advance, num_warps=1, enable_fp_fusion=False,
    )
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _coupled_rows(plan: Launch, grads: Sequence[Tensor], state: dict[str, list[Tensor]], h: dict,
                  row_mean: RowMean | None, grad_scale: Tensor | None, found_inf: Tensor | None,
                  clip_value: float | None) -> None:
    """Coupled Adam's step 2 (and 3) on the (1, H) rows, before the elementwise kernel.

    Per coupled tensor: the sum over dim 0 of g^2 in fp32 (one read of g: ``vector_norm``
    upcasts on the fly), then ``row_mean(i, sum)`` -> the mean over the global vocabulary
    (a hook that may all-reduce across the ranks of a row-sharded tensor), then one launch
    of :func:`kernels.coupled_row_kernel` for the EMA, the unscale and the AMSGrad maximum.
    Clip-by-value clamps each gradient before it is squared, so that path scales and clamps
    a copy of g here.
    """
    beta2 = float(h["betas"][1])
    amsgrad = len(plan.rows) == 2  # the EMA row and its running maximum
    for i, g in enumerate(grads):
        scale = grad_scale
        if clip_value is not None:
            # A copy: g.float() of an fp32 grad is the grad itself, which must stay as it is.
            g = g.to(torch.float32, copy=True) if grad_scale is None else g.float() * grad_scale
            row_sum = g.clamp_(-clip_value, clip_value).square_().sum(0, keepdim=True)
            scale = None
        else:
            row_sum = torch.linalg.vector_norm(g, 2, dim=0, keepdim=True, dtype=torch.float32).square_()
        rows = g.shape[0]
        if row_mean is not None:
            row_sum, rows = row_mean(i, row_sum), 1
        # The rows are (1, H) fp32 state: contiguous unless set by hand (then a work copy).
        rows_state = [state[k][i] for k in plan.rows]
        work = [x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
                for x in (row_sum, *rows_state)]
        H = work[1].numel()
        if H:
            dummy = _dummy(g.device)
            kernels(g.device).coupled_row_kernel[(_cdiv(H, ROW_BLOCK),)](
                work[0], work[1], work[-1], dummy if scale is None else scale,
                dummy if found_inf is None else found_inf, H, float(rows), beta2,
                BLOCK=ROW_BLOCK, HAS_SCALE=scale is not None, HAS_FOUND=found_inf is not None, AMSGRAD=amsgrad,
                num_warps=NUM_WARPS, enable_fp_fusion=False,  # the reference's separate roundings
            )
        for original, copy in zip(rows_state, work[1:]):
            if copy is not original:
                original.copy_(copy)


# ----- the entry points -----------------------------------------------------------------------


def run(rule: RuleSpec | str, params: Sequence[Tensor], grads: Sequence[Tensor], state: dict[str, list[Tensor]],
        steps: Sequence[Tensor] | Sequence[float], group: dict, row_mean: RowMean | None = None, *,
        grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
        clip_value: float | None = None, advance: bool = False) -> None:
    """Apply ``rule`` (its :class:`~lightning_optim.rules.RuleSpec` or name) to one (device,
    dtype) bucket in one kernel launch (``docs/triton.md``).

    ``steps``: this step's counts, as device step tensors or as floats, as the other
    backends take them (put on the device here). ``advance=True`` (what ``Optimizer.step``
    passes): the device step tensors hold the previous counts, and the step prologue
    counts this step on the device, ``t += 1``, taken back when ``found_inf`` is set."""
    if not params:
        return
    owner = "backend 'triton'"
    device = params[0].device
    kind = _kind(owner, params[0].dtype)
    for dtype in set(map(_dtype, grads)):
        _kind(owner, dtype)
    if clip_value is not None and not clip_value >= 0:
        raise invalid(owner, "clip_value", clip_value, "must be >= 0")
    if steps and not isinstance(steps[0], Tensor):
        if advance:
            raise invalid(owner, "steps", "floats with advance=True", "only device step tensors can be advanced")
        steps = [torch.tensor(float(t), dtype=torch.float32, device=device) for t in steps]
    spec = rules.get(rule)
    plan = spec.launch(group)
    keys = plan.slots
    master = state.get("master_param")
    if master is not None and kind == _KIND[torch.float32]:
        raise invalid(owner, "master_param", "fp32 params", "master weights are for bfloat16/float16 params only")
    coupled = spec.row_coupled
    if coupled:
        # Before the layout copies, so a copied row already holds the new second moment.
        _coupled_rows(plan, grads, state, group, row_mean, grad_scale, found_inf, clip_value)
    # lr- and step-dependent factors come from the step prologue, on the device (before the
    # elementwise kernel on the same stream; also for a bucket of empty tensors: NAdam's
    # mu_product advances for every tensor that got a gradient, as in the reference).
    factors = _device_factors(spec, plan, group, state, steps, found_inf, device, advance)
    slot_lists = [list(state[k]) for k in keys] + ([list(master)] if master is not None else [])
    ps, gs, ss, back = _layouts(params, grads, slot_lists, coupled)
    block = BLOCK["cpu" if device.type == "cpu" else "cuda"]
    rowlens = [max(1, p.numel() // p.shape[0]) if p.numel() else 1 for p in ps] if coupled else None
    tab = TABLES.get([ps, gs, *ss], rowlens, block)
    if tab.nblocks:
        dummy = _dummy(device)
        kernel = getattr(kernels(device), plan.kernel)
        kernel[(tab.nblocks,)](
            tab.table, tab.blocks,
            factors,
            dummy if grad_scale is None else grad_scale,
            dummy if found_inf is None else found_inf,
            **plan.floats, clip=float(clip_value or 0.0),
            W=tab.width, BLOCK=block, KIND=kind, GKIND=_KIND[gs[0].dtype], ALIGNED=tab.aligned,
            HAS_SCALE=grad_scale is not None, HAS_FOUND=found_inf is not None,
            HAS_CLIP=clip_value is not None, MASTER=master is not None, MSLOT=len(keys) + 2,
            MAXIMIZE=bool(group.get("maximize", False)), **plan.switches,
            num_warps=NUM_WARPS, enable_fp_fusion=True,
        )
    for original, copy in back:
        original.copy_(copy)
