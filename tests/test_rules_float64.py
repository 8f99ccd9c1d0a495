"""Lion, Yogi and CoupledAdam against float64 references written here from the papers.

torch has none of the three, so the oracle is an independent plain-Python-loop version of
each paper's algorithm in float64; ours runs in fp32 on every backend. For CoupledAdam
the reference keeps the full V x H second moment and averages it over the rows, as
Stollenwerk & Stollenwerk (2025) write it, while ours keeps only the row mean.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import lightning_optim as lo
from conftest import assert_rel

STEPS = 20


def lion_reference(p, grads, lr, beta1, beta2, wd, maximize):
    m = torch.zeros_like(p)
    for g in grads:
        g = -g if maximize else g
        c = beta1 * m + (1 - beta1) * g
        p = p * (1 - lr * wd) - lr * torch.sign(c)
        m = beta2 * m + (1 - beta2) * g
    return p


def yogi_reference(p, grads, lr, beta1, beta2, eps, v0, wd, maximize):
    m, v = torch.zeros_like(p), torch.full_like(p, v0)
    for t, g in enumerate(grads, start=1):
        g = -g if maximize else g
        m = beta1 * m + (1 - beta1) * g
        v = v - (1 - beta2) * torch.sign(v - g * g) * g * g
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
        p = p * (1 - lr * wd) - lr * m_hat / (torch.sqrt(v_hat) + eps)
    return p


def coupled_adam_reference(p, grads, lr, beta1, beta2, eps, wd, scale, bias_correction):
    """The paper's form: a full second moment, averaged over the vocabulary rows."""
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        v_coupled = v.mean(dim=0, keepdim=True).expand_as(v)
        bc1, bc2 = (1 - beta1**t, 1 - beta2**t) if bias_correction else (1.0, 1.0)
        p = p * (1 - lr * wd) - (lr / bc1) * m / (torch.sqrt(scale * v_coupled / bc2) + eps)
    return p


def run_ours(make, shape, grads64):
    p = torch.randn(shape, generator=torch.Generator().manual_seed(3)).requires_grad_()
    start = p.detach().double().clone()
    opt = make([p])
    for g in grads64:
        p.grad = g.float()
        opt.step()
    return start, p.detach().double()


def make_grads(shape, scale=1.0):
    gen = torch.Generator().manual_seed(4)
    return [scale * torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(STEPS)]


BACKENDS = ["reference", "foreach"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wd, maximize, betas", list(itertools.product([0.0, 0.1], [False, True], [(0.9, 0.99), (0.5, 0.8)])))
def test_lion(backend, wd, maximize, betas):
    shape, lr = (13, 7), 1e-3
    grads = make_grads(shape)
    start, got = run_ours(lambda ps: lo.Lion(ps, lr=lr, betas=betas, weight_decay=wd, maximize=maximize, backend=backend), shape, grads)
    want = lion_reference(start, grads, lr, *betas, wd, maximize)
    assert_rel(got, want, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wd, maximize, v0", list(itertools.product([0.0, 0.1], [False, True], [1e-6, 0.5])))
def test_yogi(backend, wd, maximize, v0):
    shape, lr, betas, eps = (13, 7), 1e-2, (0.9, 0.999), 1e-3
    grads = make_grads(shape)
    start, got = run_ours(
        lambda ps: lo.Yogi(ps, lr=lr, betas=betas, eps=eps, initial_accumulator_value=v0, weight_decay=wd,
                           maximize=maximize, backend=backend),
        shape, grads,
    )
    want = yogi_reference(start, grads, lr, *betas, eps, v0, wd, maximize)
    assert_rel(got, want, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wd, scale, bias_correction", list(itertools.product([0.0, 0.1], [1.0, 2.5], [True, False])))
def test_coupled_adam(backend, wd, scale, bias_correction):
    shape, lr, betas, eps = (50, 8), 1e-2, (0.9, 0.95), 1e-8
    # Zipfian rows: frequent tokens get large gradients, rare ones tiny, which is where
    # coupling changes the update (uniform rows would hide a wrong mean).
    row_scale = torch.tensor([1.0 / (r + 1) for r in range(shape[0])], dtype=torch.float64)[:, None]
    grads = [g * row_scale for g in make_grads(shape)]
    start, got = run_ours(
        lambda ps: lo.CoupledAdam([{"params": ps, "coupled": True, "coupling_scale": scale}], lr=lr, betas=betas,
                                  eps=eps, weight_decay=wd, bias_correction=bias_correction, backend=backend),
        shape, grads,
    )
    want = coupled_adam_reference(start, grads, lr, *betas, eps, wd, scale, bias_correction)
    assert_rel(got, want, 1e-6)
    # And coupling matters here: plain AdamW lands somewhere measurably different.
    _, adamw = run_ours(lambda ps: lo.AdamW(ps, lr=lr, betas=betas, eps=eps, weight_decay=wd, backend=backend), shape, grads)
    assert (adamw - want).abs().max() > 1e-3


def test_coupled_rows_get_equal_scale():
    """Coupling gives every row the same denominator: the first step of a 1-column embedding
    moves each row by lr * g_i / sqrt(mean(g^2)), proportional to its gradient."""
    p = torch.zeros(4, 1, requires_grad=True)
    opt = lo.CoupledAdam([{"params": [p], "coupled": True}], lr=0.1, eps=0.0, weight_decay=0.0)
    g = torch.tensor([[4.0], [2.0], [1.0], [1.0]])
    p.grad = g
    opt.step()
    rms = math.sqrt((16 + 4 + 1 + 1) / 4)
    torch.testing.assert_close(p.detach(), -0.1 * g / rms, rtol=1e-6, atol=0)
