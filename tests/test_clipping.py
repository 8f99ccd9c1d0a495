"""Gradient clipping: the same bits as torch's clip_grad_norm_ / clip_grad_value_, per-group
thresholds, the non-finite guard and its counters, validation, and no host sync in clip_."""

from __future__ import annotations

import copy
import math
import re
import types

import pytest
import torch
from torch import nn

from lightning_optim.clipping import ClipReport, GradientClipper, NonFiniteGradientError

INF = float("inf")
NORM_TYPES = [1.0, 2.0, 3.5, INF]


def _param(shape, scale=1.0, dtype=torch.float32, grad=True) -> nn.Parameter:
    p = nn.Parameter(torch.randn(shape).to(dtype))
    if grad:
        p.grad = (torch.randn(shape) * scale).to(dtype)
    return p


def _groups(dtype_b=torch.float32) -> list[dict]:
    """Four groups of different scale; the last one unnamed (so called 'group3')."""
    return [
        {"name": "embedding", "params": [_param((50, 8), 3.0), _param((10, 8), 3.0)]},
        {"name": "decay", "params": [_param((8, 8), 0.5, dtype_b), _param((4, 8), 0.5)]},
        {"name": "no_decay", "params": [_param(8, 0.1), _param(4, 0.1, dtype_b)]},
        {"params": [_param((3, 5), 0.2)]},
    ]


def _sgd(groups) -> torch.optim.SGD:
    return torch.optim.SGD(groups, lr=0.1)


def _twins(dtype_b=torch.float32):
    """An optimizer on fresh groups, and an identical deep copy of them for torch's functions."""
    groups = _groups(dtype_b)
    ref = copy.deepcopy(groups)  # deepcopy leaves .grad behind
    for p, r in zip(_params(groups), _params(ref)):
        r.grad = None if p.grad is None else p.grad.clone()
    return _sgd(groups), groups, ref


def _params(groups, *which):
    return [p for i, g in enumerate(groups) if not which or i in which for p in g["params"]]


def _assert_same_grads(groups, ref):
    for a, b in zip(_params(groups), _params(ref)):
        if b.grad is None:
            assert a.grad is None
        else:
            assert a.grad.dtype == b.grad.dtype
            assert torch.equal(a.grad, b.grad), (a.grad - b.grad).abs().max()


NAMES = ["embedding", "decay", "no_decay", "group3"]


