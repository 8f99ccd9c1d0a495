"""Learning-rate schedules: hand-computed factors, LambdaLR on a real optimizer, resume, errors."""

from __future__ import annotations

import copy
import io
import math
import pickle
import re

import pytest
import torch

from lightning_optim.schedules import (
    SCHEDULES,
    Schedule,
    build_scheduler,
    check_schedule,
    describe,
    lr_factor,
    schedule_of,
    with_total_steps,
)

R2 = math.sqrt(2) / 4  # 0.5 * cos(pi / 4)

# (name, options, t, factor), each worked out by hand from the formulas in the module docstring.
TABLE = [
    ("constant", {}, 0, 1.0),
    ("constant", {}, 10**6, 1.0),
    ("constant", {"total_steps": 10}, 50, 1.0),  # total_steps accepted, not read
    # warmup (t + 1) / w: the first step is not lr 0, step w - 1 reaches 1
    ("constant", {"warmup_steps": 4}, 0, 0.25),
    ("constant", {"warmup_steps": 4}, 1, 0.5),
    ("constant", {"warmup_steps": 4}, 3, 1.0),
    ("constant", {"warmup_steps": 4}, 4, 1.0),
    ("time_decay", {"decay": 0.5}, 0, 1.0),
    ("time_decay", {"decay": 0.5}, 1, 1 / 1.5),
    ("time_decay", {"decay": 0.5}, 2, 0.5),
    ("time_decay", {"decay": 0.5}, 6, 0.25),
    ("time_decay", {"decay": 0.0}, 100, 1.0),
    # after warmup the decay clock restarts at s = t - w
    ("time_decay", {"decay": 0.5, "warmup_steps": 2}, 0, 0.5),
    ("time_decay", {"decay": 0.5, "warmup_steps": 2}, 2, 1.0),
    ("time_decay", {"decay": 0.5, "warmup_steps": 2}, 4, 0.5),
    ("step", {"step_size": 3, "gamma": 0.5}, 0, 1.0),
    ("step", {"step_size": 3, "gamma": 0.5}, 2, 1.0),
    ("step", {"step_size": 3, "gamma": 0.5}, 3, 0.5),
    ("step", {"step_size": 3, "gamma": 0.5}, 5, 0.5),
    ("step", {"step_size": 3, "gamma": 0.5}, 6, 0.25),
    ("step", {"step_size": 3, "gamma": 0.5}, 9, 0.125),
    ("step", {"step_size": 3, "gamma": 0.5, "warmup_steps": 2}, 4, 1.0),
    ("step", {"step_size": 3, "gamma": 0.5, "warmup_steps": 2}, 5, 0.5),
    ("step", {}, 1000, 0.5**10),  # the defaults (schedules.defaults): x0.5 every 100 steps
    ("exponential", {"gamma": 0.5}, 0, 1.0),
    ("exponential", {"gamma": 0.5}, 1, 0.5),
    ("exponential", {"gamma": 0.5}, 3, 0.125),
    ("exponential", {"gamma": 0.9}, 2, 0.81),
    ("exponential", {"gamma": 0.9, "warmup_steps": 1}, 2, 0.9),
    ("cosine", {"total_steps": 4}, 0, 1.0),
    ("cosine", {"total_steps": 4}, 1, 0.5 + R2),
    ("cosine", {"total_steps": 4}, 2, 0.5),
    ("cosine", {"total_steps": 4}, 3, 0.5 - R2),
    ("cosine", {"total_steps": 4}, 4, 0.0),
    ("cosine", {"total_steps": 4}, 10, 0.0),  # held past the total
    ("cosine", {"total_steps": 4, "min_lr_ratio": 0.1}, 2, 0.55),
    ("cosine", {"total_steps": 4, "min_lr_ratio": 0.1}, 4, 0.1),
    ("cosine", {"total_steps": 4, "min_lr_ratio": 0.1}, 100, 0.1),
    ("cosine", {"total_steps": 4, "min_lr_ratio": 1.0}, 2, 1.0),
    ("cosine", {"total_steps": 6, "warmup_steps": 2}, 0, 0.5),
    ("cosine", {"total_steps": 6, "warmup_steps": 2}, 2, 1.0),
    ("cosine", {"total_steps": 6, "warmup_steps": 2}, 4, 0.5),
    ("cosine", {"total_steps": 6, "warmup_steps": 2}, 6, 0.0),
    # cosine from 1 to r over the T - w = 8 steps after warmup
    ("warmup_cosine", {"total_steps": 10, "warmup_steps": 2, "min_lr_ratio": 0.2}, 0, 0.5),
    ("warmup_cosine", {"total_steps": 10, "warmup_steps": 2, "min_lr_ratio": 0.2}, 1, 1.0),
    ("warmup_cosine", {"total_steps": 10, "warmup_steps": 2, "min_lr_ratio": 0.2}, 2, 1.0),
    ("warmup_cosine", {"total_steps": 10, "warmup_steps": 2, "min_lr_ratio": 0.2}, 4, 0.2 + 0.8 * (0.5 + R2)),
    ("warmup_cosine", {"total_steps": 10, "warmup_steps": 2, "min_lr_ratio": 0.2}, 6, 0.6),
    ("warmup_cosine", {"total_steps": 10, "warmup_steps": 2, "min_lr_ratio": 0.2}, 10, 0.2),
    ("warmup_cosine", {"total_steps": 10, "warmup_steps": 2, "min_lr_ratio": 0.2}, 11, 0.2),
    ("warmup_linear", {"total_steps": 10, "warmup_steps": 2}, 0, 0.5),
    ("warmup_linear", {"total_steps": 10, "warmup_steps": 2}, 2, 1.0),
    ("warmup_linear", {"total_steps": 10, "warmup_steps": 2}, 6, 0.5),
    ("warmup_linear", {"total_steps": 10, "warmup_steps": 2}, 8, 0.25),
    ("warmup_linear", {"total_steps": 10, "warmup_steps": 2}, 10, 0.0),
    ("warmup_linear", {"total_steps": 10, "warmup_steps": 2}, 20, 0.0),
    ("warmup_linear", {"total_steps": 10, "warmup_steps": 2, "min_lr_ratio": 0.5}, 6, 0.75),
    ("warmup_linear", {"total_steps": 10, "warmup_steps": 2, "min_lr_ratio": 0.5}, 10, 0.5),
]


