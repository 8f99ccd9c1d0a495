"""Property-based checks of the config layer (hypothesis).

- Random VALID optimizer configs, for every registry name: ``create_optimizer(config, module)``
  builds and one ``step()`` leaves every parameter finite.
- Random INVALID ones (one field of a valid config perturbed out of range or to a wrong type)
  raise :class:`~lightning_optim.validation.ConfigurationError`: never a bare ``TypeError``,
  ``KeyError``, ``AttributeError``, ``OverflowError``, ``ZeroDivisionError`` or an assert.
- The same for the scheduler, clipping and accumulation coercers of :mod:`lightning_optim.config`,
  plus a fuzz: any value at all in any field either builds or raises ``ConfigurationError``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lightning_optim as lo
from lightning_optim import config as C
from lightning_optim.registry import create_optimizer, options
from lightning_optim.schedules import build_scheduler
from lightning_optim.validation import ConfigurationError

NAMES = lo.optimizers()
EXAMPLES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
OPT_FIELDS = {f.name for f in dataclasses.fields(C.OptimizerConfig)} - {"name"}

# ----- optimizer: valid values per option -------------------------------------------------------------

unit = st.floats(0.0, 0.999)
VALID = {
    "lr": st.floats(1e-6, 1.0),
    "betas": st.tuples(unit, st.floats(0.0, 0.9999)).map(list),
    "eps": st.floats(1e-10, 1e-2),
    "weight_decay": st.floats(0.0, 0.5),
    "momentum": unit,
    "dampening": st.floats(0.0, 1.0),
    "nesterov": st.booleans(),
    "alpha": unit,
    "centered": st.booleans(),
    "lr_decay": st.floats(0.0, 1.0),
    "initial_accumulator_value": st.floats(0.0, 1.0),
    "momentum_decay": st.floats(0.0, 0.1),
    "decoupled_weight_decay": st.booleans(),
    "amsgrad": st.booleans(),
    "maximize": st.booleans(),
    "bias_correction": st.booleans(),
    "coupling_scale": st.floats(1e-3, 10.0),
    "master_weights": st.booleans(),
    "backend": st.sampled_from(["auto", "reference", "foreach"]),
}


def configurable(name: str) -> list[str]:
    """The options of ``name`` the ``optimizer`` node can set (``coupled`` is the partition's)."""
    return [k for k in options(name) if k in OPT_FIELDS]


def test_every_node_field_has_a_valid_strategy():
    assert OPT_FIELDS == set(VALID)
    assert all(set(configurable(n)) <= set(VALID) for n in NAMES)


@st.composite
def valid_config(draw, name=None):
    name = name or draw(st.sampled_from(NAMES))
    fields = configurable(name)
    chosen = draw(st.lists(st.sampled_from(fields), unique=True, max_size=len(fields)))
    config = {"name": name, **{f: draw(VALID[f]) for f in chosen}}
    merged = {**options(name), **config}
    if merged.get("nesterov"):  # Nesterov needs momentum > 0 and no dampening
        config["momentum"] = draw(st.floats(0.01, 0.99))
        config["dampening"] = 0.0
    if merged.get("centered") and merged.get("alpha", 1) == 0:
        # Centered RMSprop refuses alpha = 0 (the variance of one gradient is 0). Any alpha > 0
        # must stay finite: the backends clamp the rounded variance at 0 before its square root.
        config["alpha"] = draw(st.floats(1e-300, 0.999))
    return config


def _model() -> nn.Module:
    return nn.Sequential(nn.Embedding(6, 4), nn.LayerNorm(4), nn.Linear(4, 3))


def _one_step(config: dict) -> nn.Module:
    torch.manual_seed(0)
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lo.LightningOptimWarning)
        optimizer = create_optimizer(config, model)
    model(torch.tensor([0, 2, 5])).square().mean().backward()
    optimizer.step()
    return model


@EXAMPLES
@given(valid_config())
def test_valid_optimizer_configs_build_and_step_finitely(config):
    C.optimizer_config(config)  # the node accepts it too
    model = _one_step(config)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), (name, config)


# ----- optimizer: one field perturbed -------------------------------------------------------------------

not_a_number = st.one_of(st.text(max_size=5), st.booleans(), st.lists(st.floats(), max_size=2),
                         st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
negative = st.one_of(st.floats(max_value=-1e-12, allow_nan=False), st.integers(max_value=-1))
huge = st.integers(min_value=10**309, max_value=10**400)  # too large for a float
not_a_bool = st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=5), st.lists(st.booleans(), max_size=1))


