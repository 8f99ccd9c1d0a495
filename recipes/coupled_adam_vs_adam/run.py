"""Coupled Adam against AdamW on the main job's tiny GPT (Stollenwerk & Stollenwerk 2025).

Trains ``python -m lightning_optim.train`` twice per seed, ``optimizer=adamw`` and
``optimizer=coupled_adam``, same seed, same budget, same everything else, then reads each
run's final checkpoint: validation loss (last ``val/loss`` in ``logs/metrics.csv``), the
geometry of the tied embedding ``wte`` (:func:`lightning_optim.stats.embedding_geometry`) and
the spread of the per-token second moment: the coefficient of variation (std / mean) across
vocabulary rows of the row-mean of sqrt(v_hat) of ``wte``. CoupledAdam stores one shared
second-moment row for the whole embedding, so its spread is 0 by construction.

    python recipes/coupled_adam_vs_adam/run.py                 # 2 seeds x 2 optimizers, ~7 min on 2 CPU cores
    python recipes/coupled_adam_vs_adam/run.py --seeds 1 --steps 100 --json out.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lightning_optim.stats import embedding_geometry

OPTIMIZERS = ("adamw", "coupled_adam")
WTE = "net.wte.weight"
# Stollenwerk & Stollenwerk (2025), 125M parameters: (AdamW, CoupledAdam).
PAPER = {"iso": (0.10, 0.83), "ratio": (0.82, 0.03), "loss": (3.03, 2.97)}


def train(optimizer: str, seed: int, run_dir: Path, steps: int | None, extra: list[str]) -> None:
    """One ``python -m lightning_optim.train`` run into ``run_dir`` (raises on failure)."""
    cmd = [sys.executable, "-m", "lightning_optim.train", f"optimizer={optimizer}", f"seed={seed}",
           "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"]
    if steps is not None:
        cmd.append(f"trainer.max_steps={steps}")
    cmd += extra
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def sqrt_v_spread(ckpt: dict, name: str = WTE) -> float:
    """Coefficient of variation across rows of the row-mean of sqrt(v_hat) of ``name``."""
    opt = ckpt["optimizer_states"][0]
    for group in opt["param_groups"]:
        names = group.get("param_names") or []
        if name in names:
            state = opt["state"][group["params"][names.index(name)]]
            beta2 = group["betas"][1]
            break
    else:
        raise KeyError(f"{name} not in the optimizer's param groups")
    v = state["exp_avg_sq"].double()
    step = float(state["step"])
    v_hat = v / (1 - beta2 ** step) if group.get("bias_correction", True) else v
    row = v_hat.sqrt().mean(1)  # one value per stored row: V rows (AdamW), 1 shared row (CoupledAdam)
    if row.numel() == 1:
        return 0.0
    return float(row.std() / row.mean())


def measure(run_dir: Path) -> dict:
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    geo = embedding_geometry(ckpt["state_dict"][WTE].double())
    return {"val_loss": val[-1], "iso": float(geo["isotropy"]), "mean_norm": float(geo["mean_norm"]),
            "ratio": float(geo["mean_ratio"]), "sqrt_v_cv": sqrt_v_spread(ckpt),
            "step": int(ckpt["global_step"])}


def fmt(r: dict) -> str:
    return (f"{r['val_loss']:.4f} | {r['iso']:.3f} | {r['mean_norm']:.3f} | {r['ratio']:.3f} | "
            f"{r['sqrt_v_cv']:.3f}")


def mean_row(rows: list[dict]) -> dict:
    return {k: statistics.fmean(r[k] for r in rows) for k in ("val_loss", "iso", "mean_norm", "ratio", "sqrt_v_cv")}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2, help="seeds 0..seeds-1, the same for both optimizers")
    ap.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: the main job's, 300)")
    ap.add_argument("--out", default=None, help="parent directory of the runs (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write per-run results here")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs, e.g. model.d_model=64")
    args = ap.parse_args(argv)

    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="coupled_adam_vs_adam-")
        parent = Path(tmp.name)
    else:
        parent = Path(args.out)
    results = []
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        for name in OPTIMIZERS:
            run_dir = parent / f"{name}-seed{seed}"
            t = time.perf_counter()
            train(name, seed, run_dir, args.steps, args.overrides)
            r = {"optimizer": name, "seed": seed, **measure(run_dir), "seconds": time.perf_counter() - t}
            print(f"{name} seed {seed}: {r['step']} steps in {r['seconds']:.0f} s", file=sys.stderr)
            results.append(r)
    elapsed = time.perf_counter() - t0
    if tmp is not None:
        tmp.cleanup()

    steps = results[0]["step"]
    print(f"tiny GPT (main job), {steps} steps, seeds 0..{args.seeds - 1}, extra overrides: "
          f"{' '.join(args.overrides) or 'none'} ({elapsed:.0f} s)\n")
    print("| optimizer | seed | val loss | Iso | ‖μ‖ | ‖μ‖/mean‖e_i‖ | CV of per-token √v̂ |")
    print("|---|---|---|---|---|---|---|")
    for name in OPTIMIZERS:
        rows = [r for r in results if r["optimizer"] == name]
        for r in rows:
            print(f"| {name} | {r['seed']} | {fmt(r)} |")
        print(f"| **{name}** | **mean** | {fmt(mean_row(rows))} |")
    a = mean_row([r for r in results if r["optimizer"] == "adamw"])
    c = mean_row([r for r in results if r["optimizer"] == "coupled_adam"])
    print("\nCoupledAdam's per-token √v̂ spread is 0 by construction: one second-moment row shared by all tokens.")
    print("\n| quantity | paper AdamW → CoupledAdam (125M) | ours AdamW → CoupledAdam | same direction |")
    print("|---|---|---|---|")
    for key, label, better in (("iso", "Iso", "up"), ("ratio", "‖μ‖/mean‖e_i‖", "down"), ("loss", "val loss", "down")):
        ours = ("val_loss" if key == "loss" else key)
        pa, pc = PAPER[key]
        same = (c[ours] > a[ours]) if better == "up" else (c[ours] < a[ours])
        print(f"| {label} | {pa:.2f} → {pc:.2f} | {a[ours]:.3f} → {c[ours]:.3f} | {'yes' if same else 'no'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