# ----- match torch exactly ------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("ratio", [0.3, 3.0])  # threshold below / above the total norm
@pytest.mark.parametrize("dtype_b", [torch.float32, torch.bfloat16])
def test_norm_mode_matches_clip_grad_norm(norm_type, ratio, dtype_b):
    opt, groups, ref = _twins(dtype_b)
    norm = torch.nn.utils.get_total_norm([p.grad for p in _params(ref)], norm_type)
    max_norm = ratio * float(norm)
    expected_total = torch.nn.utils.clip_grad_norm_(_params(ref), max_norm, norm_type)

    report = GradientClipper("norm", max_norm=max_norm, norm_type=norm_type).clip_(opt)

    _assert_same_grads(groups, ref)
    assert torch.equal(report.total_norm, expected_total)
    assert report.total_norm.shape == () and report.finite.dtype == torch.bool and bool(report.finite)
    assert list(report.clipped) == NAMES == list(report.group_norms)
    assert all(bool(c) == (ratio < 1) for c in report.clipped.values())
    # The clipped norm is the threshold (up to the 1e-6 of the formula and rounding).
    if ratio < 1:
        after = torch.nn.utils.get_total_norm([p.grad for p in _params(groups)], norm_type)
        assert after.item() == pytest.approx(max_norm, rel=1e-2 if dtype_b == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("max_value", [0.05, 0.7, 100.0])
@pytest.mark.parametrize("dtype_b", [torch.float32, torch.bfloat16])
def test_value_mode_matches_clip_grad_value(max_value, dtype_b):
    opt, groups, ref = _twins(dtype_b)
    expected_flags = [any(p.grad.abs().max().item() > max_value for p in g["params"]) for g in ref]
    torch.nn.utils.clip_grad_value_(_params(ref), max_value)

    report = GradientClipper("value", max_value=max_value).clip_(opt)

    _assert_same_grads(groups, ref)
    assert [bool(report.clipped[n]) for n in NAMES] == expected_flags
    assert any(expected_flags) == (max_value < 100.0)
    # Within the bound as the grad's dtype rounds it (0.05 is a little above 0.05 in fp32 and bf16).
    assert all(p.grad.abs().max() <= torch.tensor(max_value, dtype=p.grad.dtype) for p in _params(groups))


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_report_norms_in_every_mode_equal_torchs(norm_type):
    for mode, kw in (("none", {}), ("value", {"max_value": 0.5}), ("norm", {"max_norm": 1.0})):
        opt, groups, ref = _twins(torch.bfloat16)
        report = GradientClipper(mode, norm_type=norm_type, **kw).clip_(opt)
        all_grads = [p.grad for p in _params(ref)]
        assert torch.equal(report.total_norm, torch.nn.utils.get_total_norm(all_grads, norm_type)), mode
        for i, name in enumerate(NAMES):
            expected = torch.nn.utils.get_total_norm([p.grad for p in ref[i]["params"]], norm_type)
            assert torch.equal(report.group_norms[name], expected), (mode, name)
        if mode == "none":
            _assert_same_grads(groups, ref)
            assert not any(bool(c) for c in report.clipped.values())


def test_norm_of_the_global_group_is_the_p_norm_of_all_entries():
    opt, groups, _ = _twins()
    flat = torch.cat([p.grad.flatten() for p in _params(groups)])
    for p in (1.0, 2.0, 3.5, INF):
        report = GradientClipper(norm_type=p).clip_(opt)
        assert report.total_norm.item() == pytest.approx(torch.linalg.vector_norm(flat, p).item(), rel=1e-6)


# ----- per group ------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", [2.0, INF])
def test_per_group_norm_thresholds_apply_per_group(norm_type):
    opt, groups, ref = _twins()
    norms = {n: torch.nn.utils.get_total_norm([p.grad for p in ref[i]["params"]], norm_type).item()
             for i, n in enumerate(NAMES)}
    emb_t = norms["embedding"] / 4  # clips
    decay_t = norms["decay"] * 2  # does not clip
    rest = torch.nn.utils.get_total_norm([p.grad for p in _params(ref, 2, 3)], norm_type).item()
    max_norm = rest / 3  # the other two groups, clipped by their joint norm
    torch.nn.utils.clip_grad_norm_(_params(ref, 0), emb_t, norm_type)
    torch.nn.utils.clip_grad_norm_(_params(ref, 1), decay_t, norm_type)
    torch.nn.utils.clip_grad_norm_(_params(ref, 2, 3), max_norm, norm_type)

    clipper = GradientClipper("norm", max_norm=max_norm, norm_type=norm_type,
                              per_group={"embedding": emb_t, "decay": decay_t})
    report = clipper.clip_(opt)

    _assert_same_grads(groups, ref)
    assert {n: bool(c) for n, c in report.clipped.items()} == {
        "embedding": True, "decay": False, "no_decay": True, "group3": True}
    assert {n: v.item() for n, v in report.group_norms.items()} == pytest.approx(norms, rel=1e-6)
    # Each listed group is at its own threshold now, the rest jointly at max_norm.
    after = lambda *i: torch.nn.utils.get_total_norm([p.grad for p in _params(groups, *i)], norm_type).item()
    assert after(0) == pytest.approx(emb_t, rel=1e-5)
    assert after(1) == pytest.approx(norms["decay"], rel=1e-7)
    assert after(2, 3) == pytest.approx(max_norm, rel=1e-5)


def test_per_group_without_global_threshold_leaves_the_others_alone():
    opt, groups, ref = _twins()
    t = torch.nn.utils.get_total_norm([p.grad for p in _params(ref, 0)]).item() / 2
    torch.nn.utils.clip_grad_norm_(_params(ref, 0), t)
    report = GradientClipper("norm", per_group=types.MappingProxyType({"embedding": t})).clip_(opt)
    _assert_same_grads(groups, ref)
    assert [bool(report.clipped[n]) for n in NAMES] == [True, False, False, False]


def test_per_group_value_bounds_apply_per_group():
    opt, groups, ref = _twins()
    torch.nn.utils.clip_grad_value_(_params(ref, 0), 1.0)
    torch.nn.utils.clip_grad_value_(_params(ref, 2), 0.01)
    torch.nn.utils.clip_grad_value_(_params(ref, 1, 3), 0.3)
    clipper = GradientClipper("value", max_value=0.3, per_group={"embedding": 1.0, "no_decay": 0.01})
    report = clipper.clip_(opt)
    _assert_same_grads(groups, ref)
    assert all(bool(c) for c in report.clipped.values())
    assert _params(groups, 2)[0].grad.abs().max().item() == pytest.approx(0.01)


def test_a_zero_group_clipped_jointly_is_not_flagged():
    opt, groups, _ = _twins()
    for p in _params(groups, 2):
        p.grad.zero_()
    report = GradientClipper("norm", max_norm=1e-3, per_group={"embedding": 1.0}).clip_(opt)
    assert {n: bool(c) for n, c in report.clipped.items()} == {
        "embedding": True, "decay": True, "no_decay": False, "group3": True}
    assert report.group_norms["no_decay"].item() == 0.0


def test_value_flag_is_false_when_the_grad_sits_exactly_on_the_bound():
    p = _param(4, dtype=torch.bfloat16)
    bound = 0.3  # not a bf16 number: the clamp and the flag both round it to bf16
    p.grad = torch.tensor([bf := torch.tensor(bound, dtype=torch.bfloat16).item(), -bf, 0.0, 0.1],
                          dtype=torch.bfloat16)
    before = p.grad.clone()
    report = GradientClipper("value", max_value=bound).clip_(_sgd([p]))
    assert torch.equal(p.grad, before) and not bool(report.clipped["group0"])
    p.grad[0] = 0.31
    report = GradientClipper("value", max_value=bound).clip_(_sgd([p]))
    assert bool(report.clipped["group0"]) and p.grad[0].item() == bf


# ----- gradients that are None, mixed dtypes ----------------------------------------------------


def test_none_grads_are_ignored_and_an_empty_group_reports_zero():
    a, b = _param((5, 3)), _param(3, grad=False)
    c = _param(7, grad=False)
    opt = _sgd([{"name": "w", "params": [a, b]}, {"name": "frozen_now", "params": [c]}])
    r = a.grad.clone()
    norm = torch.linalg.vector_norm(r)
    report = GradientClipper("norm", max_norm=0.1).clip_(opt)
    assert b.grad is None and c.grad is None
    assert torch.equal(report.total_norm, torch.nn.utils.get_total_norm([r]))
    assert report.group_norms["frozen_now"].item() == 0.0
    assert not bool(report.clipped["frozen_now"]) and bool(report.clipped["w"])
    assert torch.allclose(a.grad, r * (0.1 / (norm + 1e-6)))


def test_no_grads_at_all():
    opt = _sgd([_param(3, grad=False)])
    for mode, kw in (("none", {}), ("norm", {"max_norm": 1.0}), ("value", {"max_value": 1.0})):
        clipper = GradientClipper(mode, **kw)
        report = clipper.clip_(opt)
        assert report.total_norm.item() == 0.0 and bool(report.finite)
        assert not clipper.should_skip(report) and clipper.clipped_steps == 0


def test_mixed_dtypes_keep_each_grads_dtype():
    opt, groups, ref = _twins(torch.bfloat16)
    dtypes = [p.grad.dtype for p in _params(groups)]
    assert torch.bfloat16 in dtypes and torch.float32 in dtypes
    torch.nn.utils.clip_grad_norm_(_params(ref), 0.5)
    report = GradientClipper("norm", max_norm=0.5).clip_(opt)
    assert [p.grad.dtype for p in _params(groups)] == dtypes
    assert report.total_norm.dtype == torch.float32
    _assert_same_grads(groups, ref)


# ----- the non-finite guard -------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), INF, -INF])
@pytest.mark.parametrize("mode", ["none", "value", "norm"])
@pytest.mark.parametrize("norm_type", [2.0, INF])
def test_non_finite_grad_is_reported_and_skipped(bad, mode, norm_type):
    opt, groups, _ = _twins()
    groups[1]["params"][0].grad[2, 3] = bad
    kw = {"norm": {"max_norm": 1e-3}, "value": {"max_value": 1e-3}, "none": {}}[mode]
    clipper = GradientClipper(mode, norm_type=norm_type, **kw)
    before = [p.grad.clone() for p in _params(groups)]
    report = clipper.clip_(opt)
    assert not bool(report.finite)
    assert not math.isfinite(report.group_norms["decay"].item())
    assert math.isfinite(report.group_norms["embedding"].item())
    if mode == "norm":  # a NaN/inf norm must not scale the grads into NaN or zeros
        assert all(torch.equal(a, b) or torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in
                   zip((p.grad for p in _params(groups)), before))
    assert clipper.should_skip(report) is True
    assert (clipper.skipped_steps, clipper.consecutive_skips, clipper.clipped_steps) == (1, 1, 0)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, INF])