def _numeric(low_ok: bool = True) -> st.SearchStrategy:
    """Values invalid for a number >= 0 (> 0 when not ``low_ok``)."""
    bad = [not_a_number, non_finite, negative, huge]
    if not low_ok:
        bad.append(st.just(0))
    return st.one_of(*bad)


bad_beta = st.one_of(not_a_number.filter(lambda v: not isinstance(v, bool)), non_finite, negative,
                     st.floats(min_value=1.0, allow_nan=False))
INVALID = {
    "lr": _numeric(low_ok=False),
    "betas": st.one_of(
        st.text(max_size=4), st.floats(), st.lists(unit, min_size=3, max_size=4), st.lists(unit, max_size=1),
        st.tuples(bad_beta, unit), st.tuples(unit, bad_beta),
    ),
    "eps": _numeric(),
    "weight_decay": _numeric(),
    "momentum": _numeric(),  # torch allows momentum >= 1 (SGD, RMSprop): only its sign and type are checked
    # torch bounds no dampening, and neither do we (any finite value: SGD._validate), so a
    # negative one or one above 1 is valid; only its type and finiteness are checked.
    "dampening": st.one_of(not_a_number, non_finite, huge),
    "alpha": _numeric(),  # torch allows alpha >= 1 (RMSprop(alpha=1.5)), and so do we: its sign is checked
    "lr_decay": _numeric(),
    "initial_accumulator_value": _numeric(),
    "momentum_decay": _numeric(),
    "coupling_scale": _numeric(low_ok=False),
    "backend": st.one_of(st.text(max_size=8).filter(lambda s: s not in ("auto", "reference", "foreach")),
                         st.integers(), st.lists(st.just("foreach"), max_size=1)),
}
for _flag in ("nesterov", "centered", "decoupled_weight_decay", "amsgrad", "maximize", "bias_correction",
              "master_weights"):
    INVALID[_flag] = not_a_bool


def test_every_node_field_has_an_invalid_strategy():
    assert OPT_FIELDS == set(INVALID)


@st.composite
def invalid_config(draw):
    config = draw(valid_config())
    field = draw(st.sampled_from(configurable(config["name"])))
    config[field] = draw(INVALID[field])
    return config, field


@EXAMPLES
@given(invalid_config())
def test_one_bad_field_raises_a_configuration_error(case):
    config, field = case
    builds = [lambda: C.optimizer_config(config)]
    if not (field == "lr" and type(config["lr"]) is int and config["lr"] == 0):  # lr=0: the classes allow it
        builds.append(lambda: create_optimizer(config, _model()))
    for build in builds:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lo.LightningOptimWarning)
            with pytest.raises(ConfigurationError) as info:
                build()
        assert field in str(info.value), (config, str(info.value))


# ----- scheduler ----------------------------------------------------------------------------------------


@st.composite
def valid_schedule(draw):
    name = draw(st.sampled_from(["constant", "time_decay", "step", "exponential", "cosine", "warmup_cosine", "warmup_linear"]))
    total = draw(st.integers(2, 10_000))
    node = {"name": name, "total_steps": total}
    if name == "time_decay":
        node["decay"] = draw(st.floats(0.0, 10.0))
    if name == "step":
        node["step_size"] = draw(st.integers(1, 1000))
    if name in ("step", "exponential"):
        node["gamma"] = draw(st.floats(0.01, 1.0))
    if name in ("cosine", "warmup_cosine", "warmup_linear"):
        node["min_lr_ratio"] = draw(st.floats(0.0, 1.0))
    low = 1 if name.startswith("warmup_") else 0
    node["warmup_steps"] = draw(st.integers(low, total - 1))
    return node


@EXAMPLES
@given(valid_schedule(), st.integers(0, 20_000))
def test_valid_schedules_build_and_give_factors_in_0_1(node, t):
    cfg = C.scheduler_config(node)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = build_scheduler(optimizer, cfg.name, **cfg.options()).lr_lambdas[0]
    assert 0.0 <= schedule(t) <= 1.0


