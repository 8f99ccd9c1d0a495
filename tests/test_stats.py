"""MomentStats: every statistic against a float64 computation written here, the coupled-row
semantics, torch.optim optimizers, selection and its errors, embedding geometry, bounded drift
memory, and that nothing syncs with the host."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import lightning_optim as lo
from lightning_optim.stats import EMBEDDING_STATS, STATS, MomentStats

raises = functools.partial(pytest.raises, ValueError)
TOL = 1e-5


def close(actual: torch.Tensor, expected: float, tol: float = TOL) -> None:
    assert actual.dim() == 0, actual.shape
    a, e = actual.double().item(), float(expected)
    assert math.isclose(a, e, rel_tol=tol, abs_tol=tol * 1e-3), f"{a!r} != {e!r}"


def grads(shape: tuple[int, ...], n: int, *, zero_col: bool = False) -> list[torch.Tensor]:
    gs = [torch.randn(shape, dtype=torch.float64) for _ in range(n)]
    if zero_col:
        for g in gs:
            g[..., 0] = 0.0  # these coordinates never see a gradient: v stays 0 there
    return gs


def two_groups(opt_cls, **kw):
    w = torch.nn.Parameter(torch.randn(6, 5))
    b = torch.nn.Parameter(torch.randn(5))
    opt = opt_cls(
        [{"name": "decay", "params": [w], "param_names": ["fc.weight"]},
         {"name": "no_decay", "params": [b], "param_names": ["fc.bias"], "weight_decay": 0.0}],
        **kw,
    )
    return opt, {"fc.weight": w, "fc.bias": b}


class Ema:
    """Adam's moments in float64, from the gradients the test feeds."""

    def __init__(self, b1: float, b2: float, coupled: bool = False) -> None:
        self.b1, self.b2, self.coupled, self.t = b1, b2, coupled, 0
        self.m = self.v = 0.0

    def update(self, g: torch.Tensor) -> None:
        self.t += 1
        g2 = g.square().mean(0, keepdim=True) if self.coupled else g.square()
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g2

    def hats(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.m / (1 - self.b1 ** self.t), self.v / (1 - self.b2 ** self.t)


def expected_moments(m_hat, v_hat, eps):
    s = v_hat.sqrt()
    return {
        "exp_avg_norm": m_hat.norm(),
        "sqrt_v_mean": s.mean(),
        "sqrt_v_max": s.max(),
        "snr": (m_hat.abs() / (s + eps)).mean(),
        "dead_fraction": (s < eps).double().mean(),
    }


def step_and_stats(opt, params, gs, stats, t):
    before = {n: p.detach().double().clone() for n, p in params.items()}
    for n, p in params.items():
        p.grad = gs[n][t].to(p.dtype)
    stats.before_step()
    opt.step()
    out = stats.after_step()
    return before, out


def test_stat_names():
    assert STATS == ("grad_norm", "param_norm", "update_ratio", "exp_avg_norm", "sqrt_v_mean",
                     "sqrt_v_max", "v_drift", "v_log_ratio", "snr", "dead_fraction")
    assert EMBEDDING_STATS == ("mean_norm", "mean_ratio", "isotropy")


def test_adamw_all_stats_and_drift():
    opt, params = two_groups(lo.AdamW, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    gs = {"fc.weight": grads((6, 5), 2, zero_col=True), "fc.bias": grads((5,), 2)}
    emas = {n: Ema(0.9, 0.99) for n in params}
    stats = MomentStats(opt)
    assert [n for n, _, _ in stats.tracked()] == ["fc.weight", "fc.bias"]
    prev_v = {}
    for t in range(2):
        before, out = step_and_stats(opt, params, gs, stats, t)
        for n, p in params.items():
            emas[n].update(gs[n][t])
            m_hat, v_hat = emas[n].hats()
            exp = expected_moments(m_hat, v_hat, 1e-8)
            exp["grad_norm"] = gs[n][t].norm()
            exp["param_norm"] = p.detach().double().norm()
            exp["update_ratio"] = (p.detach().double() - before[n]).norm() / before[n].norm()
            if t == 1:
                exp["v_drift"] = (v_hat - prev_v[n]).norm() / prev_v[n].norm()
                exp["v_log_ratio"] = torch.log(v_hat.mean() / prev_v[n].mean())
            for s in STATS:
                key = f"optim/{s}/{n}"
                if s in exp:
                    close(out[key], exp[s])
                    assert out[key].dtype == torch.float32 and out[key].device == p.device
                else:
                    assert key not in out, key  # drift: absent the first time
            prev_v[n] = v_hat
    # The zero column of fc.weight: sqrt(v_hat) = 0 < eps on 6 of 30 coordinates.
    close(out["optim/dead_fraction/fc.weight"], 0.2)
    close(out["optim/dead_fraction/fc.bias"], 0.0)
    assert list(out) == [f"optim/{s}/{n}" for s in STATS for n in params]  # stat-major order


def test_grad_norm_is_taken_before_clipping_and_snapshot_is_freed():
    opt, params = two_groups(lo.AdamW, lr=1e-2)
    stats = MomentStats(opt, stats=("grad_norm", "update_ratio"))
    for p in params.values():
        p.grad = torch.full_like(p, 10.0)
    stats.before_step()
    assert stats._snapshots
    torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
    opt.step()
    out = stats.after_step()
    close(out["optim/grad_norm/fc.weight"], 10.0 * math.sqrt(30))
    assert not stats._snapshots
    # Without before_step: the gradient as it is now (clipped), and no update ratio.
    out = stats.after_step()
    assert set(out) == {"optim/grad_norm/fc.weight", "optim/grad_norm/fc.bias"}
    close(out["optim/grad_norm/fc.weight"], math.sqrt(30 / 35), 1e-4)  # clipped to total norm 1
    stats.before_step(update_ratio=False)
    assert not stats._snapshots


def test_bias_correction_off_and_defaults():
    opt, params = two_groups(lo.AdamW, lr=1e-2, betas=(0.8, 0.9), bias_correction=False)
    g = grads((6, 5), 1)[0]
    params["fc.weight"].grad = g.float()
    opt.step()
    out = MomentStats(opt, stats=("exp_avg_norm", "sqrt_v_max")).after_step()
    close(out["optim/exp_avg_norm/fc.weight"], (0.2 * g).norm())
    close(out["optim/sqrt_v_max/fc.weight"], (0.1 * g.square()).sqrt().max())
    assert "optim/exp_avg_norm/fc.bias" not in out  # no gradient yet: no state, no stats


def test_coupled_adam_shared_row():
    E = torch.nn.Parameter(torch.randn(7, 4))
    W = torch.nn.Parameter(torch.randn(4, 3))
    opt = lo.CoupledAdam(
        [{"name": "embedding", "params": [E], "param_names": ["tok.weight"], "coupled": True,
          "weight_decay": 0.0},
         {"name": "decay", "params": [W], "param_names": ["head.weight"]}],
        lr=1e-2, betas=(0.9, 0.95), eps=1e-6,
    )
    gE = grads((7, 4), 2, zero_col=True)
    ema = Ema(0.9, 0.95, coupled=True)
    stats = MomentStats(opt)
    prev = None
    for t in range(2):
        E.grad, W.grad = gE[t].float(), torch.randn(4, 3)
        stats.before_step()
        opt.step()
        out = stats.after_step()
        ema.update(gE[t])
        m_hat, v_hat = ema.hats()
        assert v_hat.shape == (1, 4) == opt.state[E]["exp_avg_sq"].shape
        exp = expected_moments(m_hat, v_hat, 1e-6)  # snr broadcasts the row over the 7 rows
        for s, value in exp.items():
            close(out[f"optim/{s}/tok.weight"], value)
        close(out["optim/dead_fraction/tok.weight"], 0.25)  # 1 of the H = 4 shared values
        if prev is not None:
            close(out["optim/v_drift/tok.weight"], (v_hat - prev).norm() / prev.norm())
            close(out["optim/v_log_ratio/tok.weight"], math.log(v_hat.mean() / prev.mean()))
        prev = v_hat
    assert stats.sqrt_v()["tok.weight"].shape == (1, 4)
    torch.testing.assert_close(stats.sqrt_v()["tok.weight"].double(), v_hat.sqrt(), rtol=TOL, atol=0)


def test_coupling_scale_enters_snr_only():
    E = torch.nn.Parameter(torch.randn(5, 3))
    opt = lo.CoupledAdam([{"params": [E], "coupled": True, "coupling_scale": 4.0}], lr=1e-2, eps=1e-3)
    g = grads((5, 3), 1)[0]
    E.grad = g.float()
    opt.step()
    out = MomentStats(opt, stats=("snr", "sqrt_v_mean")).after_step()
    ema = Ema(0.9, 0.999, coupled=True)
    ema.update(g)
    m_hat, v_hat = ema.hats()
    close(out["optim/sqrt_v_mean/group0.0"], v_hat.sqrt().mean())
    close(out["optim/snr/group0.0"], (m_hat.abs() / ((4.0 * v_hat).sqrt() + 1e-3)).mean())


def test_torch_adamw_named_params():
    model = torch.nn.Linear(5, 3)
    opt = torch.optim.AdamW(model.named_parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-7)
    assert [n for n, _, _ in MomentStats(opt, include="w*").tracked()] == ["weight"]
    names = [n for n, _, _ in MomentStats(opt).tracked()]
    assert names == ["weight", "bias"]
    params = dict(model.named_parameters())
    gs = {n: grads(p.shape, 2) for n, p in params.items()}
    emas = {n: Ema(0.9, 0.99) for n in params}
    stats = MomentStats(opt)
    for t in range(2):
        before, out = step_and_stats(opt, params, gs, stats, t)
        for n in params:
            emas[n].update(gs[n][t])
        for n, p in params.items():
            m_hat, v_hat = emas[n].hats()
            for s, value in expected_moments(m_hat, v_hat, 1e-7).items():
                close(out[f"optim/{s}/{n}"], value)
            close(out[f"optim/update_ratio/{n}"], (p.detach().double() - before[n]).norm() / before[n].norm())
    assert "optim/v_drift/weight" in out


def test_torch_sgd_momentum_has_no_v_stats():
    w = torch.nn.Parameter(torch.randn(4, 4))
    b = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.SGD([w, b], lr=0.1, momentum=0.9)
    stats = MomentStats(opt)
    assert [n for n, _, _ in stats.tracked()] == ["group0.0", "group0.1"]
    gs = {"group0.0": grads((4, 4), 2), "group0.1": grads((4,), 2)}
    params = {"group0.0": w, "group0.1": b}
    for t in range(2):
        before, out = step_and_stats(opt, params, gs, stats, t)
    for n, p in params.items():
        buf = 0.9 * gs[n][0] + gs[n][1]
        close(out[f"optim/exp_avg_norm/{n}"], buf.norm())
        close(out[f"optim/grad_norm/{n}"], gs[n][1].norm())
        close(out[f"optim/update_ratio/{n}"], (p.detach().double() - before[n]).norm() / before[n].norm())
        for s in ("sqrt_v_mean", "sqrt_v_max", "v_drift", "v_log_ratio", "snr", "dead_fraction"):
            assert f"optim/{s}/{n}" not in out
    assert stats.sqrt_v() == {} and stats.reference_bytes() == 0


def test_lightning_sgd_rmsprop_adagrad_lion():
    g = grads((3, 4), 1)[0]

    def run(opt_cls, **kw):
        p = torch.nn.Parameter(torch.randn(3, 4))
        opt = opt_cls([{"name": "g", "params": [p]}], **kw)
        p.grad = g.float()
        opt.step()
        return MomentStats(opt).after_step()

    out = run(lo.SGD, lr=0.1, momentum=0.9)
    close(out["optim/exp_avg_norm/g.0"], g.norm())
    assert "optim/sqrt_v_mean/g.0" not in out
    out = run(lo.RMSprop, lr=0.1, alpha=0.9, momentum=0.5)
    s = (0.1 * g.square()).sqrt()
    close(out["optim/sqrt_v_mean/g.0"], s.mean())
    close(out["optim/sqrt_v_max/g.0"], s.max())
    assert "optim/exp_avg_norm/g.0" not in out and "optim/snr/g.0" not in out  # its buffer is not m
    out = run(lo.Adagrad, lr=0.1, initial_accumulator_value=0.5)
    close(out["optim/sqrt_v_mean/g.0"], (0.5 + g.square()).sqrt().mean())
    out = run(lo.Lion, lr=0.1, betas=(0.9, 0.99))
    close(out["optim/exp_avg_norm/g.0"], (0.01 * g).norm())  # Lion's m: no bias correction


def test_bf16_params_are_reduced_in_fp32():
    opt, params = two_groups(lo.AdamW, lr=1e-2)
    for p in params.values():
        p.data = p.data.bfloat16()
    gs = {n: grads(p.shape, 1) for n, p in params.items()}
    stats = MomentStats(opt)
    _, out = step_and_stats(opt, params, gs, stats, 0)
    assert all(v.dtype == torch.float32 for v in out.values())
    g_bf16 = gs["fc.weight"][0].bfloat16().double()
    close(out["optim/grad_norm/fc.weight"], g_bf16.norm())
    ema = Ema(0.9, 0.999)
    ema.update(g_bf16)
    m_hat, v_hat = ema.hats()
    close(out["optim/sqrt_v_mean/fc.weight"], v_hat.sqrt().mean())


def test_include_exclude_and_errors():
    opt, _ = two_groups(lo.AdamW, lr=1e-2)
    names = lambda s: [n for n, _, _ in s.tracked()]  # noqa: E731
    assert names(MomentStats(opt, include="*.bias")) == ["fc.bias"]
    assert names(MomentStats(opt, exclude=("*.bias",))) == ["fc.weight"]
    assert names(MomentStats(opt, include=("fc.*",), exclude="*.weight")) == ["fc.bias"]
    listed = r"matches no parameter; parameters: 'fc.weight', 'fc.bias'"
    with raises(match=r"MomentStats: include='emb\*' is invalid: " + listed):
        MomentStats(opt, include=("emb*",))
    with raises(match=r"exclude='\*.scale' is invalid: matches no parameter"):
        MomentStats(opt, exclude="*.scale")
    with raises(match=r"stats='grad_nrom' is invalid: must be one of .* \(did you mean 'grad_norm'"):
        MomentStats(opt, stats=("grad_nrom",))
    with raises(match=r"include=\(\) is invalid"):
        MomentStats(opt, include=())
    with raises(match=r"drift_max_elements=0 is invalid: must be >= 1"):
        MomentStats(opt, drift_max_elements=0)
    with raises(match=r"optimizer=.* is invalid: must be a torch.optim.Optimizer"):
        MomentStats(object())
    with raises(match=r"must be a 2-D tensor"):
        MomentStats(opt).embedding_stats({"e": torch.zeros(3)})
    out = MomentStats(opt, stats=("param_norm", "grad_norm")).after_step()
    assert set(out) == {"optim/param_norm/fc.weight", "optim/param_norm/fc.bias"}


def iso_float64(E: torch.Tensor) -> float:
    E = E.double()
    _, U = torch.linalg.eigh(E.T @ E)
    Z = torch.exp(E @ U).sum(0)
    return float(Z.min() / Z.max())


def test_embedding_stats():
    stats = MomentStats(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    row = torch.tensor([1.0, 2.0, 3.0, 4.0])
    X = torch.randn(20, 4)
    gauss = torch.randn(4000, 8)
    shift = torch.zeros(8)
    shift[3] = 10.0
    small = torch.randn(30, 5) * 0.7
    out = stats.embedding_stats({"equal": row.repeat(10, 1), "sym": torch.cat([X, -X]), "gauss": gauss,
                                 "shifted": gauss + shift, "small": small})
    assert set(out) == {f"embedding/{s}/{n}" for s in EMBEDDING_STATS
                        for n in ("equal", "sym", "gauss", "shifted", "small")}
    close(out["embedding/mean_ratio/equal"], 1.0)
    close(out["embedding/mean_norm/equal"], math.sqrt(30.0))
    assert abs(out["embedding/mean_norm/sym"].item()) < 1e-6
    assert abs(out["embedding/mean_ratio/sym"].item()) < 1e-6
    assert out["embedding/isotropy/gauss"].item() > 0.5
    assert out["embedding/isotropy/shifted"].item() < 0.1
    assert out["embedding/mean_ratio/shifted"].item() > 0.9
    close(out["embedding/isotropy/small"], iso_float64(small), 1e-4)
    mu = small.double().mean(0)
    close(out["embedding/mean_ratio/small"], mu.norm() / small.double().norm(dim=1).mean())
    cheap = stats.embedding_stats({"e": gauss}, isotropy=False)
    assert set(cheap) == {"embedding/mean_norm/e", "embedding/mean_ratio/e"}


def test_drift_subsample_is_deterministic_and_memory_bounded():
    def run():
        torch.manual_seed(1)
        w = torch.nn.Parameter(torch.randn(10, 10))
        b = torch.nn.Parameter(torch.randn(5))
        opt = torch.optim.Adam([w, b], lr=1e-2, betas=(0.9, 0.99))
        stats = MomentStats(opt, stats=("v_drift", "v_log_ratio"), drift_max_elements=7)
        gw = grads((10, 10), 4)
        outs, sizes = [], []
        ema = Ema(0.9, 0.99)
        hats = []
        for t in range(4):
            w.grad, b.grad = gw[t].float(), torch.randn(5)
            opt.step()
            outs.append(stats.after_step())
            sizes.append(stats.reference_bytes())
            ema.update(gw[t])
            hats.append(ema.hats()[1])
        return outs, sizes, hats

    outs, sizes, hats = run()
    outs2, _, _ = run()
    for a, b in zip(outs, outs2):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # One reference per tensor: 7 of w's 100 values, all 5 of b's, plus one mean each (fp32).
    assert sizes == [(7 + 5 + 2) * 4] * 4
    idx = torch.arange(0, 100, 100 // 7)[:7]
    for t in (1, 2, 3):
        cur, prev = hats[t].flatten()[idx], hats[t - 1].flatten()[idx]
        close(outs[t]["optim/v_drift/group0.0"], (cur - prev).norm() / prev.norm())
        close(outs[t]["optim/v_log_ratio/group0.0"], math.log(hats[t].mean() / hats[t - 1].mean()))


def test_state_dict_round_trip_keeps_drift_reference():
    opt, params = two_groups(lo.AdamW, lr=1e-2)
    gs = {n: grads(p.shape, 2) for n, p in params.items()}
    stats = MomentStats(opt, stats=("v_drift",))
    step_and_stats(opt, params, gs, stats, 0)
    fresh = MomentStats(opt, stats=("v_drift",))
    fresh.load_state_dict(stats.state_dict())
    assert fresh.reference_bytes() == stats.reference_bytes() > 0
    _, a = step_and_stats(opt, params, gs, fresh, 1)
    assert set(a) == {"optim/v_drift/fc.weight", "optim/v_drift/fc.bias"}


def _forbid(monkeypatch):
    def boom(self, *args, **kwargs):
        raise AssertionError("host sync: a tensor value was read by the host")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, boom)


def test_no_host_sync(monkeypatch):
    w = torch.nn.Parameter(torch.randn(6, 5))
    E = torch.nn.Parameter(torch.randn(9, 5))
    h = torch.nn.Parameter(torch.randn(5).bfloat16())
    optimizers = [
        lo.AdamW([{"name": "d", "params": [w, h]}], lr=1e-2),
        lo.CoupledAdam([{"name": "embedding", "params": [E], "coupled": True}], lr=1e-2),
        torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 3))], lr=1e-2),
        torch.optim.SGD([torch.nn.Parameter(torch.randn(3))], lr=0.1, momentum=0.9),
        lo.RMSprop([torch.nn.Parameter(torch.randn(4))], lr=0.1),
        lo.Adagrad([torch.nn.Parameter(torch.randn(4))], lr=0.1),
    ]
    for opt in optimizers:
        stats = MomentStats(opt, drift_max_elements=8)
        params = [p for _, p, _ in stats.tracked()]
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            with monkeypatch.context() as m:
                _forbid(m)
                stats.before_step()
            opt.step()  # the optimizer itself may read its CPU step counts
            with monkeypatch.context() as m:
                _forbid(m)
                out = stats.after_step()
                sqrt_v = stats.sqrt_v()
                emb = stats.embedding_stats({"E": E}) if opt is optimizers[1] else {}
        assert out and all(v.dim() == 0 for v in (*out.values(), *emb.values()))
        assert all(torch.isfinite(v).all() for v in sqrt_v.values())
    with pytest.raises(AssertionError, match="host sync"):  # the patch does bite
        with monkeypatch.context() as m:
            _forbid(m)
            torch.ones(1).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_device_sync_cuda():
    w = torch.nn.Parameter(torch.randn(64, 32, device="cuda"))
    E = torch.nn.Parameter(torch.randn(100, 32, device="cuda"))
    opt = lo.CoupledAdam([{"name": "embedding", "params": [E], "coupled": True},
                          {"name": "decay", "params": [w]}], lr=1e-2)
    stats = MomentStats(opt, drift_max_elements=100)
    for _ in range(3):
        for p in (w, E):
            p.grad = torch.randn_like(p)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            stats.before_step()
            torch.cuda.set_sync_debug_mode(0)
            opt.step()
            torch.cuda.set_sync_debug_mode("error")
            out = stats.after_step()
            stats.sqrt_v()
            stats.embedding_stats({"E": E}, isotropy=False)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert all(v.is_cuda for v in out.values())


def test_update_ratio_of_a_tensor_starting_at_zero_is_finite():
    """A zero-initialized bias: relative to where it ended (1.0 after one step), 0 if unmoved."""
    import lightning_optim as lo
    from lightning_optim.stats import MomentStats

    moving, still = torch.zeros(4, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = lo.SGD([{"params": [moving, still], "param_names": ["moving", "still"], "name": "g"}], lr=0.1)
    moving.grad, still.grad = torch.ones(4), torch.zeros(3)
    stats = MomentStats(opt, stats=("update_ratio",))
    stats.before_step()
    opt.step()
    out = stats.after_step()
    assert out["optim/update_ratio/moving"].item() == pytest.approx(1.0)
    assert out["optim/update_ratio/still"].item() == 0.0
