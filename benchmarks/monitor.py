"""Overhead of ``MomentMonitor`` on a training step of a tiny GPT, and a check that steps which
do not log never read a device value back to the host.

A benchmark, not a test: it prints markdown tables and exits 0; nothing here asserts speed.

The model
    The main job's :class:`lightning_optim.app.models.TinyGPT`: token embedding ``wte``
    (``--vocab`` x ``--width``) tied to the output head, learned positions ``wpe``,
    ``--layers`` pre-LN blocks, a final LayerNorm. ``--vocab 4096 --seq 128 --batch 32`` is
    the main job's default shape; the smaller defaults keep the run near two minutes.
    The batch is ``--batch`` sequences of ``--seq`` random token ids (a fixed pool of
    batches drawn once from a seeded generator), next-token cross-entropy. The optimizer is
    ``--optimizer`` (default ``coupled_adam``, the main job's) over
    :func:`lightning_optim.param_groups`, so ``wte`` (the tied output embedding) sits in the
    coupled ``embedding`` group and ``wpe`` in ``no_decay``; clipping is by global norm, ``max_norm=1``.

What one step is
    Plain PyTorch, not Lightning's Trainer (whose own per-step overhead would dominate and
    vary). The step does what Lightning plus the two callbacks do, in
    their order: ``zero_grad``, forward, backward; then ``MomentMonitor.on_before_optimizer_step``
    (on a logging step ``MomentStats.before_step()``: gradient norms and a parameter
    snapshot, before clipping); then ``OptimizerCallback``'s part (``GradientClipper.clip_``
    and ``should_skip``, the step's one host sync, present in every configuration); then
    ``opt.step()``; then ``MomentMonitor.on_train_batch_end`` (on a logging step
    ``MomentStats.after_step()``, the clipped fractions, ``embedding_stats`` of the tensors
    the monitor picks, with isotropy on the expensive cadence, and
    :func:`lightning_optim.integration.loggers.to_floats`, the host read-back a logger does). The gates
    (``step % every_n_steps``) and the embedding lookup are the monitor's own code; the
    logger itself is left out (writing a CSV row is the logger's cost, not the monitor's),
    as are the W&B histograms and ``OptimizerCallback``'s per-step ``log_dict``, which all
    configurations would pay alike.

Configurations, each with its own model and optimizer from the same seed
    ``off`` (baseline: no monitor), ``off, again (A/A)`` (a second baseline, timed like the
    others: its "overhead" is the noise floor of this run), ``every 50`` (isotropy every 500:
    the defaults), ``every 10`` (isotropy every 500), ``every step`` (isotropy every 10:
    ``monitor=every_step``).

How it is timed
    Each configuration first takes ``--warmup`` untimed steps (the sync check below runs
    then). Then ``--rounds`` interleaved rounds: round-robin over the configurations, each
    running a window of ``--steps`` consecutive steps (default 50: one logging step at
    every 50, five at every 10), the starting configuration rotating every round, so drift
    (clocks, other load on the VM) hits all configurations alike. Every step is timed with
    ``time.perf_counter`` (on CUDA, after a ``torch.cuda.synchronize`` at its end). Reported
    per configuration:

    - ``ms/step``: the mean over all timed steps, logging and isotropy steps included (the
      amortized cost; sensitive to stalls, which hit every configuration alike).
    - ``window``: the median over rounds of the window's mean step time.
    - ``overhead``: the median over rounds of (window mean / the baseline's window mean in
      the same round) - 1, a paired estimate; ``spread`` is the interquartile range of those
      per-round ratios. One window in ten holds the isotropy step at every 50, so this
      median leaves it out (it adds about 0.03% there, see the breakdown).
    - ``overhead (classes)``: the steps split into classes (non-logging, logging, isotropy),
      each class's median step time weighted by its share of the steps, over the
      baseline's median step: robust to stalls, and it keeps the isotropy's amortized cost.
    - the median step time of each class.

    The every-step target is a ratio of a fixed cost (the monitor's work per log, set by
    the number and size of the tensors) to the step time (set by ``--batch``, ``--seq``
    and the model): a larger batch lowers it, a smaller one raises it.

The sync check (during warm-up)
    ``torch.Tensor.item``, ``tolist``, ``__bool__``, ``__float__`` and ``__int__`` are patched
    to count calls, attributed to the monitor phase they happen in: ``before_step``,
    ``after_step``, ``embedding_stats``, ``to_floats`` (and the gates, on steps that do not
    log), or to the rest of the step. Printed: the monitor's reads on steps that do not log
    (must be 0), the reads of a whole non-logging step against the baseline's (the same:
    the clipper's one device sync, plus lightning_optim's optimizers reading their CPU step
    counters), and the reads per logging step by phase (``to_floats`` reads once
    per device; the statistics themselves none). With ``--device cuda``,
    ``torch.cuda.set_sync_debug_mode("warn")`` is also on around the monitor's code on
    every warm-up step, and the synchronizing-operation warnings are counted the same way
    (this also catches syncs inside C++ ops, e.g. ``linalg.eigh`` in isotropy).

Cost breakdown
    On the trained model of the last configuration, each piece of a logging step is timed
    alone (median of ``--reps`` calls): ``before_step``, ``after_step`` with one statistic at
    a time (a fresh ``MomentStats(stats=[s])``; ``grad_norm`` alone only reads the snapshot
    ``before_step`` made, so its cost is in ``before_step``), ``after_step`` with all of them,
    ``embedding_stats`` with and without isotropy, and ``to_floats`` of a full logging step's
    metrics. ``--no-breakdown`` skips it.

Examples::

    python benchmarks/monitor.py                        # about 2-3 minutes on 2 CPU cores
    python benchmarks/monitor.py --batch 16 --rounds 40 --json out.json   # about 6 minutes
    python benchmarks/monitor.py --device cuda --width 256 --layers 4 --batch 32
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common import cpu_name, pick_device, sync
from lightning_optim.integration.moment_monitor import MomentMonitor
from lightning_optim.clipping import GradientClipper
from lightning_optim.integration.loggers import to_floats
from lightning_optim.app.models import TinyGPT
from lightning_optim.registry import create_optimizer
from lightning_optim.stats import STATS, MomentStats

# (label, every_n_steps, expensive_every_n_steps); None: no monitor.
CONFIGS: list[tuple[str, int | None, int | None]] = [
    ("off", None, None),
    ("off, again (A/A)", None, None),
    ("every 50", 50, 500),
    ("every 10", 10, 500),
    ("every step", 1, 10),
]
TARGETS = {"every 50": 0.02, "every step": 0.15}


# ----- the model ---------------------------------------------------------------------------------


# The main job's model (lightning_optim.app.models.TinyGPT): the step the targets are about.


# ----- counting host reads ----------------------------------------------------------------------

READS = ("item", "tolist", "__bool__", "__float__", "__int__")


class ReadCounter:
    """Counts ``Tensor.item/tolist/__bool__/__float__/__int__`` calls (and, on CUDA, sync-debug
    warnings) per phase while :meth:`patched` is active; ``phase`` says where we are."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.phase = "step"
        self.reads: dict[str, int] = {}
        self.warnings: dict[str, int] = {}

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        saved = {name: torch.Tensor.__dict__.get(name) for name in READS}

        def wrap(name: str, fn: Any) -> Any:
            def counted(*args: Any, **kwargs: Any) -> Any:
                self.reads[self.phase] = self.reads.get(self.phase, 0) + 1
                return fn(*args, **kwargs)
            return counted

        for name in READS:
            setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
        try:
            yield
        finally:
            for name, fn in saved.items():
                if fn is None:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, fn)

    @contextlib.contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        previous, self.phase = self.phase, phase
        if not self.cuda:
            try:
                yield
            finally:
                self.phase = previous
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(mode)
                self.phase = previous
        n = sum("synchroniz" in str(w.message) for w in caught)
        self.warnings[phase] = self.warnings.get(phase, 0) + n


