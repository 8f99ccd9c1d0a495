"""The accumulation schedule and the window rules, without Lightning."""

from __future__ import annotations

import pytest

from lightning_optim.accumulation import AccumulationSchedule, Accumulator, step_divisor


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


def keyed_windows(schedule, batches: int, epochs: int) -> list[list[tuple[int, int]]]:
    """What a user keys: step s averages the next ``size_at(s)`` micro-batches, an epoch end
    cuts a window short. Windows as lists of (epoch, batch_idx)."""
    s, windows = AccumulationSchedule(schedule), []
    for epoch in range(epochs):
        b = 0
        while b < batches:
            n = s.size_at(len(windows))
            windows.append([(epoch, i) for i in range(b, min(b + n, batches))])
            b += n
    return windows


def lightning_replay(schedule, batches: int, epochs: int):
    """Lightning 2.6's rules with A = what the Accumulator returns, on one-hot micro-batch
    gradients: zero_grad before the backward of batch b when b % A == 0 (or when the
    Accumulator says so), loss divided by A, a step after batch b when (b + 1) % A == 0 or b is
    the epoch's last. Returns, per step, the gradient after the step scale, and the
    ``micro_batches`` each step reports."""
    acc = Accumulator(AccumulationSchedule(schedule))
    grad = [0.0] * (batches * epochs)
    steps, reported = [], []
    for epoch in range(epochs):
        for b in range(batches):
            k = acc.on_batch_start(b, len(steps), epoch)
            if b % k == 0 or acc.must_zero_grad(b):
                grad = [0.0] * len(grad)
            grad[epoch * batches + b] += 1.0 / k
            if (b + 1) % k == 0 or b == batches - 1:
                scale = acc.step_scale()
                steps.append([g * scale for g in grad])
                reported.append(acc.micro_batches)
                acc.close()
    return steps, reported


SCHEDULES = [
    ({0: 1, 3: 4}, 24, 1),  # the switch lands on batch 3, not a multiple of 4
    ({0: 2, 5: 3}, 20, 2),  # windows of 3 from batch 10 on; an epoch end cuts one short
    ({0: 4, 2: 1}, 13, 2),  # a decrease
    ({0: 3, 2: 5, 4: 2}, 17, 3),  # three sizes, cut windows, epochs that start aligned again
    ({0: 1, 1: 4}, 9, 1),  # a window starting at batch_idx 1: no divisor of 1 helps Lightning zero it
    (3, 10, 2),  # constant: the divisor is always the size
    ({0: 1, 7: 6}, 40, 1),  # batch 7 + 6 = 13, a prime: k = 13
]


@pytest.mark.parametrize("schedule, batches, epochs", SCHEDULES)
def test_every_step_averages_exactly_its_keyed_window(schedule, batches, epochs):
    steps, reported = lightning_replay(schedule, batches, epochs)
    windows = keyed_windows(schedule, batches, epochs)
    assert len(steps) == len(windows)
    for grad, window, m in zip(steps, windows, reported):
        want = [0.0] * (batches * epochs)
        for epoch, b in window:
            want[epoch * batches + b] = 1.0 / len(window)
        assert grad == pytest.approx(want, rel=1e-12, abs=1e-15)
        assert m == len(window)
    acc = Accumulator(AccumulationSchedule(schedule))
    assert acc.count_steps(batches, epochs) == len(windows)


def test_switch_example_from_the_schedule_key():
    """{0: 1, 3: 4}: steps 0-2 take one batch each, step 3 takes batches 3-6 (not batch 3 alone)."""
    acc = Accumulator(AccumulationSchedule({0: 1, 3: 4}))
    steps, given = 0, []
    for b in range(12):
        k = acc.on_batch_start(b, steps, 0)
        given.append(k)
        if (b + 1) % k == 0:
            assert acc.step_scale() == (k / 4 if steps >= 3 else 1.0)
            steps += 1
    # windows 3-6 (ends at 7: k = 7), 7-10 (ends at 11: k = 11), then 11 opens a window ending at 15 (k = 5)
    assert given == [1, 1, 1, 7, 7, 7, 7, 11, 11, 11, 11, 5] and steps == 5


def test_step_divisor_is_the_smallest_divisor_at_least_the_size():
    for end in range(1, 150):
        for size in range(1, end + 1):
            assert step_divisor(end, size) == min(d for d in range(size, end + 1) if end % d == 0), (end, size)
    assert step_divisor(1_000_003, 2) == 1_000_003  # a prime: the whole count


def test_scale_and_state_round_trip():
    acc = Accumulator(AccumulationSchedule(4))
    for b in range(6):
        acc.on_batch_start(b, 0, 0)
    assert (acc.seen, acc.divisor) == (2, 4) and acc.step_scale() == 2.0  # a window cut short at 2
    restored = Accumulator(AccumulationSchedule(4))
    restored.load_state_dict(acc.state_dict())
    assert restored.state_dict() == acc.state_dict() == {"size": 4, "seen": 2, "divisor": 4, "lost": 0, "open": True}
    restored.lose_window()  # a resume without the window's gradients: only later micro-batches count
    restored.on_batch_start(6, 0, 0)
    assert (restored.micro_batches, restored.step_scale()) == (1, 4.0)


def test_state_from_before_the_divisor_rule_loads():
    acc = Accumulator(AccumulationSchedule({0: 1, 4: 2}))
    acc.load_state_dict({"size": 2, "seen": 2})
    assert acc.state_dict() == {"size": 2, "seen": 2, "divisor": 2, "lost": 0, "open": False}


def test_count_steps_replays_epochs():
    """10 batches, {0: 1, 5: 2}: epoch 0 = 5 steps of 1 + windows 5-6, 7-8, 9 (cut short);
    epoch 1 = 5 windows of 2."""
    acc = Accumulator(AccumulationSchedule({0: 1, 5: 2}))
    assert acc.count_steps(batches_per_epoch=10, epochs=2) == 13
    assert Accumulator(AccumulationSchedule(3)).count_steps(10, 1) == 4  # 3+3+3, then a window of 1
    by_epoch = Accumulator(AccumulationSchedule({0: 1, 1: 3}, by="epoch"))
    assert by_epoch.count_steps(6, 3) == 6 + 2 + 2
    big = Accumulator(AccumulationSchedule({0: 1, 1000: 8}))
    assert big.count_steps(10**7, 2) == 1000 + -(-(10**7 - 1000) // 8) + 10**7 // 8  # jumps, no per-batch loop
