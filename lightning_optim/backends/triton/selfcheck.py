"""A once-per-process check of the fused kernels on the device they will run on.

Why this exists
    CI checks every kernel against :mod:`..reference` under Triton's interpreter, which
    executes the kernel source in numpy: it proves the math, not the compiled code. A real
    GPU adds what the interpreter cannot see: the compiler (a Triton or driver version that
    miscompiles or fails to assemble a kernel), the architecture, vectorized loads,
    ``enable_fp_fusion``. ``backend="auto"`` may only pick ``triton`` on a device where the
    kernels have shown they agree with the reference there, so before trusting one it calls
    :func:`verify`, and falls back to ``foreach`` (with a warning carrying the reason) when
    it fails.

What it does
    For one (rule, compile-time options, dtype, device): two steps (t = 1, then t = 2 with
    other gradients, the counts advanced by the step prologue on the device as in
    ``Optimizer.step``) of :func:`.launcher.run` on scratch tensors, never the user's, against
    :func:`..reference.run` on CPU copies, then a comparison of the params (and the fp32
    master, with ``master_weights``) and of every fp32 state tensor. Two steps, because the
    first starts from the zero state and so never reads it. The scratch params are two
    small tensors, one of them longer than one ``BLOCK``, so a launch has several programs
    and a ragged tail.

Cost
    One compile of the kernel variant (which the training step would pay anyway, and then
    finds in Triton's cache) plus two launches on a few thousand elements, once per
    configuration and process: results are cached in :data:`_RESULTS`, keyed by the options
    that change the compiled code, so a learning-rate schedule never re-checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ... import rules
from .. import reference
from . import launcher

InitState = Callable[[Tensor, dict], dict[str, Tensor]]

# (rule, dtype, device, options) -> None (agrees) or the reason it does not.
_RESULTS: dict[tuple, str | None] = {}

# Hyperparameters that are runtime kernel arguments and may change every step (a schedule):
# they must not make a new check. The others stay in the key: a bool can be a compile-time
# switch, and a float can be one through ``!= 0`` (weight decay on/off, momentum).
_RUNTIME_ONLY = ("lr", "initial_lr", "name")

# fp32: both sides compute in fp32 but the kernel folds factors and may fuse multiply-adds,
# so a few ulps of rounding (~1e-7) per op; 1e-5 of the tensor's scale is far from that and
# far below what a wrong formula gives.
_FP32_TOL = 1e-5
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_SEED = 20240611


def options_key(group: dict) -> tuple:
    """The group's hyperparameters that may change the compiled kernel, hashable: every
    scalar option but the learning rate (tuples such as ``betas`` are runtime floats), and
    whether lr is a tensor (the launcher then reads it on the device: a compile-time switch
    of the step prologue, so another kernel variant), with its dtype."""
    lr = group.get("lr")
    scalars = tuple(sorted((k, v) for k, v in group.items()
                           if isinstance(v, (bool, int, float, str)) and k not in _RUNTIME_ONLY))
    return scalars + ((" lr tensor", str(lr.dtype) if isinstance(lr, Tensor) else None),)


def clear_cache() -> None:
    """Forget every result (tests)."""
    _RESULTS.clear()


def verify(rule: rules.RuleSpec | str, group: dict, dtype: torch.dtype, device: torch.device,
           init_state: InitState) -> str | None:
    """None when the fused kernel of ``rule`` agrees with the reference for the options of
    ``group``, ``dtype`` params on ``device``; else a one-line reason. Cached per process.

    ``init_state(p, group)``: the optimizer's fresh state for a param (its ``_init_state``).
    Exceptions from the launcher (compile, assembly, launch or driver errors) become the
    reason; exceptions from the reference are bugs and propagate.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    spec = rules.get(rule)
    key = (spec.name, dtype, str(device), options_key(group))
    if key not in _RESULTS:
        _RESULTS[key] = _check(spec, group, dtype, device, init_state)
    return _RESULTS[key]


