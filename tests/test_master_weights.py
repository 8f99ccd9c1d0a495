"""fp32 master weights for bf16/fp16 params (``master_weights=True``), for every registry name.

The master is the fp32 run: the same fp32 math on the same grads as the optimizer on fp32
copies of the params, bit for bit, and the bf16 param is its rounding. The motivating case:
lr=1e-4 Adam steps are below half a bf16 ulp of weights of size ~0.3, so without a master
the weights never move. Backends agree (Triton under its CPU interpreter). fp32 params
ignore the option. The masters survive ``state_dict``; a state dict without them loads
into a master optimizer by making them from the params, with a warning.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import lightning_optim as lo
from lightning_optim import config as C
from lightning_optim.registry import REGISTRY
from lightning_optim.validation import ConfigurationError, LightningOptimWarning
from conftest import assert_rel

NAMES = lo.optimizers()
BACKENDS = ["reference", "foreach"]
# Registry names plus variants whose update reads the param (decay) or keeps more state.
VARIANTS = {name: {} for name in NAMES}
VARIANTS.update({
    "sgd+momentum+wd": {"momentum": 0.9, "weight_decay": 0.1},
    "rmsprop+centered+momentum": {"centered": True, "momentum": 0.5, "weight_decay": 0.1},
    "adam+amsgrad+wd": {"amsgrad": True, "weight_decay": 0.1},
    "adamw+wd": {"weight_decay": 0.1},
    "nadam+decoupled": {"decoupled_weight_decay": True, "weight_decay": 0.1},
    "lion+wd": {"weight_decay": 0.1},
})
SHAPES = [(0,), (1,), (13,), (6, 5), (300,)]


def name_of(variant: str) -> str:
    return variant.split("+")[0]


def make_params(dtype, gen):
    """Awkward sizes, and a non-contiguous (transposed) leaf."""
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in SHAPES]
    params.append(torch.randn(9, 5, generator=gen).to(dtype).t().requires_grad_())
    return params


def groups_for(name, params):
    if name == "coupled_adam":  # the 2-D tensors coupled, the rest plain AdamW
        return [{"params": [p for p in params if p.dim() >= 2], "coupled": True},
                {"params": [p for p in params if p.dim() < 2]}]
    return params


def train(variant, backend, dtype, *, master, steps=5, lr=1e-2):
    """``steps`` steps on params of ``dtype``; params and grads are drawn in bf16, which fp16,
    fp32 and fp64 hold exactly, so every run starts from and gets the same values.
    The third param gets no grad on the first step: a bucket on two step counts."""
    gen = torch.Generator().manual_seed(3)
    params = make_params(torch.bfloat16, gen)
    params = [p.detach().to(dtype).requires_grad_() for p in params] if dtype != torch.bfloat16 else params
    name = name_of(variant)
    opt = lo.create_optimizer({"name": name, **VARIANTS[variant], "lr": lr, "master_weights": master},
                              groups_for(name, params), backend=backend)
    for step in range(steps):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen).bfloat16()
            p.grad = None if (i == 2 and step == 0) else g.to(dtype)
        opt.step()
    return params, opt


def masters(opt, params):
    return [opt.state[p]["master_param"] for p in params]


# ----- (a) the master is the fp32 run ------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_master_is_the_fp32_run_bit_for_bit(variant, backend):
    p16, opt16 = train(variant, backend, torch.bfloat16, master=True)
    p32, opt32 = train(variant, backend, torch.float32, master=False)
    for i, (a, e) in enumerate(zip(p16, p32)):
        m = opt16.state[a]["master_param"]
        assert m.dtype == torch.float32 and m.shape == a.shape, i
        assert torch.equal(m, e.detach()), f"param {i}: master != fp32 run"
        assert torch.equal(a.detach(), m.bfloat16()), f"param {i}: param != round(master)"
        # The rule state is the fp32 run's too.
        s16, s32 = opt16.state[a], opt32.state[e]
        assert s16.keys() - {"master_param"} == s32.keys()
        for key in s32:
            assert torch.equal(s16[key], s32[key]), (i, key)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_master(backend):
    p16, opt16 = train("adamw", backend, torch.float16, master=True)
    p32, _ = train("adamw", backend, torch.float32, master=False)
    for a, e in zip(p16, p32):
        m = opt16.state[a]["master_param"]
        assert m.dtype == torch.float32
        assert torch.equal(m, e.detach()) and torch.equal(a.detach(), m.half())


# ----- (b) the motivating case -----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_adam_steps_are_lost_in_bf16_and_kept_by_the_master(backend):
    """lr=1e-4 Adam moves each coordinate by ~lr a step (a constant grad: m/sqrt(v) = sign g).
    On bf16 weights of size 0.25-0.5 half an ulp is 2^-10 ~ 9.8e-4 > 1e-4: every update rounds
    away. With a master the 20 updates add up to 2e-3, which the rounding then shows."""
    gen = torch.Generator().manual_seed(0)
    lr, steps = 1e-4, 20
    sign = torch.randint(0, 2, (256,), generator=gen).float().mul_(2).sub_(1)
    init = (torch.rand(256, generator=gen) * 0.25 + 0.25).mul_(sign).bfloat16()
    g = (torch.rand(256, generator=gen) + 0.5).mul_(sign).bfloat16()
    runs = {}
    for master in (False, True):
        p = init.clone().requires_grad_()
        opt = lo.Adam([p], lr=lr, master_weights=master, backend=backend)
        for _ in range(steps):
            p.grad = g.clone()
            opt.step()
        runs[master] = (p.detach(), opt.state[p])
    plain, _ = runs[False]
    assert torch.equal(plain, init), "bf16 Adam without a master moved: the premise is wrong"
    moved, state = runs[True]
    master = state["master_param"]
    assert_rel(init.float() - master, steps * lr * sign, 1e-2, "master displacement")
    assert torch.equal(moved, master.bfloat16())
    assert (moved != init).all(), "every coordinate moved by more than half an ulp"


# ----- (c) the backends agree --------------------------------------------------------------------


def assert_bucket_close(got, ref, what, tol=1e-6):
    for i, (a, e) in enumerate(zip(got[0], ref[0])):
        ma, me = got[1].state[a]["master_param"], ref[1].state[e]["master_param"]
        assert_rel(ma, me, tol, f"{what} param {i} master")
        assert torch.equal(a.detach(), ma.bfloat16()), f"{what} param {i}: param != round(master)"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_foreach_matches_reference(variant):
    ref = train(variant, "reference", torch.bfloat16, master=True)
    got = train(variant, "foreach", torch.bfloat16, master=True)
    assert_bucket_close(got, ref, "foreach")


@pytest.mark.parametrize("name", NAMES)
def test_triton_matches_reference(name, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors through Triton's interpreter
    ref = train(name, "reference", torch.bfloat16, master=True, steps=3)
    got = train(name, "triton", torch.bfloat16, master=True, steps=3)
    assert got[1].backend == "triton"
    assert_bucket_close(got, ref, "triton")
    for a, e in zip(got[0], ref[0]):
        sa, se = got[1].state[a], ref[1].state[e]
        assert sa.keys() == se.keys()
        for key in se:
            assert sa[key].dtype == se[key].dtype == torch.float32, key
            assert_rel(sa[key], se[key], 1e-5, key)


# ----- (d) fp32 params ignore the option ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_fp32_params_ignore_the_option(name, backend, dtype):
    with_, opt = train(name, backend, dtype, master=True)
    without, _ = train(name, backend, dtype, master=False)
    for a, e in zip(with_, without):
        assert "master_param" not in opt.state[a]
        assert torch.equal(a.detach(), e.detach())


def test_mixed_model_and_per_group_option():
    """Only bf16 params of master groups get a master; each group says for itself."""
    gen = torch.Generator().manual_seed(0)
    a16, b16 = torch.randn(8, generator=gen).bfloat16().requires_grad_(), torch.randn(8).bfloat16().requires_grad_()
    a32 = torch.randn(8, generator=gen).requires_grad_()
    opt = lo.AdamW([{"params": [a16, a32], "name": "master"},
                    {"params": [b16], "name": "plain", "master_weights": False}], master_weights=True)
    assert [g["master_weights"] for g in opt.param_groups] == [True, False]
    for p in (a16, a32, b16):
        p.grad = torch.randn(p.shape).to(p.dtype)
    opt.step()
    assert "master_param" in opt.state[a16]
    assert "master_param" not in opt.state[a32] and "master_param" not in opt.state[b16]
    # Turning the option on between steps makes the master from the param; off drops it.
    opt.param_groups[1]["master_weights"] = True
    opt.param_groups[0]["master_weights"] = False
    before = b16.detach().float()
    opt.step()
    assert "master_param" not in opt.state[a16]
    m = opt.state[b16]["master_param"]
    assert m.dtype == torch.float32 and torch.equal(b16.detach(), m.bfloat16()) and not torch.equal(m, before)


# ----- (e) state dicts ---------------------------------------------------------------------------


def through_bytes(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf)


def fresh(name, params, master, backend="foreach"):
    clones = [p.detach().clone().requires_grad_() for p in params]
    opt = lo.create_optimizer({"name": name, "lr": 1e-2, "master_weights": master},
                              groups_for(name, clones), backend=backend)
    return clones, opt


def more_steps(params, opt, steps=2, seed=11):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_is_exact(name):
    params, opt = train(name, "foreach", torch.bfloat16, master=True, steps=3)
    sd = through_bytes(opt.state_dict())
    assert all(g["master_weights"] is True for g in sd["param_groups"])
    clones, opt2 = fresh(name, params, master=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LightningOptimWarning)  # nothing to create or drop
        opt2.load_state_dict(sd)
    for p, q in zip(params, clones):
        m, m2 = opt.state[p]["master_param"], opt2.state[q]["master_param"]
        assert m2.dtype == torch.float32 and torch.equal(m, m2)
    more_steps(params, opt)
    more_steps(clones, opt2)
    for p, q in zip(params, clones):
        assert torch.equal(p.detach(), q.detach())
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt2.state[q][key]), key


@pytest.mark.parametrize("name", ["adamw", "sgd", "coupled_adam"])
def test_state_dict_without_masters_loads_by_making_them(name):
    params, opt = train(name, "foreach", torch.bfloat16, master=False, steps=3)
    sd = opt.state_dict()
    clones, opt2 = fresh(name, params, master=True)
    with pytest.warns(LightningOptimWarning, match=r"no fp32 master weights for .*made them from the loaded"):
        opt2.load_state_dict(sd)
    assert all(g["master_weights"] is True for g in opt2.param_groups)  # this optimizer's choice
    for q in clones:
        if q.numel() or opt2.state[q]:
            m = opt2.state[q]["master_param"]
            assert m.dtype == torch.float32 and torch.equal(m, q.detach().float())
    more_steps(clones, opt2)
    for q in clones:
        assert torch.equal(q.detach(), opt2.state[q]["master_param"].bfloat16())


def test_torch_state_dict_loads_into_a_master_optimizer():
    p = torch.randn(16).bfloat16().requires_grad_()
    ref = torch.optim.AdamW([p], lr=1e-2)
    p.grad = torch.randn(16).bfloat16()
    ref.step()
    q = p.detach().clone().requires_grad_()
    opt = lo.AdamW([q], lr=1e-2, master_weights=True)
    with pytest.warns(LightningOptimWarning, match="no fp32 master weights"):
        opt.load_state_dict(ref.state_dict())
    assert opt.param_groups[0]["master_weights"] is True
    assert torch.equal(opt.state[q]["master_param"], q.detach().float())


def test_masters_into_a_plain_optimizer_are_dropped_with_a_warning():
    params, opt = train("adam", "foreach", torch.bfloat16, master=True, steps=2)
    clones, opt2 = fresh("adam", params, master=False)
    with pytest.warns(LightningOptimWarning, match="dropped them"):
        opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["master_weights"] is False
    assert all("master_param" not in s for s in opt2.state.values())


def test_master_of_the_wrong_shape_is_refused():
    params, opt = train("adam", "foreach", torch.bfloat16, master=True, steps=1)
    sd = opt.state_dict()
    sd["state"][3]["master_param"] = torch.zeros(2, 2)
    _, opt2 = fresh("adam", params, master=True)
    with pytest.raises(ValueError, match=r"master_param of shape \[2, 2\] in the state dict, expected \[6, 5\]"):
        opt2.load_state_dict(sd)


# ----- (f) validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_master_weights_must_be_a_bool(name):
    owner = REGISTRY[name].cls.__name__
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ConfigurationError, match=rf"^{owner}: master_weights='yes' is invalid: must be true or false"):
        lo.create_optimizer({"name": name, "master_weights": "yes"}, [p])
    with pytest.raises(ConfigurationError, match=r"^optimizer: master_weights='yes' is invalid"):  # the node's name
        C.optimizer_config({"name": name, "master_weights": "yes"})
    with pytest.raises(ConfigurationError, match=rf"^{owner} group 'g': master_weights=1 is invalid"):
        REGISTRY[name].cls([{"params": [p], "name": "g", "master_weights": 1}])


def test_config_node_sets_the_option():
    cfg = C.optimizer_config({"name": "adamw", "master_weights": True})
    assert cfg.master_weights is True
    opt = lo.create_optimizer(cfg, [torch.zeros(2, requires_grad=True)])
    assert opt.defaults["master_weights"] is True and opt.param_groups[0]["master_weights"] is True
