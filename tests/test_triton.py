"""The Triton backend against the reference, for every rule and option.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set per test by the
fixture below; the launcher loads an interpreted copy of the kernels for CPU tensors and
a compiled one for CUDA tensors, so the variable does not leak into GPU runs). Every test
that takes ``device`` also runs on CUDA when there is a GPU. Triton is a test dependency
(the ``dev`` extra): without it this file fails to import, on purpose.

The interpreter executes each program in numpy, about 20 ms apiece, so sizes are small
and ``BLOCK`` is 128 on CPU: a 300-element tensor is three programs, a 1009-element one
eight.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import triton  # noqa: F401  (a missing Triton must fail this file, not skip it)

import lightning_optim as lo
from lightning_optim import backends, rules
from lightning_optim.backends import reference
from lightning_optim.backends import triton as tb
from lightning_optim.backends.triton import launcher
from lightning_optim.validation import ConfigurationError
from conftest import assert_rel, build_for_rule
from test_backends import VARIANTS as BACKEND_VARIANTS

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")),
]


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# Every registry name and the option variants of test_backends, plus the code paths that
# only the fused kernels have (switch combinations).
VARIANTS = dict(BACKEND_VARIANTS)
VARIANTS.update({
    "nesterov+maximize+wd": {"weight_decay": 0.1, "maximize": True},
    "rmsprop+centered": {"centered": True},
    "rmsprop+momentum": {"momentum": 0.9},
    "adam+amsgrad+decoupled": {"amsgrad": True, "decoupled_weight_decay": True, "weight_decay": 0.1},
    "adam+no_bias_correction+l2": {"bias_correction": False, "weight_decay": 0.1},
    "coupled_adam+no_bias_correction+scale": {"bias_correction": False, "coupling_scale": 0.5},
    "lion+maximize": {"maximize": True},
    "yogi+maximize": {"maximize": True},
})
# RAdam rectifies from step 6 at beta2 = 0.999: run it long enough that one launch holds
# rectified tensors and the late, still unrectified one.
STEPS = {"radam": 7, "radam+decoupled": 7}


def name_of(variant: str) -> str:
    return variant.split("+")[0]


def make_params(dtypes, device, gen):
    """Empty, one element, a prime, matrices, more than one block, and a transposed leaf."""
    specs = [(0,), (1,), (13,), (6, 5), (7, 11), (300,)]
    params = [torch.randn(s, generator=gen).to(device=device, dtype=dtypes[i % len(dtypes)]).requires_grad_()
              for i, s in enumerate(specs)]
    params.append(torch.randn(5, 9, generator=gen).to(device=device, dtype=dtypes[0]).t().requires_grad_())
    return params


def train(variant, backend, dtypes, device, steps=3):
    gen = torch.Generator().manual_seed(7)
    params = make_params(dtypes, device, gen)
    name = name_of(variant)
    opt = build_for_rule(name, VARIANTS[variant], params, backend)
    late = params[2]  # no gradient on the first step: one bucket holds two step counts
    for step in range(steps):
        for p in params:
            if p is late and step == 0:
                p.grad = None
                continue
            # Non-contiguous grads for matrices: the transpose of the transposed shape.
            g = torch.randn(tuple(reversed(p.shape)), generator=gen).t() if p.dim() == 2 else torch.randn(p.shape, generator=gen)
            p.grad = g.to(device=device, dtype=p.dtype)
        opt.step()
    return params, opt


def assert_param(a: torch.Tensor, e: torch.Tensor, what: str, before: torch.Tensor | None = None) -> None:
    """``before``: the param before the step, whose scale bounds the rounding of p - lr * u
    when the two nearly cancel."""
    assert a.dtype == e.dtype, what
    if e.dtype == torch.float32:
        if before is not None and before.numel():
            e_scale = e.abs().max().item() if e.numel() else 0.0
            atol = 1e-6 * max(before.abs().max().item(), e_scale)
            torch.testing.assert_close(a.double(), e.double(), rtol=1e-6, atol=atol, msg=what)
        else:
            assert_rel(a, e, 1e-6, what)
    else:
        # Both do fp32 math and round once; a different op order can flip the last bit.
        ulp = torch.finfo(e.dtype).eps
        torch.testing.assert_close(a.float().cpu(), e.float().cpu(), rtol=ulp, atol=ulp * 1e-2, msg=what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_optimizer_matches_reference(variant, device):
    """End to end through the Optimizer: fp32 and bf16 params together (two buckets)."""
    dtypes = [torch.float32, torch.bfloat16]
    steps = STEPS.get(variant, 3)
    ref_params, ref_opt = train(variant, "reference", dtypes, "cpu", steps)
    got_params, got_opt = train(variant, "triton", dtypes, device, steps)
    assert got_opt.backend == "triton"
    for i, (a, e) in enumerate(zip(got_params, ref_params)):
        assert_param(a.detach().cpu(), e.detach(), f"param {i}")
    for i, (pa, pe) in enumerate(zip(got_params, ref_params)):
        sa, se = got_opt.state[pa], ref_opt.state[pe]
        assert sa.keys() == se.keys()
        for key in se:
            assert sa[key].dtype == se[key].dtype == torch.float32, key
            assert_rel(sa[key].cpu(), se[key], 1e-5, f"param {i} {key}")


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_adamw(device):
    gen = torch.Generator().manual_seed(1)
    runs = []
    for backend, dev in (("reference", "cpu"), ("triton", device)):
        gen.manual_seed(1)
        ps = [torch.randn(s, generator=gen).half().to(dev).requires_grad_() for s in ((200,), (3, 7))]
        opt = lo.AdamW(ps, lr=1e-2, backend=backend)
        for _ in range(2):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).half().to(dev)
            opt.step()
        runs.append(ps)
    for a, e in zip(*runs):
        assert_param(a.detach().cpu(), e.detach(), "fp16")


# ----- direct launcher tests: one bucket, every kernel ----------------------------------------

# One configuration per kernel code path: (rule, group, state keys and fills).
ADAM = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, amsgrad=False, maximize=False,
            decoupled_weight_decay=True, bias_correction=True)
RULES = {
    "sgd": (dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True, weight_decay=0.1, maximize=False),
            {"momentum_buffer": 0.0}),
    "adagrad": (dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, eps=1e-10, maximize=False), {"sum": 0.1}),
    "rmsprop": (dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.1, momentum=0.5, centered=True, maximize=False),
                {"square_avg": 0.0, "momentum_buffer": 0.0, "grad_avg": 0.0}),
    "adam": (dict(ADAM, amsgrad=True, decoupled_weight_decay=False), {"exp_avg": 0.0, "exp_avg_sq": 0.0, "max_exp_avg_sq": 0.0}),
    "coupled_adam": (dict(ADAM, amsgrad=True, coupling_scale=2.0), {"exp_avg": 0.0, "exp_avg_sq": 0.0, "max_exp_avg_sq": 0.0}),
    "nadam": (dict(ADAM, momentum_decay=4e-3), {"exp_avg": 0.0, "exp_avg_sq": 0.0, "mu_product": 1.0}),
    "radam": (dict(ADAM), {"exp_avg": 0.0, "exp_avg_sq": 0.0}),
    "lion": (dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, maximize=True), {"exp_avg": 0.0}),
    "yogi": (dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-3, weight_decay=0.1, maximize=False), {"exp_avg": 0.0, "exp_avg_sq": 1e-6}),
}


def bucket(rule, shapes, dtype, device, gen):
    _, fills = RULES[rule]
    params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    state = {}
    for key, fill in fills.items():
        if key == "mu_product":
            state[key] = [torch.tensor(fill) for _ in params]
        elif rule == "coupled_adam" and key != "exp_avg":
            state[key] = [torch.full((1, *p.shape[1:]), fill, device=device) for p in params]
        else:
            state[key] = [torch.full(p.shape, fill, device=device) for p in params]
    return params, grads, state


def clone(tensors):
    if isinstance(tensors, dict):
        return {k: clone(v) for k, v in tensors.items()}
    return [t.detach().clone() for t in tensors]


def reference_run(rule, params, grads, state, steps, group):
    """The reference on CPU copies (fp32 math for bf16 params, as every backend)."""
    P, G, S = clone(params), clone(grads), clone(state)
    P, G = [p.cpu() for p in P], [g.cpu() for g in G]
    S = {k: [s.cpu() for s in v] for k, v in S.items()}
    reference.run(rule, P, G, S, steps, group)
    return P, S


def assert_bucket(P, S, params, state, what, before=None):
    for i, (a, e) in enumerate(zip(params, P)):
        assert_param(a.cpu(), e, f"{what} param {i}", None if before is None else before[i].cpu())
    for key in S:
        for i, (a, e) in enumerate(zip(state[key], S[key])):
            assert_rel(a.cpu(), e, 1e-5, f"{what} {key}[{i}]")


SHAPES = [(3, 5), (1009,), (1,), (0, 4)]
COUPLED_SHAPES = [(3, 5), (11, 13), (1, 7)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", list(RULES))
def test_kernel_with_grad_scale_and_clip(rule, device):
    """g -> clamp(g * scale, -c, c) before the rule, in-kernel, vs the reference on that g."""
    gen = torch.Generator().manual_seed(3)
    shapes = COUPLED_SHAPES if rule == "coupled_adam" else SHAPES
    params, grads, state = bucket(rule, shapes, torch.float32, device, gen)
    group = RULES[rule][0]
    scale, clip = 0.37, 0.5
    steps = [2.0, 5.0, 1.0, 3.0][:len(params)]  # per-tensor factors
    # In the same float32 ops as the kernel, so the reference sees the same g.
    seen = [(g.cpu() * torch.tensor(scale)).clamp(-clip, clip) for g in grads]
    before = clone(params)
    P, S = reference_run(rule, params, seen, state, steps, group)
    launcher.run(rule, params, grads, state, steps, group,
                 grad_scale=torch.tensor(scale, device=device), clip_value=clip)
    assert_bucket(P, S, params, state, rule, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", list(RULES))
def test_found_inf_is_a_no_op(rule, device):
    """A set found_inf masks every store: params and state unchanged bit for bit."""
    gen = torch.Generator().manual_seed(4)
    shapes = COUPLED_SHAPES if rule == "coupled_adam" else [(5,), (300,)]
    params, grads, state = bucket(rule, shapes, torch.bfloat16, device, gen)
    grads[0][0] = float("nan")  # the reason found_inf is set, typically
    before_p = clone(params)
    before_s = {k: clone(v) for k, v in state.items() if k != "mu_product"}
    launcher.run(rule, params, grads, state, [1.0] * len(params), RULES[rule][0],
                 found_inf=torch.ones((), device=device))
    for a, b in zip(params, before_p):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    for key, values in before_s.items():
        for a, b in zip(state[key], values):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), key
    # found_inf = 0: the step happens.
    launcher.run(rule, params, [g.nan_to_num() for g in grads], state, [1.0] * len(params), RULES[rule][0],
                 found_inf=torch.zeros((), device=device))
    assert any(not torch.equal(a, b) for a, b in zip(params, before_p))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", list(RULES))
def test_kernel_with_device_step_counts(rule, device):
    """``steps`` as float32 0-d device tensors (the optimizer's format on this backend): the
    step prologue computes every factor from t on the device, per tensor, as the reference
    does from the floats; NAdam's mu_product (on the device too) advances once per tensor."""
    gen = torch.Generator().manual_seed(12)
    shapes = COUPLED_SHAPES if rule == "coupled_adam" else SHAPES
    params, grads, state = bucket(rule, shapes, torch.float32, device, gen)
    if "mu_product" in state:
        state["mu_product"] = [t.to(device) for t in state["mu_product"]]
    group = RULES[rule][0]
    for it in range(3 if rule != "radam" else 5):
        steps = [2.0 + it, 5.0 + it, 1.0 + it, 3.0 + it][:len(params)]
        before = clone(params)
        P, S = reference_run(rule, params, grads, state, steps, group)
        launcher.run(rule, params, grads, state, [torch.tensor(t, device=device) for t in steps], group)
        assert_bucket(P, S, params, state, f"{rule} step {it}", before)


@pytest.mark.parametrize("device", DEVICES)
def test_device_steps_must_be_on_the_params_device(device):
    p, g = torch.ones(3, device=device), torch.ones(3, device=device)
    state = {"exp_avg": [torch.zeros(3, device=device)], "exp_avg_sq": [torch.zeros(3, device=device)]}
    with pytest.raises(ValueError, match="float32 0-d tensors"):
        launcher.run("adam", [p], [g], state, [torch.tensor(1.0, dtype=torch.float64)], RULES["adam"][0])


# The step factors in float64, from the reference's formulas (backends/reference.py), for a
# tensor at step t whose mu_product was 1 before this step (NAdam).
def _adam_factors(h, t):
    """(-lr / bc1, 1 / sqrt(bc2)): Adam's step 4 folded into two factors."""
    beta1, beta2 = h["betas"]
    return (-h["lr"] / (1 - beta1**t), 1 / math.sqrt(1 - beta2**t))


def _nadam_factors(h, t):
    beta1, beta2 = h["betas"]
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * h["momentum_decay"]))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * h["momentum_decay"]))
    product = float(torch.tensor(mu, dtype=torch.float32))  # mu_product is kept in fp32
    return (-h["lr"] * (1.0 - mu) / (1.0 - product), -h["lr"] * mu_next / (1.0 - product * mu_next), 1 - beta2**t)


