"""torch's fused kernels behind the compiled backend, and what ``auto`` picks on CPU.

Where a rule's spec names a torch fused kernel for the group (Adam, AdamW, SGD, Adagrad), the
compiled backend runs it instead of compiling: these tests hold that path to the reference on
awkward sizes, to ``torch.optim``'s own ``fused=True`` bit for bit, and check that it compiles
nothing; then the table of ``auto``'s choices and of torch's ``fused=`` keyword on CPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import lightning_optim as lo
from lightning_optim import backends
from lightning_optim.backends import compiled, torch_kernels
from lightning_optim.validation import ConflictingOptions, LightningOptimWarning
from conftest import assert_rel, build_for_rule

# Registry names (with options) whose every group torch's kernels compute.
KERNEL_CASES = {
    "sgd": ("sgd", {}),
    "momentum": ("momentum", {}),
    "nesterov+maximize": ("nesterov", {"maximize": True, "weight_decay": 0.1}),
    "momentum+dampening": ("momentum", {"dampening": 0.2, "weight_decay": 0.1}),
    "adagrad": ("adagrad", {"lr_decay": 0.01, "weight_decay": 0.1, "initial_accumulator_value": 0.1}),
    "adam+l2+amsgrad": ("adam", {"weight_decay": 0.1, "amsgrad": True}),
    "adamw+maximize": ("adamw", {"maximize": True}),
    "amsgrad": ("amsgrad", {}),
}


def dense_params(dtype=torch.float32, seed=7):
    """Awkward sizes, all dense (torch's kernels take only those): empty, one, a prime, a matrix."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype).requires_grad_() for shape in [(0,), (1,), (13,), (6, 5)]]


def run(opt, params, steps=5, seed=11):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
    return params


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernel_path_matches_reference_and_compiles_nothing(case, dtype):
    name, options = KERNEL_CASES[case]
    expected_params = dense_params(dtype)
    expected_opt = build_for_rule(name, options, expected_params, "reference")
    run(expected_opt, expected_params)
    params = dense_params(dtype)
    opt = build_for_rule(name, options, params, "compiled")
    graphs = counters["stats"]["unique_graphs"]
    run(opt, params)
    assert counters["stats"]["unique_graphs"] == graphs  # torch's kernel ran; Inductor compiled nothing
    for i, (a, e) in enumerate(zip(params, expected_params)):
        assert_rel(a, e, 1e-6, f"param {i}")
        for key, value in expected_opt.state[e].items():
            assert_rel(opt.state[a][key], value, 1e-6, f"param {i} {key}")


TORCH_FUSED = {
    "SGD": dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False),
    "Adagrad": dict(lr=0.1, lr_decay=0.01, weight_decay=0.1),
    "Adam": dict(lr=0.01, weight_decay=0.1, amsgrad=True),
    "AdamW": dict(lr=0.01, maximize=True),
}


@pytest.mark.parametrize("cls", list(TORCH_FUSED))
def test_auto_on_cpu_is_torchs_fused_step_bit_for_bit(cls):
    """Same kernel, same inputs: ``auto`` (our compiled backend handing the bucket to torch's
    kernel) equals ``torch.optim.<cls>(fused=True)`` exactly, step counts included."""
    ours_params, torch_params = dense_params(), dense_params()
    ours = getattr(lo, cls)(ours_params, **TORCH_FUSED[cls])
    theirs = getattr(torch.optim, cls)(torch_params, fused=True, **TORCH_FUSED[cls])
    assert ours.backend == "compiled"
    run(ours, ours_params)
    run(theirs, torch_params)
    for a, e in zip(ours_params, torch_params):
        assert torch.equal(a, e)
        for key, value in theirs.state[e].items():
            assert torch.equal(ours.state[a][key], value), key


def test_mixed_first_steps_with_dampening():
    """A param that first gets a gradient late is on its first step (buf = g) while the others
    are not (buf = mu * buf + (1 - dampening) * g): both in one bucket, as the reference."""
    results = {}
    for backend in ("reference", "compiled"):
        params = dense_params()
        opt = lo.SGD(params, lr=0.1, momentum=0.9, dampening=0.3, backend=backend)
        gen = torch.Generator().manual_seed(5)
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=gen) if step > 0 or i != 3 else None
            opt.step()
        results[backend] = (params, opt)
    (got, got_opt), (exp, exp_opt) = results["compiled"], results["reference"]
    assert got_opt.state[got[3]]["step"].item() == 2 and got_opt.state[got[2]]["step"].item() == 3
    for a, e in zip(got, exp):
        assert_rel(a, e, 1e-6)
        assert_rel(got_opt.state[a]["momentum_buffer"], exp_opt.state[e]["momentum_buffer"], 1e-6)


