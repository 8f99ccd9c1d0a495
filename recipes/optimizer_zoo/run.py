"""The optimizer zoo: every registry optimizer on the tiny GPT and on a small convex problem.

(a) The main job's tiny GPT (:class:`lightning_optim.app.models.TinyGPT`, tied embeddings) on the
    stdlib corpus (:func:`lightning_optim.app.corpus.load_corpus`, the main job's cached tokens),
    a short budget, same seed, same batches and same initial weights for every optimizer,
    trained in a plain PyTorch loop (no Lightning, so ms/step is the optimizer plus the
    model). ``lightning_optim.create_optimizer(name, model)`` splits the parameters by
    :func:`lightning_optim.param_groups` (the output embedding coupled only for CoupledAdam).
(b) Logistic regression on standardized synthetic features: full batch, float64, 200 steps.

Writes one PNG (two panels of loss curves) and prints a table: optimizer | lr | final GPT
train loss | final convex loss | ms/step.

    python recipes/optimizer_zoo/run.py                                   # ~3 min on 2 CPU cores
    python recipes/optimizer_zoo/run.py --gpt-steps 100 --png zoo.png --json zoo.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import lightning_optim as lo
from lightning_optim.app.corpus import load_corpus
from lightning_optim.app.models import TinyGPT

HERE = Path(__file__).resolve().parent

# One lr per optimizer and problem, untuned beyond a quick look: the adaptive rules get the
# main job's 1e-3 (lion, whose every step has size lr per coordinate, 3e-4); the SGD family,
# whose step scales with the raw gradient, needs a much larger lr on the GPT.
GPT_LR = {
    "sgd": 0.3, "momentum": 0.03, "nesterov": 0.03, "adagrad": 0.01, "rmsprop": 0.001,
    "adam": 0.001, "amsgrad": 0.001, "adamw": 0.001, "nadam": 0.001, "radam": 0.001,
    "lion": 0.0003, "yogi": 0.001, "coupled_adam": 0.001,
}
# Convex problem (standardized features, lambda_max of the logistic Hessian <= ~0.25 * lambda_max(X^T X / n)).
CONVEX_LR = {
    "sgd": 1.0, "momentum": 0.1, "nesterov": 0.1, "adagrad": 0.1, "rmsprop": 0.01,
    "adam": 0.05, "amsgrad": 0.05, "adamw": 0.05, "nadam": 0.05, "radam": 0.05,
    "lion": 0.005, "yogi": 0.05, "coupled_adam": 0.05,
}


def make_opt(name: str, params, lr: float):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CoupledAdam on a model/tensor without an embedding group
        return lo.create_optimizer(name, params, lr=lr)


def run_gpt(name: str, corpus, steps: int, batch_size: int, model_kw: dict, seed: int = 0,
            lr: float | None = None) -> dict:
    """``steps`` training steps of TinyGPT; returns the per-step train loss and ms/step."""
    torch.manual_seed(seed)
    seq = model_kw["seq_len"]
    model = TinyGPT(corpus.vocab_size, model_kw["d_model"], model_kw["n_layers"], model_kw["n_heads"], seq)
    opt = make_opt(name, model, GPT_LR[name] if lr is None else lr)
    gen = torch.Generator().manual_seed(seed)
    n = len(corpus.train) - seq - 1
    losses, times = [], []
    for _ in range(steps):
        starts = torch.randint(0, n, (batch_size,), generator=gen)
        batch = torch.stack([corpus.train[s : s + seq + 1] for s in starts.tolist()])
        t = time.perf_counter()
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    # ms/step: median of the steps after the first (warm-up: lazy state allocation)
    ms = 1000 * sorted(times[1:] or times)[len(times[1:] or times) // 2]
    return {"losses": losses, "ms": ms}


def convex_data(n: int = 500, d: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.randn(d, d, generator=gen, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0)  # standardized features
    w_true = torch.randn(d, generator=gen, dtype=torch.float64)
    p = torch.sigmoid(x @ w_true)
    y = (torch.rand(n, generator=gen, dtype=torch.float64) < p).double()  # noisy labels: a finite optimum
    return x, y


def run_convex(name: str, steps: int = 200, lr: float | None = None) -> dict:
    """Full-batch logistic regression (with bias), w0 = 0; returns the loss after each step."""
    x, y = convex_data()
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    opt = make_opt(name, [w], CONVEX_LR[name] if lr is None else lr)
    losses = []
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(xb @ w, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        losses.append(float(F.binary_cross_entropy_with_logits(xb @ w, y)))
    return {"losses": losses}


def convex_optimum(steps: int = 50) -> float:
    """The minimum of the convex loss, by Newton's method (for reference in the plot and table)."""
    x, y = convex_data()
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    w = torch.zeros(xb.shape[1], dtype=torch.float64)
    for _ in range(steps):
        p = torch.sigmoid(xb @ w)
        g = xb.T @ (p - y) / len(y)
        h = (xb * (p * (1 - p))[:, None]).T @ xb / len(y)
        w = w - torch.linalg.solve(h, g)
    return float(F.binary_cross_entropy_with_logits(xb @ w, y))