def _radam_factors(h, t):
    beta1, beta2 = h["betas"]
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * beta2**t / bc2
    if rho_t > 5.0:
        r = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        return (-h["lr"] * r * math.sqrt(bc2) / bc1, 1.0, 0.0)
    return (-h["lr"] / bc1, 0.0, 0.0)


PROLOGUE_RULES = ["sgd", "adagrad", "rmsprop", "adam", "nadam", "radam", "lion"]


def _host_factors(rule, h, t):
    """The four factors of ``rule`` at step t, in float64 from the reference's formulas."""
    decay = 1 - h["lr"] * h["weight_decay"]
    if rule == "sgd":
        return (1.0 if t == 1 else 1 - h["dampening"], -h["lr"], 0.0, 0.0)
    if rule == "adagrad":
        return (-h["lr"] / (1 + (t - 1) * h["lr_decay"]), 0.0, 0.0, 0.0)
    if rule in ("rmsprop", "lion"):  # Prologue.LR
        return (-h["lr"], decay, 0.0, 0.0)
    if rule == "adam":
        return (*_adam_factors(h, t), decay, 0.0)
    if rule == "radam":
        return (*_radam_factors(h, t)[:2], 0.0, decay)
    return (*_nadam_factors(h, t), decay)


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("rule", PROLOGUE_RULES)
def test_step_prologue_factors_equal_the_host_factors(rule, lr_kind):
    """The prologue's fp64 factors, rounded once to fp32, equal the host's float64 factors
    rounded once, from the first step to counts beyond fp32's 2^24 (e.g. loaded); with lr
    a float or a 0-d tensor read on the device (an fp64 tensor: the host's value exactly)."""
    h = dict(lr=3e-4, weight_decay=0.1, betas=(0.9, 0.999), momentum_decay=4e-3, bias_correction=True,
             dampening=0.1, lr_decay=0.01, momentum=0.0, nesterov=False, eps=1e-8, amsgrad=False,
             decoupled_weight_decay=False, alpha=0.99, centered=False)
    ts = torch.tensor([1.0, 2.0, 5.0, 6.0, 7.0, 10.0, 100.0, 12345.0, 1e6, 2.0**24, 2.0**25 + 4, 3e9]).tolist()
    state = {"mu_product": [torch.tensor(1.0) for _ in ts]}
    group = dict(h, lr=torch.tensor(h["lr"], dtype=torch.float64)) if lr_kind == "tensor" else h
    spec = rules.get(rule)
    got = launcher._device_factors(spec, spec.launch(group), group, state, [torch.tensor(t) for t in ts], None,
                                   torch.device("cpu"))
    if rule == "nadam":
        mus = [h["betas"][0] * (1 - 0.5 * 0.96 ** (t * h["momentum_decay"])) for t in ts]
        assert torch.equal(torch.stack(state["mu_product"]), torch.tensor(mus, dtype=torch.float32))
    for i, t in enumerate(ts):
        want = torch.tensor(_host_factors(rule, h, t), dtype=torch.float32)
        assert torch.equal(got[i], want), (rule, t, got[i], want)


