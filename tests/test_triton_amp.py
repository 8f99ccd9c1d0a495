"""Device-side step counts on the triton backend: AMP's GradScaler taken in-kernel,
skipped steps that are not counted, and a step that a CUDA graph can capture.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, as in test_triton.py),
and the "device" of the step counts is the CPU: these tests check the protocol (no host
read in the step, found_inf masking the launch and the counts, torch fused Adam parity,
state dict interop); the CUDA-only tests at the end check the placement and the capture.
"""

from __future__ import annotations

import copy

import pytest
import torch
import triton  # noqa: F401  (a missing Triton must fail this file, not skip it)

import lightning_optim as lo
from conftest import assert_rel
from test_triton import VARIANTS, assert_param, name_of

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (device step counts, CUDA graphs)")


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


SHAPES = [(300,), (7, 11), (13,), (1,)]


def make_params(gen, device="cpu", dtype=torch.float32):
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_() for s in SHAPES]


def _forbid_host_reads(monkeypatch):
    def boom(self, *args, **kwargs):
        raise AssertionError("host sync: a tensor value was read by the host during step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, boom)


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], {
        i: {k: v.detach().clone() for k, v in opt.state[p].items()} for i, p in enumerate(params) if opt.state[p]
    }


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


# ----- (a) GradScaler: ours vs torch's fused Adam(W) ------------------------------------------------

BAD_STEPS = {2: float("inf"), 5: float("nan")}  # 0-based steps with a non-finite grad: found_inf


def _amp_run(make_opt, unscale_first: bool, steps: int = 8):
    """A GradScaler loop: loss = sum(w_i * p_i), scaled backward, a non-finite grad on the
    BAD_STEPS, optionally unscale_ first (Lightning's MixedPrecision plugin does, to clip)."""
    gen = torch.Generator().manual_seed(21)
    params = make_params(gen)
    opt = make_opt(params)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2)
    scales = []
    for step in range(steps):
        opt.zero_grad()
        ws = [torch.randn(p.shape, generator=gen) for p in params]
        loss = sum((w * p).sum() for w, p in zip(ws, params))
        scaler.scale(loss).backward()
        if step in BAD_STEPS:
            params[1].grad[3, 4] = BAD_STEPS[step]
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return params, opt, scales


@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaled", "unscaled"])
@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_grad_scaler_matches_torch_fused_adam(name, unscale_first):
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ours_cls, torch_cls = (lo.AdamW, torch.optim.AdamW) if name == "adamw" else (lo.Adam, torch.optim.Adam)
    got, opt, got_scales = _amp_run(lambda ps: ours_cls(ps, backend="triton", **hyper), unscale_first)
    exp, ref, exp_scales = _amp_run(lambda ps: torch_cls(ps, fused=True, **hyper), unscale_first)
    assert opt._step_supports_amp_scaling and ref._step_supports_amp_scaling
    assert got_scales == exp_scales
    assert min(exp_scales) < max(exp_scales)  # it grew and backed off
    for i, (a, e) in enumerate(zip(got, exp)):
        assert_param(a.detach(), e.detach(), f"param {i}")
        sa, se = opt.state[a], ref.state[e]
        assert sa["step"].dtype == torch.float32 and sa["step"].dim() == 0
        assert sa["step"].device == a.device
        assert sa["step"].item() == se["step"].item() == 8 - len(BAD_STEPS)
        for key in ("exp_avg", "exp_avg_sq"):
            assert_rel(sa[key], se[key], 1e-5, f"param {i} {key}")
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")  # GradScaler cleaned up


def test_grad_scale_combines_with_a_pending_clip_coefficient():
    """scale_next_step's coefficient times 1 / GradScaler's grad_scale, on the device."""
    runs = []
    for fused in (False, True):
        gen = torch.Generator().manual_seed(22)
        params = make_params(gen)
        opt = lo.AdamW(params, lr=1e-2, backend="triton")
        coef = torch.tensor(0.25)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1024.0
        if fused:
            opt.scale_next_step(0, grad_scale=coef)
            opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.zeros(())
            opt.step()
            del opt.grad_scale, opt.found_inf
        else:
            for p in params:
                p.grad.mul_(coef / 1024.0)
            opt.step()
        runs.append(params)
    for a, e in zip(*runs):
        assert_param(a.detach(), e.detach(), "clip x amp")


