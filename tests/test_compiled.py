"""backend="compiled": Inductor-compiled single-pass steps, held to the reference.

Compiling costs seconds per graph on 2 cores, so every test here reuses the same few bucket
shapes: the backend keeps one graph per (rule configuration, bucket) for the whole process,
and tests that share a configuration share its graph.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import lightning_optim as lo
from lightning_optim.backends import compiled
from lightning_optim.registry import REGISTRY
from lightning_optim.validation import LightningOptimWarning
from conftest import assert_rel, build_for_rule

@pytest.fixture(autouse=True)
def _inductor_only(monkeypatch):
    """Every bucket through Inductor's graph, which this file is about: the buckets torch's
    fused kernels would take (dense fp32 Adam/AdamW/SGD/Adagrad) are held to the reference,
    clipping included, in test_torch_kernels.py."""
    monkeypatch.setattr(compiled, "TORCH_KERNELS", False)


DTYPES = {"fp32": (torch.float32, {}), "bf16+masters": (torch.bfloat16, {"master_weights": True})}


def make_params(dtype, seed=7):
    """Awkward sizes: empty, one element, a prime, a matrix and a non-contiguous view."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=gen).to(dtype).requires_grad_() for shape in [(0,), (1,), (13,), (6, 5)]]
    params.append(torch.randn(5, 9, generator=gen).to(dtype).t().requires_grad_())
    return params


def set_grads(params, gen):
    for p in params:
        # Non-contiguous grads for the matrices: the transpose of the transposed shape.
        g = torch.randn(tuple(reversed(p.shape)), generator=gen).t() if p.dim() == 2 else torch.randn(p.shape, generator=gen)
        p.grad = g.to(p.dtype)


def train(name, backend, dtype, options, steps=6, params=None, opt=None, seed=11):
    params = make_params(dtype) if params is None else params
    opt = build_for_rule(name, options, params, backend) if opt is None else opt
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        set_grads(params, gen)
        opt.step()
    return params, opt


def assert_matches(got, got_opt, expected, expected_opt):
    for i, (a, e) in enumerate(zip(got, expected)):
        assert a.dtype == e.dtype
        if e.dtype == torch.float32:
            assert_rel(a, e, 1e-6, f"param {i}")
        else:  # fp32 math, one rounding each: a fold may flip the last bit, as on foreach
            ulp = torch.finfo(e.dtype).eps
            torch.testing.assert_close(a.float(), e.float(), rtol=ulp, atol=ulp * 1e-2)
    for pa, pe in zip(got, expected):
        sa, se = got_opt.state[pa], expected_opt.state[pe]
        assert sa.keys() == se.keys()
        for key in se:
            assert sa[key].dtype == se[key].dtype
            assert_rel(sa[key], se[key], 1e-5, key)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", lo.optimizers())
def test_compiled_matches_reference(name, dtype):
    """Every registry name; a rule without a pure function in the compiled backend runs
    foreach's, saying so once per process."""
    dt, options = DTYPES[dtype]
    expected, expected_opt = train(name, "reference", dt, options)
    rule = REGISTRY[name].cls.spec.name
    if rule in compiled.RULES:
        got, got_opt = train(name, "compiled", dt, options)
    else:
        compiled._uncompiled.discard(rule)
        with pytest.warns(lo.LightningOptimWarning, match=f"no compiled form of the {rule} rule"):
            got, got_opt = train(name, "compiled", dt, options)
    assert got_opt.backend == "compiled"
    assert_matches(got, got_opt, expected, expected_opt)
    if options.get("master_weights"):
        for p in got:  # the param is its master's rounding
            assert torch.equal(p.detach(), got_opt.state[p]["master_param"].to(p.dtype))


