"""The bad-input table: every way a user can misconfigure the library, one row each.

Each row is ``(id, build, exception type, message regex)``: calling ``build`` must raise the
exception with a message that names the field and quotes the value, in the library's one
shape ``Owner: field=value!r is invalid: requirement`` (:func:`lightning_optim.validation.invalid`).
Rows that go through a Lightning ``Trainer`` also check that no optimizer step ran: the
error comes before training, never in the middle of it.

The rows come from the registry and the config dataclasses where they can (a new optimizer
option or config field gets its rows without editing this file), then by hand for what is
not a single field: name look-ups, the Trainer's own clipping and accumulation next to ours,
manual optimization, partition rules, the Hydra entry point. Other test files check the same
rules at other layers (``test_validation.py``: the optimizer classes and ``create_optimizer``
for every registry name); this table goes through the user-facing entry points: the config
coercers, ``OptimizerCallback``, ``MomentMonitor``, ``Trainer.fit`` and Hydra.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

import lightning_optim as lo
from lightning_optim import config as C
from lightning_optim.integration import MomentMonitor, OptimizerCallback
from lightning_optim.registry import create_optimizer, options
from lightning_optim.validation import ConfigurationError
from lightning_helpers import BareLM, data, flat_params, trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")

NAMES = lo.optimizers()


class Case(NamedTuple):
    id: str
    build: Callable[[], Any]
    exc: type[BaseException]
    match: str


def shape(owner: str, field: str, value: Any, requirement: str = "") -> str:
    """Regex of ``Owner: field=value!r is invalid: requirement`` (requirement is a regex)."""
    return "^" + re.escape(f"{owner}: {field}={value!r} is invalid: ") + requirement


def lit(text: str) -> str:
    return re.escape(text)


# ----- builders ----------------------------------------------------------------------------------


class opt:  # noqa: N801  (reads as a builder in the table)
    """The ``optimizer`` node, as OptimizerCallback and Hydra coerce it."""

    def __init__(self, **mapping: Any) -> None:
        self.mapping = mapping

    def __call__(self) -> Any:
        return C.optimizer_config(self.mapping)


def callback(**kwargs: Any) -> Callable[[], Any]:
    return lambda: OptimizerCallback(**kwargs)


class StepCounter(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps += 1


class Fit:
    """``Trainer.fit`` of a small LM with an OptimizerCallback; remembers enough to prove after the
    error that training never started (no optimizer step, parameters as initialized)."""

    def __init__(self, module: Callable[[], pl.LightningModule] = BareLM, trainer_kwargs: dict | None = None,
                 **callback_kwargs: Any) -> None:
        self.module, self.trainer_kwargs, self.callback_kwargs = module, trainer_kwargs or {}, callback_kwargs

    def __call__(self) -> None:
        torch.manual_seed(0)
        self.model = self.module()
        self.before = flat_params(self.model).clone()
        self.counter = StepCounter()
        kwargs = {"max_steps": 3, **self.trainer_kwargs}
        trainer([self.counter, OptimizerCallback(**self.callback_kwargs)], **kwargs).fit(self.model, data(4))

    def assert_nothing_ran(self) -> None:
        assert self.counter.steps == 0
        assert torch.equal(flat_params(self.model), self.before)


# ----- the optimizer node, one field at a time (driven by OptimizerConfig and the registry) -----------

_FIELDS = [f.name for f in dataclasses.fields(C.OptimizerConfig) if f.name != "name"]
# A value of the wrong type, and one of the right type out of range (None: the field has no range),
# with the requirement each must report.
_WRONG_TYPE = {"betas": (0.9, "must be a pair"), "backend": (3, "must be one of auto, reference, foreach, triton, compiled$")}
_OUT_OF_RANGE = {
    "lr": (-1, None),  # OptimizerConfig's own check: lr > 0
    "betas": ([0.9, 1.0], None),
    "eps": (-1e-8, "must be >= 0"),
    "weight_decay": (float("inf"), "must be finite"),
    # torch.optim bounds momentum and alpha only below (1.5 is legal there and here) and
    # dampening not at all.
    "momentum": (-0.5, "must be >= 0"),
    "dampening": (float("inf"), "must be finite"),
    "alpha": (-0.5, "must be >= 0"),
    "lr_decay": (-0.1, "must be >= 0"),
    "initial_accumulator_value": (-1, "must be >= 0"),
    "momentum_decay": (-4e-3, "must be >= 0"),
    "coupling_scale": (0, lit("must be > 0")),
    "backend": ("foreac", lit("must be one of auto, reference, foreach, triton, compiled (did you mean 'foreach'?)")),
}


def _rule_with(field: str) -> str:
    """The first registry name that has ``field`` (in the order of the registry table)."""
    found = [n for n in NAMES if field in options(n)]
    assert found, f"OptimizerConfig.{field} is an option of no registry name"
    return found[0]


def _optimizer_field_cases():
    for field in _FIELDS:
        name = _rule_with(field)
        owner = "optimizer"  # the node's name, also where the optimizer class finds the value
        default = options(name)[field]
        if isinstance(default, bool):
            for bad in ("yes", 1):
                yield Case(f"optimizer.{field}={bad!r}", opt(name=name, **{field: bad}), ConfigurationError,
                           shape(owner, field, bad, "must be true or false"))
            continue
        if field in _WRONG_TYPE:
            bad, requirement = _WRONG_TYPE[field]
        else:
            bad, requirement = "abc", "must be a number"
        yield Case(f"optimizer.{field}={bad!r}", opt(name=name, **{field: bad}), ConfigurationError,
                   shape(owner, field, bad, requirement))
        bad, requirement = _OUT_OF_RANGE[field]
        if field == "lr":
            pattern = shape("optimizer", "lr", bad, lit("must be > 0"))
        elif field == "betas":
            pattern = shape(owner, "betas[1]", 1.0, lit("must be in [0, 1)"))
        else:
            pattern = shape(owner, field, bad, requirement)
        yield Case(f"optimizer.{field}={bad!r}", opt(name=name, **{field: bad}), ConfigurationError, pattern)


OPTIMIZER_FIELD_CASES = list(_optimizer_field_cases())

OPTIMIZER_CASES = [
    Case("optimizer.name unknown", opt(name="adamx"), ConfigurationError,
         shape("optimizer", "name", "adamx", r"must be one of sgd, .*\(did you mean 'adam' or 'adamw'")),
    Case("optimizer.name int", opt(name=3), ConfigurationError, shape("optimizer", "name", 3, "must be one of sgd, ")),
    Case("optimizer.name list", opt(name=["adam"]), ConfigurationError,
         shape("optimizer", "name", ["adam"], "must be one of sgd, ")),
    Case("optimizer unknown key lrr", opt(name="adamw", lrr=1e-3), ConfigurationError,
         shape("optimizer", "lrr", 1e-3, lit("is not an optimizer option (did you mean 'lr'?)"))),
    Case("optimizer option of another rule", opt(name="adam", momentum=0.9), ConfigurationError,
         shape("optimizer", "momentum", 0.9, r"adam has no option 'momentum'; its options are lr, betas")),
    Case("optimizer.lr=inf", opt(name="adamw", lr=float("inf")), ConfigurationError,
         shape("optimizer", "lr", float("inf"), "must be finite")),
    Case("optimizer.lr=nan", opt(name="adamw", lr=float("nan")), ConfigurationError,
         shape("optimizer", "lr", float("nan"), lit("must be > 0"))),
    Case("optimizer.lr huge int", opt(name="adamw", lr=10**400), ConfigurationError,
         shape("optimizer", "lr", 10**400, "must be a finite number")),
    Case("optimizer.coupling_scale=inf", opt(name="coupled_adam", coupling_scale=float("inf")), ConfigurationError,
         shape("optimizer", "coupling_scale", float("inf"), "must be finite")),
    Case("optimizer.nesterov without momentum", opt(name="sgd", nesterov=True), ConfigurationError,
         shape("optimizer", "nesterov", True, r"Nesterov momentum needs momentum > 0 .*got momentum=0\.0")),
    Case("optimizer.betas 3 values", opt(name="adamw", betas=[0.9, 0.99, 0.999]), ConfigurationError,
         shape("optimizer", "betas", [0.9, 0.99, 0.999], lit("must be a pair (beta1, beta2)"))),
    Case("optimizer node not a mapping", lambda: C.optimizer_config(3.5), ConfigurationError,
         shape("optimizer", "optimizer", 3.5, "must be a name, a mapping or an OptimizerConfig")),
    Case("create_optimizer mapping without name", lambda: create_optimizer({"lr": 0.1}, nn.Linear(2, 2)),
         ConfigurationError, shape("create_optimizer", "optimizer", {"lr": 0.1}, r"has no 'name'")),
    Case("create_optimizer unknown key lrr", lambda: create_optimizer({"name": "adamw", "lrr": 1e-3}, nn.Linear(2, 2)),
         ConfigurationError, shape("create_optimizer", "lrr", 1e-3, lit("adamw has no option 'lrr' (did you mean 'lr'?)"))),
]

# ----- scheduler, clipping, accumulation, partition, monitor nodes ------------------------------------


def sched(**mapping: Any) -> Callable[[], Any]:
    return lambda: C.scheduler_config(mapping)


def clip(**mapping: Any) -> Callable[[], Any]:
    return lambda: C.clipping_config(mapping)


def acc(value: Any) -> Callable[[], Any]:
    return lambda: C.accumulation_config(value)


def part(**mapping: Any) -> Callable[[], Any]:
    return lambda: C.partition_config(mapping)


def mon(**mapping: Any) -> Callable[[], Any]:
    return lambda: C.monitor_config(mapping)


E = ConfigurationError
SCHEDULER_CASES = [
    Case("scheduler.name unknown", sched(name="cosin"), E,
         shape("scheduler", "name", "cosin", r"must be one of constant, .*\(did you mean 'cosine'")),
    Case("scheduler.name int", sched(name=3), E, shape("scheduler", "name", 3, "must be one of constant")),
    Case("scheduler.total_steps=0", sched(name="cosine", total_steps=0), E,
         shape("scheduler", "total_steps", 0, lit("must be an integer >= 1"))),
    Case("scheduler.total_steps str", sched(name="cosine", total_steps="100"), E,
         shape("scheduler", "total_steps", "100", "must be an integer")),
    Case("scheduler.warmup_steps=-1", sched(name="constant", warmup_steps=-1), E,
         shape("scheduler", "warmup_steps", -1, lit("must be an integer >= 0"))),
    Case("scheduler.warmup_steps=1.5", sched(name="constant", warmup_steps=1.5), E,
         shape("scheduler", "warmup_steps", 1.5, "must be an integer")),
    Case("scheduler warmup longer than total", sched(name="warmup_cosine", warmup_steps=100, total_steps=50), E,
         shape("scheduler", "warmup_steps", 100, lit("must be < total_steps=50"))),
    Case("scheduler warmup_cosine without warmup", sched(name="warmup_cosine", warmup_steps=0, total_steps=50), E,
         shape("scheduler", "warmup_steps", 0, lit("'warmup_cosine' needs warmup_steps >= 1"))),
    Case("scheduler.decay=-1", sched(name="time_decay", decay=-1), E, shape("scheduler", "decay", -1, "must be >= 0")),
    Case("scheduler.decay str", sched(name="time_decay", decay="x"), E, shape("scheduler", "decay", "x", "must be a number")),
    Case("scheduler.step_size=0", sched(name="step", step_size=0), E,
         shape("scheduler", "step_size", 0, lit("must be an integer >= 1"))),
    Case("scheduler.gamma=0", sched(name="step", gamma=0), E, shape("scheduler", "gamma", 0, lit("must be in (0, 1]"))),
    Case("scheduler.gamma str", sched(name="exponential", gamma="x"), E,
         shape("scheduler", "gamma", "x", "must be a number")),
    Case("scheduler.min_lr_ratio=2", sched(name="cosine", min_lr_ratio=2), E,
         shape("scheduler", "min_lr_ratio", 2, lit("must be in [0, 1]"))),
    Case("scheduler option unused by the schedule", sched(name="cosine", gamma=0.5), E,
         shape("scheduler", "gamma", 0.5, lit("'cosine' does not use it"))),
    Case("scheduler unknown key", sched(name="cosine", warmup=5), E,
         shape("scheduler", "warmup", 5, lit("is not a scheduler option (did you mean 'warmup_steps'?)"))),
]

CLIPPING_CASES = [
    Case("clipping.mode unknown", clip(mode="nrom"), E,
         shape("clipping", "mode", "nrom", lit("must be one of none, value, norm (did you mean 'norm'?)"))),
    Case("clipping.mode int", clip(mode=1), E, shape("clipping", "mode", 1, "must be one of none, value, norm$")),
    Case("clipping.max_norm=0", clip(mode="norm", max_norm=0), E, shape("clipping", "max_norm", 0, lit("must be > 0"))),
    Case("clipping.max_norm str", clip(mode="norm", max_norm="1"), E,
         shape("clipping", "max_norm", "1", "must be a number")),
    Case("clipping.max_value=-1", clip(mode="value", max_value=-1), E,
         shape("clipping", "max_value", -1, lit("must be > 0"))),
    Case("clipping.norm_type=0", clip(mode="norm", max_norm=1.0, norm_type=0), E,
         shape("clipping", "norm_type", 0, lit("must be > 0"))),
    Case("clipping.per_group list", clip(mode="norm", per_group=[1.0]), E,
         shape("clipping", "per_group", [1.0], "must be a mapping")),
    Case("clipping.per_group negative", clip(mode="norm", per_group={"embedding": -1}), E,
         shape("clipping", "per_group['embedding']", -1, lit("must be > 0"))),
    Case("clipping.skip_nonfinite str", clip(skip_nonfinite="yes"), E,
         shape("clipping", "skip_nonfinite", "yes", "must be true or false")),
    Case("clipping.max_consecutive_skips=0", clip(max_consecutive_skips=0), E,
         shape("clipping", "max_consecutive_skips", 0, lit("must be an integer >= 1"))),
    Case("clipping.max_consecutive_skips float", clip(max_consecutive_skips=2.5), E,
         shape("clipping", "max_consecutive_skips", 2.5, lit("must be an integer >= 1"))),
    Case("clipping norm without threshold", clip(mode="norm"), E,
         shape("clipping", "max_norm", None, lit("mode='norm' needs max_norm > 0"))),
    Case("clipping threshold of the other mode", clip(mode="value", max_norm=1.0), E,
         shape("clipping", "max_norm", 1.0, lit("is not used by mode='value'; use max_value"))),
    Case("clipping unknown key", clip(mode="norm", max_nrom=1.0), E,
         shape("clipping", "max_nrom", 1.0, lit("is not a clipping option (did you mean 'max_norm'?)"))),
]

ACCUMULATION_CASES = [
    Case("accumulation=0", acc(0), E, shape("accumulation", "schedule[0]", 0, lit("must be an int >= 1"))),
    Case("accumulation=2.5", acc(2.5), E, shape("accumulation", "accumulation", 2.5, "must be a mapping")),
    Case("accumulation='4'", acc("4"), E, shape("accumulation", "accumulation", "4", "must be a mapping")),
    Case("accumulation=True", acc(True), E, shape("accumulation", "accumulation", True, "must be a mapping")),
    Case("accumulation negative key", acc({-1: 2}), E, shape("accumulation", "schedule", {-1: 2}, "keys must be >= 0")),
    Case("accumulation zero size", acc({0: 1, 10: 0}), E, shape("accumulation", "schedule[10]", 0, lit("must be an int >= 1"))),
    Case("accumulation negative size", acc({0: -2}), E, shape("accumulation", "schedule[0]", -2, lit("must be an int >= 1"))),
    Case("accumulation fractional size", acc({0: 1, 10: 2.5}), E, shape("accumulation", "schedule[10]", 2.5, "must be an int")),
    Case("accumulation non-increasing keys", acc({0: 1, 1000: 8, 200: 4}), E,
         shape("accumulation", "schedule", {0: 1, 1000: 8, 200: 4}, "keys must increase, but 200 comes after 1000")),
    Case("accumulation list non-increasing", acc({"schedule": [[0, 1], [10, 2], [5, 4]]}), E,
         r"^accumulation: schedule=.* is invalid: keys must increase, but 5 comes after 10"),
    Case("accumulation list repeated start", acc({"schedule": [[0, 1], [10, 2], [10, 4]]}), E,
         shape("accumulation", "schedule", [[0, 1], [10, 2], [10, 4]], "has start 10 twice")),
    Case("accumulation.schedule not a list", acc({"schedule": 3}), E,
         shape("accumulation", "schedule", 3, "must be a list of")),
    Case("accumulation.schedule bad pair", acc({"schedule": [[0, 1, 2]]}), E,
         shape("accumulation", "schedule", [[0, 1, 2]], lit("must be [start, micro_batches] pairs"))),
    Case("accumulation.schedule empty", acc({"schedule": []}), E, shape("accumulation", "schedule", {}, "must not be empty")),
    Case("accumulation.by unknown", acc({"schedule": [[0, 2]], "by": "epok"}), E,
         shape("accumulation", "by", "epok", lit("must be one of step, epoch (did you mean 'epoch'?)"))),
    Case("accumulation unknown key", acc({"schedule": [[0, 2]], "byy": "step"}), E,
         shape("accumulation", "byy", "step", lit("is not an accumulation option (did you mean 'by'?)"))),
]

PARTITION_CASES = [
    Case("partition.weight_decay=-1", part(weight_decay=-1), E, shape("partition", "weight_decay", -1, "must be >= 0")),
    Case("partition.weight_decay str", part(weight_decay="0.1"), E,
         shape("partition", "weight_decay", "0.1", "must be a number")),
    Case("partition.coupled str", part(coupled="yes"), E, shape("partition", "coupled", "yes", "must be true or false")),
    Case("partition.rules not a list", part(rules=3), E, shape("partition", "rules", 3, "must be a list")),
    Case("partition.rules[0] not a mapping", part(rules=["head.*"]), E,
         shape("partition", "rules[0]", "head.*", "must be a mapping")),
    Case("partition unknown key", part(rule=[]), E, shape("partition", "rule", [], lit("is not a partition option (did you mean 'rules'?)"))),
    Case("partition rule option typo", callback(partition={"rules": [{"match": "head.*", "lrr": 0.1}]}), E,
         shape("partition", "rules[0].lrr", 0.1, lit("adamw has no option 'lrr' (did you mean 'lr'?)"))),
    Case("partition rule option of another rule", callback(partition={"rules": [{"match": "head.*", "momentum": 0.9}]}), E,
         shape("partition", "rules[0].momentum", 0.9, lit("adamw has no option 'momentum'"))),
    Case("partition rule bad value", callback(partition={"rules": [{"match": "norm.*", "lr": -1}]}), E,
         shape("partition", "rules[0].lr", -1, "must be >= 0")),
    Case("param_groups rule with match and module", lambda: lo.param_groups(nn.Linear(2, 2), rules=[{"match": "*", "module": "Linear"}]),
         E, shape("param_groups", "rules[0]", {"match": "*", "module": "Linear"}, "needs exactly one of 'match'")),
    Case("param_groups unknown module type", lambda: lo.param_groups(nn.Linear(2, 2), rules=[{"module": "Linaer"}]),
         E, shape("param_groups", "rules[0].module", "Linaer", lit("is not a known nn.Module type (did you mean 'Linear'"))),
]

MONITOR_CASES = [
    Case("MomentMonitor every_n_steps=0", lambda: MomentMonitor(every_n_steps=0), E,
         shape("monitor", "every_n_steps", 0, lit("must be an int >= 1"))),
    Case("MomentMonitor every_n_steps float", lambda: MomentMonitor(every_n_steps=2.0), E,
         shape("monitor", "every_n_steps", 2.0, lit("must be an int >= 1"))),
    Case("MomentMonitor every_n_steps bool", lambda: MomentMonitor(every_n_steps=True), E,
         shape("monitor", "every_n_steps", True, lit("must be an int >= 1"))),
    Case("MomentMonitor expensive not a multiple", lambda: MomentMonitor(every_n_steps=3, expensive_every_n_steps=10), E,
         shape("monitor", "expensive_every_n_steps", 10, "must be a multiple of every_n_steps=3")),
    Case("MomentMonitor unknown stat", lambda: MomentMonitor(stats=["grad_norm", "snrr"]), E,
         shape("monitor", "stats", "snrr", r"must be one of grad_norm, .*\(did you mean 'snr'")),
    Case("MomentMonitor one unknown stat string", lambda: MomentMonitor(stats="grad_nrom"), E,
         shape("monitor", "stats", "grad_nrom", r"must be one of .*\(did you mean 'grad_norm'")),
    Case("MomentMonitor stats int", lambda: MomentMonitor(stats=3), E, shape("monitor", "stats", 3, "must be a list of strings")),
    Case("MomentMonitor include int", lambda: MomentMonitor(include=3), E,
         shape("monitor", "include", 3, "must be a list of strings")),
    Case("MomentMonitor include empty", lambda: MomentMonitor(include=[]), E,
         shape("monitor", "include", [], "must hold at least one pattern")),
    Case("MomentMonitor exclude non-string", lambda: MomentMonitor(exclude=["bias", 1]), E,
         shape("monitor", "exclude", 1, "must be a string")),
    Case("MomentMonitor histograms str", lambda: MomentMonitor(histograms="no"), E,
         shape("monitor", "histograms", "no", "must be true or false")),
    Case("MomentMonitor drift_max_elements=0", lambda: MomentMonitor(drift_max_elements=0), E,
         shape("monitor", "drift_max_elements", 0, lit("must be an int >= 1"))),
    Case("monitor.enabled str", mon(enabled="false"), E, shape("monitor", "enabled", "false", "must be true or false")),
    Case("monitor unknown key", mon(every_n_step=5), E,
         shape("monitor", "every_n_step", 5, lit("is not a monitor option (did you mean 'every_n_steps'"))),
]


# ----- plain PyTorch: groups given by hand -------------------------------------------------------------


def _two_groups() -> Any:
    shared = nn.Parameter(torch.ones(3, 2))
    return create_optimizer("adamw", [{"params": [shared]}, {"params": [shared]}])


def _coupled_vector() -> Any:
    model = nn.Sequential(nn.Embedding(5, 3), nn.LayerNorm(3))
    groups = [{"name": "embedding", "coupled": True, "params": [model[0].weight, model[1].weight],
               "param_names": ["0.weight", "1.weight"]}, {"name": "rest", "params": [model[1].bias]}]
    return create_optimizer("coupled_adam", groups)


def _all_frozen() -> Any:
    model = nn.Linear(2, 2).requires_grad_(False)
    return create_optimizer("adamw", model)


TORCH_CASES = [
    Case("param in two groups", _two_groups, ValueError, "some parameters appear in more than one parameter group"),
    Case("coupled group of 1-D params", _coupled_vector, E,
         r"^CoupledAdam: coupled groups must be 2-D or wider, but parameter '1\.weight' has shape \[3\]"),
    Case("module with no trainable parameter", _all_frozen, E,
         shape("param_groups", "module", "Linear", lit("has no trainable parameters (all 2 are frozen)"))),
]


# ----- through Trainer.fit: caught before the first optimizer step -----------------------------------------


class FrozenNormLM(BareLM):
    def __init__(self) -> None:
        super().__init__()
        self.norm.requires_grad_(False)


class ManualLM(BareLM):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


FIT_CASES = [
    Case("fit: Trainer gradient_clip_val and our clipping", Fit(trainer_kwargs={"gradient_clip_val": 1.0},
         clipping={"mode": "norm", "max_norm": 1.0}), E,
         r"^OptimizerCallback: Trainer\(gradient_clip_val=1\.0\) and clipping mode 'norm' are both set: choose one"),
    Case("fit: Trainer accumulate_grad_batches and our accumulation", Fit(trainer_kwargs={"accumulate_grad_batches": 2},
         accumulation={0: 1, 5: 2}), E,
         r"^OptimizerCallback: Trainer\(accumulate_grad_batches=2\) and an accumulation schedule .* are both set: choose one"),
    Case("fit: manual optimization", Fit(ManualLM), E,
         r"^OptimizerCallback: automatic_optimization=False is not supported"),
    Case("fit: partition rule matching nothing", Fit(partition={"rules": [{"match": "haed.*", "lr": 0.1}]}), E,
         shape("param_groups", "rules[0]", {"match": "haed.*", "lr": 0.1}, "matches no trainable parameter")),
    Case("fit: partition rule naming a frozen param", Fit(FrozenNormLM, partition={"rules": [{"match": "norm.*", "lr": 0.1}]}),
         E, shape("param_groups", "rules[0]", {"match": "norm.*", "lr": 0.1},
                  lit("matches only frozen parameters (requires_grad=False): 'norm.weight', 'norm.bias'"))),
    Case("fit: coupled rule on 1-D params", Fit(optimizer="coupled_adam", partition={"rules": [{"match": "*.bias", "coupled": True}]}),
         E, shape("param_groups", "rules[0]", {"match": "*.bias", "coupled": True},
                  r"coupled groups must be 2-D or wider, but 'norm\.bias' has shape \(16,\)")),
    Case("fit: scheduler warmup longer than the run", Fit(scheduler={"name": "warmup_cosine", "warmup_steps": 10}), E,
         shape("scheduler", "warmup_steps", 10, lit("must be < total_steps=3 (this run takes 3 optimizer steps)"))),
]

CASES: list[Case] = [*OPTIMIZER_FIELD_CASES, *OPTIMIZER_CASES, *SCHEDULER_CASES, *CLIPPING_CASES, *ACCUMULATION_CASES,
                     *PARTITION_CASES, *MONITOR_CASES, *TORCH_CASES, *FIT_CASES]


def test_the_table_is_what_it_says():
    """At least 40 distinct cases, unique ids, and every OptimizerConfig field with both a wrong
    type and a wrong range (a new field gets rows, or this fails)."""
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    assert len(CASES) >= 40
    for field in _FIELDS:
        rows = [c for c in OPTIMIZER_FIELD_CASES if c.id.startswith(f"optimizer.{field}=")]
        assert len(rows) == 2, (field, [c.id for c in rows])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_before_training(case):
    with warnings.catch_warnings():
        # A config that would also warn (e.g. CoupledAdam without a coupled group) must still fail
        # on the error under test, not on the project's warnings-as-errors filter.
        warnings.simplefilter("ignore", lo.LightningOptimWarning)
        with pytest.raises(case.exc, match=case.match):
            case.build()
    if isinstance(case.build, Fit):
        case.build.assert_nothing_ran()


OPT_NODE_CASES = [c for c in CASES if isinstance(c.build, opt)]


@pytest.mark.parametrize("case", OPT_NODE_CASES, ids=[c.id for c in OPT_NODE_CASES])
def test_the_optimizer_node_fails_the_same_through_the_callback(case):
    """OptimizerCallback(optimizer=...) is the public door; its message is the config's."""
    with pytest.raises(case.exc, match=case.match):
        OptimizerCallback(optimizer=case.build.mapping)


