"""Runs you can kill: ``python -m lightning_optim.train`` with ``checkpoint.every_n_steps``,
SIGKILLed after a checkpoint or while one is being written, continued with ``resume=auto``,
ends bit-identical to an uninterrupted run (every tensor of ``last.ckpt``) with the same
``metrics.csv`` rows (no gap, no duplicate). A used run directory is refused without
``resume``, unknown keys exit 2, a cut checkpoint given to ``resume=`` is one line, exit 2.

Every run is the main job at a tiny size (a 250 kB corpus, d_model 32, one layer, dropout on,
so the global RNG matters), 20 steps, a checkpoint every 5, the newest 3 kept.
"""

from __future__ import annotations

import csv
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_optim.checkpoint import KILL_IN_WRITE_ENV, verify_checkpoint

SMALL_JOB = ["data.max_bytes=250000", "data.vocab_size=512", "data.batch_size=8", "data.val_batches=2",
             "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.seq_len=32"]
TINY = [*SMALL_JOB, "model.dropout=0.1", "trainer.max_steps=20", "trainer.val_check_interval=10",
        "trainer.log_every_n_steps=1", "monitor.every_n_steps=2", "monitor.expensive_every_n_steps=4",
        "checkpoint.every_n_steps=5", "checkpoint.keep=3", "trainer.enable_progress_bar=false",
        # every row reaches the disk at once, so the killed run leaves rows after its checkpoint
        "+logger.flush_logs_every_n_steps=1"]
TIMEOUT = 300  # seconds a run may take before the test fails (a hang, not a measurement)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "LIGHTNING_OPTIM_CACHE": str(cache), "WANDB_MODE": "offline"}