# ----- the monitor, as MomentMonitor's hooks do it ------------------------------------------


class Monitor:
    """``MomentMonitor``'s two hooks without the Trainer: same gates, same calls, same order."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, clipper: GradientClipper,
                 every: int, expensive: int) -> None:
        self.model, self.opt, self.clipper = model, opt, clipper
        self.every, self.expensive = every, expensive
        self.stats = MomentStats(opt, stats=STATS)
        self.pending: int | None = None
        self.last_clips: dict[str, int] = {}
        self.last_step = 0
        self.counter: ReadCounter | None = None  # set during the sync check

    def _phase(self, name: str) -> Any:
        return self.counter.in_phase(name) if self.counter is not None else contextlib.nullcontext()

    def on_before_optimizer_step(self, step: int) -> None:
        if step % self.every:
            return
        with self._phase("before_step"):
            self.stats.before_step(update_ratio=True)
        self.pending = step

    def on_train_batch_end(self, step: int) -> dict[str, float] | None:
        if self.pending is None or step < self.pending:
            return None
        self.pending = None
        with self._phase("after_step"):
            metrics: dict[str, Any] = dict(self.stats.after_step())
        names = [g.get("name", f"group{i}") for i, g in enumerate(self.opt.param_groups)]
        clips = self.clipper.group_clipped_steps
        steps = max(step - self.last_step, 1)
        for name in names:
            metrics[f"optim/clipped_fraction/{name}"] = (clips.get(name, 0) - self.last_clips.get(name, 0)) / steps
        self.last_clips, self.last_step = dict(clips), step
        with self._phase("embedding_stats"):
            embeddings = MomentMonitor._embeddings(self.model, self.opt)
            metrics.update(self.stats.embedding_stats(embeddings, isotropy=step % self.expensive == 0))
        with self._phase("to_floats"):
            return to_floats(metrics)


# ----- configurations and the step ----------------------------------------------------------------


@dataclass
class Config:
    label: str
    every: int | None
    expensive: int | None
    model: TinyGPT
    opt: torch.optim.Optimizer
    clipper: GradientClipper
    monitor: Monitor | None
    step: int = 0  # optimizer steps taken (the monitor's 1-based step is step + 1)
    n_metrics: int = 0  # metrics of the last logging step
    samples: list[float] = field(default_factory=list)  # ms, every timed step
    kinds: list[str] = field(default_factory=list)  # "plain" | "log" | "isotropy", per sample
    rounds: list[float] = field(default_factory=list)  # ms/step, window mean of each round

    def kind(self, step: int) -> str:
        if self.every is None or step % self.every:
            return "plain"
        return "isotropy" if step % self.expensive == 0 else "log"


def build(label, every, expensive, args, device) -> Config:
    torch.manual_seed(args.seed)
    model = TinyGPT(args.vocab, args.width, args.layers, args.heads, args.seq).to(device)
    opt = create_optimizer({"name": args.optimizer, "lr": args.lr}, model)
    clipper = GradientClipper(mode="norm", max_norm=1.0)
    monitor = Monitor(model, opt, clipper, every, expensive) if every else None
    return Config(label, every, expensive, model, opt, clipper, monitor)


def train_step(c: Config, tokens: torch.Tensor, counter: ReadCounter | None = None) -> str:
    """One optimizer step; returns the step's kind. ``counter``: attribute host reads."""
    step = c.step + 1
    phase = (lambda name: counter.in_phase(name)) if counter else (lambda name: contextlib.nullcontext())
    c.opt.zero_grad(set_to_none=True)
    logits = c.model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    if c.monitor is not None:
        with phase("gate"):
            c.monitor.on_before_optimizer_step(step)
    report = c.clipper.clip_(c.opt)
    if not c.clipper.should_skip(report):
        c.opt.step()
    c.step = step
    if c.monitor is not None:
        with phase("gate"):
            floats = c.monitor.on_train_batch_end(step)
        if floats is not None:
            c.n_metrics = len(floats)
    return c.kind(step)