@pytest.mark.parametrize(("size", "skipped"), [(1e30, True), (1e18, False)])
def test_unclipped_grads_whose_squares_overflow_are_skipped_whatever_the_norm(norm_type, size, skipped):
    """mode="none": 1e30 is finite, but its square is inf in fp32 and would make Adam's v inf
    for good; the 1- and inf-norms do not overflow, so the guard checks the 2-norm as well."""
    opt, groups, _ = _twins()
    groups[1]["params"][0].grad[2, 3] = size
    clipper = GradientClipper("none", norm_type=norm_type)
    report = clipper.clip_(opt)
    assert math.isfinite(report.total_norm.item()) is (norm_type != 2.0 or not skipped)
    assert clipper.should_skip(report) is skipped


def test_a_finite_step_resets_consecutive_skips():
    clipper = GradientClipper("norm", max_norm=1e-3, max_consecutive_skips=3)
    for step in range(8):
        opt, groups, _ = _twins()
        if step in (0, 1, 3, 4, 5):
            groups[0]["params"][1].grad[0, 0] = float("nan")
        skip = clipper.should_skip(clipper.clip_(opt))
        assert skip == (step in (0, 1, 3, 4, 5))
    assert (clipper.skipped_steps, clipper.consecutive_skips, clipper.clipped_steps) == (5, 0, 3)