def _shapes(spec: rules.RuleSpec, device: torch.device) -> list[tuple[int, ...]]:
    # One tensor past one block, with a ragged tail (61 and 13 are prime), so a launch has
    # several programs and a masked last block: 2 programs on CPU, where the interpreter
    # takes ~20 ms per program.
    block = launcher.BLOCK["cpu" if device.type == "cpu" else "cuda"]
    if spec.row_coupled:
        # 2-D: the rows share the H = 13 second moment, read at offset % H across blocks.
        return [(7, 13), (block // 13 + 2, 13)]
    return [(7, 13), (block + 61,)]


def _check(spec: rules.RuleSpec, group: dict, dtype: torch.dtype, device: torch.device,
           init_state: InitState) -> str | None:
    rule = spec.name  # (in the messages)
    h = {k: v for k, v in group.items() if k not in ("params", "param_names")}
    ref_h = h
    if isinstance(h.get("lr"), Tensor):
        # The launcher gets a copy of the tensor (same dtype and device: the same code path as
        # the real step); the reference takes a float (a one-time host read, fine here).
        lr = h["lr"]
        h = {**h, "lr": lr.detach().clone()}
        ref_h = {**h, "lr": float(lr)}
    master = bool(h.get("master_weights", False)) and dtype in _LOW_PRECISION
    gen = torch.Generator().manual_seed(_SEED)
    shapes = _shapes(spec, device)
    params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes] for _ in range(2)]
    fresh = [init_state(p, ref_h) for p in params]
    state = {k: [s[k].to(device) for s in fresh] for k in fresh[0]}
    if master:
        state["master_param"] = [p.to(torch.float32, copy=True) for p in params]

    # The reference's copies, on the CPU, before the launcher updates anything in place.
    ref_params = [p.to("cpu", copy=True) for p in params]
    ref_grads = [[g.to("cpu", copy=True) for g in gs] for gs in grads]
    ref_state = {k: [t.to("cpu", copy=True) for t in v] for k, v in state.items()}

    where = f"{_dtype_name(dtype)} params on {device}"
    # The optimizer's own path: persistent device counts, advanced by the step prologue.
    steps = [torch.zeros((), dtype=torch.float32, device=device) for _ in params]
    try:
        for gs in grads:
            launcher.run(spec, params, gs, state, steps, h, advance=True)
        if device.type == "cuda":
            # Launches are asynchronous: a fault in the kernel surfaces at the next sync.
            torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001  (any failure means: do not use this kernel)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"the triton {rule} kernel failed to compile/launch for {where}: {type(e).__name__}: {first}"

    counts = [float(t) for t in steps]
    if counts != [2.0] * len(params):
        return f"the triton {rule} step prologue left the step counts at {counts} after two steps for {where}"
    for t, gs in zip((1.0, 2.0), ref_grads):
        reference.run(spec, ref_params, gs, ref_state, [t] * len(ref_params), ref_h)

    for i, (a, b) in enumerate(zip(params, ref_params)):
        why = _compare(a.cpu(), b, low_precision=dtype in _LOW_PRECISION)
        if why:
            return f"triton {rule} step differs from the reference by {why} in param {i} for {where}"
    for k, values in ref_state.items():
        for i, (a, b) in enumerate(zip(state[k], values)):
            why = _compare(a.cpu(), b, low_precision=False)
            if why:
                return f"triton {rule} step differs from the reference by {why} in {k}[{i}] for {where}"
    return None


def _compare(a: Tensor, b: Tensor, *, low_precision: bool) -> str | None:
    """None when ``a`` (the kernel's) matches ``b`` (the reference's), else how far apart."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"shape/dtype {list(a.shape)} {a.dtype} instead of {list(b.shape)} {b.dtype}"
    if not b.numel():
        return None
    a64, b64 = a.double(), b.double()
    err = (a64 - b64).abs()
    if low_precision:
        # Both backends compute in fp32 and round once to the param's dtype; a different op
        # order (a folded factor, a fused multiply-add) can put the fp32 results on two sides
        # of a rounding boundary, so they may differ by one unit in the last place. One ulp
        # of b is at most eps * |b| for a normal b; the smallest normal covers b near zero,
        # where the spacing is fixed (subnormals). Anything beyond is a wrong result.
        info = torch.finfo(b.dtype)
        spacing = info.eps * b64.abs() + info.tiny
        ratio = (err / spacing).max().item()
        if not ratio <= 1.0:  # also NaN
            return f"{ratio:.3g} units in the last place (tolerance 1)"
        return None
    rel = err.max().item() / max(b64.abs().max().item(), 1e-30)
    if not rel <= _FP32_TOL or not math.isfinite(rel):
        return f"{rel:.2e} relative (tolerance {_FP32_TOL:g})"
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
