"""The compiled backend: every rule of :mod:`.reference`, compiled by Inductor over a bucket.

Each rule here is the reference rule written as a pure function of one tensor's values
(``w, g, state..., c``) that returns the new values, following the reference's numbered
steps; :func:`run` applies it to every tensor of a (device, dtype) bucket inside one
``torch.compile(fullgraph=True)`` graph and writes the results back in place. Inductor
fuses each tensor's whole update into one loop (a vectorised C++ loop on CPU, a Triton
kernel on CUDA), so a step reads p, g and the state once and writes p and the state once,
where the foreach backend streams the bucket through memory once per op.

Where torch already ships that loop (its fused Adam, AdamW, SGD and Adagrad kernels, for the
groups and buckets :func:`.torch_kernels.kernel_for` accepts: dense fp32/fp64 CPU tensors,
no masters), :func:`run` hands the bucket to torch's kernel instead:
the same single pass, nothing to compile (:mod:`.torch_kernels`), except for a bucket of 10M
elements or more that is clipped by norm: Inductor's graph applies the coefficient as it reads
g, where torch's kernel writes the clipped g back (4 more bytes per parameter), and at that
size the saving outweighs the compile. ``TORCH_KERNELS = False``
sends every bucket through Inductor (the benchmarks' "compiled (Inductor)" rows, the tests).

What specialises a graph, and what does not:

- the *structure* of a group (the rule, ``maximize``, ``amsgrad``, ``nesterov``,
  ``centered``, ``momentum != 0``, ``weight_decay != 0``, decoupled decay, master weights,
  a finished Coupled Adam row) is baked into the graph as Python constants: one compile per
  configuration;
- every *float* of a step (lr, betas, eps, weight decay, the bias corrections, NAdam's
  momentum products, RAdam's rectification) is computed on the host from the group and the
  step counts, in float64 as the reference computes them, and enters the graph as one
  ``[n_tensors, n_coefficients]`` tensor in the working dtype. An LR schedule, the step
  count, per-group lr or betas changes therefore never recompile;
- the bucket's tensors (their count, shapes, strides and dtypes) are static (``dynamic=False``):
  each distinct bucket gets its own copy of the step function (its own code object, so its
  own Dynamo cache) and compiles once; the same bucket reuses its graph on every step.

Step counts can differ inside a bucket (a param that first got a gradient late): the
coefficients are per tensor, and RAdam's switch between the rectified and the plain step is
a per-tensor 0/1 coefficient selected with ``where``, not a Python branch.

Coupled Adam's shared row: without sharding the mean of g^2 over dim 0 is computed in the
graph; with a row-sharded param (a ``row_mean`` hook) the local row sums are computed
outside the graph, finished by the hook (an all-reduce), and enter the graph as inputs, as
on the triton backend.

Clipping and AMP (``fused_grad_transform``, :mod:`.protocol`): the clip-by-norm coefficient
(a 0-d device tensor from :class:`~lightning_optim.clipping.GradientClipper`, handed over by
``Optimizer.scale_next_step``) multiplies each gradient inside the graph, and a clip-by-value
bound clamps it there, so the step reads g once where clipping first reads and writes it once
more (8 of fp32 AdamW's 36 bytes per parameter). Both enter as 0-d tensors: a coefficient or
bound that changes every step never recompiles; only having one or not is structural. The
``.grad`` tensors are left unclipped, as on triton (on torch's kernel path they come out
clipped, see :mod:`.torch_kernels`). The backend counts steps on the host (no
``device_steps``), so ``torch.amp.GradScaler`` unscales the gradients and skips inf steps on
the host, as for any torch optimizer.

If Inductor cannot compile a step (no C++ compiler, an unsupported torch or Python, an
Inductor error), the bucket runs on :mod:`.foreach` instead (same results, several passes
over memory), with one :class:`~lightning_optim.validation.LightningOptimWarning` per
process that names the reason; there the gradient transform is applied to the ``.grad``
tensors in place first, as on foreach.

Cost: compiling happens on the first step of each bucket configuration. On 2 CPU cores a
cold process pays ~30 s before the first graph (Inductor's own start-up) plus seconds per
graph; Inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``) makes later processes faster.
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .. import rules
from ..validation import LightningOptimWarning
from . import foreach, torch_kernels
from .protocol import apply_grad_transform

# ----- the rules, one tensor at a time, as pure functions ------------------------------------
# ``c`` is the tensor's row of coefficients (0-d tensors when indexed); ``f`` the structural
# flags of the configuration. Each returns (new w, {state key: new value}).


def _grad(w: Tensor, g: Tensor, c: Tensor, f: dict, *, l2: bool) -> Tensor:
    """Reference ``_grad``: negated to maximize, plus ``wd * p`` for L2 decay (c[0] = wd)."""
    if f["maximize"]:
        g = -g
    if l2 and f["wd"]:
        g = g + c[0] * w
    return g


def _decay(w: Tensor, g: Tensor, c: Tensor, f: dict) -> tuple[Tensor, Tensor]:
    """The Adam family's weight decay: L2 into g, or decoupled, w * (1 - lr * wd) (c[1])."""
    g = _grad(w, g, c, f, l2=not f["decoupled"])
    if f["decoupled"] and f["wd"]:
        w = w * c[1]
    return w, g


