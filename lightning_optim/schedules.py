"""Learning-rate schedules: a multiplier of each param group's base lr, per optimizer step.

``t`` counts the optimizer steps already taken (0-based): ``lr_factor(name, 0)`` scales the
lr of the very first step. With ``w = warmup_steps``, ``T = total_steps``, ``r = min_lr_ratio``:

Warmup (every schedule takes ``warmup_steps``, default 0 = none, 100 for ``warmup_*``; Goyal et al. 2017, "Accurate,
Large Minibatch SGD", sec. 2.2, gradual warmup; the GPT-3 / nanoGPT form)::

    t < w:   (t + 1) / w                  the first step gets lr/w, not 0; step w-1 gets lr
    t >= w:  the schedule below at s = t - w, so it starts at exactly 1 when warmup ends

Schedules, as functions of ``s`` (``s = t`` when ``w = 0``)::

    constant       1
    time_decay     1 / (1 + decay * s)                         time-based (inverse-time) decay
    step           gamma ** floor(s / step_size)               step decay
    exponential    gamma ** s                                  exponential decay
    cosine         r + (1 - r) * 0.5 * (1 + cos(pi * s / (T - w)))   for s < T - w, then r
                   (Loshchilov & Hutter 2017, SGDR, eq. 5, one cycle, no restarts)
    warmup_cosine  cosine, with warmup_steps >= 1 required
    warmup_linear  r + (1 - r) * (1 - s / (T - w))             for s < T - w, then r

So the cosine and linear decays always reach ``r`` at ``t = T`` whatever the warmup, and hold
it afterwards (a run that outlives its estimate keeps training at the floor, never at a
rising lr). ``cosine`` with ``warmup_steps > 0`` is the same curve as ``warmup_cosine``; the
``warmup_*`` names exist so that choosing one and forgetting the warmup is an error rather
than a silent run without warmup.

Options each schedule reads, with the default it takes when the option is not given
(setting any other option to a value other than its neutral default in :data:`DEFAULTS` is an
error, so that ``gamma=0.5`` on a cosine schedule cannot be silently ignored)::

    constant       warmup_steps=0
    time_decay     warmup_steps=0, decay=0.01 (>= 0)
    step           warmup_steps=0, step_size=100 (int >= 1), gamma=0.5 (in (0, 1])
    exponential    warmup_steps=0, gamma=0.99 (in (0, 1])
    cosine         total_steps (required), warmup_steps=0, min_lr_ratio=0.0 (in [0, 1])
    warmup_cosine, warmup_linear
                   total_steps (required), warmup_steps=100, min_lr_ratio=0.0

:func:`defaults` is the one table of these defaults: the ``scheduler`` config node
(:class:`lightning_optim.config.SchedulerConfig`, hence ``OptimizerCallback`` and Hydra's
``scheduler=<name>``, whose YAML files list the same values), :class:`Schedule`,
:func:`build_scheduler`, :func:`lr_factor` and :func:`check_schedule` all take an option
left out (or ``None``) from it, so a name means the same schedule on every path.

``total_steps`` is accepted by every schedule (the Lightning callback passes the trainer's
estimate to all of them); where it is given, ``warmup_steps < total_steps`` is required.

:func:`build_scheduler` returns a ``torch.optim.lr_scheduler.LambdaLR`` driven by one
:class:`Schedule` object for all param groups, so each group's own lr is scaled and the
ratios between groups are kept. :class:`Schedule` is a plain object whose attributes are
the options, so ``LambdaLR.state_dict()`` saves them (torch saves a callable object's
``__dict__``) and ``copy.deepcopy`` / pickle work. :func:`with_total_steps` corrects the
total of a built scheduler once the real number of steps is known; the corrected total is
in the state dict, so it survives a checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from . import compat
from .validation import at_least, choice, invalid, number, suggest, unit_interval

OWNER = "scheduler"

SCHEDULES: tuple[str, ...] = (
    "constant", "time_decay", "step", "exponential", "cosine", "warmup_cosine", "warmup_linear",
)

# The neutral value of every option: what an option a schedule does not read must stay at.
DEFAULTS: dict[str, Any] = {
    "total_steps": None,
    "warmup_steps": 0,
    "decay": 0.0,
    "step_size": 1,
    "gamma": 1.0,
    "min_lr_ratio": 0.0,
}

# The defaults of the options a schedule reads, where they differ from the neutral value: a
# step or exponential schedule that never decays, or a warmup_* schedule without warmup,
# would be a schedule in name only.
PRESETS: dict[str, dict[str, Any]] = {
    "constant": {},
    "time_decay": {"decay": 0.01},
    "step": {"step_size": 100, "gamma": 0.5},
    "exponential": {"gamma": 0.99},
    "cosine": {},
    "warmup_cosine": {"warmup_steps": 100},
    "warmup_linear": {"warmup_steps": 100},
}

# total_steps is absent: every schedule accepts it (see the module docstring).
READS: dict[str, frozenset[str]] = {
    "constant": frozenset({"warmup_steps"}),
    "time_decay": frozenset({"warmup_steps", "decay"}),
    "step": frozenset({"warmup_steps", "step_size", "gamma"}),
    "exponential": frozenset({"warmup_steps", "gamma"}),
    "cosine": frozenset({"warmup_steps", "min_lr_ratio"}),
    "warmup_cosine": frozenset({"warmup_steps", "min_lr_ratio"}),
    "warmup_linear": frozenset({"warmup_steps", "min_lr_ratio"}),
}
_READS = READS
_NEEDS_TOTAL = frozenset({"cosine", "warmup_cosine", "warmup_linear"})
_NEEDS_WARMUP = frozenset({"warmup_cosine", "warmup_linear"})


def defaults(name: str) -> dict[str, Any]:
    """Every option of schedule ``name`` with the value it takes when not given: the neutral
    :data:`DEFAULTS`, with the schedule's own :data:`PRESETS` over the options it reads."""
    choice(OWNER, "name", name, SCHEDULES)
    return {**DEFAULTS, **PRESETS[name]}


