"""Gradient-accumulation schedules: micro-batches per optimizer step, changing over training.

Lightning's ``GradientAccumulationScheduler`` changes the window only at epoch starts.
Here the schedule can be keyed by optimizer step, e.g. ``{0: 1, 200: 4, 1000: 8}``: one
micro-batch per step for the first 200 steps, then 4, then 8. That is a batch-size
warm-up (Smith et al. 2018, "Don't Decay the Learning Rate, Increase the Batch Size";
GPT-3, Brown et al. 2020, Sec. 2.3 and Table 2.1).

How it drives Lightning. Lightning decides "step now?" from ``trainer.accumulate_grad_batches``
and the batch index in the epoch: a window of n micro-batches starts at a batch index
divisible by n. :class:`Accumulator` therefore switches to a new size only where a window
starts *and* the batch index is a multiple of the new size, so every window is whole and
Lightning's own bookkeeping (loss division, zero_grad, DDP no_sync) stays right. A change
keyed at step s so takes effect at the first window boundary at or after s where that
holds (at most n_new - 1 micro-batches later). Lightning also steps on the last batch of
an epoch; a window cut short there is rescaled so that the step still sees the mean
gradient of the micro-batches it had (see :meth:`Accumulator.partial_window_scale`).

Plain Python: the Lightning callback feeds it batch indices and step counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .validation import choice, invalid

OWNER = "accumulation"


class AccumulationSchedule:
    """Window size as a step function of the optimizer step (``by="step"``) or epoch.

    Args:
        schedule: an int (constant), or ``{start: micro_batches}`` with int keys >= 0 and
            int values >= 1. A missing key 0 means 1 micro-batch until the first key.
        by: ``"step"`` (keys are optimizer steps) or ``"epoch"`` (Lightning's form).
    """

    def __init__(self, schedule: int | Mapping[int, int] = 1, by: str = "step") -> None:
        self.by = choice(OWNER, "by", by, ("step", "epoch"))
        if isinstance(schedule, Mapping):
            items = dict(schedule)
        else:
            items = {0: schedule}
        if not items:
            raise invalid(OWNER, "schedule", schedule, "must not be empty")
        parsed = {}
        for key, value in items.items():
            k = _int(key, f"schedule key {key!r}")
            if k < 0:
                raise invalid(OWNER, "schedule", schedule, f"keys must be >= 0, got {key!r}")
            v = _int(value, f"schedule[{key!r}]")
            if v < 1:
                raise invalid(OWNER, f"schedule[{key!r}]", value, "must be an int >= 1 (micro-batches per step)")
            if parsed and k <= last:  # {0: 1, 1000: 8, 200: 4}: most likely a typo
                raise invalid(OWNER, "schedule", schedule,
                              f"keys must increase, but {key!r} comes after {last_key!r}")
            parsed[k] = v
            last, last_key = k, key
        parsed.setdefault(0, 1)
        self.points = dict(sorted(parsed.items()))

    def size_at(self, step: int, epoch: int = 0) -> int:
        """Micro-batches per optimizer step once ``step`` optimizer steps (or ``epoch`` epochs) are done."""
        at = step if self.by == "step" else epoch
        size = 1
        for start, n in self.points.items():
            if start > at:
                break
            size = n
        return size

    @property
    def is_constant(self) -> bool:
        return len(set(self.points.values())) == 1

    def describe(self) -> str:
        if self.is_constant:
            return f"{self.points[0]} micro-batch(es) per optimizer step"
        unit = "step" if self.by == "step" else "epoch"
        return "accumulate " + ", ".join(f"{n} from {unit} {s}" for s, n in self.points.items())

    def __repr__(self) -> str:
        return f"AccumulationSchedule({self.points}, by={self.by!r})"


class Accumulator:
    """Decides, batch by batch, the window size to give Lightning (see the module docstring).

    State: ``size`` (the window size in force) and ``seen`` (micro-batches so far in the
    current window); both go into checkpoints through :meth:`state_dict`.
    """

    def __init__(self, schedule: AccumulationSchedule) -> None:
        self.schedule = schedule
        self.size = schedule.size_at(0, 0)
        self.seen = 0

    def on_batch_start(self, batch_idx: int, optimizer_steps: int, epoch: int) -> int:
        """Call at each training batch start; returns the window size for this batch."""
        if batch_idx % self.size == 0:  # a window starts here
            self.seen = 0
            want = self.schedule.size_at(optimizer_steps, epoch)
            if want != self.size and batch_idx % want == 0:
                self.size = want
        self.seen += 1
        return self.size

    def partial_window_scale(self) -> float:
        """Factor for the grads of a window that ended early (the epoch's last batch).

        Lightning divided each micro-batch loss by ``size``; with ``seen < size`` the summed
        gradient is ``seen/size`` of the mean, so multiply by ``size/seen``.
        """
        return self.size / self.seen if 0 < self.seen < self.size else 1.0

    def count_steps(self, batches_per_epoch: int, epochs: int, start_step: int = 0) -> int:
        """Optimizer steps in ``epochs`` epochs of ``batches_per_epoch``, replaying the rules:
        what an LR schedule's total must be when training is bounded by epochs."""
        replay = Accumulator(self.schedule)
        steps = start_step
        for epoch in range(epochs):
            for b in range(batches_per_epoch):
                n = replay.on_batch_start(b, steps, epoch)
                if (b + 1) % n == 0 or b == batches_per_epoch - 1:
                    steps += 1
        return steps - start_step

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "seen": self.seen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.size, self.seen = int(state["size"]), int(state["seen"])


def _int(value: Any, field: str) -> int:
    if isinstance(value, bool):
        raise invalid(OWNER, field, value, "must be an int")
    if isinstance(value, str):  # YAML/CLI keys may arrive as strings
        try:
            return int(value.strip())
        except ValueError:  # also '²', which str.isdigit() accepts and int() does not
            pass
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return int(value)
    raise invalid(OWNER, field, value, "must be an int")
