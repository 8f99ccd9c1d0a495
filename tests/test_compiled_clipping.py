"""backend="compiled" with clipping and AMP: the clip factor applied inside the single pass.

The compiled backend declares ``fused_grad_transform``: ``GradientClipper`` hands it the
clip-by-norm coefficient (``Optimizer.scale_next_step``) instead of rescaling ``.grad``, and
the compiled graph multiplies g by it (then clamps, for clip by value) as it reads g for the
update. The update must be the clipped foreach step's, to the tolerance ``test_compiled``
holds the backend to, with ``.grad`` left unclipped; a coefficient or bound that changes every
step must not recompile. AMP: the backend counts steps on the host, so ``torch.amp.GradScaler``
unscales and skips on the host, as for any optimizer.

Compiling costs seconds per graph on 2 cores: the tests that compile are ``slow`` and reuse
few bucket shapes, and so share graphs.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import lightning_optim as lo
from lightning_optim import backends
from lightning_optim.backends import compiled
from lightning_optim.clipping import GradientClipper
from lightning_optim.validation import LightningOptimWarning
from conftest import assert_rel

@pytest.fixture(autouse=True)
def _inductor_only(monkeypatch):
    """Every bucket through Inductor's graph, which this file is about: the buckets torch's
    fused kernels would take (dense fp32 Adam/AdamW/SGD/Adagrad) are held to the reference,
    clipping included, in test_torch_kernels.py."""
    monkeypatch.setattr(compiled, "TORCH_KERNELS", False)


CLIPS = {
    "norm": dict(mode="norm", max_norm=0.05),
    "norm_inf_per_group": dict(mode="norm", norm_type=float("inf"), max_norm=0.5, per_group={"embedding": 0.01}),
    "value": dict(mode="value", max_value=0.02),
    "value_per_group_only": dict(mode="value", max_value=None, per_group={"decay": 0.01}),
}


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(11, 6), nn.LayerNorm(6), nn.Linear(6, 7), nn.Linear(7, 11)).to(dtype)


def _clipped_run(backend: str, clip: dict, *, fused: bool | None, dtype=torch.float32, steps: int = 3,
                 options: dict | None = None):
    """AdamW (decay / no-decay / embedding groups) behind a GradientClipper; ``fused=None``:
    the clipper asks the backend. Returns the model, the optimizer, the reports and, per
    step, the ``.grad`` tensors as the step saw them and as they were drawn."""
    model = _model(dtype)
    opt = lo.create_optimizer({"name": "adamw", "lr": 1e-2, **(options or {})}, model, backend=backend)
    clipper = GradientClipper(**clip)
    gen = torch.Generator().manual_seed(1)
    reports, seen, drawn = [], [], []
    for _ in range(steps):
        opt.zero_grad()
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        drawn.append([p.grad.clone() for p in model.parameters()])
        reports.append(clipper.clip_(opt, fused=fused))
        assert not clipper.should_skip(reports[-1])
        opt.step()
        seen.append([p.grad.clone() for p in model.parameters()])
    return model, opt, reports, seen, drawn


def test_compiled_declares_the_fused_transform_and_the_clipper_hands_it_over():
    backend = backends.get("compiled")
    assert backend.fused_grad_transform and not backend.device_steps
    p = nn.Parameter(torch.ones(4))
    opt = lo.AdamW([p], backend="compiled")
    p.grad = torch.full((4,), 3.0)  # norm 6 > 1: coefficient 1 / (6 + 1e-6)
    GradientClipper(mode="norm", max_norm=1.0).clip_(opt)
    (scale, bound), = opt._next_transforms.values()
    assert bound is None
    assert scale.item() == pytest.approx(1 / (6 + 1e-6), rel=1e-6)
    assert torch.equal(p.grad, torch.full((4,), 3.0))  # handed over, not applied


@pytest.mark.slow
@pytest.mark.parametrize("clip", list(CLIPS))
def test_fused_clipping_on_compiled_matches_clipping_first_on_foreach(clip):
    """Every clip mode: the compiled step applying the coefficient or bound in its graph gives
    the clipped foreach step (1e-6 relative), the reports agree, and ``.grad`` stays as drawn."""
    model_c, opt_c, rep_c, seen_c, drawn_c = _clipped_run("compiled", CLIPS[clip], fused=None)
    model_f, opt_f, rep_f, _, _ = _clipped_run("foreach", CLIPS[clip], fused=False)
    assert compiled._failed is None
    for a, b in zip(rep_c, rep_f):
        assert torch.equal(a.total_norm, b.total_norm)
        assert {k: bool(v) for k, v in a.clipped.items()} == {k: bool(v) for k, v in b.clipped.items()}
    assert any(bool(v) for r in rep_f for v in r.clipped.values())  # the thresholds do clip
    for i, (pc, pf) in enumerate(zip(model_c.parameters(), model_f.parameters())):
        assert_rel(pc, pf, 1e-6, f"param {i}")
        for key in ("exp_avg", "exp_avg_sq"):
            assert_rel(opt_c.state[pc][key], opt_f.state[pf][key], 1e-5, f"param {i} {key}")
    for seen, drawn in zip(seen_c, drawn_c):  # .grad unclipped on a fused backend
        assert all(torch.equal(s, d) for s, d in zip(seen, drawn))
    assert opt_c._next_transforms == {}


@pytest.mark.slow
def test_bf16_masters_fused_clipping_on_compiled():
    """bf16 params with fp32 masters: clipping first rounds g * coef to bf16, the graph keeps
    it in fp32, so the two differ by at most a bf16 rounding of the update."""
    model_c, *_ = _clipped_run("compiled", CLIPS["norm"], fused=None, dtype=torch.bfloat16,
                               options={"master_weights": True})
    model_f, *_ = _clipped_run("foreach", CLIPS["norm"], fused=False, dtype=torch.bfloat16,
                               options={"master_weights": True})
    for pc, pf in zip(model_c.parameters(), model_f.parameters()):
        assert (pc.float() - pf.float()).abs().max() <= 2 ** -7 * pf.float().abs().max()


def _warmup_cosine(step, warmup=5, total=20):
    return (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def _params(seed=7):
    """Awkward sizes, as in test_compiled: empty, one element, a prime, a matrix, a transposed view."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=gen).requires_grad_() for shape in [(0,), (1,), (13,), (6, 5)]]
    params.append(torch.randn(5, 9, generator=gen).t().requires_grad_())
    return params