def _integer(field: str, value: Any, low: int) -> int:
    # YAML and Lightning's estimated_stepping_batches can hand over 1000.0; accept whole
    # floats, but never bools, fractions, inf or NaN.
    if isinstance(value, bool):
        raise invalid(OWNER, field, value, "must be an integer")
    if isinstance(value, numbers.Integral):
        v = int(value)
    elif isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        v = int(value)
    else:
        raise invalid(OWNER, field, value, "must be an integer")
    if v < low:
        raise invalid(OWNER, field, value, f"must be an integer >= {low}")
    return v


def _normalize(
    name: Any, total_steps: Any, warmup_steps: Any, decay: Any, step_size: Any, gamma: Any,
    min_lr_ratio: Any,
) -> dict[str, Any]:
    """Validate every option and return them converted (ints as int, reals as float); an
    option given as ``None`` takes the schedule's default (:func:`defaults`)."""
    base = defaults(name)
    total_steps = base["total_steps"] if total_steps is None else total_steps
    warmup_steps = base["warmup_steps"] if warmup_steps is None else warmup_steps
    decay = base["decay"] if decay is None else decay
    step_size = base["step_size"] if step_size is None else step_size
    gamma = base["gamma"] if gamma is None else gamma
    min_lr_ratio = base["min_lr_ratio"] if min_lr_ratio is None else min_lr_ratio
    opts: dict[str, Any] = {
        "total_steps": None if total_steps is None else _integer("total_steps", total_steps, 1),
        "warmup_steps": _integer("warmup_steps", warmup_steps, 0),
        "decay": at_least(OWNER, "decay", decay, 0.0),
        "step_size": _integer("step_size", step_size, 1),
        "gamma": number(OWNER, "gamma", gamma),
        "min_lr_ratio": unit_interval(OWNER, "min_lr_ratio", min_lr_ratio, closed=True),
    }
    reads = _READS[name]
    for field, default in DEFAULTS.items():
        if field != "total_steps" and field not in reads and opts[field] != default:
            used = ", ".join(["total_steps", *sorted(reads)])
            raise invalid(OWNER, field, opts[field], f"{name!r} does not use it (it uses {used})")
    if "gamma" in reads and not 0.0 < opts["gamma"] <= 1.0:
        raise invalid(OWNER, "gamma", gamma, "must be in (0, 1]")
    if name in _NEEDS_TOTAL and opts["total_steps"] is None:
        raise invalid(OWNER, "total_steps", None, f"{name!r} needs total_steps (an integer >= 1)")
    if name in _NEEDS_WARMUP and opts["warmup_steps"] < 1:
        raise invalid(
            OWNER, "warmup_steps", warmup_steps,
            f"{name!r} needs warmup_steps >= 1 (use 'cosine' or 'constant' for no warmup)",
        )
    if opts["total_steps"] is not None and opts["warmup_steps"] >= opts["total_steps"]:
        raise invalid(
            OWNER, "warmup_steps", warmup_steps, f"must be < total_steps={opts['total_steps']!r}"
        )
    return opts


