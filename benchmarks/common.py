"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import platform

import torch


def cpu_name() -> str:
    """The CPU model for the report header."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer reads the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_device(name: str, threads: int | None) -> torch.device | None:
    """The ``--device`` to run on (and ``--threads``), or None after saying why it can't be."""
    import sys

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {name}: CUDA is not available in this torch ({torch.__version__})", file=sys.stderr)
        return None
    return device