def _scheduled_run(backend: str, transform, steps: int = 20):
    """AdamW over two groups under a warm-up + cosine schedule; ``transform(opt, step)``
    sets this step's clip (the clipper, or ``scale_next_step`` directly). Returns the params
    and the compile counters after the first step and at the end."""
    params = _params()
    groups = [{"params": params[:3], "lr": 1e-2, "weight_decay": 0.0},
              {"params": params[3:], "lr": 3e-3, "weight_decay": 0.1}]
    opt = lo.AdamW(groups, backend=backend)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine)
    gen = torch.Generator().manual_seed(3)
    after_first = None
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * (1 + step)  # norms (so coefficients) change
        transform(opt, step)
        opt.step()
        sched.step()
        if step == 0:
            after_first = (counters["stats"]["unique_graphs"], counters["frames"]["total"])
    return params, after_first, (counters["stats"]["unique_graphs"], counters["frames"]["total"])


def _clip_by_norm(clipper):
    def transform(opt, step):
        report = clipper.clip_(opt, fused=None if opt.backend == "compiled" else False)
        assert all(bool(v) for v in report.clipped.values())  # every step clips, by a new coefficient
    return transform


def _changing_scale_and_bound(opt, step):
    # A coefficient and a clamp bound that differ every step, in both groups.
    for gi in range(len(opt.param_groups)):
        opt.scale_next_step(gi, grad_scale=torch.tensor(0.9 ** step), clip_value=0.5 + 0.1 * step)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["clipper", "scale_and_bound"])
def test_clipping_under_a_schedule_does_not_recompile(how):
    """20 scheduled steps with clipping on every step: the graphs compile on step 1 and
    nothing compiles or is traced again, though the coefficient (and the bound) change every
    step; the result is the clipped foreach step's."""
    def make():
        return _clip_by_norm(GradientClipper(mode="norm", max_norm=1.0)) if how == "clipper" \
            else _changing_scale_and_bound
    expected, _, _ = _scheduled_run("foreach", make())
    got, after_first, at_end = _scheduled_run("compiled", make())
    assert compiled._failed is None
    assert at_end == after_first  # no graph compiled and no frame (re)traced after step 1
    for a, e in zip(got, expected):
        assert_rel(a, e, 1e-6)