@pytest.mark.parametrize("clipping", [{"mode": "norm", "max_norm": 0.5}, {"mode": "value", "max_value": 0.5}],
                         ids=["norm", "value"])
def test_clipping_on_the_kernel_path(clipping):
    """The clipper's coefficient c reaches torch's kernel as grad_scale = 1/c, a clip-by-value
    bound as a clamp pass before it (the kernels cannot clamp): the step equals clipping the
    grads first (foreach) to 1e-6, leaves .grad clipped as foreach does, and compiles nothing."""
    from lightning_optim.clipping import GradientClipper

    results = {}
    graphs = counters["stats"]["unique_graphs"]
    for backend in ("foreach", "compiled"):
        params = dense_params()  # the empty one included: value mode asks every grad's max |g|
        opt = lo.AdamW(params, lr=1e-2, backend=backend)
        clipper = GradientClipper(**clipping)
        gen = torch.Generator().manual_seed(2)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 3
            assert not clipper.should_skip(clipper.clip_(opt))
            opt.step()
        results[backend] = params
    assert counters["stats"]["unique_graphs"] == graphs
    for a, e in zip(results["compiled"], results["foreach"]):
        assert_rel(a, e, 1e-6)
        assert_rel(a.grad, e.grad, 1e-6)  # both clipped in place
    grads = torch.cat([p.grad.flatten() for p in results["compiled"]])
    if clipping["mode"] == "norm":
        assert grads.norm().item() == pytest.approx(0.5, rel=1e-5)
    else:
        assert grads.abs().max().item() == 0.5


@pytest.mark.slow
def test_a_large_bucket_clipped_by_norm_goes_through_inductor(monkeypatch):
    """From WORTH_COMPILING_FROM elements a clipped bucket is compiled, so the coefficient
    is applied inside the graph (.grad left as drawn) instead of by torch's kernel (.grad
    clipped): the same step as clipping first on foreach, to 1e-6."""
    from lightning_optim.clipping import GradientClipper

    monkeypatch.setattr(compiled, "WORTH_COMPILING_FROM", 20)
    results = {}
    for backend in ("foreach", "compiled"):
        params = dense_params()
        opt = lo.AdamW(params, lr=1e-2, backend=backend)
        clipper = GradientClipper(mode="norm", max_norm=0.5)
        gen = torch.Generator().manual_seed(2)
        graphs = counters["stats"]["unique_graphs"]
        for _ in range(2):
            drawn = [torch.randn(p.shape, generator=gen) * 3 for p in params]
            for p, g in zip(params, drawn):
                p.grad = g.clone()
            clipper.should_skip(clipper.clip_(opt))
            opt.step()
        if backend == "compiled":
            assert counters["stats"]["unique_graphs"] == graphs + 1
            assert all(torch.equal(p.grad, g) for p, g in zip(params, drawn))
        results[backend] = params
    for a, e in zip(results["compiled"], results["foreach"]):
        assert_rel(a, e, 1e-6)


@pytest.mark.parametrize("why, make", [
    ("bf16 (Inductor keeps our one rounding)", lambda: [torch.randn(8, dtype=torch.bfloat16)]),
    ("a strided view (the kernels index it as if dense)", lambda: [torch.randn(6, 8)[:, ::2]]),
])
def test_buckets_the_kernels_cannot_take(why, make):
    params = [p.requires_grad_() for p in make()]
    for p in params:
        p.grad = torch.ones_like(p)
    state = {"exp_avg": [torch.zeros_like(p) for p in params], "exp_avg_sq": [torch.zeros_like(p) for p in params]}
    spec = lo.AdamW.spec
    group = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "decoupled_weight_decay": True,
             "bias_correction": True}
    assert torch_kernels.kernel_for(spec, group, params, [p.grad for p in params], state) is None, why
    dense = [torch.randn(8).requires_grad_()]
    dense_state = {k: [torch.zeros(8)] for k in state}
    assert torch_kernels.kernel_for(spec, group, dense, [torch.ones(8)], dense_state) == "_fused_adamw_"
    assert torch_kernels.kernel_for(spec, {**group, "bias_correction": False}, dense, [torch.ones(8)],
                                    dense_state) is None


