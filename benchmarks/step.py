"""Time one ``optimizer.step()`` of every registry rule on a GPT-2-small-shaped parameter list.

A benchmark, not a test: it prints a markdown table and exits 0; nothing here asserts speed.

What it measures
    Only ``opt.step()``. The parameter list has GPT-2 small's shapes (wte, wpe, 12 blocks
    of ln_1 / attn.c_attn / attn.c_proj / ln_2 / mlp.c_fc / mlp.c_proj, ln_f: 148 tensors)
    at ``--width`` d. The vocabulary defaults to 50257 scaled by d/768, so the embedding
    keeps GPT-2's share of the parameters (about 31%); ``--width 768 --vocab 50257`` is the
    real 124M-parameter model. The default width, 320 (21.8M parameters, 350 MB of p, g, m, v:
    ten times the 32 MB L3 of the 2-core EPYC it was tuned on), makes one torch foreach
    AdamW step take about 25-40 ms there and the whole run about a minute. Wider models
    (>= 352 there) cross into a regime where glibc hands the foreach temporaries back to the
    OS after every step, so every step page-faults them in again (see ``faults/step``:
    about 2 us per 4 KiB page there, plus erratic stalls). Whether a run is in that regime
    depends on the heap's history, so it can flip between runs and configurations even at
    320. ``--keep-freed-memory`` removes the effect, as a caching allocator would.

    Parameters and gradients are drawn once from a fixed generator (never zeros). Every
    configuration gets its own copy of the parameters, starting from the same values;
    all share the same gradient tensors (checked unchanged at the end). Each
    configuration takes ``--warmup`` untimed steps (the first one creates the state), then
    the configurations are timed in ``--repeats`` interleaved rounds: round-robin over
    all configurations, ``--steps`` individually timed steps each, the starting
    configuration rotating every round, so drift (clocks, other load) hits all of them
    alike. The reported time is the median over all timed steps; ``spread`` is the
    interquartile range of the per-round medians over the median: differences smaller than
    it are noise. ``auto`` and ``foreach`` run the same code on CPU and CUDA, so the gap
    between those two rows is another reading of the noise. On CUDA each step is timed
    with CUDA events and the device is synchronized after every slice; on CPU with
    ``time.perf_counter``.

Baselines, measured in the same run, same parameters and gradients
    ``torch.optim.AdamW(foreach=True)``, ``torch.optim.AdamW(fused=True)`` (CPU fused
    kernels exist since torch 2.4) and ``torch.optim.Adam(foreach=True)``. Ratios are
    our time over the baseline's time: above 1 is slower.

Effective bandwidth
    ``B/param`` is the fewest bytes a step must move: every parameter read and written,
    every gradient read, every state tensor (not the scalar ``step``) read and written,
    taken from the actual tensors after warm-up. For fp32 Adam/AdamW that is 28 B/param
    (p, g, m, v read; p, m, v written). ``GB/s`` is that over the median time: a fused
    one-pass kernel can approach the memory ceilings printed in the header (a large
    copy, and a large in-place ``a.add_(b)``, the access pattern of an optimizer update);
    a foreach implementation makes several passes over memory per step (see the note
    printed under the table), so its effective GB/s is about the ceiling divided by
    (bytes it really moves / minimum bytes). With
    bf16 parameters our state stays fp32 (torch's baselines keep bf16 state), which the
    byte count reflects.

Triton
    ``triton`` (the fused multi-tensor kernels, one launch per bucket) is timed on CUDA
    only; on a CPU the row is skipped with the reason printed (the kernels run on CPUs only
    in Triton's interpreter, a test tool). Its ``B/param`` is the kernel's own byte count
    (``lightning_optim.backends.triton.bytes_per_param``, worked out per rule in that
    package's docstring), so its GB/s is comparable to the copy ceiling. With triton or
    compiled, more rows time a clipped AdamW step: ``GradientClipper(mode="norm")`` handing
    its coefficient to the single-pass step of each (which applies it as it reads g), against
    ``torch.nn.utils.clip_grad_norm_`` + ``torch.optim.AdamW(fused=True)``. Their ``B/param``
    counts the norm's read of g (fp32: 28 + 4 = 32 for ours) and, for torch's path, the
    rescale's read and write of g as well (40). ``--max-norm``
    defaults to 1.0, the issue's target: every step clips on both sides (torch's rescales
    the shared grads to norm 1 once, then by a coefficient of about 1 each step).

Compiled
    ``compiled`` (one pass over memory: torch's own fused kernel where one computes the
    rule, Adam/AdamW/SGD/Adagrad on CPU; else the rule compiled by Inductor over the bucket)
    is timed on every device, and ``compiled (Inductor)`` (backend ``inductor`` here: the
    same with torch's kernels switched off) puts Inductor's graph of those four rules next to
    torch's kernel. The clipped AdamW rows run on ``auto`` (on CPU torch's kernel, which takes
    the coefficient as its divisor and writes the clipped g back: 36 B/param) and on Inductor
    (the coefficient inside the graph: 32 B/param). A first step that compiles: the run prints that cost per row,
    cold (a fresh Inductor cache directory, unless ``--inductor-cache`` names one) and warm
    (the same step again after ``torch._dynamo.reset()``: Dynamo traces again, Inductor reads
    its on-disk cache). A new process pays about the warm figure plus Inductor's start-up.

Floor
    ``floor ms`` is ``B/param`` x params / the in-place bandwidth measured in the header
    (``a.add_(b)``): the time a single-pass step that moves only the bytes it must would take
    at that bus speed; ``vs floor`` is the median over it.

Backends
    ``auto`` resolves to ``triton`` on CUDA when Triton is installed; on CPU to ``compiled``
    where torch's fused kernels compute the rule or the model has 10M parameters or more, else
    ``foreach`` (the resolved name is shown), and is measured anyway, as a check that
    resolution costs nothing per step. ``reference``
    (one tensor at a time, the test oracle) is only measured with ``--with-reference``.
    On CUDA it launches several kernels per tensor and is slow. On a CPU it is about as
    fast as foreach (torch's CPU foreach ops are a C++ loop over the tensors anyway; the
    per-tensor loop keeps small tensors in cache across the rule's ops and frees each
    temporary at once, so it never page-faults).

Examples::

    python benchmarks/step.py                                   # about a minute on 2 CPU cores
    python benchmarks/step.py --rules adamw,coupled_adam --width 768 --vocab 50257
    python benchmarks/step.py --with-reference --width 64
    python benchmarks/step.py --device cuda --width 768 --dtype bfloat16 --json out.json
    python benchmarks/step.py --device cuda --width 768 --vocab 50257 --rules adamw --backends foreach,triton
    python benchmarks/step.py --device cuda --sizes 16777216x8,1024x100 --rules adamw,lion
"""