def test_raises_after_max_consecutive_skips():
    clipper = GradientClipper("norm", max_norm=1.0, max_consecutive_skips=2)
    opt, groups, _ = _twins()
    groups[0]["params"][0].grad[1, 1] = INF
    groups[3]["params"][0].grad[0, 0] = float("nan")
    assert clipper.should_skip(clipper.clip_(opt))
    assert clipper.should_skip(clipper.clip_(opt))
    message = ("clipping: non-finite gradients in 3 consecutive steps, more than max_consecutive_skips=2; "
               "groups with a non-finite 2-norm: 'embedding', 'group3'. Training has diverged")
    with pytest.raises(NonFiniteGradientError, match="^" + re.escape(message)):
        clipper.should_skip(clipper.clip_(opt))
    assert issubclass(NonFiniteGradientError, RuntimeError)
    assert (clipper.skipped_steps, clipper.consecutive_skips) == (2, 2)


def test_skip_nonfinite_false_never_skips():
    clipper = GradientClipper("norm", max_norm=1.0, skip_nonfinite=False, max_consecutive_skips=1)
    for _ in range(5):
        opt, groups, _ = _twins()
        groups[2]["params"][0].grad[0] = float("nan")
        report = clipper.clip_(opt)
        assert not bool(report.finite)
        assert clipper.should_skip(report) is False
    assert (clipper.skipped_steps, clipper.consecutive_skips) == (0, 0)