def check_schedule(
    name: str,
    *,
    total_steps: int | None = None,
    warmup_steps: int | None = None,
    decay: float | None = None,
    step_size: int | None = None,
    gamma: float | None = None,
    min_lr_ratio: float | None = None,
) -> None:
    """Raise ``ValueError`` (``scheduler: field=value is invalid: ...``) on any bad option.
    Options left ``None`` take the schedule's default (:func:`defaults`)."""
    _normalize(name, total_steps, warmup_steps, decay, step_size, gamma, min_lr_ratio)


@dataclasses.dataclass
class Schedule:
    """The picklable lr multiplier ``LambdaLR`` calls with the step count.

    Built through :func:`build_scheduler` or directly (``Schedule("cosine", total_steps=100)``);
    either way the options are validated. Its attributes are exactly the options, because
    ``LambdaLR.state_dict()`` stores them (and ``load_state_dict`` puts them back as they were).
    """

    name: str
    total_steps: int | None = None
    warmup_steps: int | None = None  # None: the schedule's default (see defaults())
    decay: float | None = None
    step_size: int | None = None
    gamma: float | None = None
    min_lr_ratio: float | None = None

    def __post_init__(self) -> None:
        opts = _normalize(self.name, self.total_steps, self.warmup_steps, self.decay,
                          self.step_size, self.gamma, self.min_lr_ratio)
        self.__dict__.update(opts)

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}

    def set_total_steps(self, total_steps: int) -> None:
        """Change the total in place, validated like the rest (see :func:`with_total_steps`)."""
        opts = _normalize(self.name, total_steps, self.warmup_steps, self.decay, self.step_size,
                          self.gamma, self.min_lr_ratio)
        self.total_steps = opts["total_steps"]

    def __call__(self, t: int) -> float:
        w = self.warmup_steps
        if t < w:
            return (t + 1) / w
        s = t - w
        name = self.name
        if name == "constant":
            return 1.0
        if name == "time_decay":
            return 1.0 / (1.0 + self.decay * s)
        if name == "step":
            return self.gamma ** (s // self.step_size)
        if name == "exponential":
            return self.gamma**s
        span = self.total_steps - w  # > 0, validated
        r = self.min_lr_ratio
        if s >= span:
            return r
        if name == "warmup_linear":
            return r + (1.0 - r) * (1.0 - s / span)
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * s / span))

    def describe(self) -> str:
        """One line for logs, e.g. ``warmup_cosine: 100 warmup steps, cosine to 0.1x over 1000 steps``."""
        parts = [f"{self.warmup_steps} warmup steps"] if self.warmup_steps else []
        name = self.name
        if name == "constant":
            parts.append("constant 1x")
        elif name == "time_decay":
            parts.append(f"1 / (1 + {self.decay:g} * t)")
        elif name == "step":
            parts.append(f"x{self.gamma:g} every {self.step_size} steps")
        elif name == "exponential":
            parts.append(f"x{self.gamma:g} per step")
        else:
            shape = "linear" if name == "warmup_linear" else "cosine"
            parts.append(f"{shape} to {self.min_lr_ratio:g}x over {self.total_steps} steps")
        return f"{name}: {', '.join(parts)}"