# Structural options compile their own graph; a few that change the code path.
VARIANTS = {
    "adam+maximize+l2+amsgrad": ("adam", {"maximize": True, "weight_decay": 0.1, "amsgrad": True}),
    "rmsprop+centered+momentum": ("rmsprop", {"centered": True, "momentum": 0.5, "weight_decay": 0.1}),
    "sgd+dampening+wd": ("momentum", {"dampening": 0.2, "weight_decay": 0.1}),
    "radam+decoupled": ("radam", {"decoupled_weight_decay": True, "weight_decay": 0.1}),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_variants_match_reference(variant):
    name, options = VARIANTS[variant]
    expected, expected_opt = train(name, "reference", torch.float32, options)
    got, got_opt = train(name, "compiled", torch.float32, options)
    assert_matches(got, got_opt, expected, expected_opt)


def _warmup_cosine(step, warmup=5, total=20):
    return (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.slow
def test_schedule_step_count_and_group_lr_do_not_recompile():
    """20 steps of a warm-up + cosine schedule over two groups with different lr and weight
    decay: every graph compiles on the first step, none after; and the result is foreach's."""
    runs = {}
    for backend in ("foreach", "compiled"):
        params = make_params(torch.float32)
        groups = [{"params": params[:3], "lr": 1e-2, "weight_decay": 0.0},
                  {"params": params[3:], "lr": 3e-3, "weight_decay": 0.1}]
        opt = lo.AdamW(groups, backend=backend)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine)
        gen = torch.Generator().manual_seed(3)
        for step in range(20):
            set_grads(params, gen)
            opt.step()
            sched.step()
            if step == 0:
                graphs = counters["stats"]["unique_graphs"]
                frames = counters["frames"]["total"]
        runs[backend] = params
        if backend == "compiled":
            # No graph compiled and no frame (re)traced after the first step.
            assert (counters["stats"]["unique_graphs"], counters["frames"]["total"]) == (graphs, frames)
            assert graphs >= 2  # one per group's bucket, both compiled on step 1
    for a, e in zip(runs["compiled"], runs["foreach"]):
        assert_rel(a, e, 1e-6)


def test_compile_failure_falls_back_to_foreach_with_one_warning(monkeypatch):
    def broken(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("InductorError: no working C++ compiler found\nmore detail")
        return call

    monkeypatch.setattr(compiled, "_compile", broken)
    monkeypatch.setattr(compiled, "_GRAPHS", {})
    monkeypatch.setattr(compiled, "_failed", None)
    expected, expected_opt = train("nadam", "foreach", torch.float32, {}, steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, got_opt = train("nadam", "compiled", torch.float32, {}, steps=3)
    ours = [w for w in caught if issubclass(w.category, LightningOptimWarning)]
    assert len(ours) == 1
    assert "backend='compiled' could not compile the optimizer step: RuntimeError: InductorError: no working C++ " \
           "compiler found. Using backend='foreach'" in str(ours[0].message)
    for a, e in zip(got, expected):  # exactly foreach, NAdam's mu_product not advanced twice
        assert torch.equal(a, e)
    for pa, pe in zip(got, expected):
        for key in expected_opt.state[pe]:
            assert torch.equal(got_opt.state[pa][key], expected_opt.state[pe][key]), key


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "nadam"])
@pytest.mark.parametrize("first, then", [("compiled", "foreach"), ("foreach", "compiled")])
def test_state_dict_moves_between_backends(name, first, then):
    """Save after 3 steps on one backend, load into the other, 3 more steps: the same as 6
    steps on the first backend (to the backends' parity)."""
    straight, straight_opt = train(name, first, torch.float32, {}, steps=6)
    params, opt = train(name, first, torch.float32, {}, steps=3)
    saved = opt.state_dict()
    moved = [p.detach().clone().requires_grad_() for p in params]
    other = build_for_rule(name, {}, moved, then)
    other.load_state_dict(saved)
    # Continue with the same gradient stream: replay the first 3 draws, then step.
    gen = torch.Generator().manual_seed(11)
    for _ in range(3):
        set_grads(moved, gen)
    for _ in range(3):
        set_grads(moved, gen)
        other.step()
    assert other.backend == then
    assert_matches(moved, other, straight, straight_opt)


def test_resolve_accepts_compiled():
    p = torch.zeros(3, requires_grad=True)
    assert lo.AdamW([p], backend="compiled").backend == "compiled"
    assert lo.NAdam([p]).backend == "foreach"  # auto on a small job: compiling costs more than it saves


@pytest.mark.slow
def test_coupled_row_of_a_large_table_is_summed_in_blocks():
    """A table of 300 rows: the row of g^2 is summed as 16 blocks of 18 rows plus a tail of 12
    (compiled._row_sum_of_squares), which rounds differently from one sum, not more."""
    from lightning_optim.backends import reference

    results = {}
    for name, backend in (("reference", reference), ("compiled", compiled)):
        gen = torch.Generator().manual_seed(2)
        params = [torch.randn(300, 8, generator=gen)]
        state = {"exp_avg": [torch.zeros(300, 8)], "exp_avg_sq": [torch.zeros(1, 8)]}
        group = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "maximize": False,
                 "amsgrad": False, "bias_correction": True, "decoupled_weight_decay": True, "coupling_scale": 1.0}
        for t in (1.0, 2.0, 3.0):
            backend.run("coupled_adam", params, [torch.randn(300, 8, generator=gen)], state, [t], group)
        results[name] = (params[0], state["exp_avg_sq"][0])
    assert_rel(results["compiled"][0], results["reference"][0], 1e-6)
    assert_rel(results["compiled"][1], results["reference"][1], 1e-6)