def _moments(g: Tensor, s: dict, c: Tensor) -> tuple[Tensor, Tensor]:
    """Adam's two EMAs: m = lerp(m, g, 1 - beta1) (c[2]), v = beta2 * v + (1 - beta2) * g^2 (c[3], c[4])."""
    return torch.lerp(s["exp_avg"], g, c[2]), s["exp_avg_sq"] * c[3] + c[4] * g * g


def _sgd(w, g, s, c, f):
    # c: wd, mu, 1 - dampening (1 on a tensor's first step), -lr
    g = _grad(w, g, c, f, l2=True)
    new = {}
    if f["momentum"]:
        # 1. buf = mu * buf + (1 - dampening) * g
        buf = s["momentum_buffer"] * c[1] + c[2] * g
        new["momentum_buffer"] = buf
        # 2. Nesterov: g + mu * buf
        g = g + c[1] * buf if f["nesterov"] else buf
    # 3. p = p - lr * g
    return w + c[3] * g, new


def _sgd_coefficients(h: dict, t: float) -> list[float]:
    return [h["weight_decay"], h["momentum"], 1.0 if t == 1 else 1 - h["dampening"], -h["lr"]]


def _adagrad(w, g, s, c, f):
    # c: wd, -clr, eps
    g = _grad(w, g, c, f, l2=True)
    # 2. sum = sum + g^2
    acc = s["sum"] + g * g
    # 3. p = p - clr * g / (sqrt(sum) + eps)
    return w + c[1] * (g / (acc.sqrt() + c[2])), {"sum": acc}


def _adagrad_coefficients(h: dict, t: float) -> list[float]:
    # 1. clr = lr / (1 + (t - 1) * lr_decay)
    return [h["weight_decay"], -h["lr"] / (1 + (t - 1) * h["lr_decay"]), h["eps"]]


def _rmsprop(w, g, s, c, f):
    # c: wd, alpha, 1 - alpha, eps, momentum, -lr
    g = _grad(w, g, c, f, l2=True)
    # 1. square_avg = alpha * square_avg + (1 - alpha) * g^2
    sq = s["square_avg"] * c[1] + c[2] * g * g
    new = {"square_avg": sq}
    if f["centered"]:
        # 2c. sqrt(E[g^2] - E[g]^2), clamped at 0 as in the reference
        ga = torch.lerp(s["grad_avg"], g, c[2])
        new["grad_avg"] = ga
        avg = (sq - ga * ga).clamp_min(0.0).sqrt()
    else:
        avg = sq.sqrt()
    avg = avg + c[3]
    if f["momentum"]:
        # 3m. buf = momentum * buf + g / avg; p = p - lr * buf
        buf = s["momentum_buffer"] * c[4] + g / avg
        new["momentum_buffer"] = buf
        return w + c[5] * buf, new
    # 3. p = p - lr * g / avg
    return w + c[5] * (g / avg), new