def lr_factor(
    name: str,
    t: int,
    *,
    total_steps: int | None = None,
    warmup_steps: int | None = None,
    decay: float | None = None,
    step_size: int | None = None,
    gamma: float | None = None,
    min_lr_ratio: float | None = None,
) -> float:
    """The multiplier of the base lr at optimizer step ``t`` (0-based), options validated
    (those left ``None`` take the schedule's default)."""
    schedule = Schedule(name, total_steps, warmup_steps, decay, step_size, gamma, min_lr_ratio)
    return schedule(_integer("t", t, 0))


def _schedule(name: str, total_steps: int | None, options: dict[str, Any]) -> Schedule:
    for key, value in options.items():
        if key not in DEFAULTS or key == "total_steps":
            known = [k for k in DEFAULTS if k != "total_steps"]
            raise invalid(OWNER, key, value, f"is not a scheduler option; options are total_steps, "
                          f"{', '.join(known)}{suggest(key, known)}")
    return Schedule(name, total_steps=total_steps, **options)


def describe(name: str, **options: Any) -> str:
    """One log line for a schedule and its options (validated), e.g.
    ``describe("step", step_size=100, gamma=0.5) == "step: x0.5 every 100 steps"``."""
    return _schedule(name, options.pop("total_steps", None), options).describe()


def build_scheduler(
    optimizer: torch.optim.Optimizer, name: str, *, total_steps: int | None = None, **options: Any
) -> LambdaLR:
    """Validate the options, then wrap ``optimizer`` in a ``LambdaLR`` following ``name``.

    Step it once per optimizer step (Lightning: ``interval="step"``). One :class:`Schedule`
    drives every param group, so each group's own lr is what gets scaled.
    """
    return LambdaLR(optimizer, _schedule(name, total_steps, options))


def schedule_of(scheduler: LambdaLR) -> Schedule:
    """The :class:`Schedule` inside a scheduler made by :func:`build_scheduler`."""
    fns = getattr(scheduler, "lr_lambdas", None)
    if not fns or not all(isinstance(fn, Schedule) for fn in fns):
        raise invalid(OWNER, "scheduler", type(scheduler).__name__,
                      "must be a LambdaLR made by lightning_optim.schedules.build_scheduler")
    return fns[0]


def with_total_steps(scheduler: LambdaLR, total_steps: int) -> LambdaLR:
    """Set the schedule's ``total_steps`` in place and return ``scheduler``.

    For the callback, once ``trainer.estimated_stepping_batches`` is known. The lr of the
    step about to run is recomputed at once, so the optimizer never takes a step at an lr
    from the old total. Validated like :func:`check_schedule` (e.g. it must exceed the
    warmup). Steps already taken are not replayed: a run past the new total sits at the floor.
    """
    # build_scheduler shares one Schedule among the groups; a hand-built list may not.
    schedule_of(scheduler)
    for fn in {id(fn): fn for fn in scheduler.lr_lambdas}.values():
        fn.set_total_steps(total_steps)
    groups = scheduler.optimizer.param_groups
    for group, base_lr, fn in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        lr = base_lr * fn(scheduler.last_epoch)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(float(lr))  # tensor lrs (capturable optimizers) are updated in place
        else:
            group["lr"] = lr
    # What get_last_lr() reports; torch keeps copies, never the groups' own tensors.
    compat.set_scheduler_last_lr(
        scheduler, [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in groups])
    return scheduler