# ----- (b) found_inf: nothing moves, no host read ----------------------------------------------------


@pytest.mark.parametrize("variant", sorted({name_of(v) for v in VARIANTS} | {"nadam+decoupled", "sgd+dampening"}))
def test_found_inf_step_changes_nothing_and_reads_nothing(variant, monkeypatch):
    gen = torch.Generator().manual_seed(23)
    name = name_of(variant)
    params = make_params(gen) + [torch.randn(5, 4, generator=gen).bfloat16().requires_grad_()]
    if name == "coupled_adam":
        groups = [{"params": [p for p in params if p.dim() >= 2], "coupled": True},
                  {"params": [p for p in params if p.dim() < 2]}]
    else:
        groups = [{"params": params, "master_weights": True}]
    opt = lo.create_optimizer({"name": name, **VARIANTS.get(variant, {}), "lr": 1e-2}, groups, backend="triton")
    assert opt._step_supports_amp_scaling

    def grads(bad: bool):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        if bad:
            params[0].grad[7] = float("nan")

    def step(found: float, scale: float | None):
        opt.grad_scale = None if scale is None else torch.tensor(scale)
        opt.found_inf = torch.tensor(found)
        with monkeypatch.context() as m:
            _forbid_host_reads(m)
            opt.step()
        del opt.grad_scale, opt.found_inf

    grads(False)
    step(0.0, 2.0)  # a normal AMP step, no host read either
    grads(False)
    step(0.0, None)
    steps = [opt.state[p]["step"].clone() for p in params]
    assert all(s.item() == 2 for s in steps)
    before_p, before_s = _snapshot(opt, params)
    grads(True)
    step(2.0, 2.0)  # GradScaler sums the per-device flags: 2 is one skipped step too
    after_p, after_s = _snapshot(opt, params)
    for i, (a, b) in enumerate(zip(after_p, before_p)):
        assert _bitwise_equal(a, b), f"param {i} moved on a skipped step"
    assert after_s.keys() == before_s.keys()
    for i in before_s:
        assert after_s[i].keys() == before_s[i].keys()
        for key in before_s[i]:
            assert _bitwise_equal(after_s[i][key], before_s[i][key]), f"param {i} {key} changed on a skipped step"
    # And the next good step is counted as the third.
    grads(False)
    step(0.0, 2.0)
    assert all(opt.state[p]["step"].item() == 3 for p in params)
    if name == "nadam":
        assert all(opt.state[p]["mu_product"].item() != before_s[i]["mu_product"].item() for i, p in enumerate(params))


def test_found_inf_without_grad_scaler_check_reads_nothing(monkeypatch):
    """The patch bites: a host read in the step would fail the test above."""
    with pytest.raises(AssertionError, match="host sync"):
        with monkeypatch.context() as m:
            _forbid_host_reads(m)
            torch.ones(()).item()


# ----- (c) per-tensor step counts in one bucket -----------------------------------------------------


@pytest.mark.parametrize("variant", ["adam", "adamw+no_bias_correction", "nadam", "radam", "sgd+dampening",
                                     "adagrad+lr_decay", "yogi", "coupled_adam", "lion"])
