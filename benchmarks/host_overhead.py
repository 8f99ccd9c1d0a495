"""The host (CPU) time of one ``optimizer.step()`` on the triton backend, without a GPU.

A benchmark, not a test: it prints a markdown table and exits 0; nothing here asserts speed.

Why
    A fused step is fast on the device (GPT-2 small's 124M fp32 AdamW params move 3.5 GB:
    about 0.9 ms at 90% of an H200's 4.3 TB/s copy bandwidth), so the Python that gathers
    the tensors and launches the kernels can become the bottleneck: if the host needs longer
    than the device to issue a step, the GPU waits. This measures that host work on any
    machine, CPU only: the parameter list has GPT-2 small's tensor count (148) with tiny
    tensors, and the Triton kernels are replaced by no-op launchers, so what is timed is
    exactly the per-step Python and torch bookkeeping of ``Optimizer.step`` and the launcher
    (bucketing, layout checks, the address-table cache key, the step-count increment).

Baseline, same run, same tensors
    ``torch.optim.AdamW(fused=True)`` on the same tiny CPU tensors: its own Python per-param
    loop plus one fused C++ call whose arithmetic on 148 x 4 elements is negligible. Ratio
    = our host time / torch's. On a GPU, ``benchmarks/step.py --device cuda`` prints both the
    device time and this host time (``host ms``) of the real launches.

Caveat: torch's row includes its step-count increment, ``torch._foreach_add_`` over 148 0-d
tensors, which costs more on CPU tensors than the one launch it is on a GPU; ours counts the
step inside the step prologue kernel, not launched here. The script times that increment on
torch's own step tensors in the same run and prints it under the table, with torch's time
without it, so the comparison can be read both ways.

    python benchmarks/host_overhead.py
"""

from __future__ import annotations

import os
import statistics
import sys
import timeit
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # triton's CPU mode: needed to build the optimizers on CPU tensors

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lightning_optim as lo  # noqa: E402
from common import cpu_name  # noqa: E402
from lightning_optim.backends.triton import launcher  # noqa: E402
from step import GPT2_VOCAB, GPT2_WIDTH, gpt2_shapes, time_steps  # noqa: E402


CPU = torch.device("cpu")


class _NoLaunch:
    """Stands in for the kernels module: ``kernel[grid](...)`` does nothing."""

    def __getattr__(self, name):
        return self

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> int:
    torch.manual_seed(0)
    n = len(gpt2_shapes(GPT2_WIDTH, GPT2_VOCAB))
    params = [torch.nn.Parameter(torch.randn(2, 2)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(2, 2)
    launcher.kernels = lambda device: _NoLaunch()
    configs = [("torch.optim.AdamW(fused=True)", lambda: torch.optim.AdamW(params, fused=True))]
    for name in ("adamw", "coupled_adam", "nadam", "lion", "sgd"):
        groups = [{"params": params[:2], "coupled": True}, {"params": params[2:]}] if name == "coupled_adam" else params
        configs.append((f"{name} (triton, kernels not launched)",
                        lambda name=name, groups=groups: lo.create_optimizer({"name": name}, groups, backend="triton")))
    built = [(label, make()) for label, make in configs]
    for _, opt in built:
        for _ in range(5):  # state, tables
            opt.step()
    results = {label: [] for label, _ in built}
    for r in range(7):  # interleaved rounds
        for label, opt in built[r % len(built):] + built[:r % len(built)]:
            results[label].append(statistics.median(time_steps(opt, 20, CPU)[0]))
    base = statistics.median(results[built[0][0]])
    print(f"{cpu_name()} | torch {torch.__version__} | {n} tensors (GPT-2 small's count) | threads "
          f"{torch.get_num_threads()} | median of 7 interleaved rounds x 20 steps")
    print()
    print("| optimizer | host ms per step | spread | vs torch fused AdamW |")
    print("|---|---:|---:|---:|")
    for label, rounds in results.items():
        med = statistics.median(rounds)
        q1, _, q3 = statistics.quantiles(rounds, n=4, method="inclusive")
        print(f"| {label} | {med:.3f} | {(q3 - q1) / med:.0%} | {med / base:.2f} |")
    torch_steps = [built[0][1].state[p]["step"] for p in params]
    increment = 1e3 * statistics.median(timeit.repeat(lambda: torch._foreach_add_(torch_steps, 1.0), number=1, repeat=500))
    print()
    print(f"torch's step-count increment on its {n} CPU step tensors: {increment:.3f} ms of its {base:.3f} ms "
          f"(one launch on a GPU); torch without it: {base - increment:.3f} ms.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
