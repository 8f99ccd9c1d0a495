"""A one-minute tour: every optimizer on a tiny tied-embedding model with Zipfian tokens.

    python -m lightning_optim.demo [--steps 200] [--vocab 512] [--backend auto]

Each optimizer trains the same model from the same seed on pairs (x, y) where x is
drawn from a Zipf distribution and y = f(x) for a fixed random map f most of the time.
It prints the final loss, the time per step, and the embedding's mean-vector ratio
||mean_i e_i|| / mean_i ||e_i||: Adam-type optimizers let the embeddings drift together
(the anisotropy of Stollenwerk & Stollenwerk 2025), Coupled Adam keeps the ratio low.
Plain PyTorch: no Lightning, no download.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from ..registry import create_optimizer, optimizers

# Learning rates that suit this toy for each rule (Lion wants ~10x less than Adam).
LR = {"sgd": 0.5, "momentum": 0.1, "nesterov": 0.1, "adagrad": 0.1, "rmsprop": 3e-3, "lion": 3e-4}


class TiedBigram(nn.Module):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied input/output embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(self.embed(x)))


def zipf_pairs(vocab: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    x = torch.multinomial(weights, n, replacement=True, generator=gen)
    f = torch.randperm(vocab, generator=gen)
    noise = torch.multinomial(weights, n, replacement=True, generator=gen)
    y = torch.where(torch.rand(n, generator=gen) < 0.8, f[x], noise)
    return x, y


def mean_ratio(e: torch.Tensor) -> float:
    return (e.mean(0).norm() / e.norm(dim=1).mean()).item()


def run(name: str, steps: int, vocab: int, dim: int, batch: int, backend: str) -> dict:
    torch.manual_seed(0)
    model = TiedBigram(vocab, dim)
    opt = create_optimizer({"name": name, "lr": LR.get(name, 3e-3)}, model, backend=backend)
    gen = torch.Generator().manual_seed(1)
    x, y = zipf_pairs(vocab, steps * batch, gen)
    loss_fn = nn.CrossEntropyLoss()
    step_time = 0.0
    for i in range(steps):
        xb, yb = x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]
        loss = loss_fn(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        t0 = time.perf_counter()
        opt.step()
        step_time += time.perf_counter() - t0
    return {"name": name, "loss": loss.item(), "ms": 1e3 * step_time / steps, "ratio": mean_ratio(model.embed.weight.detach())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_optim.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--backend", default="auto", choices=["auto", "reference", "foreach"])
    parser.add_argument("--optimizers", nargs="*", default=optimizers(), metavar="NAME")
    args = parser.parse_args(argv)
    print(f"{len(args.optimizers)} optimizers x {args.steps} steps, vocab {args.vocab}, dim {args.dim}, backend {args.backend}")
    print(f"{'optimizer':<14}{'final loss':>11}{'ms/step':>9}{'|mean e|/mean|e|':>18}")
    for name in args.optimizers:
        r = run(name, args.steps, args.vocab, args.dim, args.batch, args.backend)
        print(f"{r['name']:<14}{r['loss']:>11.3f}{r['ms']:>9.2f}{r['ratio']:>18.3f}", flush=True)