def _rmsprop_coefficients(h: dict, t: float) -> list[float]:
    return [h["weight_decay"], h["alpha"], 1 - h["alpha"], h["eps"], h["momentum"], -h["lr"]]


def _adam(w, g, s, c, f, row=None):
    # c: wd, 1 - lr * wd, 1 - beta1, beta2, 1 - beta2, sqrt(bc2), eps, -lr / bc1, coupling_scale
    w, g = _decay(w, g, c, f)
    # 1. m = beta1 * m + (1 - beta1) * g
    m = torch.lerp(s["exp_avg"], g, c[2])
    new = {"exp_avg": m}
    # 2. v = beta2 * v + (1 - beta2) * g^2; coupled: the mean of g^2 over dim 0 (``row``,
    #    finished outside the graph under sharding)
    if f["coupled"]:
        if row is None:
            row = _row_sum_of_squares(g) / g.shape[0]
        v = s["exp_avg_sq"] * c[3] + c[4] * row
    else:
        v = s["exp_avg_sq"] * c[3] + c[4] * g * g
    new["exp_avg_sq"] = v
    # 3. AMSGrad: the running maximum of v
    if f["amsgrad"]:
        v = torch.maximum(s["max_exp_avg_sq"], v)
        new["max_exp_avg_sq"] = v
    # 5. p = p - lr/bc1 * m / (sqrt(v / bc2) + eps), v scaled by coupling_scale if coupled
    if f["coupled"]:
        v = v * c[8]
    denom = v.sqrt() / c[5] + c[6]
    return w + c[7] * (m / denom), new


def _row_sum_of_squares(g: Tensor, chunks: int = 16) -> Tensor:
    """sum over dim 0 of g^2, keepdim: Coupled Adam's row before its mean. Summed as
    ``chunks`` blocks of rows and then across the blocks: Inductor's CPU loop parallelises a
    reduction over the leading dim of one [V, H] block across H only and reads g at about a
    third of the bus speed; the blocks give the threads contiguous runs of rows (1.19 ->
    0.77 ms for GPT-2-small's 20940 x 320 embedding on 2 cores; 16 blocks keep 16 threads
    busy). Rounds differently from one sum, within the reference's tolerance."""
    rows = g.shape[0] // chunks * chunks
    if rows < 16 * chunks:  # a small table: one reduction
        return (g * g).sum(0, keepdim=True)
    body = g[:rows].reshape(chunks, rows // chunks, *g.shape[1:])
    total = (body * body).sum(1).sum(0, keepdim=True)
    if rows < g.shape[0]:
        tail = g[rows:]
        total = total + (tail * tail).sum(0, keepdim=True)
    return total


def _adam_coefficients(h: dict, t: float) -> list[float]:
    beta1, beta2 = h["betas"]
    # 4. bias corrections (Kingma & Ba 2015, Alg. 1)
    bc1, bc2 = (1 - beta1**t, 1 - beta2**t) if h["bias_correction"] else (1.0, 1.0)
    return [h["weight_decay"], 1 - h["lr"] * h["weight_decay"], 1 - beta1, beta2, 1 - beta2,
            math.sqrt(bc2), h["eps"], -h["lr"] / bc1, h.get("coupling_scale", 1.0)]


def _nadam(w, g, s, c, f):
    # c: wd, 1 - lr * wd, 1 - beta1, beta2, 1 - beta2, bc2, eps, grad step, momentum step
    w, g = _decay(w, g, c, f)
    # 2. the usual moments
    m, v = _moments(g, s, c)
    denom = (v / c[5]).sqrt() + c[6]
    # 3. a gradient term and a look-ahead momentum term
    w = w + c[7] * (g / denom)
    return w + c[8] * (m / denom), {"exp_avg": m, "exp_avg_sq": v}


def _nadam_coefficients(h: dict, t: float, prod: float) -> list[float]:
    beta1, beta2 = h["betas"]
    lr, psi = h["lr"], h["momentum_decay"]
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * psi))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))
    return [h["weight_decay"], 1 - lr * h["weight_decay"], 1 - beta1, beta2, 1 - beta2, 1 - beta2**t,
            h["eps"], -lr * (1.0 - mu) / (1.0 - prod), -lr * mu_next / (1.0 - prod * mu_next)]


