"""Wilson et al. (NeurIPS 2017), "The Marginal Value of Adaptive Gradient Methods", Sec. 3.3.

A linearly separable least-squares problem on which methods whose iterates stay in the row
span of X (SGD, heavy-ball, Nesterov) generalize perfectly, while AdaGrad, RMSProp and Adam
converge to a solution that predicts +1 on every fresh point.

Training point i (label y_i = +1 with probability p, else -1), a vector in R^{6n}:
    x_i1 = y_i,  x_i2 = x_i3 = 1,
    x_ij = 1 for j = 4+5(i-1), ..., 4+5(i-1)+2(1-y_i)   (1 unique feature if y_i=+1, 5 if -1)
everything else 0. Loss: 0.5 * ||Xw - y||^2 / n, full batch, w0 = 0, float64.
Test points are drawn the same way and get their *own* unique features, in coordinates
appended after the 6n training ones, where the trained weights are exactly 0 (no training
gradient ever touches them and weight decay is off), so only w_1..w_3 decide a test prediction.

    python recipes/adaptive_generalization/run.py            # all 13 optimizers, table
    python recipes/adaptive_generalization/run.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

import lightning_optim as lo

# One learning rate per registry name, same step budget for all, weight_decay=0 for all
# (adamw and coupled_adam default to 0.01; decay would pull w off the least-squares solution
# set and blur the comparison). SGD-family: about 0.5 / lambda_max of X^T X / n (~3).
# Adaptive rules: per-coordinate step sizes, so lr is roughly the per-step move of each
# weight; 0.01 lets them fit in a few hundred steps (the paper tunes lr; the limit point
# does not depend on it much). Lion moves every coordinate by exactly lr per step, so it
# gets a smaller lr to end near a fit instead of oscillating at +-lr. RMSprop (no bias
# correction, no momentum) keeps oscillating around the fit at 0.01 (train loss ~1e-4 after
# 600 steps), so it gets 0.003.
LR = {
    "sgd": 0.2,
    "momentum": 0.02,
    "nesterov": 0.02,
    "adagrad": 0.1,
    "rmsprop": 0.003,
    "adam": 0.01,
    "amsgrad": 0.01,
    "adamw": 0.01,
    "nadam": 0.01,
    "radam": 0.01,
    "lion": 0.001,
    "yogi": 0.01,
    "coupled_adam": 0.01,
}

# What Wilson et al. predict for the test error ("1-p": predicts +1 everywhere).
SGD_FAMILY = {"sgd", "momentum", "nesterov"}
ADAPTIVE = {"adagrad", "rmsprop", "adam", "amsgrad", "adamw"}  # AMSGrad/AdamW(wd=0): Adam variants


def paper_prediction(name: str, p: float) -> str:
    if name in SGD_FAMILY:
        return "0"
    if name in ADAPTIVE:
        return f"≈ 1-p = {1 - p:.2f}"
    return "not in the paper"


def make_data(n: int, p: float, gen: torch.Generator, dim: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n points of Wilson et al.'s distribution in R^dim; unique features start at column `offset`."""
    y = torch.where(torch.rand(n, generator=gen, dtype=torch.float64) < p, 1.0, -1.0).double()
    x = torch.zeros(n, dim, dtype=torch.float64)
    x[:, 0] = y
    x[:, 1] = 1.0
    x[:, 2] = 1.0
    for i in range(n):
        k = 1 if y[i] > 0 else 5
        start = offset + 5 * i
        x[i, start : start + k] = 1.0
    return x, y


def run(name: str, n: int = 100, p: float = 0.6, steps: int = 600, seed: int = 0,
        test_size: int = 1000, lr: float | None = None) -> dict:
    """Train one registry optimizer on one draw of the problem; return losses and errors."""
    gen = torch.Generator().manual_seed(seed)
    d = 6 * n
    x, y = make_data(n, p, gen, d, offset=3)
    # Test points: fresh unique features in columns d, d+1, ... that training never sees.
    xt, yt = make_data(test_size, p, gen, d + 5 * test_size, offset=d)

    w = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CoupledAdam with no coupled group: "plain AdamW"
        opt = lo.create_optimizer(name, [w], lr=LR[name] if lr is None else lr, weight_decay=0.0)
    xtx, xty = x.T @ x / n, x.T @ y / n  # full-batch gradient: X^T (Xw - y) / n
    for _ in range(steps):
        with torch.no_grad():
            w.grad = xtx @ w - xty
        opt.step()

    with torch.no_grad():
        train_pred = x @ w
        w_test = torch.cat([w, torch.zeros(xt.shape[1] - d, dtype=torch.float64)])
        test_pred = xt @ w_test
        return {
            "name": name,
            "seed": seed,
            "train_loss": float(0.5 * ((train_pred - y) ** 2).mean()),
            "train_error": float((train_pred * y <= 0).double().mean()),
            "test_error": float((test_pred * yt <= 0).double().mean()),
            "test_negatives": float((yt < 0).double().mean()),
            "w123": [float(v) for v in w[:3]],
        }


def verdict(name: str, test_error: float, p: float) -> str:
    if name in SGD_FAMILY:
        return "agrees: generalizes" if test_error <= 0.05 else "DISAGREES: should reach ~0 test error"
    if name in ADAPTIVE:
        return ("agrees: predicts +1 almost everywhere" if test_error >= 0.8 * (1 - p)
                else "DISAGREES: should be ≈ 1-p")
    kind = "generalizes like SGD" if test_error <= 0.05 else (
        "fails like Adam (≈ 1-p)" if test_error >= 0.8 * (1 - p) else "in between")
    return f"no claim; {kind}"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="training points (dimension 6n)")
    ap.add_argument("--p", type=float, default=0.6, help="P(y=+1), > 1/2")
    ap.add_argument("--steps", type=int, default=600, help="full-batch steps, same for all")
    ap.add_argument("--seeds", type=int, default=5, help="data draws 0..seeds-1")
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--json", default=None, help="write per-run results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    t0 = time.perf_counter()
    results = [run(name, args.n, args.p, args.steps, s, args.test_size)
               for name in lo.optimizers() for s in range(args.seeds)]
    elapsed = time.perf_counter() - t0

    print(f"n={args.n}, d={6 * args.n}, p={args.p}, steps={args.steps}, seeds={args.seeds}, "
          f"test points={args.test_size}, float64, weight_decay=0; mean over seeds "
          f"({elapsed:.1f} s)\n")
    print("| optimizer | lr | train loss | train error | test error | paper's prediction | verdict |")
    print("|---|---|---|---|---|---|---|")
    for name in lo.optimizers():
        rows = [r for r in results if r["name"] == name]
        mean = {k: statistics.fmean(r[k] for r in rows) for k in ("train_loss", "train_error", "test_error")}
        print(f"| {name} | {LR[name]:g} | {mean['train_loss']:.2e} | {mean['train_error']:.3f} | "
              f"{mean['test_error']:.3f} | {paper_prediction(name, args.p)} | "
              f"{verdict(name, mean['test_error'], args.p)} |")
    neg = statistics.fmean(r["test_negatives"] for r in results if r["name"] == "sgd")
    print(f"\nfraction of negatives in the test sets (the error of 'always +1'): {neg:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