def test_late_param_has_its_own_step_count(variant):
    """A param that first gets a gradient on step 3: its own bias corrections (and NAdam's
    mu_product) in the same launch as the others, as the reference computes them."""
    name = name_of(variant)
    steps = 8 if name == "radam" else 5  # RAdam rectifies from step 6: both kinds in one launch
    runs = []
    for backend in ("reference", "triton"):
        gen = torch.Generator().manual_seed(24)
        params = make_params(gen)
        groups = params
        if name == "coupled_adam":
            groups = [{"params": [p for p in params if p.dim() >= 2], "coupled": True},
                      {"params": [p for p in params if p.dim() < 2]}]
        opt = lo.create_optimizer({"name": name, **VARIANTS.get(variant, {}), "lr": 1e-2}, groups, backend=backend)
        for step in range(steps):
            for i, p in enumerate(params):
                g = torch.randn(p.shape, generator=gen)
                p.grad = None if (i == 2 and step < 2) else g
            opt.step()
        runs.append((params, opt))
    (ref_params, ref_opt), (got_params, got_opt) = runs
    for i, (a, e) in enumerate(zip(got_params, ref_params)):
        assert_param(a.detach(), e.detach(), f"param {i}")
        sa, se = got_opt.state[a], ref_opt.state[e]
        assert sa["step"].item() == se["step"].item() == (steps - 2 if i == 2 else steps)
        for key in se:
            assert_rel(sa[key], se[key], 1e-5, f"param {i} {key}")


# ----- (d) state dicts ----------------------------------------------------------------------------------


def _train(opt, params, gen, steps):
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


@pytest.mark.parametrize("name", ["adamw", "nadam"])
def test_state_dict_round_trip_with_device_steps(name):
    gen = torch.Generator().manual_seed(25)
    params = make_params(gen)
    opt = lo.create_optimizer({"name": name, "lr": 1e-2}, params, backend="triton")
    _train(opt, params, gen, 2)
    saved = opt.state_dict()
    copies = [p.detach().clone().requires_grad_() for p in params]
    loaded = lo.create_optimizer({"name": name, "lr": 1e-2}, copies, backend="triton")
    loaded.load_state_dict(saved)
    for p, q in zip(params, copies):
        for key in ("step", "mu_product"):
            if key in opt.state[p]:
                got = loaded.state[q][key]
                assert got.dtype == torch.float32 and got.dim() == 0 and got.device == q.device
                assert got is not opt.state[p][key] and torch.equal(got, opt.state[p][key])
    _train(opt, params, torch.Generator().manual_seed(26), 2)
    _train(loaded, copies, torch.Generator().manual_seed(26), 2)
    for a, e in zip(copies, params):
        assert torch.equal(a, e)
    # A reference-backend optimizer keeps them on the CPU, from the same state dict.
    plain = lo.create_optimizer({"name": name, "lr": 1e-2}, [p.detach().clone().requires_grad_() for p in params])
    plain.load_state_dict(saved)
    assert all(s["step"].device.type == "cpu" for s in plain.state.values())


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_torch_fused_adamw_state_dict_interop(direction):
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    gen = torch.Generator().manual_seed(27)
    start = make_params(gen)

    def ours(ps):
        return lo.AdamW(ps, backend="triton", **hyper)

    def theirs(ps):
        return torch.optim.AdamW(ps, fused=True, **hyper)

    first, second = (theirs, ours) if direction == "torch_to_ours" else (ours, theirs)
    params = [p.detach().clone().requires_grad_() for p in start]
    opt = first(params)
    _train(opt, params, torch.Generator().manual_seed(28), 3)
    copies = [p.detach().clone().requires_grad_() for p in params]
    other = second(copies)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch's loader keeps the tensors it is given
    for q in copies:
        s = other.state[q]["step"]
        assert s.dtype == torch.float32 and s.dim() == 0 and s.item() == 3
    _train(opt, params, torch.Generator().manual_seed(29), 2)
    _train(other, copies, torch.Generator().manual_seed(29), 2)
    for a, e in zip(copies, params):
        assert_param(a.detach(), e.detach(), direction)
    assert all(other.state[q]["step"].item() == 5 for q in copies)


# ----- CUDA only: placement and graph capture -----------------------------------------------------------