def plot(results: list[dict], optimum: float, png: Path, title_gpt: str, title_convex: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(results):
        style = "--" if i >= 10 else "-"
        a.plot(range(1, len(r["gpt"]) + 1), r["gpt"], style, color=cmap(i), label=r["name"], lw=1.2)
        b.semilogy(range(len(r["convex"])), [max(v - optimum, 1e-16) for v in r["convex"]], style,
                   color=cmap(i), label=r["name"], lw=1.2)
    a.set(title=title_gpt, xlabel="step", ylabel="train loss (nats/token)")
    b.set(title=title_convex, xlabel="step", ylabel="loss − optimum")
    a.legend(fontsize=8, ncol=2)
    b.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpt-steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-layers", type=int, default=2)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--max-bytes", type=int, default=6_000_000, help="of stdlib source (the main job's default)")
    ap.add_argument("--convex-steps", type=int, default=200)
    ap.add_argument("--png", default=str(HERE / "loss_curves.png"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    corpus = load_corpus(args.vocab_size, args.max_bytes, verbose=False)
    model_kw = {"d_model": args.d_model, "n_layers": args.n_layers, "n_heads": args.n_heads, "seq_len": args.seq_len}
    optimum = convex_optimum()
    t0 = time.perf_counter()
    results = []
    for name in lo.optimizers():
        g = run_gpt(name, corpus, args.gpt_steps, args.batch_size, model_kw)
        c = run_convex(name, args.convex_steps)
        results.append({"name": name, "gpt_lr": GPT_LR[name], "convex_lr": CONVEX_LR[name], "gpt": g["losses"],
                        "ms": g["ms"], "convex": c["losses"]})
        print(f"{name}: GPT {g['losses'][-1]:.3f}, convex {c['losses'][-1]:.5f}", file=sys.stderr)
    elapsed = time.perf_counter() - t0
    gpt_title = (f"tiny GPT (d={args.d_model}, {args.n_layers} layers, vocab {corpus.vocab_size}), "
                 f"batch {args.batch_size}x{args.seq_len}")
    plot(results, optimum, Path(args.png), gpt_title,
         f"logistic regression, n=500, d=20, full batch (optimum {optimum:.4f})")

    print(f"tiny GPT: {args.gpt_steps} steps, batch {args.batch_size}x{args.seq_len}, d_model {args.d_model}, "
          f"{args.n_layers} layers, vocab {corpus.vocab_size}, seed 0; convex: logistic regression, n=500, d=20, "
          f"full batch, float64, {args.convex_steps} steps, optimum {optimum:.4f} ({elapsed:.0f} s)")
    print(f"GPT loss at step 1: {results[0]['gpt'][0]:.3f} (ln vocab = {math.log(corpus.vocab_size):.3f}); "
          f"GPT loss: mean of the last 5 steps; ms/step: median GPT step (forward, backward, optimizer)\n")
    print("| optimizer | lr (GPT / convex) | final GPT train loss | final convex loss | ms/step |")
    print("|---|---|---|---|---|")
    for r in results:
        last = r["gpt"][-5:]
        print(f"| {r['name']} | {r['gpt_lr']:g} / {r['convex_lr']:g} | {sum(last) / len(last):.3f} | "
              f"{r['convex'][-1]:.5f} | {r['ms']:.1f} |")
    print(f"\nfigure: {args.png}")
    if args.json:
        Path(args.json).write_text(json.dumps({"optimum": optimum, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
