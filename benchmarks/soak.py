"""Soak: thousands of optimizer steps under Lightning, watching the process's memory for growth.

A check, not a timing: it exits 1 when memory grows faster than ``--max-growth-mib`` MiB
per 1000 optimizer steps after the warm-up, 0 otherwise (and 2 when the device asked for is
not there).

What runs
    A :class:`lightning_optim.app.models.TinyGPT` (tied embedding, ``--vocab`` x ``--width``,
    ``--layers`` blocks) trained by a Lightning ``Trainer`` for ``--steps`` optimizer steps
    on a fixed pool of random token windows (``--pool`` batches, cycled epoch after epoch),
    with everything that keeps per-step state switched on: ``OptimizerCallback``
    (``--optimizer``, a warm-up cosine LR schedule, clipping by norm, per-step ``log_dict`` of
    norms, LR and counters), ``MomentMonitor`` every ``--every`` steps (all statistics, the
    drift references, embedding statistics, isotropy every ``--expensive-every``), a
    ``CSVLogger`` in a temporary directory (it flushes to disk every 100 rows), and the
    module's own ``self.log("train/loss")``.

What is sampled
    Every ``--sample-every`` optimizer steps (and once at step 0): the resident set size
    (psutil if installed, else ``/proc/self/statm``), ``torch.cuda.memory_allocated`` on CUDA,
    and the number of objects the garbage collector tracks (after a ``gc.collect()``, so
    the count is of live objects, less the samples themselves: a leak of Python objects
    shows here even when the allocator hides it from the RSS).

How growth is judged
    The first ``--warmup`` fraction of the steps is left out (allocator pools, lazily
    created optimizer state, the first drift references and the CSV header rewrites all
    land there). A least-squares line through the remaining samples gives the growth in
    bytes per 1000 steps; the table also shows max - min over those samples. A leak of one
    small tensor per step (a few hundred bytes) would show as about 0.3 MiB per 1000 steps
    in the fit; the default threshold is 1 MiB per 1000 steps, above the allocator noise
    seen on CPU (see benchmarks/RESULTS.md, "Soak").

Examples::

    python benchmarks/soak.py                       # 3000 steps, CPU or CUDA (auto)
    python benchmarks/soak.py --steps 20000 --device cuda
    python benchmarks/soak.py --steps 50 --sample-every 5 --max-growth-mib 1e9   # smoke run
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

MIB = 1 << 20


@dataclass
class Sample:
    step: int
    seconds: float
    rss: int  # bytes
    cuda: int | None  # bytes allocated by torch on the device, None on CPU
    objects: int  # objects tracked by the garbage collector


def rss_bytes() -> int:
    """Resident set size of this process, in bytes."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return psutil.Process().memory_info().rss


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 with fewer than two distinct xs)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


@dataclass
class Verdict:
    """Growth after the warm-up, per 1000 steps, and the spread, for each quantity sampled."""

    rss_growth: float  # bytes per 1000 steps
    rss_spread: int  # bytes, max - min
    cuda_growth: float | None
    cuda_spread: int | None
    objects_growth: float  # objects per 1000 steps
    samples_used: int
    failures: list[str]


def analyse(samples: list[Sample], warmup_steps: int, max_growth_mib: float) -> Verdict:
    """Fit a line to the samples at or after ``warmup_steps``; fail where a growth exceeds the limit."""
    used = [s for s in samples if s.step >= warmup_steps]
    steps = [float(s.step) for s in used]
    rss = [float(s.rss) for s in used]
    rss_growth = slope(steps, rss) * 1000
    cuda_growth = cuda_spread = None
    failures = []
    limit = max_growth_mib * MIB
    if len(used) < 3:
        failures.append(f"only {len(used)} samples after the warm-up: run more --steps or sample more often")
    if rss_growth > limit:
        failures.append(f"RSS grows {rss_growth / MIB:.3f} MiB per 1000 steps after the warm-up "
                        f"(limit {max_growth_mib:g} MiB): a host memory leak")
    if used and used[0].cuda is not None:
        cuda = [float(s.cuda) for s in used]
        cuda_growth = slope(steps, cuda) * 1000
        cuda_spread = int(max(cuda) - min(cuda))
        if cuda_growth > limit:
            failures.append(f"torch.cuda.memory_allocated grows {cuda_growth / MIB:.3f} MiB per 1000 steps "
                            f"after the warm-up (limit {max_growth_mib:g} MiB): tensors are being kept alive")
    return Verdict(
        rss_growth=rss_growth, rss_spread=int(max(rss) - min(rss)) if rss else 0,
        cuda_growth=cuda_growth, cuda_spread=cuda_spread,
        objects_growth=slope(steps, [float(s.objects) for s in used]) * 1000,
        samples_used=len(used), failures=failures,
    )