def test_schedule_names_in_order():
    assert SCHEDULES == (
        "constant", "time_decay", "step", "exponential", "cosine", "warmup_cosine", "warmup_linear",
    )


def test_table_covers_every_schedule():
    assert {row[0] for row in TABLE} == set(SCHEDULES)


@pytest.mark.parametrize("name, options, t, expected", TABLE)
def test_lr_factor_matches_hand_computed(name, options, t, expected):
    assert lr_factor(name, t, **options) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def _sgd(lrs=(0.1, 0.01)):
    groups = [{"params": [torch.nn.Parameter(torch.ones(3))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=1.0)


def _step(optimizer, scheduler):
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    optimizer.step()
    scheduler.step()


def _lrs(optimizer):
    return [g["lr"] for g in optimizer.param_groups]


@pytest.mark.parametrize(
    "name, options",
    [
        ("constant", {"warmup_steps": 3}),
        ("time_decay", {"decay": 0.3, "warmup_steps": 2}),
        ("step", {"step_size": 2, "gamma": 0.5}),
        ("exponential", {"gamma": 0.8}),
        ("cosine", {"total_steps": 8, "min_lr_ratio": 0.1}),
        ("warmup_cosine", {"total_steps": 8, "warmup_steps": 3}),
        ("warmup_linear", {"total_steps": 8, "warmup_steps": 3, "min_lr_ratio": 0.25}),
    ],
)
def test_lambda_lr_scales_each_group_lr(name, options):
    base = (0.1, 0.01)
    optimizer = _sgd(base)
    scheduler = build_scheduler(optimizer, name, **options)
    for t in range(12):  # past total_steps
        factor = lr_factor(name, t, **options)
        lrs = _lrs(optimizer)
        assert lrs == pytest.approx([b * factor for b in base], rel=1e-12, abs=1e-18), f"t={t}"
        if factor > 0:
            assert lrs[0] / lrs[1] == pytest.approx(10.0, rel=1e-12)
        assert scheduler.get_last_lr() == lrs
        _step(optimizer, scheduler)


def test_one_schedule_object_for_all_groups():
    scheduler = build_scheduler(_sgd((0.1, 0.01, 0.5)), "cosine", total_steps=10)
    assert len(scheduler.lr_lambdas) == 3
    assert all(fn is scheduler.lr_lambdas[0] for fn in scheduler.lr_lambdas)
    assert isinstance(schedule_of(scheduler), Schedule)


def test_build_validates_before_touching_the_optimizer():
    optimizer = _sgd()
    with pytest.raises(ValueError, match=r"scheduler: total_steps=None is invalid"):
        build_scheduler(optimizer, "cosine")
    assert _lrs(optimizer) == [0.1, 0.01]
    assert all("initial_lr" not in g for g in optimizer.param_groups)


def test_state_dict_round_trip_resumes_the_same_lrs():
    options = {"total_steps": 12, "warmup_steps": 3, "min_lr_ratio": 0.1}
    opt_a = _sgd()
    sched_a = build_scheduler(opt_a, "warmup_cosine", total_steps=100, warmup_steps=3, min_lr_ratio=0.1)
    with_total_steps(sched_a, 12)  # the corrected total must survive the checkpoint
    for _ in range(5):
        _step(opt_a, sched_a)

    buffer = io.BytesIO()
    torch.save({"optimizer": opt_a.state_dict(), "scheduler": sched_a.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)  # plain numbers only, no pickled classes

    opt_b = _sgd()
    sched_b = build_scheduler(opt_b, "warmup_cosine", total_steps=100, warmup_steps=3, min_lr_ratio=0.1)
    opt_b.load_state_dict(checkpoint["optimizer"])
    sched_b.load_state_dict(checkpoint["scheduler"])
    assert schedule_of(sched_b).total_steps == 12
    assert sched_b.last_epoch == 5

    for t in range(5, 15):
        expected = [b * lr_factor("warmup_cosine", t, **options) for b in (0.1, 0.01)]
        assert _lrs(opt_a) == pytest.approx(expected, rel=1e-12, abs=1e-18)
        assert _lrs(opt_b) == _lrs(opt_a), f"t={t}"
        _step(opt_a, sched_a)
        _step(opt_b, sched_b)


def test_deepcopy_and_pickle():
    optimizer = _sgd()
    scheduler = build_scheduler(optimizer, "warmup_linear", total_steps=6, warmup_steps=2)
    _step(optimizer, scheduler)
    clone = copy.deepcopy(scheduler)
    assert clone.lr_lambdas[0] is clone.lr_lambdas[1]  # still shared by the groups
    assert clone.lr_lambdas[0] is not scheduler.lr_lambdas[0]
    for _ in range(3):
        _step(clone.optimizer, clone)
    assert _lrs(optimizer) == pytest.approx([0.1, 0.01])  # t=1: end of warmup, untouched
    assert _lrs(clone.optimizer) == pytest.approx([0.1 * 0.5, 0.01 * 0.5])  # t=4: halfway down

    schedule = schedule_of(scheduler)
    again = pickle.loads(pickle.dumps(schedule))
    assert again == schedule
    assert [again(t) for t in range(8)] == [schedule(t) for t in range(8)]


def test_with_total_steps_rescales_from_the_current_step():
    optimizer = _sgd()
    scheduler = build_scheduler(optimizer, "cosine", total_steps=1000)
    for _ in range(2):
        _step(optimizer, scheduler)
    assert with_total_steps(scheduler, 4) is scheduler
    # recomputed at once for the step about to run (t=2 of 4: halfway)
    assert _lrs(optimizer) == pytest.approx([0.05, 0.005])
    assert scheduler.get_last_lr() == _lrs(optimizer)
    _step(optimizer, scheduler)
    assert _lrs(optimizer) == pytest.approx([0.1 * (0.5 - R2), 0.01 * (0.5 - R2)])
    _step(optimizer, scheduler)
    assert _lrs(optimizer) == pytest.approx([0.0, 0.0], abs=1e-18)


def test_with_total_steps_validates():
    scheduler = build_scheduler(_sgd(), "warmup_linear", total_steps=100, warmup_steps=10)
    with pytest.raises(ValueError, match=r"warmup_steps=10 is invalid: must be < total_steps=10\b"):
        with_total_steps(scheduler, 10)
    with pytest.raises(ValueError, match=r"total_steps=inf is invalid"):
        with_total_steps(scheduler, float("inf"))
    assert schedule_of(scheduler).total_steps == 100  # unchanged by the failed attempts
    plain = torch.optim.lr_scheduler.LambdaLR(_sgd(), lambda t: 1.0)
    with pytest.raises(ValueError, match=r"scheduler: scheduler='LambdaLR' is invalid"):
        with_total_steps(plain, 10)


def test_whole_float_totals_become_ints():
    # Lightning's estimated_stepping_batches and YAML can give 1000.0
    schedule = Schedule("cosine", total_steps=1000.0, warmup_steps=10.0)
    assert schedule.total_steps == 1000 and type(schedule.total_steps) is int
    assert type(schedule.warmup_steps) is int


def _err(text: str) -> str:
    return "^" + re.escape(f"scheduler: {text}")


ERRORS = [
    ("cosin", {"total_steps": 10}, "name='cosin' is invalid: must be one of constant, time_decay"),
    ("cosin", {"total_steps": 10}, "name='cosin' is invalid: must be one of", r".*\(did you mean 'cosine'"),
    ("cosine", {}, "total_steps=None is invalid: 'cosine' needs total_steps"),
    ("warmup_cosine", {"warmup_steps": 2}, "total_steps=None is invalid"),
    ("warmup_linear", {"warmup_steps": 2}, "total_steps=None is invalid"),
    ("cosine", {"total_steps": 0}, "total_steps=0 is invalid: must be an integer >= 1"),
    ("cosine", {"total_steps": -5}, "total_steps=-5 is invalid"),
    ("cosine", {"total_steps": 10.5}, "total_steps=10.5 is invalid: must be an integer"),
    ("cosine", {"total_steps": True}, "total_steps=True is invalid: must be an integer"),
    ("constant", {"total_steps": float("nan")}, "total_steps=nan is invalid"),
    ("constant", {"warmup_steps": -1}, "warmup_steps=-1 is invalid: must be an integer >= 0"),
    ("constant", {"warmup_steps": "5"}, "warmup_steps='5' is invalid: must be an integer"),
    ("cosine", {"total_steps": 10, "warmup_steps": 10},
     "warmup_steps=10 is invalid: must be < total_steps=10"),
    ("constant", {"total_steps": 5, "warmup_steps": 7},
     "warmup_steps=7 is invalid: must be < total_steps=5"),
    ("warmup_cosine", {"total_steps": 10, "warmup_steps": 0},
     "warmup_steps=0 is invalid: 'warmup_cosine' needs warmup_steps >= 1"),
    ("warmup_cosine", {"total_steps": 10},  # the default warmup, 100 steps, is longer than the run
     "warmup_steps=100 is invalid: must be < total_steps=10"),
    ("warmup_linear", {"total_steps": 10, "warmup_steps": 0}, "warmup_steps=0 is invalid"),
    ("time_decay", {"decay": -0.1}, "decay=-0.1 is invalid: must be >= 0"),
    ("time_decay", {"decay": float("nan")}, "decay=nan is invalid"),
    ("time_decay", {"decay": "fast"}, "decay='fast' is invalid: must be a number"),
    ("step", {"step_size": 0}, "step_size=0 is invalid: must be an integer >= 1"),
    ("step", {"step_size": 1.5}, "step_size=1.5 is invalid: must be an integer"),
    ("step", {"gamma": 0}, "gamma=0 is invalid: must be in (0, 1]"),
    ("step", {"gamma": -0.5}, "gamma=-0.5 is invalid: must be in (0, 1]"),
    ("exponential", {"gamma": 1.5}, "gamma=1.5 is invalid: must be in (0, 1]"),
    ("exponential", {"gamma": "0.5"}, "gamma='0.5' is invalid: must be a number"),
    ("cosine", {"total_steps": 10, "min_lr_ratio": -0.1}, "min_lr_ratio=-0.1 is invalid: must be in [0, 1]"),
    ("cosine", {"total_steps": 10, "min_lr_ratio": 1.5}, "min_lr_ratio=1.5 is invalid: must be in [0, 1]"),
    # an option the schedule does not read, set away from its default, is not silently ignored
    ("cosine", {"total_steps": 10, "gamma": 0.5}, "gamma=0.5 is invalid: 'cosine' does not use it"),
    ("step", {"min_lr_ratio": 0.1}, "min_lr_ratio=0.1 is invalid: 'step' does not use it"),
    ("constant", {"decay": 0.1}, "decay=0.1 is invalid: 'constant' does not use it"),
    ("exponential", {"gamma": 0.9, "step_size": 5}, "step_size=5 is invalid: 'exponential' does not use it"),
]


@pytest.mark.parametrize("row", ERRORS, ids=lambda row: f"{row[0]}-{row[2].split(' ')[0]}")
def test_check_schedule_errors(row):
    name, options, text, *rest = row
    pattern = _err(text) + "".join(rest)
    with pytest.raises(ValueError, match=pattern):
        check_schedule(name, **options)
    with pytest.raises(ValueError, match=pattern):
        lr_factor(name, 0, **options)
    with pytest.raises(ValueError, match=pattern):
        build_scheduler(_sgd(), name, **options)
    with pytest.raises(ValueError, match=pattern):
        describe(name, **options)


def test_unknown_option_and_bad_step():
    pattern = _err("warmup=10 is invalid: is not a scheduler option") + r".*did you mean 'warmup_steps'"
    with pytest.raises(ValueError, match=pattern):
        build_scheduler(_sgd(), "cosine", total_steps=100, warmup=10)
    with pytest.raises(ValueError, match=_err("t=-1 is invalid: must be an integer >= 0")):
        lr_factor("constant", -1)
    with pytest.raises(ValueError, match=_err("t=0.5 is invalid: must be an integer")):
        lr_factor("constant", 0.5)


def test_valid_options_pass():
    check_schedule("constant")
    check_schedule("exponential", gamma=1.0, total_steps=None)
    check_schedule("warmup_cosine", total_steps=2, warmup_steps=1, min_lr_ratio=1.0)
    check_schedule("cosine", total_steps=10, gamma=1.0, decay=0.0, step_size=1)  # defaults are fine


@pytest.mark.parametrize(
    "name, options",
    [
        ("cosine", {"total_steps": 50, "warmup_steps": 7, "min_lr_ratio": 0.1}),
        ("warmup_cosine", {"total_steps": 50, "warmup_steps": 7}),
        ("warmup_linear", {"total_steps": 50, "warmup_steps": 7, "min_lr_ratio": 0.3}),
        ("constant", {"warmup_steps": 7}),
        ("time_decay", {"decay": 0.1, "warmup_steps": 7}),
        ("step", {"step_size": 4, "gamma": 0.7, "warmup_steps": 7}),
        ("exponential", {"gamma": 0.95, "warmup_steps": 7}),
    ],
)
def test_warmup_increases_then_decay_never_increases(name, options):
    w, floor = options["warmup_steps"], options.get("min_lr_ratio", 0.0)
    f = [lr_factor(name, t, **options) for t in range(70)]
    assert f[0] == pytest.approx(1 / w)
    assert all(a < b for a, b in zip(f[: w - 1], f[1:w])), "warmup must strictly increase"
    assert f[w - 1] == f[w] == 1.0  # warmup hands over to the decay at exactly 1
    assert all(a >= b for a, b in zip(f[w:], f[w + 1 :])), "must not increase after warmup"
    assert all(0.0 < x <= 1.0 for x in f[:w])  # warmup starts at 1/w, below any floor
    assert all(floor <= x <= 1.0 for x in f[w:])
    if "total_steps" in options:
        assert f[options["total_steps"]:] == [pytest.approx(floor, abs=1e-15)] * (70 - options["total_steps"])


def test_describe():
    assert describe("warmup_cosine", total_steps=1000, warmup_steps=100, min_lr_ratio=0.1) == (
        "warmup_cosine: 100 warmup steps, cosine to 0.1x over 1000 steps"
    )
    assert describe("cosine", total_steps=500) == "cosine: cosine to 0x over 500 steps"
    assert describe("warmup_linear", total_steps=20, warmup_steps=2) == (
        "warmup_linear: 2 warmup steps, linear to 0x over 20 steps"
    )
    assert describe("constant") == "constant: constant 1x"
    assert describe("constant", warmup_steps=5, total_steps=100) == "constant: 5 warmup steps, constant 1x"
    assert describe("time_decay", decay=0.01) == "time_decay: 1 / (1 + 0.01 * t)"
    assert describe("step", step_size=100, gamma=0.5) == "step: x0.5 every 100 steps"
    assert describe("exponential", gamma=0.999) == "exponential: x0.999 per step"
    assert Schedule("step", step_size=3, gamma=0.1).describe() == "step: x0.1 every 3 steps"