@EXAMPLES
@given(valid_schedule(), st.data())
def test_the_scheduler_node_and_the_schedules_module_take_the_same_defaults(node, data):
    """Any subset of a valid node's options (total_steps kept): the config node (OptimizerCallback,
    Hydra) and schedules.Schedule / build_scheduler fill the rest from the same defaults, so they
    build the same schedule, or refuse it with the same message."""
    from lightning_optim.schedules import Schedule, schedule_of

    keep = data.draw(st.sets(st.sampled_from(sorted(k for k in node if k not in ("name", "total_steps")))))
    given = {"name": node["name"], "total_steps": node["total_steps"], **{k: node[k] for k in keep}}

    def outcome(build):
        try:
            return build()
        except ConfigurationError as err:
            return str(err)

    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    from_node = outcome(lambda: C.scheduler_config(given).options())
    assert from_node == outcome(lambda: Schedule(**given).options())
    assert from_node == outcome(lambda: schedule_of(build_scheduler(optimizer, **given)).options())


SCHEDULE_INVALID = {
    "name": st.one_of(st.text(max_size=8).filter(lambda s: s not in C.SCHEDULES), st.integers(), st.just(["cosine"])),
    "total_steps": st.one_of(st.integers(max_value=0), st.floats(0.01, 0.99), not_a_number, non_finite),
    "warmup_steps": st.one_of(st.integers(max_value=-1), st.floats(0.01, 0.99), not_a_number, non_finite),
    "decay": st.one_of(negative, not_a_number, st.just(math.nan)),
    "step_size": st.one_of(st.integers(max_value=0), not_a_number, non_finite),
    "gamma": st.one_of(st.floats(max_value=0.0, allow_nan=False), st.floats(min_value=1.0, exclude_min=True), not_a_number),
    "min_lr_ratio": st.one_of(negative, st.floats(min_value=1.0, exclude_min=True), not_a_number, st.just(math.nan)),
}


@st.composite
def invalid_schedule(draw):
    node = draw(valid_schedule())
    reads = {"name", "total_steps", "warmup_steps", *[k for k in node if k not in ("name", "total_steps", "warmup_steps")]}
    field = draw(st.sampled_from(sorted(reads)))
    node[field] = draw(SCHEDULE_INVALID[field])
    return node, field


@EXAMPLES
@given(invalid_schedule())
def test_one_bad_scheduler_field_raises(case):
    node, field = case
    with pytest.raises(ConfigurationError, match=field):
        C.scheduler_config(node)


# ----- clipping -------------------------------------------------------------------------------------------


@st.composite
def valid_clipping(draw):
    mode = draw(st.sampled_from(["none", "value", "norm"]))
    node = {"mode": mode, "norm_type": draw(st.sampled_from([1.0, 2.0, 3.5, math.inf])),
            "skip_nonfinite": draw(st.booleans()), "max_consecutive_skips": draw(st.integers(1, 100))}
    if mode != "none":
        node["max_norm" if mode == "norm" else "max_value"] = draw(st.floats(1e-6, 1e6))
        node["per_group"] = draw(st.dictionaries(st.sampled_from(["embedding", "decay", "no_decay"]),
                                                 st.floats(1e-6, 1e6), max_size=3))
    return node


@EXAMPLES
@given(valid_clipping())
def test_valid_clipping_builds_and_clips(node):
    clipper = C.clipping_config(node).build()
    params = [nn.Parameter(torch.ones(3, 2)) for _ in range(3)]
    for i, p in enumerate(params):
        p.grad = torch.full((3, 2), 10.0 ** (2 * i))
    optimizer = torch.optim.SGD([{"params": [p], "name": n} for p, n in zip(params, ["embedding", "decay", "no_decay"])],
                                lr=0.1)
    report = clipper.clip_(optimizer)
    assert not clipper.should_skip(report)
    assert all(torch.isfinite(p.grad).all() for p in params)


CLIPPING_INVALID = {
    "mode": st.one_of(st.text(max_size=6).filter(lambda s: s not in ("none", "value", "norm")), st.integers(), st.none()),
    "norm_type": st.one_of(st.floats(max_value=0.0, allow_nan=False), st.just(math.nan), not_a_number, huge),
    "skip_nonfinite": not_a_bool,
    "max_consecutive_skips": st.one_of(st.integers(max_value=0), st.floats(allow_nan=False), not_a_number),
    "max_norm": st.one_of(st.floats(max_value=0.0), non_finite, not_a_number, huge),
    "max_value": st.one_of(st.floats(max_value=0.0), non_finite, not_a_number, huge),
    "per_group": st.one_of(st.lists(st.floats(), min_size=1, max_size=2), st.text(min_size=1, max_size=3),
                           st.dictionaries(st.sampled_from(["embedding"]), st.floats(max_value=0.0), min_size=1),
                           st.dictionaries(st.integers(), st.floats(1e-3, 1.0), min_size=1)),
}