from __future__ import annotations

import argparse
import ctypes
import os
import tempfile
import gc
import json
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from common import cpu_name, pick_device, sync
from lightning_optim.backends import compiled as compiled_backend
from lightning_optim.backends import torch_kernels
from lightning_optim.backends import triton as triton_backend
from lightning_optim.clipping import GradientClipper
from lightning_optim.registry import create_optimizer, optimizers, options

GPT2_VOCAB = 50257
GPT2_WIDTH = 768
N_CTX = 1024
N_LAYER = 12
DEFAULT_WIDTH = 320
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ----- the parameter list ---------------------------------------------------------------------


def gpt2_shapes(width: int, vocab: int, n_layer: int = N_LAYER) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of GPT-2's parameters, HF layout (Conv1D weights are [in, out])."""
    d = width
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte.weight", (vocab, d)), ("wpe.weight", (N_CTX, d))]
    for i in range(n_layer):
        h = f"h.{i}."
        shapes += [
            (h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)), (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)), (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, 4 * d)), (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (4 * d, d)), (h + "mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


def parse_sizes(spec: str) -> list[tuple[str, tuple[int, ...]]]:
    """``--sizes``: comma-separated ``N`` (one 1-D tensor of N elements) or ``NxK`` (K of them)."""
    shapes = []
    for item in spec.split(","):
        n, _, k = item.strip().partition("x")
        for _ in range(int(k or 1)):
            shapes.append((f"t{len(shapes)}", (int(n),)))
    return shapes


def make_tensors(shapes, device, dtype, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Master parameter values and the shared gradients: random, from a fixed generator."""
    gen = torch.Generator().manual_seed(seed)
    values, grads = [], []
    for _, shape in shapes:
        # Drawn in fp32 on the CPU so every device and dtype sees the same numbers.
        values.append((0.02 * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype))
        grads.append((1e-3 * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype))
    return values, grads


# ----- configurations ---------------------------------------------------------------------------


@dataclass
class Config:
    rule: str  # registry name, or a torch baseline's label
    backend: str  # as requested ("auto", "foreach", "reference", or "torch ...")
    resolved: str  # what actually runs
    opt: torch.optim.Optimizer
    params: list[torch.Tensor]
    baseline: str | None = None  # key of the baseline this row *is*, if any
    samples: list[float] = field(default_factory=list)  # ms, every timed step
    host: list[float] = field(default_factory=list)  # CUDA: host ms of every timed step call
    rounds: list[float] = field(default_factory=list)  # ms, median of each round
    bytes_per_step: int = 0
    faults: int = 0  # CPU: minor page faults over all timed steps
    note: str = ""
    compile_s: tuple[float, float] | None = None  # compiled: first step (cold cache), again (warm cache)

    @property
    def label(self) -> str:
        if self.backend == self.resolved:
            return self.backend
        return f"{self.backend} (={self.resolved})"


def fresh_params(values, grads) -> list[torch.Tensor]:
    params = []
    for v, g in zip(values, grads):
        p = torch.nn.Parameter(v.clone())
        p.grad = g  # shared, read-only for every optimizer here (checked at the end)
        params.append(p)
    return params


def build_ours(rule: str, backend: str, params, names) -> torch.optim.Optimizer:
    kw: dict[str, Any] = {"backend": backend}
    if "weight_decay" in options(rule):
        kw["weight_decay"] = 0.1
    if rule == "coupled_adam":
        coupled = [p for n, p in zip(names, params) if n == "wte.weight"]
        rest = [p for n, p in zip(names, params) if n != "wte.weight"]
        groups: Any = [
            {"params": coupled, "name": "embedding", "coupled": True},
            {"params": rest, "name": "rest"},
        ]
    else:
        groups = [{"params": params, "name": "all"}]
    return create_optimizer(rule, groups, **kw)


BASELINES: dict[str, tuple[str, str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]] = {
    "adamw_foreach": ("torch.optim.AdamW", "torch foreach",
                      lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, foreach=True)),
    "adamw_fused": ("torch.optim.AdamW", "torch fused",
                    lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, fused=True)),
    "adam_foreach": ("torch.optim.Adam", "torch foreach",
                     lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.1, foreach=True)),
}


def min_bytes(opt: torch.optim.Optimizer, params) -> int:
    """Fewest bytes one step moves: p read+write, g read, each state tensor read+write."""
    total = 0
    for p in params:
        total += 2 * p.nbytes + p.grad.nbytes
        for key, s in opt.state[p].items():
            if isinstance(s, torch.Tensor) and key not in ("step", "mu_product") and s.dim() > 0:
                total += 2 * s.nbytes
    return total


def triton_bytes(opt) -> int:
    """The bytes the fused kernels move per step, from the rule table (each rule's spec)."""
    total = 0
    for group in opt.param_groups:
        rule = opt.spec_for(group)
        for p in group["params"]:
            master = "master_param" in opt.state.get(p, {})
            total += triton_backend.bytes_per_param(rule, group, p.dtype, master=master) * p.numel()
    return total


class InductorOnly:
    """An optimizer on ``backend="compiled"`` with torch's fused kernels switched off
    (``compiled.TORCH_KERNELS = False`` around each step): every bucket through Inductor, the
    row ``compiled (Inductor)``, so rules that ``compiled`` hands to torch's kernels (Adam,
    AdamW, SGD, Adagrad) are measured on both paths in the same run."""

    def __init__(self, opt) -> None:
        self.opt, self.state = opt, opt.state
        self.backend = opt.backend

    def step(self) -> None:
        compiled_backend.TORCH_KERNELS = False
        try:
            self.opt.step()
        finally:
            compiled_backend.TORCH_KERNELS = True


class ClippedOurs:
    """Our AdamW on a fused-transform backend (``triton`` or ``compiled``) behind
    ``GradientClipper(mode="norm")``, the library's own path: the clipper's per-tensor norms
    (one foreach reduction), the coefficient handed to the step (``Optimizer.scale_next_step``),
    and the single-pass step applying it to g as it reads g: no pass over the grads to scale
    them, no host sync. ``backend="inductor"``: the compiled backend with torch's kernels off
    (:class:`InductorOnly`). On torch's kernel path the clipped g is written back, so each
    clipped row has its own copy of the grads."""

    def __init__(self, params, max_norm: float, backend: str) -> None:
        inductor = backend == "inductor"
        self.opt = create_optimizer("adamw", [{"params": params, "name": "all"}],
                                    backend="compiled" if inductor else backend, weight_decay=0.1)
        self.clipper = GradientClipper(mode="norm", max_norm=max_norm)
        self.params = params
        self.state = self.opt.state
        self.inductor = inductor
        self.stepper = InductorOnly(self.opt) if inductor else self.opt

    def step(self) -> None:
        self.clipper.clip_(self.opt)
        self.stepper.step()


class ClippedTorch:
    """``clip_grad_norm_`` (foreach) then ``torch.optim.AdamW(fused=True)``."""

    def __init__(self, params, max_norm: float) -> None:
        self.opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, fused=True)
        self.params, self.max_norm = params, max_norm
        self.state = self.opt.state

    def step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True)
        self.opt.step()


# ----- timing ------------------------------------------------------------------------------------




def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_steps(opt, n: int, device: torch.device) -> tuple[list[float], list[float]]:
    """(ms of each of ``n`` consecutive ``opt.step()`` calls, host ms of each call).

    On CUDA the first is the device time between two events and the second the CPU time
    the call takes to return (launching, Python): a step is launch-bound when the host
    time exceeds the device time. On a CPU both are the same wall time."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        host = []
        sync(device)
        for start, end in events:
            start.record()
            t0 = time.perf_counter()
            opt.step()
            host.append((time.perf_counter() - t0) * 1e3)
            end.record()
        sync(device)
        return [start.elapsed_time(end) for start, end in events], host
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        opt.step()
        out.append((time.perf_counter() - t0) * 1e3)
    return out, out


def bandwidth(device: torch.device, nbytes: int = 256 * 2**20, reps: int = 11) -> dict[str, float]:
    """Memory ceilings in GB/s (medians), on tensors far larger than any cache.

    ``copy``: ``dst.copy_(src)``, counting bytes read plus bytes written (on a CPU the
    hardware also reads ``dst`` before writing it, so this understates the bus).
    ``inplace``: ``a.add_(b)``, 12 bytes per element: read a and b, write a, which is the
    access pattern of an optimizer's in-place update.
    """
    a = torch.rand(nbytes // 4, device=device)
    b = torch.rand(nbytes // 4, device=device)

    def med(fn) -> float:
        fn()
        times = []
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return {
        "copy": 2 * nbytes / med(lambda: a.copy_(b)) / 1e9,
        "inplace": 3 * nbytes / med(lambda: a.add_(b)) / 1e9,
    }


def estimate_bytes(shapes, dtype: torch.dtype, n_configs: int) -> int:
    """Rough peak memory: per configuration its parameter copy plus about 8 B/param of state
    (fp32 m and v for Adam, less for SGD, more for AMSGrad: this matched the measured peak)."""
    n = sum(math.prod(s) for _, s in shapes)
    elt = torch.finfo(dtype).bits // 8
    return n * (2 * elt + n_configs * (elt + 8))


def available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None




def keep_freed_memory() -> str:
    """glibc: never return freed blocks to the OS, so temporaries reuse mapped pages.

    By default glibc serves large blocks with mmap and trims the heap on free, so a
    foreach step's temporaries (e.g. ``sqrt(v)``, one parameter-sized list) are fresh pages
    every step: one minor page fault per 4 KiB, expensive and noisy in a VM. A caching
    allocator (CUDA's) has no such cost; this makes the CPU behave like one.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
    except (OSError, AttributeError):
        ok = False
    return "on (glibc mallopt)" if ok else "requested, but mallopt is unavailable (not glibc): no effect"


# ----- main ----------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=DEFAULT_WIDTH,
                    help=f"model width d (default {DEFAULT_WIDTH}; GPT-2 small is {GPT2_WIDTH})")
    ap.add_argument("--vocab", type=int, default=None,
                    help=f"vocabulary rows of wte (default {GPT2_VOCAB} * width / {GPT2_WIDTH})")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="parameter and gradient dtype")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per configuration per round (default 4)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first (default 2)")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds (default 7)")
    ap.add_argument("--rules", default=",".join(optimizers()),
                    help="comma-separated registry names (default: all)")
    ap.add_argument("--backends", default="auto,foreach,compiled,inductor,triton,reference",
                    help="comma-separated backends (default auto,foreach,compiled,inductor,triton,reference; "
                         "inductor: compiled with torch's fused kernels off, for the rules compiled hands to them; "
                         "triton needs CUDA, reference needs --with-reference)")
    ap.add_argument("--inductor-cache", metavar="DIR", default=None,
                    help="Inductor's cache directory for the compiled rows (default: a fresh temporary one, so "
                         "the first-step compile cost printed is the cold one)")
    ap.add_argument("--sizes", default=None,
                    help="instead of GPT-2's shapes, 1-D tensors: comma-separated N or NxK (K tensors of N)")
    ap.add_argument("--max-norm", type=float, default=1.0,
                    help="clip threshold of the clipped-step rows (default 1.0, the issue's target; random grads "
                         "have a norm far above it, so every step clips; torch's path rescales the grads "
                         "to norm 1 once and then keeps them there)")
    ap.add_argument("--with-reference", action="store_true",
                    help="also time the reference backend (slow: use a small --width)")
    ap.add_argument("--no-baselines", action="store_true", help="skip the torch.optim baselines (no ratios then)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="CPU, glibc: keep freed memory mapped so per-step temporaries cause no page faults "
                         "(as a caching allocator would); see the faults/step column")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    for name in ("width", "steps", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 1:
        ap.error(f"--warmup must be at least 1 (the first step creates the state), got {args.warmup}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.malloc = keep_freed_memory() if args.keep_freed_memory else "system default"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.inductor_cache or tempfile.mkdtemp(prefix="inductor-")
    device = pick_device(args.device, args.threads)
    if device is None:
        return 2
    dtype = DTYPES[args.dtype]
    vocab = args.vocab or round(GPT2_VOCAB * args.width / GPT2_WIDTH)
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    known = optimizers()
    bad = [r for r in rules if r not in known]
    if bad:
        print(f"--rules: unknown {bad!r}; registry names are {', '.join(known)}", file=sys.stderr)
        return 2
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    notes: list[str] = []
    if "reference" in backends and not args.with_reference:
        backends.remove("reference")
        notes.append("reference backend not measured: pass --with-reference (slow on CUDA, a small --width "
                     "there; on a CPU it is about as fast as foreach and never page-faults).")

    if "triton" in backends:
        if device.type != "cuda":
            backends.remove("triton")
            notes.append("triton backend not measured: its kernels run on CUDA tensors (on a CPU only in "
                         "Triton's interpreter, a test tool); pass --device cuda on a GPU machine.")
        elif not triton_backend.available():
            backends.remove("triton")
            notes.append(f"triton backend not measured: {triton_backend.why_unavailable()}")

    shapes = parse_sizes(args.sizes) if args.sizes else gpt2_shapes(args.width, vocab)
    names = [n for n, _ in shapes]
    n_fused = sum(b in backends for b in ("triton", "compiled", "inductor"))
    n_configs = (0 if args.no_baselines else len(BASELINES)) + len(rules) * len(backends) + n_fused + (n_fused > 0)
    need = estimate_bytes(shapes, dtype, n_configs)
    have = available_bytes(device)
    if have is not None and need > 0.9 * have:
        print(
            f"this run needs about {need / 2**30:.1f} GiB ({n_configs} configurations, each with its own "
            f"parameters and state, alive together for the interleaved rounds) but {device} has "
            f"{have / 2**30:.1f} GiB available: pass fewer --rules / --backends or a smaller --width",
            file=sys.stderr,
        )
        return 2
    values, grads = make_tensors(shapes, device, dtype, args.seed)
    grad_check = [g.double().abs().sum().item() for g in grads]
    n_params = sum(v.numel() for v in values)

    configs: list[Config] = []
    if not args.no_baselines:
        for key, (rule, backend, make) in BASELINES.items():
            ps = fresh_params(values, grads)
            try:
                opt = make(ps)
            except (RuntimeError, ValueError) as e:
                notes.append(f"{rule} ({backend}) skipped: {e}")
                continue
            configs.append(Config(rule, backend, backend, opt, ps, baseline=key))
    for rule in rules:
        for backend in backends:
            ps = fresh_params(values, grads)
            try:
                opt = build_ours(rule, "compiled" if backend == "inductor" else backend, ps, names)
            except ValueError as e:
                notes.append(f"{rule} / {backend} skipped: {e}")
                continue
            if backend == "inductor":
                configs.append(Config(rule, "compiled (Inductor)", "compiled (Inductor)", InductorOnly(opt), ps))
            else:
                configs.append(Config(rule, backend, opt.backend, opt, ps))
    # The clipped AdamW step on each single-pass path: auto (on CPU: torch's fused kernel, the
    # coefficient as its divisor), Inductor's graph (the coefficient inside), triton.
    if any(b in backends for b in ("triton", "compiled", "inductor")):
        labels = set()
        for b in (b for b in ("auto", "compiled", "inductor", "triton") if b in backends):
            ps = fresh_params(values, [g.clone() for g in grads])  # torch's kernel writes the clipped g back
            ours = ClippedOurs(ps, args.max_norm, b)
            resolved = "compiled (Inductor)" if b == "inductor" else ours.opt.backend
            label = f"ours: GradientClipper + {resolved} step"
            if label not in labels:  # auto and compiled are one path on CPU
                labels.add(label)
                configs.append(Config("adamw + clip", label, label, ours, ps))
        # Its own grads: clip_grad_norm_ rescales them in place, and the others share theirs.
        ps = fresh_params(values, [g.clone() for g in grads])
        label = "torch clip_grad_norm_ + fused"
        configs.append(Config("adamw + clip", label, label, ClippedTorch(ps, args.max_norm), ps))

    # Warm-up: state creation, allocator, first-touch page faults. Untimed; a failure drops the row.
    for c in list(configs):
        graphs = len(compiled_backend._GRAPHS)  # a compiled row that compiles nothing ran torch's kernels
        try:
            for i in range(args.warmup):
                t0 = time.perf_counter()
                c.opt.step()
                sync(device)
                if i == 0 and c.resolved.startswith("compiled") and len(compiled_backend._GRAPHS) > graphs:
                    c.compile_s = (time.perf_counter() - t0, float("nan"))
        except RuntimeError as e:
            notes.append(f"{c.rule} / {c.backend} skipped: step failed: {str(e).splitlines()[0]}")
            configs.remove(c)
            continue
        c.bytes_per_step = min_bytes(c.opt, c.params)
        if c.resolved == "triton" or c.resolved.startswith("triton "):
            c.bytes_per_step = triton_bytes(c.opt)
        if isinstance(c.opt, ClippedOurs) and c.opt.opt.backend == "triton":
            c.bytes_per_step = triton_bytes(c.opt.opt)
        if c.rule == "adamw + clip":
            c.bytes_per_step += sum(p.grad.nbytes for p in c.params)  # the norm reads g once more
        if isinstance(c.opt, ClippedTorch):  # and clip_grad_norm_ rescales g in place: read + write
            c.bytes_per_step += 2 * sum(p.grad.nbytes for p in c.params)
        if (isinstance(c.opt, ClippedOurs) and c.opt.opt.backend == "compiled" and not c.opt.inductor
                and device.type == "cpu" and dtype in torch_kernels.KERNEL_DTYPES
                and n_params < compiled_backend.WORTH_COMPILING_FROM):
            c.bytes_per_step += sum(p.grad.nbytes for p in c.params)  # torch's kernel writes the clipped g back

    # The compile again, from Inductor's on-disk cache: Dynamo forgets its graphs (reset), the
    # backend its compiled functions; the next step traces again and loads the compiled code.
    for c in configs:
        if c.compile_s is not None:
            compiled_backend._GRAPHS.clear()
            torch._dynamo.reset()
            t0 = time.perf_counter()
            c.opt.step()
            sync(device)
            c.compile_s = (c.compile_s[0], time.perf_counter() - t0)
    # The resets dropped every compiled graph: one more untimed step each, so that no timed
    # step of a compiled configuration (the clipped one included) traces again.
    if any(c.compile_s is not None for c in configs):
        for c in configs:
            if c.compile_s is not None or isinstance(c.opt, (ClippedOurs, InductorOnly)):
                c.opt.step()
                sync(device)
    if compiled_backend._failed is not None:
        notes.append(f"compiled rows fell back to foreach: {compiled_backend._failed}")

    # Interleaved rounds, rotating the starting configuration.
    gc.collect()
    gc.disable()
    t_start = time.perf_counter()
    try:
        for r in range(args.repeats):
            k = r % max(len(configs), 1)
            for c in configs[k:] + configs[:k]:
                f0 = minor_faults()
                ms, host = time_steps(c.opt, args.steps, device)
                c.faults += minor_faults() - f0
                c.samples += ms
                c.host += host
                c.rounds.append(statistics.median(ms))
    finally:
        gc.enable()
    elapsed = time.perf_counter() - t_start

    if any(abs(g.double().abs().sum().item() - ref) > 0 for g, ref in zip(grads, grad_check)):
        notes.append("WARNING: a configuration modified the shared gradients in place; "
                     "later steps saw different gradients.")
    for c in configs:
        if not all(bool(torch.isfinite(p).all()) for p in c.params):
            c.note = "non-finite params!"

    bw = bandwidth(device)
    report(args, device, dtype, vocab, shapes, n_params, configs, notes, bw, elapsed)
    return 0


def _median(c: Config) -> float:
    return statistics.median(c.samples)


def _spread(rounds: list[float]) -> float:
    """Interquartile range of the per-round medians: robust to one round hit by a stall."""
    if len(rounds) < 2:
        return float("nan")
    q1, _, q3 = statistics.quantiles(rounds, n=4, method="inclusive")
    return q3 - q1


def report(args, device, dtype, vocab, shapes, n_params, configs, notes, bw, elapsed) -> None:
    base = {c.baseline: _median(c) for c in configs if c.baseline}
    on_cpu = device.type == "cpu"
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"device {device} ({dev_name}) | torch {torch.__version__} | {len(shapes)} tensors | "
        f"{n_params / 1e6:.2f}M params (width {args.width}, vocab {vocab}) | "
        f"threads {torch.get_num_threads()} | dtype {args.dtype}"
        + (f" | keep-freed-memory {args.malloc}" if on_cpu else "")
    )
    print(
        f"memory ceilings: copy {bw['copy']:.1f} GB/s (read+write), in-place a.add_(b) {bw['inplace']:.1f} GB/s "
        f"| median of {args.repeats} interleaved rounds x {args.steps} steps after {args.warmup} warm-up steps "
        f"| ratio = time / baseline time (>1 slower) | timed region {elapsed:.1f} s"
    )
    print()
    header = ["rule", "backend", "median ms", "spread", "vs AdamW foreach", "vs AdamW fused", "B/param", "GB/s",
              "floor ms", "vs floor"]
    header.append("faults/step" if on_cpu else "host ms")
    rows = []
    for c in configs:
        med = _median(c)
        spread = _spread(c.rounds) / med
        ratio_fe = f"{med / base['adamw_foreach']:.2f}" if "adamw_foreach" in base else "-"
        ratio_fu = f"{med / base['adamw_fused']:.2f}" if "adamw_fused" in base else "-"
        bpp = c.bytes_per_step / n_params
        gbs = c.bytes_per_step / (med / 1e3) / 1e9
        rule = c.rule + (f" ({c.note})" if c.note else "")
        floor = c.bytes_per_step / (bw["inplace"] * 1e9) * 1e3
        row = [rule, c.label, f"{med:.2f}", f"{spread:.0%}", ratio_fe, ratio_fu, f"{bpp:.1f}", f"{gbs:.1f}",
               f"{floor:.2f}", f"{med / floor:.2f}"]
        row.append(f"{c.faults / len(c.samples):.0f}" if on_cpu else f"{statistics.median(c.host):.3f}")
        rows.append(row)
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    print(
        "B/param: fewest bytes a step must move per parameter (p read+write, g read, state read+write; "
        "28 for fp32 Adam/AdamW). GB/s: those bytes / median time. A foreach step makes several passes "
        "over memory, fused makes one, so foreach GB/s sits well below the memory ceilings and fused "
        "can reach them. fp32 AdamW actually moves 72 B/param in our foreach (7 elementwise passes: "
        "decay, lerp m, scale v, addcmul v, sqrt, add eps, addcdiv p), 80 in torch's foreach (8: "
        "it also divides the denominator by sqrt(bc2)) and 28 fused: time ratios of 72/80 = 0.90 "
        "and 72/28 = 2.6 if all run at the same bus speed."
        + (" faults/step: minor page faults per step (fresh temporaries the allocator had to map)." if on_cpu else
           " host ms: median CPU time of the step() call (launches and Python); the step is launch-bound "
           "where it exceeds median ms.")
    )
    costs = [(f"{c.rule} {c.label}", c.compile_s) for c in configs if c.compile_s is not None]
    if costs:
        print("compile cost of the compiled rows, s (first step, which compiles, cold Inductor cache "
              f"-> the same after torch._dynamo.reset(), warm on-disk cache; cache {os.environ['TORCHINDUCTOR_CACHE_DIR']}):")
        print("  " + ", ".join(f"{rule} {cold:.1f} -> {warm:.1f}" for rule, (cold, warm) in costs))
    for n in notes:
        print(f"note: {n}")

    if args.json:
        out = {
            "device": str(device), "device_name": dev_name, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "dtype": args.dtype, "width": args.width, "vocab": vocab,
            "tensors": len(shapes), "params": n_params, "steps": args.steps, "warmup": args.warmup,
            "repeats": args.repeats, "bandwidth_gbs": bw, "keep_freed_memory": args.malloc, "notes": notes,
            "results": [
                {
                    "rule": c.rule, "backend": c.backend, "resolved_backend": c.resolved,
                    "baseline": c.baseline, "median_ms": _median(c), "round_medians_ms": c.rounds,
                    "samples_ms": c.samples, "bytes_per_step": c.bytes_per_step,
                    "bytes_per_param": c.bytes_per_step / n_params,
                    "effective_gbs": c.bytes_per_step / (_median(c) / 1e3) / 1e9,
                    "ratio_vs_adamw_foreach": _median(c) / base["adamw_foreach"] if "adamw_foreach" in base else None,
                    "ratio_vs_adamw_fused": _median(c) / base["adamw_fused"] if "adamw_fused" in base else None,
                    "minor_faults_per_step": c.faults / len(c.samples) if on_cpu else None,
                    "host_ms": None if on_cpu else statistics.median(c.host),
                    "floor_ms": c.bytes_per_step / (bw["inplace"] * 1e9) * 1e3,
                    "compile_s_cold_warm": c.compile_s,
                    "note": c.note,
                }
                for c in configs
            ],
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