def warm_up_and_check(configs: list[Config], batches: list[torch.Tensor], n: int, device: torch.device) -> dict:
    """The untimed warm-up steps, with host reads counted per phase (see the docstring)."""
    result: dict[str, Any] = {}
    for c in configs:
        counter = ReadCounter(device.type == "cuda")
        if c.monitor is not None:
            c.monitor.counter = counter
        per_kind: dict[str, dict[str, int]] = {}
        steps_of: dict[str, int] = {}
        warns_of: dict[str, dict[str, int]] = {}
        with counter.patched():
            for i in range(n):
                counter.reads, counter.warnings = {}, {}
                kind = train_step(c, batches[c.step % len(batches)], counter)
                steps_of[kind] = steps_of.get(kind, 0) + 1
                for phase, k in counter.reads.items():
                    per_kind.setdefault(kind, {})[phase] = per_kind.setdefault(kind, {}).get(phase, 0) + k
                for phase, k in counter.warnings.items():
                    warns_of.setdefault(kind, {})[phase] = warns_of.setdefault(kind, {}).get(phase, 0) + k
        sync(device)
        if c.monitor is not None:
            c.monitor.counter = None
        result[c.label] = {"steps": steps_of, "reads": per_kind, "cuda_sync_warnings": warns_of if counter.cuda else None}
    return result