# ----- what auto picks on CPU, and why --------------------------------------------------------


def _coupled(params):
    return [{"params": params[:1], "coupled": True}, {"params": params[1:]}]


AUTO_TABLE = [
    # (case, build, expected backend, words of the reason)
    ("adam dense fp32", lambda ps: lo.Adam(ps), "compiled", "torch's fused kernels"),
    ("sgd momentum", lambda ps: lo.SGD(ps, lr=0.1, momentum=0.9), "compiled", "torch's fused kernels"),
    ("adagrad", lambda ps: lo.Adagrad(ps), "compiled", "torch's fused kernels"),
    ("adam without bias correction, small", lambda ps: lo.Adam(ps, bias_correction=False), "foreach",
     "would cost more than it saves"),
    ("yogi, small", lambda ps: lo.Yogi(ps), "foreach", "would cost more than it saves"),
    ("coupled adam's coupled group, small", lambda ps: lo.CoupledAdam(_coupled(ps)), "foreach",
     "would cost more than it saves"),
    ("bf16 adamw, small", lambda ps: lo.AdamW([p.detach().bfloat16().requires_grad_() for p in ps]), "foreach",
     "would cost more than it saves"),
]


@pytest.mark.parametrize("case, build, backend, words", AUTO_TABLE, ids=[row[0] for row in AUTO_TABLE])
def test_auto_on_cpu(case, build, backend, words):
    opt = build([torch.randn(4, 3).requires_grad_(), torch.randn(5).requires_grad_()])
    assert (opt.backend, words in opt.backend_reason) == (backend, True), opt.backend_reason


def test_auto_compiles_from_the_size_threshold(monkeypatch):
    params = [torch.randn(4, 3).requires_grad_(), torch.randn(5).requires_grad_()]
    assert lo.Yogi(params).backend == "foreach"
    monkeypatch.setattr(backends, "AUTO_COMPILE_MIN_PARAMS", 17)
    opt = lo.Yogi(params)
    assert opt.backend == "compiled"
    assert opt.backend_reason.startswith("0.0M parameters: one Inductor-compiled pass per step")
    # A process where compiling failed already does not try again.
    monkeypatch.setattr(compiled, "_failed", "RuntimeError: no C++ compiler")
    opt = lo.Yogi(params)
    assert (opt.backend, opt.backend_reason) == ("foreach", "compiling is unavailable here (RuntimeError: no C++ compiler)")


def test_explicit_backend_says_asked_for():
    opt = lo.Yogi([torch.randn(3).requires_grad_()], backend="reference")
    assert (opt.backend, opt.backend_reason) == ("reference", "asked for")


def test_torchs_fused_keyword_on_cpu():
    """fused=True on CPU: torch's own kernels where they compute the rule (as torch.optim's
    fused=True), else foreach with one warning; fused=False: never a single-pass backend."""
    params = [torch.randn(4, 3).requires_grad_()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lo.AdamW(params, fused=True).backend == "compiled"
        assert lo.SGD(params, lr=0.1, fused=True).backend == "compiled"
        assert lo.AdamW(params, backend="compiled", fused=True).backend == "compiled"
    assert lo.AdamW(params, fused=False).backend == "foreach"
    with pytest.warns(LightningOptimWarning, match=r"^Yogi: fused=True, but the parameters are on cpu.*"
                                                   r"using backend='foreach' instead"):
        assert lo.Yogi(params, fused=True).backend == "foreach"
    with pytest.raises(ConflictingOptions, match=r"^AdamW: backend='compiled' conflicts with fused=False, which "
                                                 r"asks for a backend other than 'compiled'"):
        lo.AdamW(params, backend="compiled", fused=False)
    with pytest.raises(ConflictingOptions, match=r"^AdamW: backend='foreach' conflicts with fused=True, which asks "
                                                 r"for backend='triton' or backend='compiled'"):
        lo.AdamW(params, backend="foreach", fused=True)


def test_copy_keeps_autos_choice():
    import copy
    import pickle

    opt = lo.AdamW([torch.randn(3, 2).requires_grad_()])
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert (clone.backend, clone.backend_reason) == (opt.backend, opt.backend_reason)
