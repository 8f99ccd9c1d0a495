"""Clipping handed to the step (``GradientClipper.clip_(..., fused=True)`` and
``Optimizer.scale_next_step``) gives the update of clipping the gradients first.

On the triton backend (interpreted on CPU here) the kernel applies the coefficient or the
bound in registers and the ``.grad`` tensors stay as they were; on the other backends the
step applies it to the gradients just before the update, so there the two paths are the
same ops and must agree to the bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_optim as lo
from lightning_optim.clipping import GradientClipper
from lightning_optim.registry import optimizers
from conftest import assert_rel

CLIPS = {
    "norm": dict(mode="norm", max_norm=0.05),
    "norm_inf_per_group": dict(mode="norm", norm_type=float("inf"), max_norm=0.5, per_group={"embedding": 0.01}),
    "value": dict(mode="value", max_value=0.02),
    "value_per_group_only": dict(mode="value", max_value=None, per_group={"decay": 0.01}),
}


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 6), nn.LayerNorm(6), nn.Linear(6, 7), nn.Linear(7, 11))  # 3: the LM head
    return model.to(dtype)


def _run(name: str, backend: str, clip: dict, fused: bool, dtype=torch.float32, steps: int = 3):
    model = _model(dtype)
    opt = lo.create_optimizer({"name": name, "lr": 1e-2}, model, backend=backend)
    clipper = GradientClipper(**clip)
    gen = torch.Generator().manual_seed(1)
    reports, grads_after_clip = [], []
    for _ in range(steps):
        opt.zero_grad()
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        reports.append(clipper.clip_(opt, fused=fused))
        grads_after_clip.append([p.grad.clone() for p in model.parameters()])
        assert not clipper.should_skip(reports[-1])
        opt.step()
    return model, opt, reports, grads_after_clip


@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("name", optimizers())
@pytest.mark.parametrize("backend", ["foreach", "triton"])
def test_fused_clipping_equals_clipping_first(name, backend, clip):
    model_a, opt_a, rep_a, _ = _run(name, backend, CLIPS[clip], fused=False)
    model_b, opt_b, rep_b, _ = _run(name, backend, CLIPS[clip], fused=True)
    for a, b in zip(rep_a, rep_b):
        assert torch.equal(a.total_norm, b.total_norm)
        assert {k: bool(v) for k, v in a.clipped.items()} == {k: bool(v) for k, v in b.clipped.items()}
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        if backend == "triton":  # g * coef in registers: the same fp32 product, to rounding
            assert_rel(pb, pa, 1e-6)
        else:
            assert torch.equal(pa, pb)
    assert any(bool(v) for r in rep_a for v in r.clipped.values())  # the thresholds do clip


def test_fused_clipping_leaves_the_gradients_and_the_next_step_alone():
    model, opt, reports, grads = _run("adamw", "triton", CLIPS["norm"], fused=True, steps=1)
    gen = torch.Generator().manual_seed(1)
    raw = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(grads[0], raw))  # .grad not rescaled
    assert bool(reports[0].clipped["decay"])
    assert opt._next_transforms == {}  # used by the step, then forgotten


def test_a_skipped_step_does_not_pass_its_scale_to_the_next():
    model = _model(torch.float32)
    opt = lo.create_optimizer({"name": "sgd", "lr": 1.0}, model, backend="foreach")
    opt.scale_next_step(0, grad_scale=torch.tensor(0.0))  # as a clip of a skipped step would
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(torch.equal(p, b - 1.0) for p, b in zip(model.parameters(), before))


def test_bf16_fused_clipping_on_triton_matches_clipping_first():
    model_a, *_ = _run("adamw", "triton", CLIPS["norm"], fused=False, dtype=torch.bfloat16)
    model_b, *_ = _run("adamw", "triton", CLIPS["norm"], fused=True, dtype=torch.bfloat16)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        # bf16 grads: clipping first rounds g * coef to bf16, the kernel keeps it in fp32.
        assert (pa.float() - pb.float()).abs().max() <= 2 ** -7 * pa.float().abs().max()


def test_fused_needs_one_of_our_optimizers():
    model = _model(torch.float32)
    with pytest.raises(ValueError, match=r"^clipping: fused=True is invalid: needs a lightning_optim optimizer, not AdamW"):
        GradientClipper(mode="norm", max_norm=1.0).clip_(torch.optim.AdamW(model.parameters()), fused=True)
