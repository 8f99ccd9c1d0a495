"""The config schema: one dataclass per concern, shared by the Python API and Hydra.

``OptimizerCallback(optimizer={"name": "coupled_adam", "lr": 3e-4})`` and the Hydra
override ``optimizer=coupled_adam optimizer.lr=3e-4`` go through the same dataclass, so a
value is checked the same way on both paths: when the config is built, before training.
Hydra additionally rejects unknown keys and wrong types at compose time, because these
dataclasses are its structured-config schema (registered by :mod:`lightning_optim.conf`).

Each ``*_config(value)`` function takes what a user may pass (None, a registry name, a
mapping, an int for accumulation, or the dataclass) and returns the checked dataclass.

Defaults have one home each, and a name means the same thing on every path: an optimizer
name's defaults are its class's, with the registry's preset (:func:`registry.options`); a
schedule name's are :func:`lightning_optim.schedules.defaults`; a clipping name's are
:data:`CLIPPING_PRESETS`; every other field's is the dataclass field's. The YAML files in
``conf/`` list the same values (``tests/test_hydra.py`` compares them, and
the README tables, to these).

Errors name the config node the bad value was written in, whichever layer finds it: a bad
``betas`` in the ``optimizer`` node reads ``optimizer: betas[1]=1.5 is invalid: ...`` whether
the schema or the optimizer class caught it (:func:`node_error`). The class's own name
(``AdamW: betas[1]=...``) appears only where the class, or ``create_optimizer``, is called
directly, without a node.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from . import registry
from .accumulation import AccumulationSchedule
from .clipping import GradientClipper
from .schedules import SCHEDULES, check_schedule
from .schedules import defaults as schedule_defaults
from .stats import STATS
from .validation import ConfigurationError, at_least, boolean, choice, invalid, positive, suggest

# The components whose errors belong to a config node other than their own name: the
# optimizer classes (and create_optimizer) report on the ``optimizer`` node, param_groups on
# ``partition``, the statistics on ``monitor``. See :func:`node_error`.
COMPONENT_NODES: dict[str, str] = {
    **{entry.cls.__name__: "optimizer" for entry in registry.REGISTRY.values()},
    "create_optimizer": "optimizer",
    "param_groups": "partition",
    "MomentStats": "monitor",
    "MomentMonitor": "monitor",
}
# ``Owner: `` or ``Owner group 'name': `` at the start of a message (validation.invalid's shape).
_OWNER = re.compile(r"^(?P<owner>[A-Za-z_][\w.]*)(?: group '[^']*')?: (?P<rest>.*)$", re.DOTALL)


def node_error(err: BaseException, node: str | None = None, field_prefix: str = "",
               nodes: Mapping[str, str] = COMPONENT_NODES) -> ConfigurationError:
    """``err`` as reported by the config node its value was written in.

    The prefix is chosen so that one node has one name in every message: ``node`` when the
    caller knows which node the value came from (the optimizer node's own checks pass
    ``"optimizer"``), else the node ``nodes`` (:data:`COMPONENT_NODES`) gives for the component
    named at the start of the message (``AdamW: ...`` -> ``optimizer: ...``, ``param_groups: ...`` ->
    ``partition: ...``); a message from a component that is no one node's (e.g.
    ``OptimizerCallback: Trainer(gradient_clip_val=1.0) and clipping mode 'norm' are both set``)
    keeps its name. ``field_prefix`` is put before the field (``rules[0].`` for a partition
    rule's option). The result is a :class:`ConfigurationError` with the same requirement text.
    """
    message = str(err)
    match = _OWNER.match(message)
    if match is None:  # not the Owner: field=value shape; still say whose it is
        return ConfigurationError(f"{node}: {message}" if node else message)
    owner = node or nodes.get(match["owner"], match["owner"])
    return ConfigurationError(f"{owner}: {field_prefix}{match['rest']}")



def compose_error(err: BaseException) -> ConfigurationError:
    """``err``, raised by Hydra while composing the config, as one line that names the key and
    quotes the value, in :func:`invalid`'s shape: ``optimizer.lr=abc`` reads ``optimizer:
    lr='abc' is invalid: Value 'abc' of type 'str' could not be converted to Float``, and
    ``optimizer=nonexistent`` reads ``optimizer: optimizer='nonexistent' is invalid: must be one
    of adagrad, ...``. Hydra prints these as several lines (OmegaConf's ``full_key:`` and
    ``object_type=`` lines, the config search path); the key is taken from OmegaConf's
    ``full_key`` or from the override Hydra names, the value from that override. An error with
    neither keeps its own text, joined into one line.
    """
    def one_line(e: BaseException) -> str:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        kept = [line for line in lines if not line.startswith(("full_key:", "object_type=", "reference_type="))]
        return " ".join(kept) or type(e).__name__

    def split(key: str) -> tuple[str, str]:
        node, _, rest = key.partition(".")
        return (node, rest) if rest else ("config", node)

    missing = getattr(err, "missing_cfg_file", None)
    if missing and getattr(err, "options", None):  # group=option with no such option
        group, _, option = str(missing).rpartition("/")
        if group:
            return invalid(group, group.rsplit("/", 1)[-1], option,
                           f"must be one of {', '.join(err.options)}{suggest(option, err.options)}")
    cause = err.__cause__
    text = str(err)
    override = getattr(err, "override", None)  # OverrideParseException carries it
    found = re.search(r"(?:Error merging override |use \+)(\S+=.*)$", text, re.MULTILINE)
    if found:
        override = found[1]
    key = value = None
    if override:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        try:
            parsed = OverridesParser.create().parse_override(override.lstrip("+~"))
            key, value = parsed.key_or_group, parsed.value()
        except Exception:  # noqa: BLE001  an unparsable override: its own text
            key, _, value = override.lstrip("+~").partition("=")
    full_key = getattr(cause, "full_key", None) or getattr(err, "full_key", None)
    reason = one_line(cause) if cause is not None else one_line(err)
    if key is None and full_key:
        key = full_key
    if key is None:
        return ConfigurationError(one_line(err) + (f": {reason}" if cause is not None else ""))
    node, field_name = split(key)
    if type(cause).__name__ in ("ConfigAttributeError", "ConfigKeyError"):
        schema = SCHEMAS.get(node)
        if schema is not None and field_name:
            known = [f.name for f in dataclasses.fields(schema)]
            reason = f"{node} has no option {field_name!r}{suggest(field_name, known)}; its options are {', '.join(known)}"
        else:
            reason = f"no such key in the config (add one with +{key}=...)"
    elif "Cannot merge DictConfig with ListConfig" in reason:
        reason = "a mapping cannot replace the list this option sets (Hydra merges a mapping into a mapping only)"
        if isinstance(value, Mapping) and key == "accumulation.schedule":
            pairs = ",".join(f"[{k},{v}]" for k, v in value.items())
            reason += f"; write it as pairs: accumulation.schedule=[{pairs}]"
    elif full_key and full_key != key:
        reason += f" (at {full_key})"
    if value is None and not override:
        return ConfigurationError(f"{node}: {field_name} is invalid: {reason}")
    return invalid(node, field_name, value, reason)

def _optimizer_post_init(self) -> None:
    options = registry.options(self.name)  # raises on an unknown name, with suggestions
    kwargs = self.kwargs()
    for key in kwargs:
        if key not in options:
            raise invalid(
                "optimizer", key, kwargs[key],
                f"{self.name} has no option {key!r}; its options are {', '.join(options)}",
            )
    if self.lr is not None:
        positive("optimizer", "lr", self.lr)
    # The optimizer's own checks, run once on a placeholder tensor, so that a bad value
    # fails here, with the optimizer's message under this node's name, not after the model is built.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            registry.create_optimizer(self.name, [torch.zeros(1, requires_grad=True)], **kwargs)
        except ConfigurationError as err:
            raise node_error(err, "optimizer") from err


def _optimizer_kwargs(self) -> dict[str, Any]:
    """The hyperparameters that were set, ready for ``create_optimizer``."""
    return {
        f.name: getattr(self, f.name)
        for f in dataclasses.fields(self)
        if f.name != "name" and getattr(self, f.name) is not None
    }


# Group options that are the partition's to set, not the optimizer node's (``partition.coupled``).
_PARTITION_OPTIONS = ("coupled",)


def _option_type(default: Any) -> Any:
    if isinstance(default, bool):
        return Optional[bool]
    if isinstance(default, (tuple, list)):
        return Optional[list[float]]
    return Optional[float]


def _optimizer_fields() -> list[tuple[str, Any, Any]]:
    """The ``optimizer`` node's fields, generated from the rule table: ``name``, then every
    option of every registry name (each once, in the order the registry first meets it) as
    ``Optional`` with default None ("the rule's default"), then ``backend``."""
    seen: dict[str, Any] = {}
    for name in registry.optimizers():
        for key, default in registry.options(name).items():
            if key not in ("backend", *_PARTITION_OPTIONS):
                seen.setdefault(key, default)
    return [("name", str, dataclasses.field(default="adamw")),
            *((key, _option_type(default), dataclasses.field(default=None)) for key, default in seen.items()),
            ("backend", str, dataclasses.field(default="auto"))]


# The ``optimizer`` node: a dataclass (Hydra's ConfigStore takes dataclasses) generated from
# the rule table, so a new rule's options appear here without an edit.
OptimizerConfig = dataclasses.make_dataclass(
    "OptimizerConfig", _optimizer_fields(),
    namespace={
        "__doc__": """The ``optimizer`` node. Fields left ``None`` take the rule's default (see README).

    Only the fields the named rule has may be set: ``momentum`` on ``adam`` is an error. The
    fields are every registry name's options (:func:`lightning_optim.registry.options`, read
    from the rule table), generated once at import.
    """,
        "__post_init__": _optimizer_post_init,
        "kwargs": _optimizer_kwargs,
    },
)
OptimizerConfig.__module__ = __name__  # (make_dataclass's ``module=`` needs Python 3.12)


@dataclass
class SchedulerConfig:
    """The ``scheduler`` node: a multiplier of every group's lr per optimizer step.

    ``total_steps: None`` takes the trainer's total optimizer steps (from ``max_steps``,
    or counted from the epochs and the accumulation schedule). The other fields left ``None``
    take the schedule's default, :func:`lightning_optim.schedules.defaults` (the one table
    of them: ``scheduler="warmup_cosine"`` here and ``scheduler=warmup_cosine`` in Hydra
    are the same schedule); once built, every field but ``total_steps`` holds a value.
    """

    name: str = "constant"
    total_steps: Optional[int] = None
    warmup_steps: Optional[int] = None
    decay: Optional[float] = None
    step_size: Optional[int] = None
    gamma: Optional[float] = None
    min_lr_ratio: Optional[float] = None

    def __post_init__(self) -> None:
        choice("scheduler", "name", self.name, SCHEDULES)
        for key, value in schedule_defaults(self.name).items():
            if key != "total_steps" and getattr(self, key) is None:
                setattr(self, key, value)
        total = 10**12 if self.total_steps is None else self.total_steps  # None: the trainer's, known later
        check_schedule(self.name, **self.options(total_steps=total))

    def options(self, total_steps: int | None = None) -> dict[str, Any]:
        return {
            "total_steps": total_steps if total_steps is not None else self.total_steps,
            "warmup_steps": self.warmup_steps,
            "decay": self.decay,
            "step_size": self.step_size,
            "gamma": self.gamma,
            "min_lr_ratio": self.min_lr_ratio,
        }


@dataclass
class ClippingConfig:
    """The ``clipping`` node: ``mode`` none / value / norm, global or per named group."""

    mode: str = "none"
    max_norm: Optional[float] = None
    max_value: Optional[float] = None
    norm_type: float = 2.0
    per_group: dict[str, float] = field(default_factory=dict)
    skip_nonfinite: bool = True
    max_consecutive_skips: int = 10

    def __post_init__(self) -> None:
        self.build()

    def build(self) -> GradientClipper:
        return GradientClipper(
            self.mode, max_norm=self.max_norm, max_value=self.max_value, norm_type=self.norm_type,
            per_group=dict(self.per_group) if isinstance(self.per_group, Mapping) else self.per_group,
            skip_nonfinite=self.skip_nonfinite,
            max_consecutive_skips=self.max_consecutive_skips,
        )


@dataclass
class AccumulationConfig:
    """The ``accumulation`` node: micro-batches per optimizer step, keyed by step or epoch.

    ``schedule`` takes two forms, in Python, in a YAML file and on the command line:
    ``[[start, micro_batches], ...]`` pairs, e.g. ``[[0, 1], [200, 4]]``, or the mapping
    ``{start: micro_batches}``, e.g. ``{0: 1, 200: 4}`` (YAML and Hydra's override grammar
    read ``0`` and ``200`` as int keys; quoted ``'200'`` is taken too). ``None``, the default,
    is one micro-batch per step, ``[[0, 1]]``. The shipped options write pairs because Hydra
    replaces a list on override (``accumulation.schedule=[[0,1],[50,4]]``) but merges a mapping
    key by key into a mapping, and cannot merge a mapping into a list at all. The schema types
    the field ``Any`` so that either form composes; this class checks it.
    """

    schedule: Any = None
    by: str = "step"

    def __post_init__(self) -> None:
        if self.schedule is None:
            self.schedule = [[0, 1]]
        if isinstance(self.schedule, Mapping):
            self.schedule = [[k, v] for k, v in self.schedule.items()]
        if isinstance(self.schedule, (str, bytes)) or not isinstance(self.schedule, Iterable):
            raise invalid("accumulation", "schedule", self.schedule,
                          "must be a list of [start, micro_batches] pairs like [[0, 1], [200, 4]], or a mapping "
                          "like {0: 1, 200: 4}")
        self.schedule = [list(pair) if isinstance(pair, (list, tuple)) else pair for pair in self.schedule]
        for pair in self.schedule:
            if not isinstance(pair, list) or len(pair) != 2:
                raise invalid("accumulation", "schedule", self.schedule,
                              f"must be [start, micro_batches] pairs like [[0, 1], [200, 4]]; {pair!r} is not a pair")
        starts = [str(start) for start, _ in self.schedule]
        for start in starts:
            if starts.count(start) > 1:  # points() would keep only the last one
                raise invalid("accumulation", "schedule", self.schedule, f"has start {start} twice")
        self.build()

    def points(self) -> dict[int, int]:
        return {k: v for k, v in self.schedule}

    def build(self) -> AccumulationSchedule:
        return AccumulationSchedule(self.points(), by=self.by)


@dataclass
class PartitionConfig:
    """The ``partition`` node: options of :func:`lightning_optim.param_groups`.

    ``coupled: None`` couples the embedding group exactly when the optimizer can (CoupledAdam).
    """

    rules: list[dict[str, Any]] = field(default_factory=list)
    weight_decay: Optional[float] = None
    coupled: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.weight_decay is not None:
            at_least("partition", "weight_decay", self.weight_decay)
        if self.coupled is not None:
            boolean("partition", "coupled", self.coupled)
        if isinstance(self.rules, (str, bytes, Mapping)) or not isinstance(self.rules, Iterable):
            raise invalid("partition", "rules", self.rules,
                          "must be a list like [{'match': 'head.*', 'lr': 0.1}]")
        for i, rule in enumerate(self.rules):
            if not isinstance(rule, Mapping):
                raise invalid("partition", f"rules[{i}]", rule, "must be a mapping with 'match' or 'module'")

    def check_options(self, optimizer: OptimizerConfig) -> None:
        """Check each rule's group options against ``optimizer``, before any model exists: a typo
        (``lrr``) or another rule's option would otherwise sit in the group unread."""
        allowed = [k for k in registry.options(optimizer.name) if k != "backend"]
        allowed += [] if "coupled" in allowed else ["coupled"]  # others warn and ignore it
        for i, rule in enumerate(self.rules):
            # match/module/group and the reserved keys are param_groups' to check
            skip = ("match", "module", "group", "params", "param_names", "name")
            opts = {k: v for k, v in rule.items() if k not in skip}
            for key, value in opts.items():
                if key not in allowed:
                    raise invalid("partition", f"rules[{i}].{key}", value, f"{optimizer.name} has no option "
                                  f"{key!r}{suggest(key, allowed)}; its options are {', '.join(allowed)}")
            group = {"params": [torch.zeros(1, 1, requires_grad=True)], **opts,
                     "name": rule.get("group", rule.get("match", f"rules[{i}]"))}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    registry.create_optimizer(optimizer.name, [group], **optimizer.kwargs())
                except ConfigurationError as err:  # the rule's value, e.g. its lr: this node's, rules[i]
                    raise node_error(err, "partition", f"rules[{i}].") from err