def test_control_the_fit_cases_train_when_the_input_is_fixed():
    """The Lightning rows fail because of their one bad input: fixed, the same setup steps."""
    fit = Fit(FrozenNormLM, partition={"rules": [{"match": "mlp.*", "lr": 0.1}]}, scheduler={"name": "warmup_cosine",
              "warmup_steps": 1}, accumulation={0: 1, 2: 2}, clipping={"mode": "norm", "max_norm": 1.0})
    fit()
    assert fit.counter.steps == 3
    assert not torch.equal(flat_params(fit.model), fit.before)


def test_control_a_schedule_without_key_zero_is_valid():
    """Not a bad input (documented, as Lightning's GradientAccumulationScheduler): no key 0 means
    one micro-batch until the first key."""
    assert C.accumulation_config({10: 2}).build().points == {0: 1, 10: 2}


# ----- Hydra -----------------------------------------------------------------------------------------


def _compose(*overrides: str):
    from hydra import compose, initialize_config_module

    with initialize_config_module(version_base=None, config_module="lightning_optim.conf"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("overrides, match", [
    (["optimizer=adam", "optimizer.momentum=0.9"], shape("optimizer", "momentum", 0.9, "adam has no option 'momentum'")),
    (["clipping=norm", "clipping.mode=nrom"], shape("clipping", "mode", "nrom", r".*did you mean 'norm'")),
    (["optimizer=sgd", "optimizer.nesterov=true"], shape("optimizer", "nesterov", True, "Nesterov momentum needs momentum > 0")),
    (["accumulation.schedule=[[0,1],[50,4],[20,8]]"], r"keys must increase, but 20 comes after 50"),
], ids=["momentum-on-adam", "clipping-mode-typo", "nesterov-without-momentum", "accumulation-out-of-order"])
def test_hydra_overrides_fail_when_the_callback_is_built(overrides, match):
    from lightning_optim.app.train import build_callback

    with pytest.raises(ConfigurationError, match=match):
        build_callback(_compose(*overrides))


def test_hydra_monitor_override_fails_when_the_monitor_is_built():
    with pytest.raises(ConfigurationError, match=shape("monitor", "every_n_steps", 0, lit("must be an int >= 1"))):
        MomentMonitor.from_config(_compose("monitor.every_n_steps=0").monitor)


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    (["optimizer.lr=-1"], "optimizer: lr=-1.0 is invalid: must be > 0"),
    (["scheduler=warmup_cosine", "scheduler.warmup_steps=100", "scheduler.total_steps=50"],
     "scheduler: warmup_steps=100 is invalid: must be < total_steps=50"),
], ids=["lr=-1", "warmup-longer-than-total"])
def test_hydra_entry_point_exits_2_with_one_paragraph(tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lightning_optim.train", *overrides, f"hydra.run.dir={run_dir}",
                           "hydra/job_logging=none", "hydra/hydra_logging=none"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert err == f"lightning_optim.train: invalid configuration: {message}", err
    assert not (run_dir / "checkpoints").exists()  # refused before anything was built


def test_fsdp1_strategy_is_refused_with_the_way_out():
    """Lightning's FSDPStrategy needs a GPU to build a Trainer, so the callback's check is
    called as Lightning calls it, with a trainer that carries that strategy."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    trainer = SimpleNamespace(gradient_clip_val=None, accumulate_grad_batches=1, strategy=FSDPStrategy())
    module = BareLM()
    with pytest.raises(ConfigurationError, match=r"FSDPStrategy \(FSDP1\) is not supported.*ModelParallelStrategy"):
        OptimizerCallback(optimizer="coupled_adam").setup(trainer, module, "fit")
    assert module.configure_optimizers.__func__ is BareLM.configure_optimizers  # nothing installed