def test_clipped_steps_counts_steps_where_any_group_clipped():
    opt, groups, _ = _twins()
    emb = torch.nn.utils.get_total_norm([p.grad for p in _params(groups, 0)]).item()
    clipper = GradientClipper("norm", per_group={"embedding": emb * 2})
    assert not clipper.should_skip(clipper.clip_(opt)) and clipper.clipped_steps == 0
    for p in _params(groups, 0):
        p.grad *= 10
    assert not clipper.should_skip(clipper.clip_(opt)) and clipper.clipped_steps == 1


def test_should_skip_reads_the_device_once(monkeypatch):
    opt, _, _ = _twins()
    clipper = GradientClipper("norm", max_norm=0.1)
    report = clipper.clip_(opt)
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.shape) or real(self))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("item() in should_skip"))
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: pytest.fail("bool() in should_skip"))
    assert clipper.should_skip(report) is False
    assert reads == [torch.Size([1 + len(NAMES)])] and clipper.clipped_steps == 1


# ----- no host sync in clip_ ------------------------------------------------------------------


def _forbid(*_args, **_kwargs):
    raise AssertionError("host sync inside clip_")


@pytest.mark.parametrize("mode,kw", [
    ("none", {}),
    ("norm", {"max_norm": 0.5}),
    ("norm", {"max_norm": 0.5, "norm_type": INF, "per_group": {"embedding": 0.1}}),
    ("value", {"max_value": 0.1}),
    ("value", {"max_value": 0.1, "norm_type": 1.0, "per_group": {"decay": 0.2}}),
])
def test_clip_does_not_sync_with_the_host(monkeypatch, mode, kw):
    opt, groups, _ = _twins(torch.bfloat16)
    groups[2]["params"][0].grad[0] = float("nan")  # the non-finite path must not sync either
    clipper = GradientClipper(mode, **kw)
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"):
            m.setattr(torch.Tensor, name, _forbid)
        report = clipper.clip_(opt)
    assert isinstance(report, ClipReport) and not bool(report.finite)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_clip_does_not_sync_on_cuda():
    opt = _sgd([{**g, "params": [nn.Parameter(p.cuda()) for p in g["params"]]} for g in _groups()])
    for p in _params(opt.param_groups):
        p.grad = torch.randn_like(p, dtype=torch.bfloat16 if p.dim() == 1 else torch.float32)
    clipper = GradientClipper("norm", max_norm=0.5, per_group={"embedding": 0.1})
    torch.cuda.set_sync_debug_mode("error")
    try:
        report = clipper.clip_(opt)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert report.total_norm.is_cuda and not clipper.should_skip(report)


# ----- state ------------------------------------------------------------------------------------


def test_state_dict_round_trip_resumes_exactly():
    clipper = GradientClipper("norm", max_norm=1.0, max_consecutive_skips=3)
    opt, groups, _ = _twins()
    clipper.should_skip(clipper.clip_(opt))  # clips: the total norm is well above 1
    groups[0]["params"][0].grad[0, 0] = float("nan")
    for _ in range(2):
        assert clipper.should_skip(clipper.clip_(opt))
    state = clipper.state_dict()
    assert {k: state[k] for k in ("skipped_steps", "consecutive_skips", "clipped_steps")} == {
        "skipped_steps": 2, "consecutive_skips": 2, "clipped_steps": 1}
    # Per group: the first (finite) step clipped every group; skipped steps count for none.
    assert state["group_clipped_steps"] == {name: 1 for name in state["group_clipped_steps"]}
    assert len(state["group_clipped_steps"]) == len(opt.param_groups)

    resumed = GradientClipper("norm", max_norm=1.0, max_consecutive_skips=3)
    resumed.load_state_dict(copy.deepcopy(state))
    assert resumed.state_dict() == state
    assert resumed.should_skip(resumed.clip_(opt))  # the third in a row: still allowed
    with pytest.raises(NonFiniteGradientError, match="in 4 consecutive steps"):
        resumed.should_skip(resumed.clip_(opt))