def _radam(w, g, s, c, f):
    # c: wd, 1 - lr * wd, 1 - beta1, beta2, 1 - beta2, bc1, lr, sqrt(bc2), eps, rect, rectified?
    w, g = _decay(w, g, c, f)
    m, v = _moments(g, s, c)
    m_hat = m / c[5]
    # 1-2. rectified where rho_t > 5 (c[10] = 1), plain momentum SGD otherwise
    rectified = m_hat * c[6] * (c[7] / (v.sqrt() + c[8])) * c[9]
    update = torch.where(c[10] > 0, rectified, m_hat * c[6])
    return w - update, {"exp_avg": m, "exp_avg_sq": v}


def _radam_coefficients(h: dict, t: float) -> list[float]:
    beta1, beta2 = h["betas"]
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    # 1. rho_t (Liu et al. 2020, eq. 5) and the rectification term r_t
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * beta2**t / bc2
    rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5 \
        if rho_t > 5.0 else 0.0
    return [h["weight_decay"], 1 - h["lr"] * h["weight_decay"], 1 - beta1, beta2, 1 - beta2, bc1, h["lr"],
            math.sqrt(bc2), h["eps"], rect, 1.0 if rho_t > 5.0 else 0.0]


def _lion(w, g, s, c, f):
    # c: wd (unused), 1 - lr * wd, 1 - beta1, -lr, 1 - beta2
    g = _grad(w, g, c, f, l2=False)
    if f["wd"]:
        w = w * c[1]
    # 1. p = p - lr * sign(beta1 * m + (1 - beta1) * g)
    w = w + c[3] * torch.lerp(s["exp_avg"], g, c[2]).sign()
    # 2. then m = beta2 * m + (1 - beta2) * g
    return w, {"exp_avg": torch.lerp(s["exp_avg"], g, c[4])}


def _lion_coefficients(h: dict, t: float) -> list[float]:
    beta1, beta2 = h["betas"]
    return [h["weight_decay"], 1 - h["lr"] * h["weight_decay"], 1 - beta1, -h["lr"], 1 - beta2]


def _yogi(w, g, s, c, f):
    # c: wd (unused), 1 - lr * wd, 1 - beta1, -(1 - beta2), sqrt(bc2), eps, -lr / bc1
    g = _grad(w, g, c, f, l2=False)
    if f["wd"]:
        w = w * c[1]
    m = torch.lerp(s["exp_avg"], g, c[2])
    # 1. v = v - (1 - beta2) * sign(v - g^2) * g^2, g^2 capped at the largest finite float
    g2 = (g * g).clamp_max(torch.finfo(g.dtype).max)
    v = s["exp_avg_sq"] + c[3] * torch.sign(s["exp_avg_sq"] - g2) * g2
    # 2. bias-corrected like Adam
    denom = v.sqrt() / c[4] + c[5]
    return w + c[6] * (m / denom), {"exp_avg": m, "exp_avg_sq": v}


def _yogi_coefficients(h: dict, t: float) -> list[float]:
    beta1, beta2 = h["betas"]
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    return [h["weight_decay"], 1 - h["lr"] * h["weight_decay"], 1 - beta1, -(1 - beta2), math.sqrt(bc2),
            h["eps"], -h["lr"] / bc1]


RULES: dict[str, tuple[Callable, Callable]] = {
    "sgd": (_sgd, _sgd_coefficients),
    "adagrad": (_adagrad, _adagrad_coefficients),
    "rmsprop": (_rmsprop, _rmsprop_coefficients),
    "adam": (_adam, _adam_coefficients),
    "coupled_adam": (_adam, _adam_coefficients),
    "nadam": (_nadam, _nadam_coefficients),
    "radam": (_radam, _radam_coefficients),
    "lion": (_lion, _lion_coefficients),
    "yogi": (_yogi, _yogi_coefficients),
}


