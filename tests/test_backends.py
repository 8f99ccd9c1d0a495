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
from lightning_optim.backends import Bucket
from lightning_optim.optim import buckets
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


def test_auto_resolves_on_cpu():
    """(The whole table of auto's CPU choices: tests/test_torch_kernels.py.)"""
    p = torch.zeros(3, requires_grad=True)
    assert lo.Adam([p]).backend == "compiled"  # torch's fused Adam kernel: nothing to compile
    assert lo.Yogi([p]).backend == "foreach"  # a small model: compiling would cost more than it saves
    assert lo.Adam([p], backend="reference").backend == "reference"
    assert backends.resolve("X", "auto", [torch.zeros(1, device="meta")]) == "reference"


# ----- gathering: the C-level common case gives exactly the general loop's bucket ------------


def _same_buckets(fast: dict, general: dict) -> None:
    """Same (device, dtype) keys, and every list holds the very same tensors, in order."""
    assert list(fast) == list(general)
    for fb, gb in zip(fast.values(), general.values()):
        assert type(fb) is type(gb) is Bucket
        (ps, gs, slots, steps, originals), (eps, egs, eslots, esteps, eoriginals) = fb, gb
        assert list(slots) == list(eslots)
        for got, expected in [(ps, eps), (gs, egs), (steps, esteps), (originals, eoriginals),
                              *((slots[k], eslots[k]) for k in eslots)]:
            assert len(got) == len(expected) and all(a is b for a, b in zip(got, expected))


def _gather(opt, group, on_device=False):
    keys = opt._state_keys(group)
    return buckets.uniform(opt, group, keys, on_device), buckets.gather(opt, group, keys, on_device)


GATHER_CASES = {
    # case: (registry name, options, param dtypes, what to do after the first step, fast path taken)
    "fp32": ("adamw", {}, [torch.float32], None, True),
    "bf16 with masters": ("adamw", {"master_weights": True}, [torch.bfloat16], None, True),
    "fp32 asking for masters": ("lion", {"master_weights": True}, [torch.float32], None, True),
    "nadam's mu_product": ("nadam", {}, [torch.float32], None, True),
    "momentum buffers": ("momentum", {}, [torch.float16], None, True),
    "a missing gradient": ("adamw", {}, [torch.float32], "drop a grad", False),
    "a param without state": ("adamw", {}, [torch.float32], "clear a state", False),
    "two dtypes": ("sgd", {}, [torch.float32, torch.bfloat16], None, False),
    "masters switched on later": ("adam", {}, [torch.bfloat16], "masters on", False),
    "masters switched off later": ("adam", {"master_weights": True}, [torch.bfloat16], "masters off", False),
}


@pytest.mark.parametrize("case", list(GATHER_CASES))
def test_common_case_gathers_the_general_bucket(case):
    """``buckets.uniform`` (the C-level fast path of every step) either declines,
    or returns exactly what the general per-param loop ``buckets.gather`` builds; declining cases
    are declined, and after the general path has fixed them up (state, masters) the fast
    path takes over."""
    name, options, dtypes, change, fast_taken = GATHER_CASES[case]
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(shape, generator=gen).to(dtypes[i % len(dtypes)]).requires_grad_()
              for i, shape in enumerate([(0,), (1,), (13,), (6, 5)])]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    opt = lo.create_optimizer({"name": name, "lr": 1e-2, **options}, params, backend="foreach")
    group = opt.param_groups[0]
    fast, _ = _gather(opt, group)
    assert fast is None  # the first step creates the state: the general path's work
    opt.step()
    if change == "drop a grad":
        params[1].grad = None
    elif change == "clear a state":
        opt.state[params[2]].clear()
    elif change == "masters on":
        group["master_weights"] = True
    elif change == "masters off":
        group["master_weights"] = False
    fast, general = _gather(opt, group)
    if fast_taken:
        _same_buckets(fast, general)
        wants = options.get("master_weights", False) and dtypes[0] != torch.float32
        assert ("master_param" in next(iter(fast.values())).state) == wants
    else:
        assert fast is None
        if change in ("clear a state", "masters on", "masters off"):
            fast, general = _gather(opt, group)  # the general path made the state whole again
            _same_buckets(fast, general)


def test_common_case_leaves_step_counts_on_another_device_to_the_general_path():
    """On the triton backend the step counts must be on the params' device: a count left
    elsewhere (a CPU state dict, state set by hand) is moved by the general path, after which
    the fast path is taken. Meta tensors stand in for a second device."""
    params = [torch.empty(4, device="meta", requires_grad=True) for _ in range(3)]
    for p in params:
        p.grad = torch.empty(4, device="meta")
    opt = lo.NAdam(params, backend="reference")
    group = opt.param_groups[0]
    for p in params:
        opt.state[p].update(opt._init_state(p, group), step=torch.tensor(2.0))
    assert opt.state[params[0]]["mu_product"].device.type == "cpu"
    fast, _ = _gather(opt, group, on_device=True)
    assert fast is None
    assert {opt.state[p][k].device.type for p in params for k in ("step", "mu_product")} == {"meta"}
    _same_buckets(*_gather(opt, group, on_device=True))