@pytest.mark.parametrize("state,message", [
    ({"skipped_steps": 1, "consecutive_skips": 0}, r"state_dict=\{.*\} is invalid: has no 'clipped_steps'"),
    ({"skipped_steps": -1, "consecutive_skips": 0, "clipped_steps": 0}, r"skipped_steps=-1 is invalid: must"),
    ({"skipped_steps": 1, "consecutive_skips": 1.5, "clipped_steps": 0}, r"consecutive_skips=1\.5 is inval"),
    ([1, 2, 3], r"state_dict=\[1, 2, 3\] is invalid: must be a mapping"),
])
def test_load_state_dict_rejects_bad_state_and_changes_nothing(state, message):
    clipper = GradientClipper()
    clipper.skipped_steps = 7
    with pytest.raises(ValueError, match="^GradientClipper.load_state_dict: " + message):
        clipper.load_state_dict(state)
    assert clipper.skipped_steps == 7


# ----- validation -------------------------------------------------------------------------------


def _shape(field, value, requirement):
    return "^" + re.escape(f"clipping: {field}={value!r} is invalid: ") + requirement


@pytest.mark.parametrize("args,kw,message", [
    (("nrom",), {"max_norm": 1.0}, _shape("mode", "nrom", re.escape(
        "must be one of none, value, norm (did you mean 'norm'?)"))),
    (("clip",), {}, _shape("mode", "clip", r"must be one of none, value, norm$")),
    (("norm",), {}, _shape("max_norm", None, re.escape("mode='norm' needs max_norm > 0 or per_group"))),
    (("norm",), {"per_group": {}}, _shape("max_norm", None, "mode='norm' needs")),
    (("value",), {}, _shape("max_value", None, re.escape("mode='value' needs max_value > 0 or per_group"))),
    (("norm",), {"max_norm": 0}, _shape("max_norm", 0, "must be > 0")),
    (("norm",), {"max_norm": -1.0}, _shape("max_norm", -1.0, "must be > 0")),
    (("norm",), {"max_norm": "1"}, _shape("max_norm", "1", "must be a number")),
    (("norm",), {"max_norm": float("nan")}, _shape("max_norm", float("nan"), "must be > 0")),
    (("value",), {"max_value": 0.0}, _shape("max_value", 0.0, "must be > 0")),
    (("norm",), {"max_norm": 1.0, "norm_type": 0}, _shape("norm_type", 0, "must be > 0")),
    (("norm",), {"max_norm": 1.0, "norm_type": -2.0}, _shape("norm_type", -2.0, "must be > 0")),
    (("norm",), {"max_norm": 1.0, "norm_type": "inf"}, _shape("norm_type", "inf", "must be a number")),
    (("norm",), {"per_group": {"embedding": 0}}, _shape("per_group['embedding']", 0, "must be > 0")),
    (("value",), {"per_group": {"embedding": -0.5}}, _shape("per_group['embedding']", -0.5, "must be > 0")),
    (("norm",), {"per_group": {3: 1.0}}, _shape("per_group", {3: 1.0}, "has key 3: keys must be group")),
    (("norm",), {"per_group": [("a", 1.0)]}, _shape("per_group", [("a", 1.0)], "must be a mapping")),
    (("norm",), {"max_norm": 1.0, "skip_nonfinite": "yes"}, _shape("skip_nonfinite", "yes", "must be true")),
    ((), {"max_consecutive_skips": 0}, _shape("max_consecutive_skips", 0, "must be an integer >= 1")),
    ((), {"max_consecutive_skips": 2.0}, _shape("max_consecutive_skips", 2.0, "must be an integer >= 1")),
    ((), {"max_consecutive_skips": True}, _shape("max_consecutive_skips", True, "must be an integer >= 1")),
    (("value",), {"max_norm": 1.0, "max_value": 1.0}, _shape("max_norm", 1.0, re.escape(
        "is not used by mode='value'; use max_value"))),
    (("norm",), {"max_norm": 1.0, "max_value": 1.0}, _shape("max_value", 1.0, "is not used by mode='norm'")),
    (("none",), {"max_norm": 1.0}, _shape("max_norm", 1.0, "is not used by mode='none'; set mode")),
    (("none",), {"per_group": {"embedding": 1.0}}, _shape("per_group", {"embedding": 1.0}, "is not used")),
])
def test_validation_names_field_and_value(args, kw, message):
    with pytest.raises(ValueError, match=message):
        GradientClipper(*args, **kw)


