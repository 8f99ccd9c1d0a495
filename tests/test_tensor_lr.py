"""A learning rate given as a 0-d tensor, on every backend.

Why: a step captured in a CUDA graph replays its kernel arguments as they were at capture;
an lr that changes (a schedule) must be read from device memory at replay time. So, as in
torch, a group's ``lr`` may be a one-element tensor. The triton backend reads it in the step
prologue on the device; reference and foreach read it on the host. These tests hold every
registry optimizer, on every backend, to the float-lr run, bit for bit, through a schedule
that changes the tensor in place, and check the tensor keeps its identity through a
scheduler and a state-dict round trip. The CUDA-graph replay itself is in test_triton_amp.py.
"""

from __future__ import annotations

import pytest
import torch

import lightning_optim as lo
from lightning_optim.schedules import build_scheduler
from lightning_optim.validation import ConfigurationError
from conftest import build_for_rule
from test_triton_amp import _forbid_host_reads

BACKENDS = ["reference", "foreach", "triton"]


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _run(name, backend, tensor_lr, steps=4):
    gen = torch.Generator().manual_seed(21)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in ((5, 3), (130,), (1,))]
    opt = build_for_rule(name, {}, params, backend)
    lrs = []
    if tensor_lr:
        for group in opt.param_groups:
            lrs.append(torch.tensor(group["lr"], dtype=torch.float32))
            group["lr"] = lrs[-1]
    else:  # the same value the tensor holds: lr rounded to fp32
        for group in opt.param_groups:
            group["lr"] = float(torch.tensor(group["lr"], dtype=torch.float32))
    scheduler = build_scheduler(opt, "cosine", warmup_steps=1, total_steps=steps)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        scheduler.step()
    if tensor_lr:  # the scheduler updated the user's tensors in place
        assert all(g["lr"] is t for g, t in zip(opt.param_groups, lrs))
    return params, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", lo.optimizers())
def test_tensor_lr_equals_float_lr(name, backend):
    floats, opt_f = _run(name, backend, tensor_lr=False)
    tensors, opt_t = _run(name, backend, tensor_lr=True)
    for a, b in zip(floats, tensors):
        assert torch.equal(a, b), (name, backend, (a - b).abs().max())
    assert [float(g["lr"]) for g in opt_t.param_groups] == [g["lr"] for g in opt_f.param_groups]


def test_triton_step_with_tensor_lr_reads_nothing_on_the_host(monkeypatch):
    gen = torch.Generator().manual_seed(22)
    params = [torch.randn(40, generator=gen).requires_grad_(), torch.randn(3, 4, generator=gen).requires_grad_()]
    lr = torch.tensor(1e-2)
    opt = lo.NAdam(params, lr=lr, weight_decay=0.1, decoupled_weight_decay=True, backend="triton")
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()  # creates the state (allowed to read: construction-like work)
    before = [p.detach().clone() for p in params]
    with monkeypatch.context() as m:
        _forbid_host_reads(m)
        lr.fill_(0.0)  # what a scheduler does between steps
        opt.step()
    # lr 0 with decoupled decay: 1 - lr * wd = 1 and no step, so nothing moved.
    assert all(torch.equal(a, b) for a, b in zip(params, before))


def test_tensor_lr_keeps_its_identity_through_load_state_dict():
    params = [torch.zeros(3, requires_grad=True)]
    lr = torch.tensor(1e-3)
    opt = lo.AdamW(params, lr=lr)
    assert opt.param_groups[0]["lr"] is lr
    saved = lo.AdamW([torch.zeros(3, requires_grad=True)], lr=5e-4).state_dict()  # a float lr
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == float(torch.tensor(5e-4))
    saved["param_groups"][0]["lr"] = torch.tensor(2e-4, dtype=torch.float64)  # a tensor lr
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] is lr and lr.dtype == torch.float32 and lr.item() == float(torch.tensor(2e-4))


@pytest.mark.parametrize(("lr", "message"), [
    (torch.tensor([1e-3, 1e-3]), r"AdamW: lr='a torch.float32 tensor of shape \[2\]' is invalid: a tensor lr must be "
                                 r"a floating-point tensor with one element"),
    (torch.tensor(1), r"AdamW: lr='a torch.int64 tensor of shape \[\]' is invalid"),
    (torch.tensor(-1e-3), r"AdamW: lr=-0.0010000000474974513 is invalid: must be >= 0"),
    (torch.tensor(float("inf")), r"AdamW: lr=inf is invalid: must be finite"),
    (torch.tensor(float("nan")), r"AdamW: lr=nan is invalid: must be >= 0"),
])
def test_bad_tensor_lr_is_refused(lr, message):
    with pytest.raises(ConfigurationError, match=message):
        lo.AdamW([torch.zeros(3, requires_grad=True)], lr=lr)
