"""benchmarks/soak.py: a 50-step run end to end, and its growth verdict on synthetic samples.

The soak itself (thousands of steps) is a benchmark, run by hand; its figures are in
benchmarks/RESULTS.md under "Soak". This only checks that the script runs, samples, prints
its table and verdict, and that the verdict fails a leak and passes a flat line.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def soak():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import soak as module
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_fifty_steps_run_sample_and_report():
    # 50 steps are too few to judge growth (the allocator is still settling), so the limit is
    # lifted here: the point is the run, the samples and the report.
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "soak.py"), "--steps", "50", "--sample-every", "10", "--every", "5",
         "--expensive-every", "10", "--device", "cpu", "--max-growth-mib", "1e9",
         "--threads", "1"],  # one thread: two OpenMP threads spin badly when the CPUs are shared
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "done: 50 optimizer steps" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| step")]
    assert [row.split("|")[1].strip() for row in rows] == ["0 (warm-up)", "10", "20", "30", "40", "50"]
    assert "RSS growth" in out and "per 1000 steps" in out and out.rstrip().endswith("MiB per 1000 steps")


def _samples(soak, mib_per_1000: float, steps=range(0, 3001, 50), noise=0.25):
    """Samples on a line of the given slope plus a deterministic +-noise MiB wiggle."""
    mib = 1 << 20
    return [soak.Sample(step=s, seconds=s / 100, rss=int(400 * mib + (mib_per_1000 * s / 1000 + noise * (-1) ** i) * mib),
                        cuda=None, objects=1000) for i, s in enumerate(steps)]


def test_verdict_fails_a_leak_and_passes_a_flat_line(soak):
    leak = soak.analyse(_samples(soak, 2.0), warmup_steps=300, max_growth_mib=1.0)
    assert leak.rss_growth / (1 << 20) == pytest.approx(2.0, abs=0.01)
    assert len(leak.failures) == 1 and "RSS grows 2.0" in leak.failures[0]
    flat = soak.analyse(_samples(soak, 0.0), warmup_steps=300, max_growth_mib=1.0)
    assert abs(flat.rss_growth) < 0.01 * (1 << 20) and flat.failures == []
    assert flat.rss_spread == int(0.5 * (1 << 20))
    # the warm-up is left out: a jump before it does not count as growth
    early = _samples(soak, 0.0)
    for s in early[:6]:
        s.rss -= 50 << 20
    assert soak.analyse(early, warmup_steps=300, max_growth_mib=1.0).failures == []
    assert soak.analyse(early, warmup_steps=0, max_growth_mib=1.0).failures != []


def test_verdict_checks_cuda_allocations_too(soak):
    samples = _samples(soak, 0.0)
    for s in samples:
        s.cuda = 1000 + s.step * 2048  # 2 KiB per step: 1.95 MiB per 1000 steps
    verdict = soak.analyse(samples, warmup_steps=300, max_growth_mib=1.0)
    assert verdict.cuda_growth / (1 << 20) == pytest.approx(2048 * 1000 / (1 << 20))
    assert len(verdict.failures) == 1 and "memory_allocated" in verdict.failures[0]