@pytest.mark.slow
def test_coupled_row_finished_outside_the_graph():
    """Coupled Adam's ``row_mean`` hook (a row-sharded param: the all-reduce that finishes the
    mean over the global vocabulary) runs outside the graph, and its row enters the graph:
    the same update as the reference given the same hook. Here the hook divides by twice the
    local rows, as if another rank held as many rows with zero gradient."""
    from lightning_optim.backends import reference

    gen = torch.Generator().manual_seed(5)
    group = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1, "maximize": False,
             "amsgrad": False, "bias_correction": True, "decoupled_weight_decay": True, "coupling_scale": 1.0}
    calls = []

    def hook(i, row_sum):
        calls.append(i)
        return row_sum.div_(2 * shapes[i][0])

    shapes = [(6, 5), (7, 3)]
    results = {}
    for name, backend in (("reference", reference), ("compiled", compiled)):
        params = [torch.randn(s, generator=torch.Generator().manual_seed(1)) for s in shapes]
        state = {"exp_avg": [torch.zeros(s) for s in shapes], "exp_avg_sq": [torch.zeros(1, s[1]) for s in shapes]}
        gen.manual_seed(5)
        for t in (1.0, 2.0, 3.0):
            grads = [torch.randn(s, generator=gen) for s in shapes]
            backend.run("coupled_adam", params, grads, state, [t, t], group, row_mean=hook)
        results[name] = (params, state)
    assert calls == [0, 1] * 6  # once per tensor and step, on both backends
    for a, e in zip(results["compiled"][0], results["reference"][0]):
        assert_rel(a, e, 1e-6)
    for a, e in zip(results["compiled"][1]["exp_avg_sq"], results["reference"][1]["exp_avg_sq"]):
        assert_rel(a, e, 1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "radam"])
def test_tensors_on_different_steps_in_one_bucket(name):
    """A param that gets its first gradient late counts its own steps: per-tensor coefficients
    (RAdam: the rectified step on some tensors and the plain one on others, in one graph)."""
    runs = {}
    for backend in ("reference", "compiled"):
        params = make_params(torch.float32)
        opt = build_for_rule(name, {}, params, backend)
        gen = torch.Generator().manual_seed(2)
        for step in range(8):
            set_grads(params, gen)
            if step < 5:
                params[2].grad = None  # joins on step 6: steps 1-3 while the others are at 6-8
            opt.step()
        runs[backend] = (params, opt)
    assert runs["compiled"][1].state[runs["compiled"][0][2]]["step"].item() == 3.0
    assert_matches(*runs["compiled"], *runs["reference"])