def time_window(c: Config, batches: list[torch.Tensor], n: int, device: torch.device) -> None:
    """``n`` consecutive steps, each timed; appends to ``c.samples``/``c.kinds``/``c.rounds``."""
    ms: list[float] = []
    kinds: list[str] = []
    cuda = device.type == "cuda"
    for _ in range(n):
        tokens = batches[c.step % len(batches)]
        t0 = time.perf_counter()
        kind = train_step(c, tokens)
        if cuda:
            torch.cuda.synchronize(device)
        ms.append((time.perf_counter() - t0) * 1e3)
        kinds.append(kind)
    c.samples += ms
    c.kinds += kinds
    c.rounds.append(sum(ms) / n)


# ----- cost breakdown --------------------------------------------------------------------------


def breakdown(c: Config, tokens: torch.Tensor, reps: int, device: torch.device) -> list[tuple[str, float]]:
    """ms of each piece of a logging step, alone, on ``c``'s trained model and optimizer."""
    def med(fn, setup=None) -> float:
        times = []
        for _ in range(reps + 1):
            if setup is not None:
                setup()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times[1:])  # the first call allocates the drift references

    c.opt.zero_grad(set_to_none=True)
    logits = c.model(tokens[:, :-1])
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).backward()
    rows: list[tuple[str, float]] = []
    full = MomentStats(c.opt, stats=STATS)
    rows.append(("before_step (grad norms + param snapshot)", med(lambda: full.before_step(update_ratio=True))))
    rows.append(("before_step, grad norms only (update_ratio=False)", med(lambda: full.before_step(update_ratio=False))))
    for s in STATS:
        one = MomentStats(c.opt, stats=[s])
        prepare = (lambda one=one: one.before_step(update_ratio=True)) if s in ("grad_norm", "update_ratio") else None
        rows.append((f"after_step, {s} only", med(one.after_step, prepare)))
    rows.append(("after_step, all stats", med(full.after_step, lambda: full.before_step(update_ratio=True))))
    embeddings = MomentMonitor._embeddings(c.model, c.opt)
    rows.append((f"embedding_stats, no isotropy ({len(embeddings)} tensors)",
                 med(lambda: full.embedding_stats(embeddings, isotropy=False))))
    rows.append(("embedding_stats with isotropy", med(lambda: full.embedding_stats(embeddings, isotropy=True))))
    full.before_step(update_ratio=True)
    metrics = {**full.after_step(), **full.embedding_stats(embeddings, isotropy=False)}
    rows.append((f"to_floats ({len(metrics)} metrics)", med(lambda: to_floats(metrics))))
    c.opt.zero_grad(set_to_none=True)
    return rows


# ----- report ------------------------------------------------------------------------------------




def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return float("nan")
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


def summarize(c: Config, base: Config) -> dict[str, Any]:
    ratios = [a / b for a, b in zip(c.rounds, base.rounds)]
    by_kind: dict[str, list[float]] = {}
    for ms, kind in zip(c.samples, c.kinds):
        by_kind.setdefault(kind, []).append(ms)
    base_median = statistics.median(base.samples)
    # Each class's median, weighted by its share of the steps: robust to stalls, keeps the amortized cost.
    weighted = sum(statistics.median(v) * len(v) for v in by_kind.values()) / len(c.samples)
    return {
        "label": c.label, "every_n_steps": c.every, "expensive_every_n_steps": c.expensive,
        "ms_per_step": statistics.fmean(c.samples),
        "overhead": statistics.median(ratios) - 1, "spread": _iqr(ratios),
        "overhead_classes": weighted / base_median - 1,
        "window_ms": statistics.median(c.rounds),
        "median_ms": {k: statistics.median(v) for k, v in by_kind.items()},
        "count": {k: len(v) for k, v in by_kind.items()},
        "metrics_per_log": c.n_metrics,
        "round_ms": c.rounds, "round_ratios": ratios,
    }


def fmt_ms(d: dict, key: str) -> str:
    return f"{d[key]:.2f}" if key in d else "-"