def train(run_dir: Path, env: dict[str, str], *extra: str, base: list[str] = TINY) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_optim.train", *base, *extra, f"hydra.run.dir={run_dir}"],
                          cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, env) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = train(run_dir, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "logs" / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def same(a: Any, b: Any, a_dir: str, b_dir: str, where: str = "checkpoint") -> None:
    """Every tensor torch.equal, every other value equal, the run directories' paths aside."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        a = {k.replace(a_dir, "RUN") if isinstance(k, str) else k: v for k, v in a.items()}
        b = {k.replace(b_dir, "RUN") if isinstance(k, str) else k: v for k, v in b.items()}
        assert a.keys() == b.keys(), (where, sorted(a.keys() ^ b.keys(), key=str))
        for k in a:
            same(a[k], b[k], a_dir, b_dir, f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, a_dir, b_dir, f"{where}[{i}]")
    elif isinstance(a, str):
        assert a.replace(a_dir, "RUN") == b.replace(b_dir, "RUN"), where
    else:
        assert a == b, (where, a, b)


def assert_continues_exactly(resumed: Path, uninterrupted: Path) -> list[str]:
    """last.ckpt bit-identical; metrics.csv the same rows, one per (step, key). Returns what it compared."""
    a = torch.load(uninterrupted / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 20
    same(a, b, str(uninterrupted), str(resumed))
    expected, got = rows(uninterrupted), rows(resumed)
    keys = Counter((row["step"], k) for row in got for k in row if k not in ("step", "epoch"))
    assert max(keys.values()) == 1, [k for k, n in keys.items() if n > 1][:5]  # no duplicate
    assert sorted({int(r["step"]) for r in got}) == list(range(20))  # no gap: every step logged
    want, have = (Counter(tuple(sorted(r.items())) for r in x) for x in (expected, got))
    assert have == want, ([dict(r) for r in (want - have)][:2], [dict(r) for r in (have - want)][:2])
    tensors = sum(isinstance(v, torch.Tensor) for v in _leaves(a))
    return [f"last.ckpt: {tensors} tensors torch.equal (weights, optimizer state, loops, callbacks)",
            f"metrics.csv: {len(got)} rows, {len(keys)} (step, key) values, steps 0-19, equal to the uninterrupted run's"]


def _leaves(x: Any):
    if isinstance(x, dict):
        for v in x.values():
            yield from _leaves(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _leaves(v)
    else:
        yield x


def kill_when(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {TIMEOUT} s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)


def steps_logged(run_dir: Path) -> int:
    """The largest step of a whole row of the run's metrics.csv so far (-1: none)."""
    try:
        text = (run_dir / "logs" / "metrics.csv").read_text()
    except FileNotFoundError:
        return -1
    lines = text.splitlines(keepends=True)
    if not lines:
        return -1
    header = next(csv.reader([lines[0]]))
    steps = []
    for line in lines[1:]:
        fields = next(csv.reader([line]), [])
        if line.endswith("\n") and len(fields) == len(header):
            steps.append(int(fields[header.index("step")]))
    return max(steps, default=-1)


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_auto_is_bit_identical(uninterrupted, env, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lightning_optim.train", *TINY, f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Killed once the checkpoint of step 10 is on disk and rows of later steps are in metrics.csv.
    kill_when(proc, lambda: (run_dir / "checkpoints" / "epoch=0-step=10.ckpt").exists() and steps_logged(run_dir) >= 12,
              "checkpoint of step 10 and rows of step 12")
    assert proc.returncode == -signal.SIGKILL
    killed_at = steps_logged(run_dir)
    resumed = train(run_dir, env, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume=auto: continuing from" in resumed.stdout
    assert "dropped)" in resumed.stdout  # rows after the checkpoint were cut
    report = assert_continues_exactly(run_dir, uninterrupted)
    print(f"\nkilled (SIGKILL) with rows up to step {killed_at} on disk; "
          + resumed.stdout.split("resume=auto: ")[1].splitlines()[0] + "; "
          + next(line for line in resumed.stdout.splitlines() if line.startswith("metrics.csv:")))
    print("\n".join(report))


@pytest.mark.slow
@pytest.mark.parametrize("damage_newest", [False, True], ids=["kill-in-write", "kill-in-write+cut-newest"])
def test_sigkill_while_a_checkpoint_is_written_leaves_the_previous_one(uninterrupted, env, tmp_path, damage_newest):
    """The process dies with half of the step-15 checkpoint in its temporary file: the files of
    step 10 are whole, and resume=auto continues from them. With the step-10 files then cut too
    (a disk that lost their end), resume=auto skips them with a warning and takes step 5."""
    run_dir = tmp_path / "run"
    proc = train(run_dir, {**env, KILL_IN_WRITE_ENV: "epoch=0-step=15.ckpt"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    temp = [p for p in ckpts.iterdir() if p.name.startswith(".epoch=0-step=15.ckpt.") and p.suffix == ".tmp"]
    assert len(temp) == 1 and 0 < temp[0].stat().st_size  # the cut temporary file
    assert not (ckpts / "epoch=0-step=15.ckpt").exists()
    for name in ("epoch=0-step=5.ckpt", "epoch=0-step=10.ckpt", "last.ckpt"):
        verify_checkpoint(ckpts / name)  # whole
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 10
    if damage_newest:
        for name in ("epoch=0-step=10.ckpt", "last.ckpt"):
            path = ckpts / name
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    resumed = train(run_dir, env, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = 5 if damage_newest else 10
    chosen = "epoch=0-step=5.ckpt" if damage_newest else "last.ckpt"
    assert f"resume=auto: continuing from '{ckpts / chosen}' (step {start})" in resumed.stdout
    skipped = [line for line in resumed.stdout.splitlines() if line.startswith("warning: resume=auto skipped")]
    assert len(skipped) == (2 if damage_newest else 0), skipped
    assert all("is truncated or corrupted" in line for line in skipped)
    assert_continues_exactly(run_dir, uninterrupted)


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.mark.slow
def test_a_used_run_directory_is_refused_without_resume_and_nothing_changes(uninterrupted, env):
    before = tree(uninterrupted)
    proc = train(uninterrupted, env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"lightning_optim.train: invalid configuration: resume: the run directory '{uninterrupted}' "
                          "holds an earlier run (")
    assert "resume=auto" in err and "another hydra.run.dir" in err
    assert tree(uninterrupted) == before  # every file and its bytes


@pytest.mark.slow
def test_resume_with_another_model_is_refused_and_nothing_changes(uninterrupted, env):
    before = tree(uninterrupted)
    proc = train(uninterrupted, env, "resume=auto", "model.d_model=64")
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip()
    assert err == (f"lightning_optim.train: invalid configuration: resume: the run in '{uninterrupted}' was started "
                   "with another model or data: model.d_model (32 there, 64 here); resume it with the overrides it "
                   f"was started with ({uninterrupted / '.hydra' / 'overrides.yaml'})"), err
    assert tree(uninterrupted) == before


@pytest.mark.slow
def test_a_resumed_wandb_run_keeps_its_id_and_one_history(env, tmp_path):
    """logger=wandb (offline): the resumed run writes a new offline-run directory under the same
    run id, and the two read back (as the dashboard reads them) as one history, each step once.
    The second run is longer than the first, so it says that it is no twin of an uninterrupted run."""
    from lightning_optim.dashboard.wandb_history import read_history, run_files

    run_dir = tmp_path / "run"
    base = [o for o in TINY if not o.startswith("+logger.")] + ["logger=wandb"]
    first = train(run_dir, env, "trainer.max_steps=10", base=base)
    assert first.returncode == 0, first.stderr[-3000:]
    second = train(run_dir, env, "trainer.max_steps=15", "resume=auto", base=base)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (f"warning: resume: this run differs from the one in '{run_dir}' in trainer.max_steps (10 there, 15 here)"
            in second.stderr)
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({name.rsplit("-", 1)[1] for name in runs}) == 1, runs
    files = run_files(sorted((run_dir / "wandb").rglob("run-*.wandb")))
    steps = [row["trainer/global_step"] for f in files for row in read_history(f) if "train/loss" in row]
    assert steps == list(range(15))


@pytest.mark.parametrize("override, message", [
    ("+ckpt_path=x.ckpt", "config: unknown key ckpt_path='x.ckpt': the config has no such key (to continue a run: "
                          "resume=auto or resume=PATH)"),
    ("+resum=auto", "config: unknown key resum='auto': the config has no such key (did you mean 'resume'?)"),
    ("+model.d_modle=64", "model: unknown key d_modle=64: model has d_model, dropout, n_heads, n_layers, seq_len "
                          "(did you mean 'd_model'?)"),
    ("+checkpoint.every_n_step=5", "checkpoint: unknown key every_n_step=5: checkpoint has every_n_steps, keep "
                                   "(did you mean 'every_n_steps'?)"),
    ("checkpoint.every_n_steps=0", "checkpoint: every_n_steps=0 is invalid: must be an int >= 1"),
    ("checkpoint.keep=0", "checkpoint: keep=0 is invalid: must be an int >= 1, or -1 to keep all"),
    ("resume=true", "resume: resume=True is invalid: must be auto or the path of a .ckpt file"),
    ("resume=missing.ckpt", "resume: checkpoint 'missing.ckpt' does not exist"),
    ("+trainer.ckpt_path=x.ckpt", "trainer: "),  # not a Trainer argument
])
def test_unknown_keys_and_bad_values_are_refused_by_check(override, message, env, tmp_path, monkeypatch):
    """What the entry point runs before Hydra writes anything (exit 2 with this message)."""
    from hydra import compose, initialize_config_module

    from lightning_optim.app.train import check
    from lightning_optim.validation import ConfigurationError

    monkeypatch.chdir(tmp_path)
    with initialize_config_module(version_base=None, config_module="lightning_optim.conf"):
        cfg = compose("config", overrides=[*SMALL_JOB, f"data.cache_dir={env['LIGHTNING_OPTIM_CACHE']}", override])
    with pytest.raises(ConfigurationError) as info:
        check(cfg)
    assert str(info.value).startswith(message), str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("+ckpt_path=x.ckpt", "lightning_optim.train: invalid configuration: config: unknown key ckpt_path='x.ckpt'"),
    ("ckpt_path=x.ckpt", "ckpt_path"),  # Hydra's own error: not in the config
])
def test_the_natural_guesses_exit_2(override, message, env, tmp_path):
    run_dir = tmp_path / "run"
    proc = train(run_dir, env, override)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_a_cut_checkpoint_given_to_resume_is_one_line_exit_2(uninterrupted, env, tmp_path):
    cut = tmp_path / "cut.ckpt"
    data = (uninterrupted / "checkpoints" / "last.ckpt").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    run_dir = tmp_path / "run"
    proc = train(run_dir, env, f"resume={cut}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"lightning_optim.train: invalid configuration: resume: checkpoint '{cut}' is truncated or "
                          "corrupted"), err
    assert not run_dir.exists()
