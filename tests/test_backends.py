"""Backend parity: every backend against the reference, for every rule.

fp32, bf16, fp16 and a mixed-dtype model; sizes 0, 1, a prime and a matrix;
non-contiguous params and grads; and a parameter whose gradient starts late, so one
bucket holds tensors on different step counts.
"""

from __future__ import annotations

import pytest
import torch

import lightning_optim as lo
from lightning_optim import backends
from conftest import assert_rel, build_for_rule

# Every registry name, plus the variants whose code paths differ.
VARIANTS = {name: {} for name in lo.optimizers()}
VARIANTS.update({
    "sgd+dampening": {"momentum": 0.9, "dampening": 0.2, "weight_decay": 0.1},
    "rmsprop+centered+momentum": {"centered": True, "momentum": 0.5, "weight_decay": 0.1},
    "adagrad+lr_decay": {"lr_decay": 0.1, "initial_accumulator_value": 0.1},
    "adam+maximize+wd": {"maximize": True, "weight_decay": 0.1},
    "adamw+no_bias_correction": {"bias_correction": False},
    "nadam+decoupled": {"decoupled_weight_decay": True, "weight_decay": 0.1},
    "radam+decoupled": {"decoupled_weight_decay": True, "weight_decay": 0.1},
    "lion+wd": {"weight_decay": 0.1},
    "yogi+wd": {"weight_decay": 0.1},
    "coupled_adam+amsgrad": {"amsgrad": True},
})


def base_name(variant: str) -> str:
    return variant.split("+")[0]


def make_params(dtypes, gen):
    """Awkward sizes: empty, one element, a prime, a matrix, and non-contiguous views."""
    specs = [(0,), (1,), (13,), (6, 5), (7, 11)]
    params = []
    for i, shape in enumerate(specs):
        dtype = dtypes[i % len(dtypes)]
        t = torch.randn(shape, generator=gen).to(dtype)
        params.append(t.requires_grad_())
    # A non-contiguous leaf: the transpose of a fresh tensor.
    params.append(torch.randn(5, 9, generator=gen).to(dtypes[0]).t().requires_grad_())
    return params


def train(variant, backend, dtypes, steps=12):
    gen = torch.Generator().manual_seed(7)
    params = make_params(dtypes, gen)
    name = base_name(variant)
    opt = build_for_rule(name, VARIANTS[variant], params, backend)
    late = params[2]  # gets no gradient for the first 3 steps: its step count lags behind
    for step in range(steps):
        for p in params:
            if p is late and step < 3:
                p.grad = None
                continue
            # Non-contiguous grads: the transpose of a tensor of the transposed shape.
            g = torch.randn(tuple(reversed(p.shape)), generator=gen).t() if p.dim() == 2 else torch.randn(p.shape, generator=gen)
            p.grad = g.to(p.dtype)
        opt.step()
    return params, opt


DTYPES = {
    "fp32": [torch.float32],
    "bf16": [torch.bfloat16],
    "fp16": [torch.float16],
    "mixed": [torch.float32, torch.bfloat16],
}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_foreach_matches_reference(variant, dtype):
    ref_params, ref_opt = train(variant, "reference", DTYPES[dtype])
    got_params, got_opt = train(variant, "foreach", DTYPES[dtype])
    for i, (a, e) in enumerate(zip(got_params, ref_params)):
        assert a.dtype == e.dtype
        if e.dtype == torch.float32:
            assert_rel(a, e, 1e-6, f"param {i}")
        else:
            # Both backends do fp32 math and round once; a fold of the denominator can flip
            # the last bit of a rounding, so allow one low-precision ulp.
            ulp = torch.finfo(e.dtype).eps
            torch.testing.assert_close(a.float(), e.float(), rtol=ulp, atol=ulp * 1e-2)
    # The fp32 state must agree too, whatever the param dtype.
    for (pa, pe) in zip(got_params, ref_params):
        sa, se = got_opt.state[pa], ref_opt.state[pe]
        assert sa.keys() == se.keys()
        for key in se:
            assert sa[key].dtype == se[key].dtype
            if key != "step" and se[key].dtype != torch.float32:
                continue
            assert_rel(sa[key], se[key], 1e-5, key)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_low_precision_state_is_fp32(variant):
    params, opt = train(variant, "foreach", [torch.bfloat16], steps=2)
    for p in params:
        for key, value in opt.state[p].items():
            assert value.dtype == torch.float32, (key, value.dtype)
            if key in ("step", "mu_product"):
                assert value.device.type == "cpu" and value.dim() == 0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_late_parameter_counts_its_own_steps(variant):
    params, opt = train(variant, "foreach", [torch.float32], steps=5)
    assert opt.state[params[2]]["step"].item() == 2.0
    assert opt.state[params[3]]["step"].item() == 5.0


def test_bf16_math_is_fp32():
    """A bf16 step equals the fp32 step on the upcast values, rounded once."""
    gen = torch.Generator().manual_seed(0)
    p16 = torch.randn(64, generator=gen).bfloat16().requires_grad_()
    p32 = p16.detach().float().requires_grad_()
    g = torch.randn(64, generator=gen).bfloat16()
    o16, o32 = lo.AdamW([p16], lr=1e-2), lo.AdamW([p32], lr=1e-2)
    p16.grad, p32.grad = g, g.float()
    o16.step()
    o32.step()
    assert torch.equal(p16.detach(), p32.detach().bfloat16())


def test_auto_resolves_to_foreach_on_cpu():
    p = torch.zeros(3, requires_grad=True)
    assert lo.Adam([p]).backend == "foreach"
    assert lo.Adam([p], backend="reference").backend == "reference"
    assert backends.resolve("X", "auto", [torch.zeros(1, device="meta")]) == "reference"
