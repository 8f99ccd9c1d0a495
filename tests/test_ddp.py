"""OptimizerCallback + MomentMonitor under 2-process CPU DDP, against a single-process run on
the same global batches.

Why the two runs must agree. ``tests/scripts/ddp_train.py`` trains with per-rank batches of
``B = 8`` from its own ``DistributedSampler(shuffle=False)`` (Lightning's automatic one would
shuffle: it always does for training loaders), which gives rank r the samples r, r + 2, r + 4,
..., so batch i of rank 0 is the even and batch i of rank 1 the odd half of samples
``[2B i, 2B i + 2B)``. The reference here loads the same samples in
batches of ``2B``: its batch i is exactly the union (checked below, not assumed). The loss is
a mean, and DDP averages the ranks' gradients, so each step's gradient is the mean over the
same 2B samples in both runs, up to fp32 rounding; accumulation windows divide by the window
length in both. Clipping in ``on_before_optimizer_step`` sees the all-reduced gradients, so
its norms, its clip decisions and the non-finite skip are global too: rank 1 alone gets an
inf loss on one step, and both ranks must skip it, as the reference (whose only rank gets
the inf) does.

One DDP launch (about 10 s of process start-up) covers every check.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                                   "ignore::FutureWarning")]

SCRIPTS = Path(__file__).parent / "scripts"


def _script():
    """Import tests/scripts/ddp_train.py as a module (its ``__main__`` part does not run)."""
    spec = importlib.util.spec_from_file_location("ddp_train", SCRIPTS / "ddp_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _per_step(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    """``{step: value}`` of the rows that have ``key``; a step logged twice fails here."""
    found: dict[int, float] = {}
    for row in rows:
        if row.get(key):
            step = int(row["step"])
            assert step not in found, f"{key} logged twice at step {step}"
            found[step] = float(row[key])
    return found


def _flatten(nested) -> list[float]:
    """The numbers of a nested list (optimizer state tensors after ``tolist()``)."""
    if isinstance(nested, list):
        return [v for item in nested for v in _flatten(item)]
    return [nested]


def _same(a: float, b: float, rel: float) -> bool:
    if not (math.isfinite(a) and math.isfinite(b)):
        return not math.isfinite(a) and not math.isfinite(b)
    return abs(a - b) <= rel * abs(b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The DDP run (a subprocess) and the single-process reference (in this process)."""
    import lightning.pytorch as pl

    from lightning_helpers import data

    out = tmp_path_factory.mktemp("ddp")
    proc = subprocess.run([sys.executable, str(SCRIPTS / "ddp_train.py"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    s = _script()
    model, callbacks, options = s.build(out / "reference_logs", bad_rank=0)
    model.load_state_dict(torch.load(out / "init.pt"))
    pl.Trainer(accelerator="cpu", devices=1, callbacks=callbacks, **options).fit(
        model, data(batches=s.BATCHES, batch_size=s.PER_RANK_BATCH * s.WORLD))
    cb = callbacks[0]
    reference = {
        "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
        "batches": model.batches, "clipper": cb.clipper.state_dict(), "steps_taken": cb.steps_taken,
    }
    return {"out": out, "ranks": ranks, "reference": reference, "script": s}


def test_ranks_end_bit_identical_and_finite(runs):
    r0, r1 = runs["ranks"]
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["params"] == r1["params"]  # bitwise: the same all-reduced grads, the same update
    assert r0["state"] == r1["state"]
    assert all(math.isfinite(v) for v in r0["params"])
    assert all(math.isfinite(v) for v in _flatten(r0["state"]))


def test_ddp_equals_single_process_on_the_global_batches(runs):
    r0, r1 = runs["ranks"]
    ref = runs["reference"]
    # DistributedSampler's split, checked: the union of the ranks' batch i is the reference's batch i.
    assert len(r0["batches"]) == len(r1["batches"]) == len(ref["batches"]) == runs["script"].BATCHES
    for i, (a, b, whole) in enumerate(zip(r0["batches"], r1["batches"], ref["batches"])):
        assert sorted(a + b) == sorted(whole), i
    got = torch.tensor(r0["params"])
    torch.testing.assert_close(got, ref["params"], rtol=1e-5, atol=1e-6)
    # and the run actually trained: the params moved well beyond that tolerance
    init = torch.cat([v.reshape(-1) for k, v in torch.load(runs["out"] / "init.pt").items() if k != "head.weight"])
    assert (got - init).abs().max() > 1e-2


def test_both_ranks_skip_the_step_where_only_rank_one_saw_inf(runs):
    s = runs["script"]
    r0, r1 = runs["ranks"]
    for r in (r0, r1):
        assert r["global_step"] == 10  # 3 single-batch steps, 6 windows of 2, 1 cut short: 16 batches
        assert r["steps_taken"] == 9  # the poisoned window's step was skipped
        assert r["clipper"]["skipped_steps"] == 1 and r["clipper"]["consecutive_skips"] == 0
    assert r0["clipper"] == r1["clipper"] == runs["reference"]["clipper"]
    assert runs["reference"]["steps_taken"] == 9
    rows = _rows(runs["out"] / "logs_rank0")
    skipped = _per_step(rows, "optim/skipped_steps")
    assert [skipped[k] for k in sorted(skipped)] == [0.0] * s.BAD_STEP + [1.0] * (10 - s.BAD_STEP)
    assert not math.isfinite(_per_step(rows, "optim/grad_norm_total")[s.BAD_STEP])


def test_only_rank_zero_logs_and_each_step_once(runs):
    s = runs["script"]
    out = runs["out"]
    rank1 = out / "logs_rank1"
    assert not rank1.exists() or not any(rank1.rglob("*")), sorted(rank1.rglob("*"))
    rows = _rows(out / "logs_rank0")
    # The callback logs through lightning_optim.integration.loggers at Lightning's step (0-based), once per optimizer step.
    assert sorted(_per_step(rows, "optim/grad_norm_total")) == list(range(10))
    # The monitor logs optimizer steps EVERY, 2*EVERY, ... through lightning_optim.integration.loggers, at
    # Lightning's step for the batch that ran each (k - 1), as the callback's keys.
    monitored = _per_step(rows, "optim/param_norm/embed.weight")
    assert sorted(monitored) == list(range(s.EVERY - 1, 10, s.EVERY))
    assert all(math.isfinite(v) for v in monitored.values())


def test_logged_norms_and_clip_counters_are_the_global_ones(runs):
    """DDP all-reduces the gradients before on_before_optimizer_step, so the logged norm is the
    global batch's: the reference's, not a rank's (and not an all-reduce of already-reduced
    norms, which would be sqrt(2) times too large)."""
    s = runs["script"]
    ddp = _rows(runs["out"] / "logs_rank0")
    ref = _rows(runs["out"] / "reference_logs")
    for key in ("optim/grad_norm_total", "optim/grad_norm/embedding", "optim/grad_norm/decay",
                "optim/grad_norm/no_decay", "optim/clipped/embedding", "optim/clipped/decay",
                "optim/clipped_steps", "optim/skipped_steps", "optim/accumulation"):
        a, b = _per_step(ddp, key), _per_step(ref, key)
        assert a.keys() == b.keys() == set(range(10)), key
        for step in a:
            assert _same(a[step], b[step], 1e-5), (key, step, a[step], b[step])
    # The thresholds split the steps: some clip, some don't, per group differently ...
    clipped_emb = _per_step(ddp, "optim/clipped/embedding")
    clipped_rest = _per_step(ddp, "optim/clipped/decay")
    assert 0 < sum(clipped_emb.values()) < 9 and 0 < sum(clipped_rest.values()) < sum(clipped_emb.values())
    # ... and no norm sits so close to its threshold that rounding could flip the decision.
    emb = _per_step(ddp, "optim/grad_norm/embedding")
    decay, no_decay = _per_step(ddp, "optim/grad_norm/decay"), _per_step(ddp, "optim/grad_norm/no_decay")
    for step in emb:
        if step == s.BAD_STEP:
            continue
        rest = math.hypot(decay[step], no_decay[step])
        assert abs(emb[step] / s.EMBEDDING_MAX_NORM - 1) > 1e-3 and abs(rest / s.MAX_NORM - 1) > 1e-3, step
        assert clipped_emb[step] == float(emb[step] > s.EMBEDDING_MAX_NORM)
        assert clipped_rest[step] == float(rest > s.MAX_NORM)
    counters = runs["ranks"][0]["clipper"]
    assert counters["group_clipped_steps"] == {"embedding": sum(clipped_emb.values()),
                                               "decay": sum(clipped_rest.values()),
                                               "no_decay": sum(clipped_rest.values())}


def test_each_keyed_window_syncs_once_at_its_last_batch(runs):
    """The schedule's windows of 2 start at batch 3, off Lightning's multiples of 2: every rank
    all-reduces exactly on each window's last backward (DDP's no_sync on the others), and each
    step averaged the micro-batches the schedule keys for it (the same windows as the
    single-process reference, which test_callback.py checks against SGD on the mean gradient)."""
    s = runs["script"]
    for r in runs["ranks"]:
        assert r["synced"] == s.WINDOW_ENDS
    ends = [-1, *s.WINDOW_ENDS]
    sizes = _per_step(_rows(runs["out"] / "logs_rank0"), "optim/accumulation")
    assert [sizes[k] for k in sorted(sizes)] == [float(b - a) for a, b in zip(ends, ends[1:])]
