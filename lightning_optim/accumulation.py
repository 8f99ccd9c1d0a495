"""Gradient-accumulation schedules: micro-batches per optimizer step, changing over training.

Lightning's ``GradientAccumulationScheduler`` changes the window only at epoch starts.
Here the schedule can be keyed by optimizer step, e.g. ``{0: 1, 200: 4, 1000: 8}``: one
micro-batch per step for the first 200 steps, then 4, then 8. That is a batch-size
warm-up (Smith et al. 2018, "Don't Decay the Learning Rate, Increase the Batch Size";
GPT-3, Brown et al. 2020, Sec. 2.3 and Table 2.1). Optimizer step s (0-based: s steps
done) averages the gradients of exactly ``size_at(s)`` micro-batches, wherever in the
epoch it falls, and also across a resume; only the epoch end cuts a window short (Lightning
always steps on an epoch's last batch).

How it drives Lightning (2.6, ``loops/training_epoch_loop.py`` and
``loops/optimization/automatic.py``). Lightning reads one number,
``trainer.accumulate_grad_batches`` = A, at each batch; with ``r = batch_idx + 1`` the
count of batches of the epoch so far:

- it steps after the batch if ``r % A == 0`` or the batch is the epoch's last
  (``_accumulated_batches_reached``, ``_num_ready_batches_reached``); the same test
  puts the backward of every batch that does not step under DDP's ``no_sync``. (A strategy
  that accumulates itself, ``handles_gradient_accumulation``, skips all this: the callback
  refuses a schedule with it);
- it calls ``zero_grad`` before the backward if ``batch_idx % A == 0``;
- it divides the loss by A before the backward (``ClosureResult.from_training_step_output``).

A window of n micro-batches with batch indices ``s, ..., e - 1`` (so it ends at ``r = e =
s + n``) is given one A = k for all of its batches, the smallest divisor of e with
``k >= n``. Then k divides e, so Lightning steps at e; and no r in ``s + 1, ..., e - 1`` is
a multiple of k, because the multiple of k below e is ``e - k <= e - n = s``: so exactly one
step, at the end of the window, and DDP syncs on its last backward only. The summed
gradient is ``sum_b g_b / k`` over the n micro-batches; after the window's last backward
(under DDP the one that all-reduces) it is multiplied by ``k / n``
(``OptimizerCallback.on_after_backward``), which gives the mean ``sum_b g_b / n``, the
gradient of the mean loss of the window, before any ``on_before_optimizer_step`` hook
(clipping, MomentMonitor's gradient statistics) reads it. The factor is linear, so it
commutes with DDP's averaging over ranks and with AMP's unscaling. A window that the epoch end
cuts to m < n micro-batches is multiplied by ``k / m`` alike, so its step too sees the mean
of the micro-batches it had. Where the window is aligned (n divides s, as always after an
epoch start until the size changes), k = n, the factor is 1 and Lightning runs exactly as
with a fixed ``accumulate_grad_batches = n``. Otherwise Lightning's own ``zero_grad`` test
``s % k == 0`` fails (k divides s only if k divides n, i.e. k = n), so the callback calls
Lightning's zero_grad path itself (``on_before_zero_grad`` hooks, then the module's
``optimizer_zero_grad``) at the window's first batch: :meth:`Accumulator.must_zero_grad`.

The loss Lightning hands to ``on_train_batch_end`` as ``outputs["loss"]`` is divided by
k; the callback multiplies it by ``k / n`` so that it reads as with a fixed
``accumulate_grad_batches = n`` (the loss divided by n). What the backward sees is the
loss divided by k: under ``16-mixed`` that is a loss scale k/n smaller than Lightning's for
a misaligned window (k can be as large as e when e is prime), which GradScaler's dynamic
scale absorbs unless the gradients underflow in fp16; bf16 and fp32 are unaffected.

Resume. :meth:`Accumulator.state_dict` holds the window in force (n, k, the micro-batches
seen, whether it is still open). A checkpoint written between steps, mid-window, needs the
gradients accumulated so far too: the callback stores them with its state in a
single-process run, and a resumed run then ends the window exactly as the uninterrupted one.
Under several processes each rank holds a different partial sum, which one checkpoint file
cannot hold: the callback warns, and the resumed window's step averages only the
micro-batches after the checkpoint (:meth:`Accumulator.lose_window`). Checkpoints written by
``ModelCheckpoint(every_n_train_steps=...)`` land right after a step, where no window is open.

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
        parsed: dict[int, int] = {}
        last, last_key = -1, None  # keys are >= 0, so the first one always passes the order check
        for key, value in items.items():
            try:
                k = _int(key, "schedule")
            except ValueError:
                k = -1
            if k < 0:  # the key is where a size starts: an optimizer step (or epoch) count
                raise invalid(OWNER, "schedule", schedule, f"keys must be >= 0 and whole (the {by} a size starts at), got {key!r}")
            v = _int(value, f"schedule[{key!r}]")
            if v < 1:
                raise invalid(OWNER, f"schedule[{key!r}]", value, "must be an int >= 1 (micro-batches per step)")
            if k <= last:  # {0: 1, 1000: 8, 200: 4}: most likely a typo
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
    """Decides, batch by batch, the ``accumulate_grad_batches`` to give Lightning (see the module docstring).

    State (in checkpoints through :meth:`state_dict`): ``size`` (n, the micro-batches of the
    window in force), ``divisor`` (k, what Lightning is given for it), ``seen`` (its
    micro-batches so far), ``lost`` (of those, the ones whose gradients a resume lost) and
    ``open`` (micro-batches accumulated since the last optimizer step).
    """

    def __init__(self, schedule: AccumulationSchedule) -> None:
        self.schedule = schedule
        self.size = schedule.size_at(0, 0)
        self.divisor = self.size
        self.seen = 0
        self.lost = 0
        self.open = False

    def on_batch_start(self, batch_idx: int, optimizer_steps: int, epoch: int) -> int:
        """Call at each training batch start (``batch_idx`` counts from the epoch start);
        returns the ``accumulate_grad_batches`` for this batch.

        A window starts at an epoch's first batch (Lightning stepped on the last one) or
        after a window's last micro-batch; it takes the size in force after
        ``optimizer_steps`` steps."""
        if batch_idx == 0 or self.seen >= self.size:
            self.size = self.schedule.size_at(optimizer_steps, epoch)
            self.divisor = step_divisor(batch_idx + self.size, self.size)
            self.seen = self.lost = 0
        self.seen += 1
        self.open = True
        return self.divisor

    def must_zero_grad(self, batch_idx: int) -> bool:
        """Whether the caller must zero the gradients before this batch's backward:
        a window's first batch where Lightning's own test ``batch_idx % k == 0`` fails."""
        return self.seen == 1 and batch_idx % self.divisor != 0

    @property
    def micro_batches(self) -> int:
        """Micro-batches whose gradients the current window holds."""
        return self.seen - self.lost

    def step_scale(self) -> float:
        """Factor for the summed gradients at the window's step: Lightning divided each
        micro-batch loss by k, the step must see the mean over the m micro-batches held, so
        ``k / m`` (m = n for a whole window)."""
        return self.divisor / self.micro_batches if self.micro_batches > 0 else 1.0

    def partial_window_scale(self) -> float:
        """Former name of :meth:`step_scale` (every window's factor, not only a cut-short one's)."""
        return self.step_scale()

    def loss_scale(self) -> float:
        """Factor that turns the loss Lightning reports (divided by k) into the loss divided
        by n, as with a fixed ``accumulate_grad_batches = n``."""
        return self.divisor / self.size

    def close(self) -> None:
        """The window's optimizer step was taken (or skipped): nothing is accumulated now."""
        self.open = False

    def lose_window(self) -> None:
        """A resume did not restore the open window's gradients: its step averages only the
        micro-batches after the resume."""
        if self.open:
            self.lost = self.seen

    def count_steps(self, batches_per_epoch: int, epochs: int, start_step: int = 0) -> int:
        """Optimizer steps in ``epochs`` epochs of ``batches_per_epoch``: one per window, the
        windows as the schedule keys them, cut at each epoch end. What an LR schedule's total
        must be when training is bounded by epochs. Jumps over runs of equal windows, so the
        cost is per schedule change and epoch, not per batch."""
        steps = start_step
        keys = sorted(self.schedule.points) if self.schedule.by == "step" else []
        for epoch in range(epochs):
            b = 0
            while b < batches_per_epoch:
                n = self.schedule.size_at(steps, epoch)
                windows = -(-(batches_per_epoch - b) // n)  # ceil: the last one may be cut short
                following = next((k for k in keys if k > steps), None)
                if following is not None:
                    windows = min(windows, following - steps)
                b += windows * n
                steps += windows
        return steps - start_step

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "seen": self.seen, "divisor": self.divisor, "lost": self.lost,
                "open": self.open}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.size, self.seen = int(state["size"]), int(state["seen"])
        # Checkpoints from before the divisor rule: windows were aligned (k = n) and written after a step.
        self.divisor = int(state.get("divisor", self.size))
        self.lost = int(state.get("lost", 0))
        self.open = bool(state.get("open", False))


def step_divisor(end: int, size: int) -> int:
    """The smallest divisor k of ``end`` with ``k >= size``: the ``accumulate_grad_batches``
    that makes Lightning step exactly once, at ``end``, over a window of ``size`` batches
    ending there (module docstring). Trial division up to sqrt(end)."""
    if end % size == 0:
        return size
    best = end
    i = 1
    while i * i <= end:
        if end % i == 0:
            for d in (i, end // i):
                if size <= d < best:
                    best = d
        i += 1
    return best


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