def report(args, device, n_params, n_tensors, configs, rows, check, costs, elapsed, load) -> None:
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    base = rows[0]
    print(
        f"device {device} ({dev_name}) | torch {torch.__version__} | threads {torch.get_num_threads()} | "
        f"TinyGPT width {args.width}, {args.layers} layers, {args.heads} heads, vocab {args.vocab} (tied), "
        f"{n_tensors} tensors, {n_params / 1e6:.2f}M params | batch {args.batch} x seq {args.seq} | "
        f"{args.optimizer}, clip norm 1.0"
    )
    print(
        f"{args.rounds} interleaved rounds x a window of {args.steps} steps per configuration, after {args.warmup} "
        f"warm-up steps | timed region {elapsed:.0f} s | load average before/after {load[0]:.2f} / {load[1]:.2f}"
    )
    print()
    header = ["monitor", "isotropy every", "ms/step", "overhead", "spread", "overhead (classes)",
              f"window ({args.steps})", "non-log step", "log step", "isotropy step", "metrics/log", "target"]
    print("| " + " | ".join(header) + " |")
    print("|---|---:|" + "|".join("---:" for _ in header[2:-1]) + "|---|")
    for r in rows:
        target = TARGETS.get(r["label"])
        if target is None or r is base:
            verdict = "-"
        else:
            verdict = f"<= {target:.0%}: " + ("met" if r["overhead"] <= target else "NOT met")
        over = "-" if r is base else f"{r['overhead']:+.1%}"
        classes = "-" if r is base else f"{r['overhead_classes']:+.1%}"
        print("| " + " | ".join([
            r["label"], str(r["expensive_every_n_steps"] or "-"), f"{r['ms_per_step']:.2f}", over,
            f"{r['spread']:.1%}" if r is not base and not math.isnan(r["spread"]) else "-", classes, f"{r['window_ms']:.2f}",
            fmt_ms(r["median_ms"], "plain"), fmt_ms(r["median_ms"], "log"), fmt_ms(r["median_ms"], "isotropy"),
            str(r["metrics_per_log"] or "-"), verdict,
        ]) + " |")
    print()
    print("ms/step: mean of all timed steps (amortized). window: median over rounds of the window's mean. "
          "overhead: median over rounds of the ratio to the baseline's window in the same round; spread: IQR "
          "of those ratios. overhead (classes): median step time of each class (non-log, log, isotropy) "
          "weighted by its share, over the baseline's median step. Step columns: median ms of that class. "
          "target: judged on overhead.")

    print()
    print("Host reads (Tensor.item/tolist/__bool__/__float__/__int__ calls) during the warm-up steps:")
    print()
    print("| monitor | steps (non-log / log / isotropy) | monitor reads, non-log steps | "
          "reads per non-log step (whole step) | reads per log step: before_step / after_step / "
          "embedding_stats / to_floats / rest" + (" | CUDA sync warnings in monitor code, non-log / log steps" if device.type == "cuda" else "") + " |")
    print("|---|---|---:|---:|---|" + ("---|" if device.type == "cuda" else ""))
    for c in configs:
        info = check[c.label]
        steps, reads = info["steps"], info["reads"]
        n_plain = steps.get("plain", 0)
        plain = reads.get("plain", {})
        monitor_plain = sum(v for k, v in plain.items() if k != "step")
        whole_plain = f"{sum(plain.values()) / n_plain:.2f}" if n_plain else "-"
        n_log = steps.get("log", 0) + steps.get("isotropy", 0)
        if n_log:
            merged: dict[str, int] = {}
            for kind in ("log", "isotropy"):
                for k, v in reads.get(kind, {}).items():
                    merged[k] = merged.get(k, 0) + v
            per_log = " / ".join(f"{merged.get(k, 0) / n_log:.2f}" for k in
                                 ("before_step", "after_step", "embedding_stats", "to_floats", "step"))
        else:
            per_log = "-"
        cells = [c.label, f"{n_plain} / {steps.get('log', 0)} / {steps.get('isotropy', 0)}",
                 str(monitor_plain) if c.monitor is not None else "-", whole_plain, per_log]
        if device.type == "cuda":
            w = info["cuda_sync_warnings"] or {}
            nonlog = sum(w.get("plain", {}).values())
            log = {k: v for kind in ("log", "isotropy") for k, v in w.get(kind, {}).items()}
            cells.append(f"{nonlog} / " + (", ".join(f"{k} {v}" for k, v in sorted(log.items()) if v) or "0"))
        print("| " + " | ".join(cells) + " |")
    bad = [c.label for c in configs if c.monitor is not None
           and sum(v for k, v in check[c.label]["reads"].get("plain", {}).items() if k != "step")]
    print()
    print("rest: the step outside the monitor, the same in every configuration: the clipper's should_skip "
          "(1 tolist, the step's one device sync) and, for lightning_optim optimizers, one tolist per param "
          "group of the CPU step counters (no device sync).")
    print("monitor host reads on steps that do not log: " + (f"NOT 0 in {', '.join(bad)}" if bad else "0 (as required)"))

    if costs:
        step_ms = statistics.median(configs[0].samples)
        print()
        print(f"Cost of each piece of a logging step, alone (median of {args.reps} calls; "
              f"% of the baseline's median step, {step_ms:.2f} ms):")
        print()
        print("| piece | ms | % of a step |")
        print("|---|---:|---:|")
        for name, ms in costs:
            print(f"| {name} | {ms:.3f} | {ms / step_ms:.1%} |")

    if args.json:
        out = {
            "device": str(device), "device_name": dev_name, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "model": {
                "width": args.width, "layers": args.layers, "heads": args.heads, "vocab": args.vocab,
                "seq": args.seq, "batch": args.batch, "params": n_params, "tensors": n_tensors},
            "optimizer": args.optimizer, "lr": args.lr, "steps": args.steps, "rounds": args.rounds,
            "warmup": args.warmup, "elapsed_s": elapsed, "load_average": load,
            "results": [{**r, "samples_ms": c.samples, "kinds": c.kinds} for r, c in zip(rows, configs)],
            "host_reads": check, "breakdown_ms": dict(costs),
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"\nwrote {args.json}")


