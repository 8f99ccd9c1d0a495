"""Properties of the rules from the lecture notes, checked with numbers."""

from __future__ import annotations

import math

import pytest
import torch

import lightning_optim as lo
from lightning_optim.backends import reference

BACKENDS = ["reference", "foreach"]


def one_step(opt_cls, p0, g, **kw):
    p = p0.clone().requires_grad_()
    opt = opt_cls([p], **kw)
    p.grad = g.clone()
    opt.step()
    return p.detach()


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_adam_step_moves_each_coordinate_by_lr(backend):
    """Bias correction makes m_hat = g and v_hat = g^2 on step 1: |dtheta| = lr*|g|/(|g|+eps)."""
    g = torch.tensor([1e-3, -0.5, 2.0, -40.0, 1e-6])
    lr, eps = 1e-2, 1e-8
    p = one_step(lo.Adam, torch.zeros(5), g, lr=lr, eps=eps, backend=backend)
    expected = -lr * g / (g.abs() + eps)
    torch.testing.assert_close(p, expected, rtol=1e-6, atol=0)
    assert torch.allclose(p.abs()[:4], torch.full((4,), lr), rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_step_without_bias_correction(backend):
    """Uncorrected, m = (1-b1) g and v = (1-b2) g^2: the step is (1-b1)/sqrt(1-b2) larger."""
    g = torch.tensor([0.5, -2.0, 3.0])
    lr, eps, b1, b2 = 1e-2, 1e-8, 0.9, 0.999
    p = one_step(lo.Adam, torch.zeros(3), g, lr=lr, eps=eps, betas=(b1, b2), bias_correction=False, backend=backend)
    expected = -lr * (1 - b1) * g / (math.sqrt(1 - b2) * g.abs() + eps)
    torch.testing.assert_close(p, expected, rtol=1e-6, atol=0)
    factor = (1 - b1) / math.sqrt(1 - b2)
    torch.testing.assert_close(p.abs(), torch.full((3,), lr * factor), rtol=1e-5, atol=0)
    assert factor == pytest.approx(3.1623, abs=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_zero_is_sgd(backend):
    gen = torch.Generator().manual_seed(0)
    p0, g = torch.randn(10, generator=gen), torch.randn(10, generator=gen)
    plain = one_step(lo.SGD, p0, g, lr=0.1, backend=backend)
    assert torch.equal(plain, p0 - 0.1 * g)
    no_momentum = lo.create_optimizer({"name": "momentum", "momentum": 0.0, "lr": 0.1}, [p := p0.clone().requires_grad_()],
                                      backend=backend)
    p.grad = g
    no_momentum.step()
    assert torch.equal(p.detach(), plain)


def test_nesterov_rule_with_zero_momentum_is_sgd():
    """The Nesterov formula g + mu*buf reduces to g at mu = 0. The SGD class rejects that
    configuration (it is almost always a mistake), so check the rule function itself."""
    gen = torch.Generator().manual_seed(0)
    p0, g = torch.randn(10, generator=gen), torch.randn(10, generator=gen)
    group = dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=True, maximize=False)
    for t in (1.0, 2.0):
        p = p0.clone()
        reference.sgd(p, g, {"momentum_buffer": torch.zeros(10)}, t, group)
        assert torch.equal(p, p0 - 0.1 * g)
    with pytest.raises(ValueError, match="nesterov=True is invalid"):
        lo.SGD([torch.zeros(1, requires_grad=True)], momentum=0.0, nesterov=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lion_with_zero_betas_is_sign_sgd(backend):
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(20, generator=gen).requires_grad_()
    expected = p.detach().clone()
    opt = lo.Lion([p], lr=0.01, betas=(0.0, 0.0), backend=backend)
    for _ in range(3):
        g = torch.randn(20, generator=gen)
        p.grad = g
        opt.step()
        expected -= 0.01 * torch.sign(g)
        assert torch.equal(p.detach(), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_coupled_adam_without_coupled_group_is_adamw(backend):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 4, generator=gen).requires_grad_()
    b = a.detach().clone().requires_grad_()
    with pytest.warns(lo.LightningOptimWarning, match="plain AdamW"):
        coupled = lo.CoupledAdam([a], lr=1e-2, weight_decay=0.1, backend=backend)
    plain = lo.AdamW([b], lr=1e-2, weight_decay=0.1, backend=backend)
    for _ in range(5):
        g = torch.randn(6, 4, generator=gen)
        a.grad, b.grad = g, g.clone()
        coupled.step()
        plain.step()
    assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_rmsprop_step_by_hand(backend):
    """g = 2, alpha = 0.99: square_avg = 0.01 * 4 = 0.04, sqrt = 0.2, step = lr * 2 / 0.2 = 0.1."""
    p = one_step(lo.RMSprop, torch.tensor([1.0]), torch.tensor([2.0]), lr=0.01, alpha=0.99, eps=0.0, backend=backend)
    torch.testing.assert_close(p, torch.tensor([0.9]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", lo.optimizers())
def test_loss_falls_on_a_quadratic(name):
    """Every rule, at its registry defaults except lr, makes progress on a convex quadratic."""
    gen = torch.Generator().manual_seed(0)
    scales = torch.linspace(0.5, 2.0, 32).reshape(8, 4)
    target = torch.randn(8, 4, generator=gen)
    x = torch.zeros(8, 4, requires_grad=True)
    lr = {"lion": 2e-2, "sgd": 0.1, "momentum": 0.05, "nesterov": 0.05, "adagrad": 0.5}.get(name, 0.05)
    # CoupledAdam couples the matrix's rows, as it would an embedding's.
    opt = lo.create_optimizer({"name": name, "lr": lr}, [{"params": [x], "coupled": name == "coupled_adam"}])

    def loss():
        return 0.5 * (scales * (x - target) ** 2).sum()

    start = loss().item()
    for _ in range(200):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.05 * start