def flags(rule: rules.RuleSpec | str, h: dict) -> tuple[tuple[str, bool], ...]:
    """The structural options of a group: what a graph is specialised on (floats are not)."""
    f = {"maximize": bool(h.get("maximize", False)), "wd": h.get("weight_decay", 0) != 0,
         "decoupled": bool(h.get("decoupled_weight_decay", False)), "coupled": rules.get(rule).row_coupled,
         "amsgrad": bool(h.get("amsgrad", False)), "nesterov": bool(h.get("nesterov", False)),
         "momentum": h.get("momentum", 0) != 0, "centered": bool(h.get("centered", False))}
    return tuple(sorted(f.items()))


# ----- the bucket step and its graphs --------------------------------------------------------


def _transform(g: Tensor, scale: Tensor | None, bound: Tensor | None) -> Tensor:
    """The fused gradient transform (``fused_grad_transform``, :mod:`.protocol`): g times the
    fp32 coefficient ``scale`` (clip-by-norm, ``min(1, max_norm / (||g|| + 1e-6))``, Pascanu
    et al. 2013, Alg. 2; or AMP's unscale), then clamped to ``[-bound, bound]`` (clip by
    value), in the working dtype, as :func:`.protocol.apply_grad_transform` does in passes."""
    if scale is not None:
        g = g * scale
    if bound is not None:
        g = torch.clamp(g, -bound, bound)
    return g


def _bucket_step(P, G, slots, masters, rows, C, scale, bound, *, rule, keys, config):
    """Update every tensor of a bucket: the body each compiled graph traces. ``slots`` are
    the state lists in ``keys`` order, ``masters`` the fp32 master copies (or None), ``rows``
    Coupled Adam's finished rows (or None), ``C`` the coefficients, one row per tensor;
    ``scale``/``bound``: the fused gradient transform's 0-d coefficient and clamp bound (or
    None each); ``rule``: the rule's name."""
    fn = RULES[rule][0]
    f = dict(config)
    coupled = f["coupled"]
    for i in range(len(P)):
        p = P[i]
        w = masters[i] if masters is not None else (p if p.dtype in (torch.float32, torch.float64) else p.float())
        g = _transform(G[i].to(w.dtype), scale, bound)
        s = {k: slots[j][i] for j, k in enumerate(keys)}
        if coupled:
            new_w, new = fn(w, g, s, C[i], f, None if rows is None else rows[i])
        else:
            new_w, new = fn(w, g, s, C[i], f)
        for k, value in new.items():
            s[k].copy_(value)
        if masters is not None:
            masters[i].copy_(new_w)
        p.copy_(new_w)


# One compiled function per distinct bucket, each on its own copy of the step's code object:
# Dynamo caches graphs per code object, so buckets never evict each other's graphs or count
# as recompilations of one another.
_GRAPHS: dict[tuple, Callable] = {}
# Where a rule's spec names a torch fused kernel for the group (:mod:`.torch_kernels`), run it
# instead of compiling; False sends every bucket through Inductor (benchmarks, tests).
TORCH_KERNELS = True
# From how many parameters a compile pays for itself: 25-70 s cold (3-8 s from Inductor's
# on-disk cache) on 2 cores, against ~3 ns per parameter and step the single pass saves over
# foreach (benchmarks/RESULTS.md): at 10M a cold compile is repaid after about 1000 steps, a
# warm one after 150. ``auto`` compiles from here (backends.AUTO_COMPILE_MIN_PARAMS), and a
# bucket clipped by norm goes through Inductor's graph even where torch has a kernel (run).
WORTH_COMPILING_FROM = 10_000_000
_compile: Callable = torch.compile
_failed: str | None = None  # why compiling failed in this process; then every step is foreach's
_uncompiled: set[str] = set()  # rules without a pure function here, warned about once