@cuda_only
def test_step_counts_live_on_the_device():
    gen = torch.Generator().manual_seed(30)
    params = make_params(gen, "cuda")
    opt = lo.NAdam(params, backend="triton")
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).cuda()
    opt.step()
    for p in params:
        assert opt.state[p]["step"].device == p.device and opt.state[p]["mu_product"].device == p.device
    torch_opt = torch.optim.NAdam([p.detach().clone().requires_grad_() for p in params], capturable=True)
    torch_opt.load_state_dict(opt.state_dict())
    loaded = lo.NAdam([p.detach().clone().requires_grad_() for p in params], backend="triton")
    loaded.load_state_dict(torch_opt.state_dict())
    assert all(s["step"].device.type == "cuda" for s in loaded.state.values())
    plain = lo.NAdam([p.detach().clone().requires_grad_() for p in params], backend="foreach")
    plain.load_state_dict(opt.state_dict())
    assert all(s["step"].device.type == "cpu" and s["mu_product"].device.type == "cpu" for s in plain.state.values())


@cuda_only
@pytest.mark.parametrize("name", ["adamw", "nadam", "radam", "sgd"])
def test_step_is_captured_by_a_cuda_graph(name, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    hyper = {"name": name, "lr": 1e-2, **({"momentum": 0.9} if name == "sgd" else {})}
    gen = torch.Generator().manual_seed(31)
    start = [torch.randn(s, generator=gen) for s in ((4096,), (33, 65), (7,))]
    grads = [[torch.randn(t.shape, generator=gen).cuda() for t in start] for _ in range(6)]

    # Eager: 6 steps.
    eager = [t.cuda().requires_grad_() for t in start]
    eager_opt = lo.create_optimizer(hyper, eager, backend="triton")
    for gs in grads:
        for p, g in zip(eager, gs):
            p.grad = g.clone()
        eager_opt.step()

    params = [t.cuda().requires_grad_() for t in start]
    opt = lo.create_optimizer(hyper, params, backend="triton")
    _captured_run(opt, params, grads)
    for a, e in zip(params, eager):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
    assert all(opt.state[p]["step"].item() == 6 for p in params)


def _captured_run(opt, params, grads, after_step=lambda: None, warmup=3):
    """``warmup`` eager steps on a side stream (state, table cache, compiled kernels), then
    one captured step replayed for the remaining grads, copied into static ``.grad``s;
    ``after_step()`` after every step (e.g. a scheduler)."""
    for p in params:
        p.grad = torch.zeros_like(p)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for gs in grads[:warmup]:
            for p, g in zip(params, gs):
                p.grad.copy_(g)
            opt.step()
            after_step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for gs in grads[warmup:]:
        for p, g in zip(params, gs):
            p.grad.copy_(g)
        graph.replay()
        after_step()
    torch.cuda.synchronize()


@cuda_only
@pytest.mark.parametrize("name", ["adamw", "lion", "coupled_adam"])
def test_captured_step_follows_a_tensor_lr_schedule(name, monkeypatch):
    """lr as a 0-d CUDA tensor, changed by a cosine schedule between replays: the replayed
    graph reads the new value each time and equals the eager run with the same schedule."""
    from lightning_optim.schedules import build_scheduler

    monkeypatch.delenv("TRITON_INTERPRET")
    gen = torch.Generator().manual_seed(32)
    start = [torch.randn(s, generator=gen) for s in ((4096,), (33, 65), (7,))]
    grads = [[torch.randn(t.shape, generator=gen).cuda() for t in start] for _ in range(8)]

    def build(params):
        groups = ([{"params": params[1:2], "coupled": True}, {"params": params[:1] + params[2:]}]
                  if name == "coupled_adam" else params)
        opt = lo.create_optimizer({"name": name, "lr": 1e-2}, groups, backend="triton")
        for group in opt.param_groups:
            group["lr"] = torch.tensor(group["lr"], device="cuda")
        return opt, build_scheduler(opt, "cosine", warmup_steps=2, total_steps=8)

    eager = [t.cuda().requires_grad_() for t in start]
    eager_opt, eager_sched = build(eager)
    for gs in grads:
        for p, g in zip(eager, gs):
            p.grad = g.clone()
        eager_opt.step()
        eager_sched.step()

    params = [t.cuda().requires_grad_() for t in start]
    opt, sched = build(params)
    _captured_run(opt, params, grads, after_step=sched.step)
    for a, e in zip(params, eager):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