# ----- main --------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    ap.add_argument("--steps", type=int, default=50,
                    help="consecutive timed steps per configuration per round, the window (default 50)")
    ap.add_argument("--rounds", type=int, default=24, help="interleaved rounds (default 24)")
    ap.add_argument("--warmup", type=int, default=100,
                    help="untimed steps per configuration first, with the host-read check (default 100)")
    ap.add_argument("--width", type=int, default=128, help="model width d (default 128)")
    ap.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    ap.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    ap.add_argument("--vocab", type=int, default=2000, help="vocabulary (default 2000)")
    ap.add_argument("--seq", type=int, default=64, help="sequence length (default 64)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per batch (default 8)")
    ap.add_argument("--optimizer", default="coupled_adam", help="registry name (default coupled_adam)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--reps", type=int, default=30, help="calls per piece in the cost breakdown (default 30)")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the cost breakdown")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also write the results (every step's time) as JSON")
    args = ap.parse_args(argv)
    for name in ("steps", "rounds", "width", "layers", "heads", "vocab", "seq", "batch", "reps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        ap.error(f"--warmup must be at least 0, got {args.warmup}")
    if args.width % args.heads:
        ap.error(f"--width {args.width} must be a multiple of --heads {args.heads}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device, args.threads)
    if device is None:
        return 2
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen).to(device) for _ in range(16)]
    try:
        configs = [build(label, every, expensive, args, device) for label, every, expensive in CONFIGS]
    except ValueError as e:
        print(f"--optimizer {args.optimizer!r}: {e}", file=sys.stderr)
        return 2
    n_params = sum(p.numel() for p in configs[0].model.parameters())
    n_tensors = len(list(configs[0].model.parameters()))

    check = warm_up_and_check(configs, batches, args.warmup, device)

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gc.collect()
    gc.disable()
    t0 = time.perf_counter()
    try:
        for r in range(args.rounds):
            k = r % len(configs)
            for c in configs[k:] + configs[:k]:
                time_window(c, batches, args.steps, device)
                sync(device)
    finally:
        gc.enable()
    elapsed = time.perf_counter() - t0
    load = (load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))

    for c in configs:
        if not all(bool(torch.isfinite(p).all()) for p in c.model.parameters()):
            print(f"warning: {c.label}: non-finite parameters", file=sys.stderr)
    rows = [summarize(c, configs[0]) for c in configs]
    costs = [] if args.no_breakdown else breakdown(configs[-1], batches[0], args.reps, device)
    report(args, device, n_params, n_tensors, configs, rows, check, costs, elapsed, load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