# Dynamo's guards already check every input's size and stride before a graph runs; Inductor's
# own re-check of each (``size_asserts``) costs ~2 us per tensor and step on the host.
_INDUCTOR_OPTIONS = {"size_asserts": False}


def _graph_for(key: tuple) -> Callable:
    fn = _GRAPHS.get(key)
    if fn is None:
        code = _bucket_step.__code__.replace(co_name=f"compiled_{key[0]}_step_{len(_GRAPHS)}")
        copy = types.FunctionType(code, _bucket_step.__globals__, code.co_name, None, None)
        copy.__kwdefaults__ = _bucket_step.__kwdefaults__
        fn = _GRAPHS[key] = _compile(copy, fullgraph=True, dynamic=False, options=_INDUCTOR_OPTIONS)
    return fn


def _coefficients(spec: rules.RuleSpec, state: dict, steps, h: dict) -> list[list[float]]:
    coefficients = RULES[spec.name][1]
    if not spec.scalar_state:
        rows: dict[float, list[float]] = {}  # usually one step count for the whole bucket
        return [rows[t] if t in rows else rows.setdefault(t, coefficients(h, t)) for t in steps]
    # NAdam's mu_product is a float32 scalar per param (torch's state format), multiplied and
    # read on the host as the reference does, so the graph never sees it.
    beta1, psi = h["betas"][0], h["momentum_decay"]
    torch._foreach_mul_(state["mu_product"], [beta1 * (1.0 - 0.5 * 0.96 ** (t * psi)) for t in steps])
    return [coefficients(h, t, x.item()) for t, x in zip(steps, state["mu_product"])]


def why_unavailable() -> str | None:
    """Why this process cannot compile a step (a compile failed already), or None."""
    return _failed


def _fall_back(reason: str) -> None:
    global _failed
    _failed = reason
    warnings.warn(
        f"backend='compiled' could not compile the optimizer step: {reason}. Using backend='foreach' "
        "for every step in this process instead (the same update, in several passes over memory instead "
        "of one). backend='foreach' silences this.",
        LightningOptimWarning, stacklevel=4,
    )