@dataclass
class MonitorConfig:
    """The ``monitor`` node: the keyword arguments of :class:`lightning_optim.MomentMonitor`,
    same names, same order, same defaults, so ``MomentMonitor(**node)`` builds it.

    ``stats=None`` means all of :data:`lightning_optim.stats.STATS`; it holds that list once
    checked. ``enabled=False`` (the ``off`` node) makes a monitor that does nothing.
    """

    every_n_steps: int = 50
    expensive_every_n_steps: int = 500
    stats: Optional[list[str]] = None
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    update_ratio: bool = True
    embeddings: bool = True
    histograms: bool = True
    drift_max_elements: int = 1 << 20
    enabled: bool = True

    def __post_init__(self) -> None:
        for name in ("enabled", "update_ratio", "embeddings", "histograms"):
            boolean("monitor", name, getattr(self, name))
        if self.stats is None:
            self.stats = list(STATS)
        for name in ("stats", "include", "exclude"):  # one string is one name, as MomentStats takes it
            value = getattr(self, name)
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, Iterable) or isinstance(value, (bytes, Mapping)):
                raise invalid("monitor", name, value, "must be a list of strings")
            value = list(value)
            for item in value:
                if not isinstance(item, str):
                    raise invalid("monitor", name, item, "must be a string")
            setattr(self, name, value)
        if not self.include:
            raise invalid("monitor", "include", self.include,
                          "must hold at least one pattern (\"*\" for all)")
        for name in ("every_n_steps", "expensive_every_n_steps", "drift_max_elements"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise invalid("monitor", name, value, "must be an int >= 1")
        if self.expensive_every_n_steps % self.every_n_steps:
            raise invalid(
                "monitor", "expensive_every_n_steps", self.expensive_every_n_steps,
                f"must be a multiple of every_n_steps={self.every_n_steps}",
            )
        for stat in self.stats:
            choice("monitor", "stats", stat, STATS)


@dataclass
class CheckpointConfig:
    """The main job's ``checkpoint`` node (``python -m lightning_optim.train``).

    ``every_n_steps``: a checkpoint every that many optimizer steps (``epoch=E-step=S.ckpt``)
    and ``last.ckpt`` with it, each written atomically; ``keep``: how many of the step
    checkpoints stay on disk (the newest; -1 keeps all), ``last.ckpt`` besides. Two, so that a
    damaged newest file still leaves one to resume from.
    """

    every_n_steps: int = 50
    keep: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.every_n_steps, bool) or not isinstance(self.every_n_steps, int) or self.every_n_steps < 1:
            raise invalid("checkpoint", "every_n_steps", self.every_n_steps, "must be an int >= 1")
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or (self.keep < 1 and self.keep != -1):
            raise invalid("checkpoint", "keep", self.keep, "must be an int >= 1, or -1 to keep all")