def run(args: argparse.Namespace, device: torch.device) -> list[Sample]:
    """Train for ``args.steps`` optimizer steps, sampling memory; return the samples."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_optim as lo
    from lightning_optim.app.models import TinyGPT

    class Task(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyGPT(args.vocab, args.width, args.layers, args.heads, args.seq)

        def training_step(self, batch, batch_idx):
            (tokens,) = batch
            logits = self.net(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            self.log("train/loss", loss)
            return loss

    samples: list[Sample] = []
    start = time.perf_counter()

    class Sampler(pl.Callback):
        def __init__(self) -> None:
            self.last = -1

        def _sample(self, step: int) -> None:
            gc.collect()
            cuda = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
            # Each earlier Sample is one tracked object of ours: leave them out of the count.
            objects = len(gc.get_objects()) - len(samples)
            samples.append(Sample(step, time.perf_counter() - start, rss_bytes(), cuda, objects))

        def on_train_start(self, trainer, pl_module):
            self._sample(0)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step == self.last:
                return
            self.last = step
            if step % args.sample_every == 0 or step == args.steps:
                self._sample(step)
            if step % max(args.steps // 10, 1) == 0:
                s = samples[-1] if samples and samples[-1].step == step else None
                rss = f", RSS {s.rss / MIB:.1f} MiB" if s else ""
                elapsed = time.perf_counter() - start
                print(f"  step {step:>6}/{args.steps}  {elapsed:7.1f} s  {1000 * elapsed / step:6.1f} ms/step{rss}",
                      flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, args.vocab, (args.pool * args.batch, args.seq + 1), generator=gen)
    loader = DataLoader(TensorDataset(tokens), batch_size=args.batch, shuffle=False)
    torch.manual_seed(args.seed)
    model = Task()
    with tempfile.TemporaryDirectory(prefix="soak-") as logs:
        callbacks = [
            lo.OptimizerCallback(optimizer={"name": args.optimizer, "lr": args.lr},
                                 scheduler={"name": "warmup_cosine", "warmup_steps": max(args.steps // 20, 1)},
                                 clipping={"mode": "norm", "max_norm": 1.0}),
            lo.MomentMonitor(every_n_steps=args.every, expensive_every_n_steps=args.expensive_every),
            Sampler(),
        ]
        trainer = pl.Trainer(
            accelerator=device.type, devices=[device.index or 0] if device.type == "cuda" else 1,
            max_steps=args.steps, max_epochs=-1, logger=CSVLogger(logs, name="", version=""),
            log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=callbacks,
        )
        trainer.fit(model, loader)
        csv_rows = sum(1 for _ in open(Path(logs) / "metrics.csv")) - 1
    print(f"  done: {trainer.global_step} optimizer steps, {csv_rows} CSV rows logged", flush=True)
    return samples


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available, default), cpu, cuda[:i]")
    ap.add_argument("--every", type=int, default=10, help="MomentMonitor every_n_steps (default 10)")
    ap.add_argument("--expensive-every", type=int, default=100,
                    help="MomentMonitor expensive_every_n_steps, a multiple of --every (default 100)")
    ap.add_argument("--sample-every", type=int, default=50, help="sample memory every K steps (default 50)")
    ap.add_argument("--warmup", type=float, default=0.1, help="fraction of steps left out of the fit (default 0.1)")
    ap.add_argument("--max-growth-mib", type=float, default=1.0,
                    help="the most growth allowed, MiB per 1000 steps (default 1)")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pool", type=int, default=32, help="distinct batches, cycled (default 32)")
    ap.add_argument("--optimizer", default="coupled_adam", help="registry name (default coupled_adam)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name in ("steps", "every", "expensive_every", "sample_every", "pool"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.expensive_every % args.every:
        ap.error(f"--expensive-every {args.expensive_every} must be a multiple of --every {args.every}")
    if not 0 <= args.warmup < 1:
        ap.error(f"--warmup must be in [0, 1), got {args.warmup}")
    return args


def main(argv=None) -> int:
    from common import cpu_name, pick_device

    args = parse_args(argv)
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = pick_device(name, args.threads)
    if device is None:
        return 2
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"soak: {args.steps} steps on {device} ({where}), torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}; TinyGPT vocab {args.vocab} width {args.width} layers {args.layers} "
          f"seq {args.seq} batch {args.batch}; {args.optimizer}, monitor every {args.every} "
          f"(isotropy every {args.expensive_every}), CSV logger; memory sampled every {args.sample_every} steps",
          flush=True)
    samples = run(args, device)
    warmup_steps = math.ceil(args.warmup * args.steps)
    verdict = analyse(samples, warmup_steps, args.max_growth_mib)

    cuda = samples[0].cuda is not None
    print()
    print("| step | s | RSS MiB | ΔRSS MiB |" + (" CUDA alloc MiB |" if cuda else "") + " GC objects |")
    print("|---:|---:|---:|---:|" + ("---:|" if cuda else "") + "---:|")
    base = next((s for s in samples if s.step >= warmup_steps), samples[-1])
    for s in samples:
        mark = "" if s.step >= warmup_steps else " (warm-up)"
        row = f"| {s.step}{mark} | {s.seconds:.1f} | {s.rss / MIB:.2f} | {(s.rss - base.rss) / MIB:+.2f} |"
        if cuda:
            row += f" {s.cuda / MIB:.2f} |"
        print(row + f" {s.objects} |")
    print()
    total = samples[-1].seconds
    print(f"after the warm-up ({warmup_steps} steps; {verdict.samples_used} samples): "
          f"RSS growth {verdict.rss_growth / MIB:+.3f} MiB per 1000 steps, max - min {verdict.rss_spread / MIB:.2f} MiB; "
          + (f"CUDA allocated growth {verdict.cuda_growth / MIB:+.3f} MiB per 1000 steps, max - min "
             f"{verdict.cuda_spread / MIB:.2f} MiB; " if cuda else "")
          + f"GC objects {verdict.objects_growth:+.1f} per 1000 steps; "
          f"{total:.0f} s in all, {1000 * total / max(samples[-1].step, 1):.1f} ms/step")
    if verdict.failures:
        for failure in verdict.failures:
            print(f"FAIL: {failure}", file=sys.stderr)
        return 1
    print(f"OK: no growth above {args.max_growth_mib:g} MiB per 1000 steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