def test_valid_corners_construct():
    GradientClipper("norm", max_norm=1.0, norm_type=INF)
    GradientClipper("norm", max_norm=1, norm_type=1)  # ints are fine
    GradientClipper("value", per_group={"embedding": 0.5})
    GradientClipper(max_consecutive_skips=1, skip_nonfinite=False)


def test_unknown_group_name_lists_the_optimizers_groups():
    opt, _, _ = _twins()
    clipper = GradientClipper("norm", max_norm=1.0, per_group={"embeding": 0.1})
    message = _shape("per_group", "embeding", re.escape(
        "names no param group of the optimizer, whose groups are 'embedding', 'decay', 'no_decay', "
        "'group3' (did you mean 'embedding'?)"))
    with pytest.raises(ValueError, match=message):
        clipper.clip_(opt)


def test_duplicate_group_names_raise():
    opt = _sgd([{"name": "a", "params": [_param(3)]}, {"name": "a", "params": [_param(2)]}])
    with pytest.raises(ValueError, match=_shape("optimizer", "a, a", "has two param groups named 'a'")):
        GradientClipper().clip_(opt)


def test_describe_is_one_line():
    cases = {
        GradientClipper(): "gradient clipping: none (logging the 2-norm); skip non-finite steps, raise after "
                           "10 in a row",
        GradientClipper("norm", max_norm=1.0): "gradient clipping by 2-norm: max_norm=1; skip non-finite "
                                                "steps, raise after 10 in a row",
        GradientClipper("norm", max_norm=0.5, norm_type=INF, per_group={"embedding": 0.1},
                        skip_nonfinite=False):
            "gradient clipping by inf-norm: per group embedding=0.1; max_norm=0.5 for the other groups; "
            "non-finite steps not skipped",
        GradientClipper("value", per_group={"decay": 2}, max_consecutive_skips=3):
            "gradient clipping by value: per group decay=2; other groups not clipped; skip non-finite "
            "steps, raise after 3 in a row",
    }
    for clipper, line in cases.items():
        assert clipper.describe() == line
        assert "\n" not in line and line in repr(clipper)


@pytest.mark.parametrize("clip", [dict(mode="value", max_value=0.5), dict(mode="norm", norm_type=math.inf, max_norm=0.5)],
                         ids=["value", "inf-norm"])
def test_an_empty_grad_has_max_norm_zero(clip):
    """max has no identity, so torch's inf-norm refuses an empty tensor; a param with no
    elements (a zero-width layer) is no reason to fail: its max |g| is 0."""
    import lightning_optim as lo

    params = [torch.zeros(0, requires_grad=True), torch.tensor([3.0, -1.0], requires_grad=True)]
    params[0].grad, params[1].grad = torch.zeros(0), torch.tensor([3.0, -1.0])
    opt = lo.SGD(params, lr=0.1, backend="foreach")
    report = GradientClipper(**clip).clip_(opt)
    assert report.total_norm.item() == pytest.approx(3.0 if clip["mode"] == "norm" else math.sqrt(10.0))  # the report's p-norm
    assert params[1].grad.abs().max().item() == pytest.approx(0.5, rel=1e-5)