def run(rule: rules.RuleSpec | str, params, grads, state, steps, group, row_mean=None, *,
        grad_scale: Tensor | None = None, clip_value: float | None = None) -> None:
    """Apply ``rule`` to one (device, dtype) bucket in one compiled graph (see the module
    docstring). The signature and the meaning of every argument are :mod:`.foreach`'s:
    ``steps`` are Python floats, ``state["master_param"]`` the optional fp32 masters,
    ``row_mean(i, local_row_sum)`` Coupled Adam's hook for row-sharded params; plus the fused
    gradient transform (``fused_grad_transform``): every gradient is multiplied by the 0-d
    fp32 tensor ``grad_scale`` and then clamped to ``[-clip_value, clip_value]`` inside the
    graph, as it is read for the update, so ``grads`` are left as they are (a bucket on torch's
    kernel writes them back clipped, :mod:`.torch_kernels`).

    A rule without a pure function here runs on :mod:`.foreach` (the same update), with one
    warning per rule and process; there, and wherever the bucket falls back to foreach, the
    transform is applied to ``grads`` in place first, as for a backend without it."""
    spec = rules.get(rule)
    masters = state.get("master_param")
    if TORCH_KERNELS:
        kernel = torch_kernels.kernel_for(spec, group, params, grads, state)
        if (kernel is not None and grad_scale is not None and clip_value is None and _failed is None
                and sum(p.numel() for p in params) >= WORTH_COMPILING_FROM):
            # A large bucket clipped by norm: the coefficient inside Inductor's graph saves the
            # kernel's write-back of the clipped g (32 instead of 36 B/param for fp32 AdamW),
            # which outweighs a compile from this size on (benchmarks/RESULTS.md).
            kernel = None
        if kernel is not None:  # torch has this very loop built in: nothing to compile
            torch_kernels.run(kernel, params, grads, state, _step_tensors(steps), group, grad_scale=grad_scale,
                              clip_value=clip_value)
            return
    steps = _floats(steps)
    if spec.name not in RULES:
        if spec.name not in _uncompiled:
            _uncompiled.add(spec.name)
            warnings.warn(f"backend='compiled' has no compiled form of the {spec.name} rule: it runs on "
                          "backend='foreach' (the same update, in several passes over memory).",
                          LightningOptimWarning, stacklevel=4)
        _foreach(spec, params, grads, state, steps, group, row_mean, grad_scale, clip_value)
        return
    rule = spec.name
    if _failed is not None or not params:
        _foreach(spec, params, grads, state, steps, group, row_mean, grad_scale, clip_value)
        return
    keys = tuple(k for k in state if k != "master_param" and k not in spec.scalar_state)
    work_dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    device = params[0].device
    config = flags(spec, group)
    # The clamp bound enters as a 0-d tensor: a bound that changes between steps (a schedule
    # of clip values) is a new input, not a new graph. Only None vs a bound is structural.
    bound = None if clip_value is None else torch.tensor(float(clip_value), dtype=work_dtype).to(device)
    # Computed before any state changes, so a failed compile can hand the bucket to foreach.
    finished = None
    if spec.row_coupled and row_mean is not None:
        # The shared row is the mean of the *transformed* g^2: this read of g is outside the
        # graph (the hook all-reduces), so the transform is applied here too.
        finished = [row_mean(i, _transform(g.to(work_dtype), grad_scale, bound).square().sum(0, keepdim=True))
                    for i, g in enumerate(grads)]
    key = (rule, config, keys, masters is not None, finished is not None, device, params[0].dtype,
           tuple(p.shape for p in params), grad_scale is not None, bound is not None)
    first = key not in _GRAPHS
    try:
        graph = _graph_for(key)
    except Exception as error:  # torch.compile itself refused (an unsupported Python or torch)
        _fall_back(f"{type(error).__name__}: {error}")
        _foreach(spec, params, grads, state, steps, group, row_mean, grad_scale, clip_value)
        return
    before = [x.clone() for k in spec.scalar_state for x in state[k]] if first else None
    rows = _coefficients(spec, state, steps, group)
    if all(r is rows[0] for r in rows):  # one step count: one row, repeated in C++
        C = torch.tensor(rows[0], dtype=work_dtype).repeat(len(rows), 1)
    else:
        C = torch.tensor(rows, dtype=work_dtype)
    C = C.to(device, non_blocking=True)
    slots = [list(state[k]) for k in keys]
    try:
        graph(list(params), list(grads), slots, None if masters is None else list(masters), finished, C,
              grad_scale, bound, rule=rule, keys=keys, config=config)
    except Exception as error:
        if not first:
            raise
        # Compilation happens on the first call, before the graph touches a tensor: the
        # bucket is as it was, but NAdam's products were already advanced on the host.
        if before is not None:
            for x, b in zip((x for k in spec.scalar_state for x in state[k]), before):
                x.copy_(b)
        _GRAPHS.pop(key, None)
        _fall_back(f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}")
        _foreach(spec, params, grads, state, steps, group, row_mean, grad_scale, clip_value)


def _floats(steps) -> list[float]:
    """The step counts as floats: ``Backend.step`` hands this backend the step tensors."""
    if steps and isinstance(steps[0], Tensor):
        return torch.stack(list(steps)).tolist()
    return list(steps)


def _step_tensors(steps) -> list[Tensor]:
    """The step counts as the CPU float32 tensors torch's kernels read (direct callers of
    :func:`run` may pass floats)."""
    if steps and isinstance(steps[0], Tensor):
        return list(steps)
    return [torch.tensor(float(t), dtype=torch.float32) for t in steps]


def _foreach(spec, params, grads, state, steps, group, row_mean, grad_scale, clip_value) -> None:
    """The bucket on :mod:`.foreach`: the gradient transform as passes over ``grads`` first."""
    if grad_scale is not None or clip_value is not None:
        apply_grad_transform(grads, grad_scale, clip_value)
    foreach.run(spec, params, grads, state, steps, group, row_mean=row_mean)