@pytest.mark.slow
def test_coupled_row_of_the_transformed_gradient():
    """Coupled Adam with a row-sharded param's hook: the shared row is finished outside the
    graph from the transformed g (g * coef, clamped), so it matches the reference fed the
    gradients transformed first."""
    from lightning_optim.backends import reference
    from lightning_optim.backends.protocol import apply_grad_transform

    group = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1, "maximize": False,
             "amsgrad": False, "bias_correction": True, "decoupled_weight_decay": True, "coupling_scale": 1.0}
    shapes = [(6, 5), (7, 3)]

    def hook(i, row_sum):
        return row_sum.div_(2 * shapes[i][0])

    results = {}
    for name in ("reference", "compiled"):
        gen = torch.Generator().manual_seed(5)
        params = [torch.randn(s, generator=torch.Generator().manual_seed(1)) for s in shapes]
        state = {"exp_avg": [torch.zeros(s) for s in shapes], "exp_avg_sq": [torch.zeros(1, s[1]) for s in shapes]}
        for t in (1.0, 2.0, 3.0):
            grads = [torch.randn(s, generator=gen) for s in shapes]
            scale, bound = torch.tensor(0.5 / t), 0.4
            if name == "reference":
                apply_grad_transform(grads, scale, bound)
                reference.run("coupled_adam", params, grads, state, [t, t], group, row_mean=hook)
            else:
                drawn = [g.clone() for g in grads]
                compiled.run("coupled_adam", params, grads, state, [t, t], group, row_mean=hook,
                             grad_scale=scale, clip_value=bound)
                assert all(torch.equal(g, d) for g, d in zip(grads, drawn))
        results[name] = (params, state)
    for a, e in zip(results["compiled"][0], results["reference"][0]):
        assert_rel(a, e, 1e-6)
    for a, e in zip(results["compiled"][1]["exp_avg_sq"], results["reference"][1]["exp_avg_sq"]):
        assert_rel(a, e, 1e-6)


def test_compile_failure_applies_the_clip_to_the_gradients_then_runs_foreach(monkeypatch):
    """Where the bucket falls back to foreach, the transform is foreach's: the same params to
    the bit as clipping first on foreach, and there the clipped ``.grad`` is what it read."""
    def broken(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("InductorError: no working C++ compiler found")
        return call

    monkeypatch.setattr(compiled, "_compile", broken)
    monkeypatch.setattr(compiled, "_GRAPHS", {})
    monkeypatch.setattr(compiled, "_failed", None)
    model_f, *_ = _clipped_run("foreach", CLIPS["norm"], fused=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model_c, opt_c, _, seen, drawn = _clipped_run("compiled", CLIPS["norm"], fused=None)
    assert [str(w.message).split(":")[0] for w in caught if issubclass(w.category, LightningOptimWarning)] == [
        "backend='compiled' could not compile the optimizer step"]
    assert opt_c.backend == "compiled"
    for pc, pf in zip(model_c.parameters(), model_f.parameters()):
        assert torch.equal(pc, pf)
    assert not all(torch.equal(s, d) for s, d in zip(seen[0], drawn[0]))  # clipped in place here


# ----- AMP: torch.amp.GradScaler on the host ------------------------------------------------------

BAD_STEPS = {2: float("inf")}  # 0-based: GradScaler finds the inf and skips the step


def _amp_run(backend: str, clip: bool, steps: int = 5):
    """A GradScaler("cpu") loop: loss = sum(w_i * p_i), scaled backward, an inf gradient on
    BAD_STEPS; with ``clip``, unscale_ then clip by norm first (the order AMP needs)."""
    gen = torch.Generator().manual_seed(21)
    params = _params()
    opt = lo.AdamW(params, lr=1e-2, weight_decay=0.1, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2)
    clipper = GradientClipper(mode="norm", max_norm=1.0)
    history, scales = [], []
    for step in range(steps):
        opt.zero_grad()
        ws = [torch.randn(p.shape, generator=gen) for p in params]
        loss = sum((w * p).sum() for w, p in zip(ws, params))
        scaler.scale(loss).backward()
        if step in BAD_STEPS:
            params[3].grad[2, 1] = BAD_STEPS[step]
        if clip:
            scaler.unscale_(opt)
            report = clipper.clip_(opt, fused=None if backend == "compiled" else False)
            assert bool(report.finite) == (step not in BAD_STEPS)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        history.append([p.detach().clone() for p in params])
    return params, opt, history, scales


@pytest.mark.slow
@pytest.mark.parametrize("clip", [False, True], ids=["amp", "amp+clip"])
def test_grad_scaler_on_compiled_matches_foreach(clip):
    """GradScaler unscales on the host (no ``device_steps``), skips the inf step (params and
    step counts untouched) and backs off; the compiled params are foreach's to 1e-6."""
    got, opt, got_hist, got_scales = _amp_run("compiled", clip)
    exp, ref, exp_hist, exp_scales = _amp_run("foreach", clip)
    assert not opt._step_supports_amp_scaling
    assert compiled._failed is None
    assert got_scales == exp_scales and got_scales[2] == got_scales[1] / 2  # backed off at the inf
    for step in BAD_STEPS:
        assert all(torch.equal(a, b) for a, b in zip(got_hist[step], got_hist[step - 1]))  # skipped
    for i, (a, e) in enumerate(zip(got, exp)):
        assert_rel(a, e, 1e-6, f"param {i}")
        assert opt.state[a]["step"].item() == ref.state[e]["step"].item() == 5 - len(BAD_STEPS)
