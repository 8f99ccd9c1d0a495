"""The accumulation schedule and the window rules, without Lightning."""

from __future__ import annotations

import pytest

from lightning_optim.accumulation import AccumulationSchedule, Accumulator


@pytest.mark.parametrize("schedule, step, expected", [
    (4, 0, 4), (4, 10**6, 4),
    ({0: 1, 200: 4, 1000: 8}, 0, 1), ({0: 1, 200: 4, 1000: 8}, 199, 1), ({0: 1, 200: 4, 1000: 8}, 200, 4),
    ({0: 1, 200: 4, 1000: 8}, 999, 4), ({0: 1, 200: 4, 1000: 8}, 5000, 8),
    ({10: 2}, 9, 1), ({10: 2}, 10, 2),  # no key 0: one micro-batch until the first key
    ({"0": 1, "5": "3"}, 5, 3),  # YAML/CLI strings
])
def test_size_at(schedule, step, expected):
    assert AccumulationSchedule(schedule).size_at(step) == expected


def test_by_epoch():
    s = AccumulationSchedule({0: 1, 2: 4}, by="epoch")
    assert [s.size_at(step=10**6, epoch=e) for e in range(4)] == [1, 1, 4, 4]


@pytest.mark.parametrize("schedule, by, match", [
    (0, "step", r"schedule\[0\]=0 is invalid: must be an int >= 1"),
    ({0: 1, -5: 2}, "step", r"keys must be >= 0"),
    ({0: 1, 10: 2.5}, "step", r"schedule\[10\]=2.5 is invalid: must be an int"),
    ({0: True}, "step", r"must be an int"),
    ({}, "step", r"must not be empty"),
    (2, "epochs", r"by='epochs' is invalid.*did you mean 'epoch'"),
])
def test_bad_schedules(schedule, by, match):
    with pytest.raises(ValueError, match=match):
        AccumulationSchedule(schedule, by=by)


def test_changes_wait_for_an_aligned_window_start():
    """1 -> 4 keyed at step 3: batches 0-3 step alone, the first size-4 window starts at batch 4."""
    acc = Accumulator(AccumulationSchedule({0: 1, 3: 4}))
    steps, sizes = 0, []
    for b in range(12):
        n = acc.on_batch_start(b, steps, 0)
        sizes.append(n)
        if (b + 1) % n == 0:
            steps += 1
    assert sizes == [1, 1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4] and steps == 6


def test_partial_window_scale_and_state():
    acc = Accumulator(AccumulationSchedule(4))
    for b in range(6):
        acc.on_batch_start(b, 0, 0)
    assert acc.seen == 2 and acc.partial_window_scale() == 2.0
    restored = Accumulator(AccumulationSchedule(4))
    restored.load_state_dict(acc.state_dict())
    assert (restored.size, restored.seen) == (4, 2)


def test_count_steps_replays_epochs():
    """10 batches, {0: 1, 5: 2}: epoch 0 = 5 + 1 (batch 5 waits) + 2 windows; epoch 1 = 5 windows."""
    acc = Accumulator(AccumulationSchedule({0: 1, 5: 2}))
    assert acc.count_steps(batches_per_epoch=10, epochs=2) == 13
    assert Accumulator(AccumulationSchedule(3)).count_steps(10, 1) == 4  # 3+3+3, then a window of 1