def test_step_prologue_compiles_for_cuda():
    """The step prologue (fp64 factor math) compiles for an sm_90 GPU, for every rule, with
    lr as an argument or a tensor, counting the step or not."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launcher.kernels(torch.device("cuda")).factors_kernel
    signature = {p.name: "*i64" if p.name == "table" else "*fp32" if p.name in ("factors", "found_inf", "lr_ptr")
                 else "i32" if p.name == "n" else "fp32" for p in fn.params if not p.is_constexpr}
    for code in map(int, rules.Prologue):
        for lr_tensor, advance in ((False, True), (True, True), (False, False)):
            src = ASTSource(fn=fn, signature=signature,
                            constexprs=dict(W=4, BLOCK=launcher.PROLOGUE_BLOCK, RULE=code, BIAS=True, HAS_FOUND=True,
                                            LR_TENSOR=lr_tensor, ADVANCE=advance))
            triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})


@pytest.mark.parametrize("device", DEVICES)
def test_one_launch_for_many_tensors(device, monkeypatch):
    """40 tensors, one launch, each tensor updated as by the reference."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(i % 7 + 1,) for i in range(40)]
    params, grads, state = bucket("adam", shapes, torch.float32, device, gen)
    group = RULES["adam"][0]
    module = launcher.kernels(torch.device(device))
    launches = []
    original = module.adam_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return original[grid]

    monkeypatch.setattr(module, "adam_kernel", Counting())
    P, S = reference_run("adam", params, grads, state, [1.0] * 40, group)
    launcher.run("adam", params, grads, state, [1.0] * 40, group)
    assert launches == [(40,)]
    assert_bucket(P, S, params, state, "adam")