@st.composite
def invalid_clipping(draw):
    node = draw(valid_clipping())
    field = draw(st.sampled_from(sorted(k for k in node if k != "mode") + ["mode"]))
    node[field] = draw(CLIPPING_INVALID[field])
    return node, field


@EXAMPLES
@given(invalid_clipping())
def test_one_bad_clipping_field_raises(case):
    node, field = case
    with pytest.raises(ConfigurationError) as info:
        C.clipping_config(node)
    # mode=none makes a threshold "not used", so the message may name that threshold instead
    assert field in str(info.value) or (field == "mode" and "max_" in str(info.value)), str(info.value)


# ----- accumulation ---------------------------------------------------------------------------------------


@st.composite
def valid_accumulation(draw):
    form = draw(st.sampled_from(["int", "mapping", "node"]))
    if form == "int":
        return draw(st.integers(1, 64))
    starts = sorted(draw(st.sets(st.integers(1, 10_000), max_size=4)))
    pairs = [[0, draw(st.integers(1, 16))]] + [[s, draw(st.integers(1, 16))] for s in starts]
    if form == "mapping":
        return dict(pairs)
    return {"schedule": pairs, "by": draw(st.sampled_from(["step", "epoch"]))}


@EXAMPLES
@given(valid_accumulation(), st.integers(0, 20_000))
def test_valid_accumulation_builds_and_sizes_are_the_schedule_values(value, step):
    schedule = C.accumulation_config(value).build()
    assert schedule.size_at(step, epoch=step) in set(schedule.points.values())


@st.composite
def invalid_accumulation(draw):
    value = draw(valid_accumulation())
    if isinstance(value, int):
        return draw(st.one_of(st.integers(max_value=0), st.floats(), st.text(max_size=3), st.booleans(), st.lists(st.integers(1, 4))))
    pairs = [list(p) for p in (value["schedule"] if "schedule" in value else value.items())]
    kind = draw(st.sampled_from(["size", "start", "order", "by", "shape"]))
    i = draw(st.integers(0, len(pairs) - 1))
    if kind == "size":
        pairs[i][1] = draw(st.one_of(st.integers(max_value=0), st.floats(0.01, 0.99), st.booleans(), st.text(min_size=1, max_size=2).filter(lambda s: not s.strip().lstrip("-").isdigit())))
    elif kind == "start":
        pairs[i][0] = draw(st.one_of(st.integers(max_value=-1), st.floats(0.01, 0.99)))  # no bool: True == 1
    elif kind == "order":
        pairs.append([pairs[-1][0] - draw(st.integers(0, pairs[-1][0])), 2])  # repeats or goes back
    elif kind == "by":
        return {"schedule": pairs, "by": draw(st.text(max_size=5).filter(lambda s: s not in ("step", "epoch")))}
    else:
        return {"schedule": draw(st.one_of(st.integers(), st.text(max_size=3), st.just([[0]]), st.just([[0, 1, 2]])))}
    return {"schedule": pairs} if "schedule" in value else {k: v for k, v in pairs} if kind != "order" else {"schedule": pairs}


@EXAMPLES
@given(invalid_accumulation())
def test_bad_accumulation_raises(value):
    with pytest.raises(ConfigurationError, match=r"^accumulation: "):
        C.accumulation_config(value)


# ----- fuzz: anything in any field builds or raises ConfigurationError -------------------------------------------

anything = st.one_of(st.none(), st.booleans(), st.integers(), huge, st.floats(), st.text(max_size=6),
                     st.lists(st.integers(-2, 5), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(-1, 3), max_size=2))
COERCERS = {
    "optimizer": (C.optimizer_config, C.OptimizerConfig),
    "scheduler": (C.scheduler_config, C.SchedulerConfig),
    "clipping": (C.clipping_config, C.ClippingConfig),
    "accumulation": (C.accumulation_config, C.AccumulationConfig),
    "partition": (C.partition_config, C.PartitionConfig),
    "monitor": (C.monitor_config, C.MonitorConfig),
}


@st.composite
def fuzzed_node(draw):
    kind = draw(st.sampled_from(sorted(COERCERS)))
    fields = [f.name for f in dataclasses.fields(COERCERS[kind][1])]
    node = draw(st.dictionaries(st.sampled_from(fields), anything, min_size=1, max_size=2))
    return kind, node


@settings(max_examples=100, deadline=None)
@given(fuzzed_node())
def test_any_value_builds_or_raises_a_configuration_error(case):
    kind, node = case
    coerce = COERCERS[kind][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lo.LightningOptimWarning)
        try:
            coerce(node)
        except ConfigurationError:
            pass