def _coerce(kind: str, cls: type, value: Any, name_field: str | None = "name") -> Any:
    """A user's value -> the checked dataclass ``cls``."""
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    if isinstance(value, str) and name_field is not None:
        return cls(**{name_field: value})
    if hasattr(value, "items"):  # dict, DictConfig
        data = {str(k): v for k, v in _plain(value).items()}
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise invalid(kind, key, data[key], f"is not {_a(kind)} option{suggest(key, known)}; options: {', '.join(sorted(known))}")
        return cls(**data)
    raise invalid(kind, kind, value, f"must be {'a name, ' if name_field else ''}a mapping or {_a(cls.__name__)}")


def _a(word: str) -> str:
    return f"{'an' if word[0].lower() in 'aeiou' else 'a'} {word}"


def _plain(value: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # the optimizers don't need omegaconf; only configs coming from Hydra do
        pass
    return value


def optimizer_config(value: Any) -> OptimizerConfig:
    return _coerce("optimizer", OptimizerConfig, value)


def scheduler_config(value: Any) -> SchedulerConfig:
    return _coerce("scheduler", SchedulerConfig, value)


# Hydra's clipping=<name> options, which the Python API takes by the same names
# (``clipping="norm"``); conf/clipping/<name>.yaml holds exactly these values.
CLIPPING_PRESETS: dict[str, dict[str, Any]] = {
    "none": {"mode": "none"},
    "value": {"mode": "value", "max_value": 1.0},
    "norm": {"mode": "norm", "max_norm": 1.0},
    "per_group": {"mode": "norm", "max_norm": 1.0, "per_group": {"embedding": 0.5}},
}


def clipping_config(value: Any) -> ClippingConfig:
    """A mapping, the dataclass, or a name of :data:`CLIPPING_PRESETS` (``"norm"`` is
    ``{"mode": "norm", "max_norm": 1.0}``, as Hydra's ``clipping=norm``)."""
    if isinstance(value, str) and value in CLIPPING_PRESETS:
        return ClippingConfig(**copy.deepcopy(CLIPPING_PRESETS[value]))
    return _coerce("clipping", ClippingConfig, value, name_field="mode")


def partition_config(value: Any) -> PartitionConfig:
    return _coerce("partition", PartitionConfig, value, name_field=None)


def monitor_config(value: Any) -> MonitorConfig:
    return _coerce("monitor", MonitorConfig, value, name_field=None)


def accumulation_config(value: Any) -> AccumulationConfig:
    """``4`` (constant), ``{0: 1, 200: 4}`` (a step schedule), or ``{"schedule": ..., "by": ...}``."""
    value = _plain(value)
    if isinstance(value, AccumulationConfig):
        return value
    if value is None:
        return AccumulationConfig()
    if isinstance(value, int) and not isinstance(value, bool):
        return AccumulationConfig(schedule=[[0, value]])
    if isinstance(value, Mapping) and value and not ({"schedule", "by"} & set(map(str, value))):
        return AccumulationConfig(schedule=[[k, v] for k, v in value.items()])
    return _coerce("accumulation", AccumulationConfig, value, name_field=None)


# The dataclass of each Hydra config group, the schema its YAML files extend (registered in
# Hydra's ConfigStore by :mod:`lightning_optim.conf`, which imports this mapping).
SCHEMAS: dict[str, type] = {
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "clipping": ClippingConfig,
    "accumulation": AccumulationConfig,
    "partition": PartitionConfig,
    "monitor": MonitorConfig,
}