@pytest.mark.parametrize("device", DEVICES)
def test_non_dense_param_goes_through_a_copy(device):
    """A slice of a larger tensor is updated via a contiguous copy; the rest is untouched."""
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(6, 8, generator=gen).to(device)
    untouched = base.clone()
    p = base[:, 2:5]
    assert not launcher._dense(p)
    g = torch.randn(6, 3, generator=gen).to(device)
    state = {"exp_avg": [torch.zeros_like(p)], "exp_avg_sq": [torch.zeros_like(p)]}
    group = RULES["radam"][0]
    P, S = reference_run("radam", [p], [g], state, [1.0], group)
    launcher.run("radam", [p], [g], state, [1.0], group)
    assert_bucket(P, S, [p], state, "slice")
    assert torch.equal(base[:, :2], untouched[:, :2]) and torch.equal(base[:, 5:], untouched[:, 5:])


@pytest.mark.parametrize("device", DEVICES)
def test_coupled_row_mean_hook(device):
    """The hook gets (i, sum over dim 0 of g^2) and its result is the mean that is used."""
    gen = torch.Generator().manual_seed(8)
    group = dict(RULES["coupled_adam"][0], amsgrad=False)
    params, grads, state = bucket("coupled_adam", [(4, 6), (5, 2)], torch.float32, device, gen)
    state.pop("max_exp_avg_sq")
    seen = []

    def row_mean(i, local):
        seen.append((i, local.clone()))
        return local / (2 * grads[i].shape[0])  # as if a second rank held as many rows, all zero

    P, S = clone(params), clone(state)
    reference.run("coupled_adam", [p.cpu() for p in P], [g.cpu() for g in grads],
                  {k: [s.cpu() for s in v] for k, v in S.items()}, [1.0, 1.0], group,
                  row_mean=lambda i, local: local / (2 * grads[i].shape[0]))
    launcher.run("coupled_adam", params, grads, state, [1.0, 1.0], group, row_mean=row_mean)
    assert [i for i, _ in seen] == [0, 1]
    for (i, local), g in zip(seen, grads):
        assert local.dtype == torch.float32 and local.shape == (1, g.shape[1])
        assert_rel(local.cpu(), g.cpu().square().sum(0, keepdim=True), 1e-6, "local sum")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_coupled_rows_take_one_launch_per_tensor(amsgrad, device, monkeypatch):
    """Coupled Adam's row update (EMA, AMP/clip scale, AMSGrad maximum) is one launch of
    ``coupled_row_kernel`` per coupled tensor, with the row count as a runtime float; rows
    kept in a strided (1, H) view (state set by hand) are updated through a work copy."""
    gen = torch.Generator().manual_seed(9)
    group = dict(RULES["coupled_adam"][0], amsgrad=amsgrad)
    params, grads, state = bucket("coupled_adam", [(4, 6), (5, 1300), (3, 2)], torch.float32, device, gen)
    if not amsgrad:
        state.pop("max_exp_avg_sq")
    wide = state["exp_avg_sq"][1]
    strided = torch.empty(1, 2 * wide.shape[1], device=device)[:, ::2]
    state["exp_avg_sq"][1] = strided.copy_(wide)
    assert not strided.is_contiguous()
    module = launcher.kernels(torch.device(device))
    original, launches = module.coupled_row_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid, args[5:7], kwargs["AMSGRAD"]))
                return original[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(module, "coupled_row_kernel", Spy())
    P, S = reference_run("coupled_adam", params, grads, state, [1.0] * 3, group)
    launcher.run("coupled_adam", params, grads, state, [1.0] * 3, group)
    assert launches == [((1,), (6, 4.0), amsgrad), ((2,), (1300, 5.0), amsgrad), ((1,), (2, 3.0), amsgrad)]
    assert state["exp_avg_sq"][1] is strided  # the user's tensor, written back
    assert_bucket(P, S, params, state, "coupled rows")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", ["adam", "sgd", "lion"])
def test_master_weights(rule, device):
    """bf16 params with an fp32 master_param: the master follows the fp32 reference
    exactly (to fp32 rounding), the param is the master rounded once."""
    gen = torch.Generator().manual_seed(9)
    group = RULES[rule][0]
    params32, grads, state = bucket(rule, [(300,), (7,)], torch.float32, device, gen)
    params = [p.bfloat16() for p in params32]
    state["master_param"] = clone(params32)
    ref_p, ref_s = clone(params32), clone(state)
    ref_s.pop("master_param")
    for step in (1.0, 2.0, 3.0):
        bf16_grads = [g.bfloat16() for g in grads]
        ref_p, ref_s = reference_run(rule, ref_p, [g.float() for g in bf16_grads], ref_s, [step] * 2, group)
        launcher.run(rule, params, bf16_grads, state, [step] * 2, group)
    for master, p, e in zip(state["master_param"], params, ref_p):
        assert_rel(master.cpu(), e, 1e-6, "master")
        assert torch.equal(p.cpu(), master.cpu().bfloat16())


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_rounding_is_torchs(device):
    """SGD with lr=0 through a master copy writes round(master): ties, tiny, huge, inf, NaN
    must round exactly as torch's .to(bfloat16)."""
    one = 1.0
    values = torch.tensor([one + 2**-8, one + 3 * 2**-8, one + 2**-8 + 2**-20, -(one + 2**-8), 3.0e38,
                           -3.4e38, 1e-40, float("inf"), -float("inf"), float("nan"), 0.0, -0.0,
                           *torch.randn(200).tolist()], dtype=torch.float32)
    master = values.to(device)
    p = torch.zeros(master.shape, dtype=torch.bfloat16, device=device)
    group = dict(lr=0.0, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False)
    launcher.run("sgd", [p], [torch.zeros_like(p)], {"master_param": [master]}, [1.0], group)
    expected = values.bfloat16()
    assert torch.equal(p.cpu().view(torch.int16)[:9], expected.view(torch.int16)[:9])
    assert torch.isnan(p.cpu()[9])
    assert torch.equal(p.cpu()[10:], expected[10:])


# ----- the table, recompiles, dispatch ----------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", list(RULES))
def test_step_prologue_counts_the_step(rule, device):
    """``advance=True`` (the optimizer's path): the prologue adds 1 to every device count,
    in place, before computing the factors, so the update equals a run given this step's
    count; a set ``found_inf`` leaves params, state and counts as they were."""
    gen = torch.Generator().manual_seed(15)
    shapes = COUPLED_SHAPES if rule == "coupled_adam" else [(0,), (5,), (300,)]
    params, grads, state = bucket(rule, shapes, torch.float32, device, gen)
    if "mu_product" in state:
        state["mu_product"] = [t.to(device) for t in state["mu_product"]]
    group = RULES[rule][0]
    counts = [torch.tensor(2.0, device=device) for _ in params]
    given = [torch.tensor(3.0, device=device) for _ in params]
    P, G, S = clone(params), clone(grads), clone(state)
    launcher.run(rule, P, G, S, given, group)
    launcher.run(rule, params, grads, state, counts, group, advance=True)
    assert [float(t) for t in counts] == [3.0] * len(params)
    for key, values in [("params", (params, P)), *((k, (state[k], S[k])) for k in S)]:
        assert all(torch.equal(a, e) for a, e in zip(*values)), key
    found = torch.ones((), device=device)
    before, saved = clone(params), clone(state)
    launcher.run(rule, params, grads, state, counts, group, found_inf=found, advance=True)
    assert [float(t) for t in counts] == [3.0] * len(params)
    assert all(torch.equal(a, e) for a, e in zip(params, before))
    assert all(torch.equal(a, e) for k in saved for a, e in zip(state[k], saved[k]))
    with pytest.raises(ValueError, match="only device step tensors can be advanced"):
        launcher.run(rule, params, grads, state, [3.0] * len(params), group, advance=True)


def test_device_counts_of_another_kind_are_refused():
    """Step counts and NAdam's mu_product given as device tensors must be float32 0-d
    tensors on the params' device: anything else is refused, naming the field and the tensor."""
    gen = torch.Generator().manual_seed(16)
    params, grads, state = bucket("nadam", [(5,), (3,)], torch.float32, "cpu", gen)
    group = RULES["nadam"][0]
    wide = [torch.tensor(1.0), torch.tensor(1.0, dtype=torch.float64)]
    with pytest.raises(ConfigurationError, match=re.escape(
            "backend 'triton': step='a torch.float64 tensor of shape [] on cpu' is invalid: device step tensors "
            "must be float32 0-d tensors on the params' device (cpu)")):
        launcher.run("nadam", params, grads, state, wide, group)
    state["mu_product"][1] = torch.ones(2)
    with pytest.raises(ConfigurationError, match=re.escape(
            "backend 'triton': mu_product='a torch.float32 tensor of shape [2] on cpu' is invalid: device "
            "mu_product tensors must be float32 0-d tensors on the params' device (cpu)")):
        launcher.run("nadam", params, grads, state, [torch.tensor(1.0)] * 2, group)


def test_table_is_cached_and_rebuilt_when_storage_changes():
    gen = torch.Generator().manual_seed(11)
    params, grads, state = bucket("lion", [(5,), (3,)], torch.float32, "cpu", gen)
    group = RULES["lion"][0]
    steps = [torch.tensor(1.0), torch.tensor(1.0)]  # the optimizer's persistent step tensors
    launcher.TABLES.clear()
    launcher.run("lion", params, grads, state, steps, group)
    assert (launcher.TABLES.builds, launcher.TABLES.hits) == (2, 0)  # the prologue's and the kernel's
    torch._foreach_add_(steps, 1.0)
    launcher.run("lion", params, grads, state, steps, dict(group, lr=5e-4))  # new lr: same tables
    assert (launcher.TABLES.builds, launcher.TABLES.hits) == (2, 2)
    grads = [g.clone() for g in grads]  # new grad storage: a new table for the kernel
    launcher.run("lion", params, grads, state, steps, group)
    assert (launcher.TABLES.builds, launcher.TABLES.hits) == (3, 3)
    table = launcher.TABLES.get([params, grads, state["exp_avg"]], [5, 3], launcher.BLOCK["cpu"])
    assert table.table.tolist()[1][:3] == [3, 3, params[1].data_ptr()]
    assert table.blocks.tolist() == [[0, 0], [1, 0]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", list(RULES))
def test_tensor_lr_is_read_on_the_device(rule, device):
    """lr as a 0-d device tensor: the same update as the float lr, and changing the tensor
    in place between steps (as a scheduler does, and as a replayed CUDA graph needs) changes
    the update, with no new table and no host read of lr."""
    gen = torch.Generator().manual_seed(14)
    shapes = COUPLED_SHAPES if rule == "coupled_adam" else [(5,), (300,)]
    params, grads, state = bucket(rule, shapes, torch.float32, device, gen)
    if "mu_product" in state:
        state["mu_product"] = [t.to(device) for t in state["mu_product"]]
    group = RULES[rule][0]
    lr = torch.tensor(group["lr"], device=device)
    steps = [torch.tensor(0.0, device=device) for _ in params]
    tables = None
    for it, value in enumerate((group["lr"], group["lr"] * 0.25, 0.0)):
        lr.fill_(value)
        torch._foreach_add_(steps, 1.0)
        before = clone(params)
        P, S = reference_run(rule, params, grads, state, [it + 1.0] * len(params), dict(group, lr=value))
        launcher.run(rule, params, grads, state, steps, dict(group, lr=lr))
        assert_bucket(P, S, params, state, f"{rule} lr={value}", before)
        if tables is None:
            tables = launcher.TABLES.builds
    assert launcher.TABLES.builds == tables
    with pytest.raises(ValueError, match="one element"):
        launcher.run(rule, params, grads, state, steps, dict(group, lr=torch.ones(2, device=device)))


def test_hyperparameters_are_runtime_arguments(monkeypatch):
    """Hyperparameters are fp32 kernel arguments (never constexpr, never ints Triton would
    specialize on), and lr reaches the elementwise kernels only through the prologue's
    factors: a scheduler changing lr does not recompile."""
    compiled = launcher.kernels(torch.device("cuda"))  # decorating needs no GPU
    for name in ("sgd_kernel", "adagrad_kernel", "rmsprop_kernel", "adam_kernel", "nadam_kernel", "lion_kernel",
                 "factors_kernel"):
        fn = getattr(compiled, name)
        # Compile-time switches are the UPPER_CASE parameters, and only those.
        assert all(p.is_constexpr == p.name.isupper() for p in fn.params), name
        runtime = [p.name for p in fn.params if not p.is_constexpr]
        assert "factors" in runtime, name
        if name != "factors_kernel":
            assert "clip" in runtime and not any("lr" in r or "decay" in r for r in runtime), (name, runtime)
    module = launcher.kernels(torch.device("cpu"))
    calls = []
    original = module.sgd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append(kwargs)
                return original[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(module, "sgd_kernel", Spy())
    p, g = torch.ones(3), torch.ones(3)
    group = dict(lr=1, momentum=0, dampening=0, nesterov=False, weight_decay=0, maximize=False)
    launcher.run("sgd", [p], [g], {}, [1.0], group)
    assert all(type(calls[0][k]) is float for k in ("wd", "mu", "clip"))
    assert torch.equal(p, torch.zeros(3))


@pytest.fixture(scope="module")
def kernel_resources():
    """``benchmarks/kernel_resources.py``: compiles a kernel for sm_90 and reads its machine code."""
    import pathlib
    import sys

    where = str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, where)
    try:
        import kernel_resources as module
    finally:
        sys.path.remove(where)
    return module


def test_kernels_compile_for_cuda(kernel_resources):
    """Every kernel compiles for an sm_90 GPU (no GPU needed), with 16-byte vector accesses
    on the full-block path when the table's addresses are aligned, and without register
    spills (a spill is a round trip to local memory per element: bandwidth the step does
    not have to spare)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    every_hook = dict(HAS_CLIP=True, MASTER=True, MAXIMIZE=True)
    # Every (kernel, switches) the rule table's launch plans use (switches a plan leaves out
    # take the kernel's default), each with every hook on.
    for label, (name, extra) in kernel_resources.KERNELS.items():
        asm = kernel_resources.compile_for_sm90(name, extra, 1, **every_hook)
        assert "ld.global.v4" in asm["ptx"], label
        assert kernel_resources.resources(asm["cubin"])["LOCAL"] == 0, label
    compiled = launcher.kernels(torch.device("cuda"))
    src = ASTSource(fn=compiled.coupled_row_kernel,
                    signature=dict.fromkeys(["row_sum", "v", "vmax", "grad_scale", "found_inf"], "*fp32")
                    | {"H": "i32", "rows": "fp32", "beta2": "fp32"},
                    constexprs=dict(BLOCK=launcher.ROW_BLOCK, HAS_SCALE=True, HAS_FOUND=True, AMSGRAD=True))
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})



def test_resolve(monkeypatch):
    p = torch.zeros(3, requires_grad=True)
    assert lo.Adam([p], backend="triton").backend == "triton"
    assert lo.Adam([p]).backend == "compiled"  # never triton on CPU, interpreter or not: torch's fused kernel
    assert backends.runner("triton") is tb.run
    with pytest.raises(ConfigurationError, match="float32, bfloat16 and float16"):
        lo.Adam([torch.zeros(3, dtype=torch.float64, requires_grad=True)], backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigurationError, match="TRITON_INTERPRET=1"):
        lo.Adam([p], backend="triton")
    monkeypatch.setattr(tb, "why_unavailable", lambda: "triton is not installed: pip install lightning_optim[triton]")
    with pytest.raises(ConfigurationError, match=r"pip install lightning_optim\[triton\]"):
        lo.Adam([p], backend="triton")


def test_float64_bucket_is_rejected():
    with pytest.raises(ConfigurationError, match="float64"):
        launcher.run("sgd", [torch.zeros(2, dtype=torch.float64)], [torch.zeros(2, dtype=torch.float64)], {}, [1.0],
                     RULES["sgd"][0])


def test_bytes_per_param():
    assert tb.bytes_per_param("adam", {}, torch.float32) == 28
    assert tb.bytes_per_param("adam", {}, torch.bfloat16) == 22
    assert tb.bytes_per_param("adam", {"amsgrad": True}, torch.float32) == 36
    assert tb.bytes_per_param("adam", {}, torch.bfloat16, master=True) == 28
    assert tb.bytes_per_param("sgd", {"momentum": 0}, torch.float32) == 12
    assert tb.bytes_per_param("coupled_adam", {}, torch.float32) == 24
