"""Resume under faults: SIGKILL mid-window and mid-epoch resumes bit for bit; a damaged
checkpoint is refused by name; another optimizer or partition is refused; torch.optim state
converts into a lightning_optim partition."""

from __future__ import annotations

import copy
import itertools
import os
import random
import re
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import assert_rel
from lightning_helpers import BareLM, TiedLM, data, flat_params, trainer
from torch import nn

import lightning_optim as lo
from lightning_optim import OptimizerCallback
from lightning_optim.accumulation import AccumulationSchedule, Accumulator
from lightning_optim.checkpoint import CheckpointError, verify_checkpoint
from lightning_optim.convert import convert_checkpoint, convert_optimizer_state

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import resume_worker as W  # noqa: E402

WORKER = Path(__file__).parent / "scripts" / "resume_worker.py"
TIMEOUT = 120  # seconds a worker may take before the test kills it and fails (a hang, not a measurement)


# ----- SIGKILL and exact resume -----------------------------------------------------------------


def schedule_rows() -> list[dict]:
    """The worker's batches replayed through the accumulation rules: for each global batch g,
    its epoch, batch_idx, window size, position in the window and optimizer steps after it."""
    acc, steps, rows = Accumulator(AccumulationSchedule(W.ACCUMULATION)), 0, []
    for epoch in range(W.EPOCHS):
        for b in range(W.BATCHES):
            size = acc.on_batch_start(b, steps, epoch)
            before = steps
            if (b + 1) % size == 0 or b == W.BATCHES - 1:
                steps += 1
            rows.append({"g": len(rows), "epoch": epoch, "batch": b, "size": size, "pos": acc.seen - 1,
                         "steps": steps, "checkpoint": steps != before and steps % W.EVERY_N_STEPS == 0})
    return rows


def last_checkpoint_before(rows: list[dict], g: int) -> dict | None:
    """The batch after which the newest checkpoint was written when batch g starts."""
    return next((r for r in reversed(rows[:g]) if r["checkpoint"]), None)


def kill_points(case: str) -> list[int]:
    rows = schedule_rows()
    points = []
    for r in rows:
        ckpt = last_checkpoint_before(rows, r["g"])
        if ckpt is None or r["batch"] == 0:
            continue
        ckpt_mid_epoch = ckpt["batch"] != W.BATCHES - 1
        if case == "mid_window" and r["size"] > 1 and r["pos"] > 0 and ckpt_mid_epoch:
            points.append(r["g"])  # micro-batches of an unfinished window are lost
        elif case == "after_epoch_end_checkpoint" and not ckpt_mid_epoch:
            points.append(r["g"])  # the resumed run starts the next epoch, then is killed mid-epoch
    return points


def test_kill_points_cover_the_cases():
    """The schedule puts windows of 1, 2 and 3 micro-batches, a cut-short last window, and
    checkpoints both mid-epoch and at an epoch's end: each case has somewhere to land."""
    rows = schedule_rows()
    assert [r["g"] for r in rows if r["checkpoint"]] == [2, 7, 12, 20, 28, 37]
    assert rows[-1]["steps"] == 19
    assert kill_points("mid_window") == [5, 7, 9, 11, 22, 23, 25, 27, 28, 30, 31, 33, 34, 36, 37]
    assert kill_points("after_epoch_end_checkpoint") == [14, 15, 16, 17, 18, 19, 20]


def run_worker(out: Path, *args: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, str(WORKER), str(out), *args], capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def run_and_kill(out: Path, pause_at: int, *args: str) -> list[str]:
    """Start a worker, SIGKILL it when it reports it paused at batch ``pause_at``; return the
    batches it started."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, str(WORKER), str(out), "--pause-at", str(pause_at), *args],
                                stdout=subprocess.PIPE, stderr=err, text=True)
        watchdog = threading.Timer(TIMEOUT, proc.kill)
        watchdog.start()
        started = []
        try:
            for line in proc.stdout:
                if line.startswith("BATCH "):
                    started.append(int(line.split()[1]))
                if line.startswith("PAUSED "):
                    os.kill(proc.pid, signal.SIGKILL)
                    break
        finally:
            watchdog.cancel()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (out / "stderr.txt").read_text()[-3000:]
    assert started[-1] == pause_at
    return started


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("full")
    run_worker(out)
    return torch.load(out / "final.pt", weights_only=False)


def loader_state(ckpt: Path) -> tuple[int, dict]:
    saved = torch.load(ckpt, weights_only=False)
    return saved["global_step"], saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mid_window", "after_epoch_end_checkpoint"])
def test_sigkill_then_resume_equals_the_uninterrupted_run_bit_for_bit(case, uninterrupted, tmp_path):
    rows = schedule_rows()
    pause_at = random.Random(f"resume-{case}").choice(kill_points(case))
    ckpt_row = last_checkpoint_before(rows, pause_at)
    started = run_and_kill(tmp_path, pause_at)
    assert started == list(range(pause_at + 1))

    # The checkpoint the kill leaves is the one the schedule says, and it knows its place in the epoch.
    last = tmp_path / "ckpt" / "last.ckpt"
    step, state = loader_state(last)
    assert step == ckpt_row["steps"]
    assert (state["epoch"], state["batches"]) == (ckpt_row["epoch"], ckpt_row["batch"] + 1)
    verify_checkpoint(last)

    run_worker(tmp_path, "--resume", str(last))
    resumed = torch.load(tmp_path / "final.pt", weights_only=False)

    # The resumed process trained on exactly the batches after the checkpoint, the same samples
    # in the same order, with the same losses (dropout masks included), bit for bit.
    full_trace = uninterrupted["trace"]
    assert len(resumed["trace"]) == len(full_trace) - (ckpt_row["g"] + 1)
    assert resumed["trace"] == full_trace[ckpt_row["g"] + 1:]
    assert torch.equal(resumed["params"], uninterrupted["params"])
    full_state, state = uninterrupted["state"], resumed["state"]
    assert state["steps_taken"] == full_state["steps_taken"] == 19
    assert state["clipper"] == full_state["clipper"]
    assert state["accumulator"] == full_state["accumulator"] == {"size": 3, "seen": 1, "divisor": 3, "lost": 0,
                                                                  "open": False}
    assert state["scheduler"] == full_state["scheduler"]
    assert resumed["lrs"] == uninterrupted["lrs"]
    assert resumed["global_step"] == uninterrupted["global_step"] == 19
    for pid, entry in uninterrupted["optimizer"]["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, resumed["optimizer"]["state"][pid][key]), (pid, key)


class _Interrupt(Exception):
    pass


class InterruptAt(pl.Callback):
    """Stops a run by an exception at the start of global batch g (the in-process stand-in for
    the SIGKILL above: the checkpoints on disk are what they would be)."""

    def __init__(self, g: int) -> None:
        self.g = g

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch * W.BATCHES + batch_idx == self.g:
            raise _Interrupt


@pytest.fixture
def one_thread():
    """A tiny model trains fastest on one thread; other threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_plain_dataloader_resume_is_not_exact(tmp_path, one_thread):
    """The control: with torch's DataLoader(shuffle=True) the resumed run restarts the epoch on
    another permutation (and the dropout masks go on from another RNG state), so it cannot
    match. Without this the SIGKILL test could pass with a loader that is not restored."""

    def fit(out, *callbacks, ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        model, cb, trace = W.DropLM(), W.optimizer_callback(), W.Trace()
        W.make_trainer(out, [cb, trace, *callbacks]).fit(model, W.loader(plain=True), ckpt_path=ckpt_path)
        return flat_params(model), trace.rows

    full_params, full_trace = fit(tmp_path / "full")
    with pytest.raises(_Interrupt):
        fit(tmp_path / "killed", InterruptAt(22))
    with pytest.warns(UserWarning, match="your dataloader is not resumable"):
        params, trace = fit(tmp_path / "killed", ckpt_path=tmp_path / "killed" / "ckpt" / "last.ckpt")
    assert trace[0][:2] == full_trace[21][:2] == (1, 8)  # Lightning's batch_idx goes on from the checkpoint...
    assert trace[0][2] != full_trace[21][2]  # ...but the samples are not that batch's
    assert len(trace) == len(full_trace) - 21
    assert not torch.equal(params, full_params)


# ----- ResumableDataLoader in process -----------------------------------------------------------


def index_batches(loader, n=None):
    """The sample indices of the first n batches (all by default); islice fetches no more."""
    return [batch[0].tolist() for batch in itertools.islice(loader, n)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumable_loader_skips_what_it_handed_out_and_restores_the_rng(num_workers):
    kwargs = dict(batch_size=8, shuffle=True, seed=3, num_workers=num_workers)
    whole = lo.ResumableDataLoader(W.dataset(), **kwargs)
    whole.sampler.set_epoch(1)
    epoch1 = index_batches(whole)
    assert sorted(sum(epoch1, [])) == list(range(len(W.dataset())))  # a permutation
    whole.sampler.set_epoch(0)
    assert index_batches(whole) != epoch1  # another one per epoch

    first = lo.ResumableDataLoader(W.dataset(), **kwargs)
    first.sampler.set_epoch(1)
    assert index_batches(first, 5) == epoch1[:5]
    state = first.state_dict()
    assert (state["epoch"], state["batches"], state["seed"]) == (1, 5, 3)
    expected_noise = torch.rand(3)  # what the interrupted run would draw next

    torch.manual_seed(1234)  # a new process: another global RNG state
    resumed = lo.ResumableDataLoader(W.dataset(), **kwargs)
    resumed.load_state_dict(state)
    it = iter(resumed)
    assert torch.rand(1).item() != expected_noise[0].item()  # not restored before the first batch...
    rest = [b[0].tolist() for b in it]
    assert rest == epoch1[5:]
    assert resumed.state_dict()["batches"] == len(epoch1) == 13


def test_resumable_loader_rng_restored_right_before_the_first_resumed_batch():
    loader = lo.ResumableDataLoader(W.dataset(), batch_size=8, shuffle=True)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    expected = torch.rand(4)
    resumed = lo.ResumableDataLoader(W.dataset(), batch_size=8, shuffle=True)
    resumed.load_state_dict(state)
    it = iter(resumed)
    torch.rand(10)  # whatever setup draws between the load and the first batch
    next(it)
    assert torch.equal(torch.rand(4), expected)


def test_resumable_loader_state_after_the_last_batch_starts_the_next_epoch():
    loader = lo.ResumableDataLoader(W.dataset(), batch_size=8, shuffle=True, seed=5)
    loader.sampler.set_epoch(2)
    index_batches(loader)
    state = loader.state_dict()
    assert (state["epoch"], state["batches"]) == (2, 13)
    resumed = lo.ResumableDataLoader(W.dataset(), batch_size=8, shuffle=True, seed=5)
    resumed.load_state_dict(state)
    assert resumed.sampler.epoch == 3
    reference = lo.ResumableDataLoader(W.dataset(), batch_size=8, shuffle=True, seed=5)
    reference.sampler.set_epoch(3)
    assert index_batches(resumed) == index_batches(reference)
    assert len(resumed) == 13


def test_resumable_loader_rejects_a_non_int_seed():
    with pytest.raises(ValueError, match=r"ResumableDataLoader: seed='0' is invalid: must be an int"):
        lo.ResumableDataLoader(W.dataset(), batch_size=8, shuffle=True, seed="0")


# ----- damaged checkpoints ----------------------------------------------------------------------


def callback() -> OptimizerCallback:
    return OptimizerCallback(optimizer={"name": "coupled_adam", "lr": 1e-2}, clipping={"mode": "norm", "max_norm": 1.0})


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "good.ckpt"
    t = trainer([callback()], max_steps=3)
    t.fit(BareLM(), data(batches=6))
    t.save_checkpoint(path)
    return path


def data_record(path: Path) -> tuple[str, int, int]:
    """(name, offset of its bytes in the file, size) of the largest tensor record."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if re.search(r"/data/\d+$", i.filename)), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
    return info.filename, info.header_offset + 30 + name_len + extra_len, info.file_size


def damaged(good: Path, tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A damaged copy of ``good`` and the error it must get (a regex)."""
    raw = good.read_bytes()
    path = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
        why = r"is truncated or corrupted \(\d+ bytes, its zip directory cannot be read"
    elif kind == "flipped":
        name, offset, size = data_record(good)
        assert size >= 64
        flipped = bytearray(raw)
        for i in range(offset + size // 2, offset + size // 2 + 4):
            flipped[i] ^= 0x5A
        path.write_bytes(bytes(flipped))
        why = rf"is truncated or corrupted \(record '{re.escape(name)}' fails its CRC-32 check\)"
    elif kind == "empty":
        path.write_bytes(b"")
        why = r"is empty \(0 bytes\)"
    elif kind == "text":
        path.write_text("epoch=3 step=120\n")
        why = r"is not a torch checkpoint: it starts with b'epoch=3 '"
    elif kind == "legacy_truncated":
        legacy = tmp_path / "legacy_whole.ckpt"
        torch.save(torch.load(good, weights_only=False), legacy, _use_new_zipfile_serialization=False)
        path.write_bytes(legacy.read_bytes()[:-100])
        why = r"cannot be read \(RuntimeError: unexpected EOF.*it is in torch's legacy format"
    else:
        raise AssertionError(kind)
    return path, rf"^checkpoint '{re.escape(str(path))}' {why}"


DAMAGE = ["truncated", "flipped", "empty", "text", "legacy_truncated"]


def test_a_good_checkpoint_verifies(good_checkpoint):
    verify_checkpoint(good_checkpoint)
    verify_checkpoint(str(good_checkpoint))


def test_flipped_bytes_load_silently_without_verification(good_checkpoint, tmp_path):
    """Why verification exists: torch.load does not check the CRCs, and returns other numbers."""
    path, _ = damaged(good_checkpoint, tmp_path, "flipped")
    good, bad = torch.load(good_checkpoint, weights_only=False), torch.load(path, weights_only=False)
    differs = [k for k, v in good["state_dict"].items() if not torch.equal(v, bad["state_dict"][k])]
    differs += [f"optimizer {pid}.{k}" for pid, s in good["optimizer_states"][0]["state"].items()
                for k, v in s.items() if not torch.equal(v, bad["optimizer_states"][0]["state"][pid][k])]
    assert differs == ["embed.weight", "head.weight"]  # one tensor record: the tied embedding


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_checkpoint_is_refused_by_name(kind, good_checkpoint, tmp_path):
    path, message = damaged(good_checkpoint, tmp_path, kind)
    ctx = pytest.warns(lo.LightningOptimWarning, match="legacy") if kind.startswith("legacy") else _nothing()
    with ctx, pytest.raises(CheckpointError, match=message):
        verify_checkpoint(path)


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_checkpoint_is_refused_by_trainer_fit(kind, good_checkpoint, tmp_path):
    path, message = damaged(good_checkpoint, tmp_path, kind)
    model = BareLM()
    before = flat_params(model).clone()
    ctx = pytest.warns(lo.LightningOptimWarning, match="legacy") if kind.startswith("legacy") else _nothing()
    with ctx, pytest.raises(CheckpointError, match=message):
        trainer([callback()], max_steps=6).fit(model, data(batches=6), ckpt_path=path)
    assert torch.equal(flat_params(model), before)  # nothing loaded, nothing trained


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_a_zip_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "notes.ckpt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")
    with pytest.raises(CheckpointError, match=r"is a zip archive but not a torch checkpoint \(no 'data.pkl'"):
        verify_checkpoint(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.ckpt"))):
        verify_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="is a directory"):
        verify_checkpoint(tmp_path)


def test_whole_legacy_checkpoint_warns_once_and_resumes(good_checkpoint, tmp_path):
    """Decision: torch's legacy format has no CRCs. Truncation still shows (it is loaded), a
    changed byte would not: a one-time warning says so, and the resume goes on."""
    legacy = tmp_path / "legacy.ckpt"
    torch.save(torch.load(good_checkpoint, weights_only=False), legacy, _use_new_zipfile_serialization=False)
    with pytest.warns(lo.LightningOptimWarning, match=r"legacy \(non-zip\) format, which stores no checksums"):
        verify_checkpoint(legacy)
    cb = callback()
    trainer([cb], max_steps=5, max_epochs=-1).fit(BareLM(), data(batches=6), ckpt_path=legacy)  # warned already
    assert cb.steps_taken == 5


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ----- another optimizer or partition -----------------------------------------------------------


def test_checkpoint_of_another_optimizer_is_refused_through_trainer(good_checkpoint):
    with pytest.raises(ValueError, match="trained with optimizer 'coupled_adam', this run asks for 'adamw'"):
        trainer([OptimizerCallback(optimizer="adamw")], max_steps=5).fit(BareLM(), data(batches=6),
                                                                          ckpt_path=good_checkpoint)


def test_checkpoint_of_another_partition_is_refused_through_trainer(tmp_path):
    path = tmp_path / "rules.ckpt"
    t = trainer([OptimizerCallback(optimizer="adamw", partition={"rules": [{"match": "mlp.*", "group": "mlp"}]})],
                max_steps=2)
    t.fit(BareLM(), data(batches=6))
    t.save_checkpoint(path)
    # Three groups each side: mlp(mlp.weight, mlp.bias), embedding, no_decay(norm) against
    # embedding, no_decay(norm, mlp.bias), decay(mlp.weight).
    with pytest.raises(ValueError, match=(
            r"^AdamW.load_state_dict: param group 0 \('embedding'\) has 1 params here but 2 in the state dict")):
        trainer([OptimizerCallback(optimizer="adamw")], max_steps=4).fit(BareLM(), data(batches=6), ckpt_path=path)


def test_checkpoint_with_another_group_count_is_refused_through_trainer(tmp_path):
    path = tmp_path / "split.ckpt"
    rules = {"rules": [{"match": "norm.*", "group": "norm"}]}
    t = trainer([OptimizerCallback(optimizer="adamw", partition=rules)], max_steps=2)
    t.fit(BareLM(), data(batches=6))
    t.save_checkpoint(path)
    with pytest.raises(ValueError, match=(
            r"^AdamW.load_state_dict: the state dict has 4 param groups \(norm, embedding, no_decay, decay\), "
            r"this optimizer has 3 \(embedding, no_decay, decay\): was it saved with another partition\?")):
        trainer([OptimizerCallback(optimizer="adamw")], max_steps=4).fit(BareLM(), data(batches=6), ckpt_path=path)


# ----- torch.optim -> lightning_optim -----------------------------------------------------------


def set_grads(model: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def run(model, opt, steps):
    for s in steps:
        set_grads(model, s)
        opt.step()


@pytest.mark.parametrize("named", [True, False], ids=["param_names", "by_order"])
def test_torch_adamw_state_converts_and_continues_like_torch(named):
    torch.manual_seed(0)
    model = TiedLM()
    params = model.named_parameters() if named else model.parameters()
    theirs = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0, foreach=False, fused=False)
    run(model, theirs, range(3))
    saved = copy.deepcopy(theirs.state_dict())
    assert ("param_names" in saved["param_groups"][0]) is named

    ours_model = copy.deepcopy(model)
    ours = lo.create_optimizer({"name": "adamw", "lr": 1e-2, "weight_decay": 0.0}, ours_model, backend="reference")
    assert [g["name"] for g in ours.param_groups] == ["embedding", "no_decay", "decay"]
    ours.load_state_dict(convert_optimizer_state(saved, ours_model, ours))
    for p, q in zip(model.parameters(), ours_model.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ours.state[q][key], theirs.state[p][key]), key
    run(model, theirs, range(3, 6))
    run(ours_model, ours, range(3, 6))
    for (name, a), b in zip(model.named_parameters(), ours_model.parameters()):
        assert_rel(b, a, 1e-6, name)
        assert torch.equal(a, b), name  # the reference backend is torch's single-tensor loop
    assert ours.state[ours_model.embed.weight]["step"].item() == 6.0


def test_coupled_conversion_is_the_row_mean_coupled_adam_keeps():
    """Torch AdamW's v, averaged over the rows, is the coupled second moment CoupledAdam builds
    from the same gradients (the mean commutes with the EMA); exp_avg carries over as is."""
    model = TiedLM()
    theirs = torch.optim.AdamW(model.named_parameters(), lr=1e-2, betas=(0.9, 0.95), foreach=False)
    run(model, theirs, range(4))
    coupled_model = copy.deepcopy(TiedLM())
    coupled = lo.create_optimizer({"name": "coupled_adam", "lr": 1e-2, "betas": [0.9, 0.95]}, coupled_model,
                                  backend="reference")
    run(coupled_model, coupled, range(4))  # the same gradients
    target_model = copy.deepcopy(model)
    target = lo.create_optimizer({"name": "coupled_adam", "lr": 1e-2, "betas": [0.9, 0.95]}, target_model)
    target.load_state_dict(convert_optimizer_state(theirs.state_dict(), target_model, target))
    emb, ref = target.state[target_model.embed.weight], coupled.state[coupled_model.embed.weight]
    assert emb["exp_avg_sq"].shape == ref["exp_avg_sq"].shape == (1, 16)
    assert_rel(emb["exp_avg_sq"], ref["exp_avg_sq"], 1e-6, "coupled exp_avg_sq")
    assert_rel(emb["exp_avg_sq"], theirs.state[model.embed.weight]["exp_avg_sq"].mean(0, keepdim=True), 1e-7, "row mean")
    assert torch.equal(emb["exp_avg"], theirs.state[model.embed.weight]["exp_avg"])
    assert emb["step"].item() == 4.0
    # Uncoupled groups carry over untouched.
    assert torch.equal(target.state[target_model.mlp.weight]["exp_avg_sq"], theirs.state[model.mlp.weight]["exp_avg_sq"])


def test_conversion_refuses_state_of_another_model():
    small, big = TiedLM(), TiedLM()
    big.mlp = nn.Linear(16, 16, bias=False)  # one tensor fewer
    theirs = torch.optim.AdamW(big.parameters())
    run(big, theirs, range(1))
    ours = lo.create_optimizer("adamw", small)
    with pytest.raises(ValueError, match=r"holds 4 parameters without names and TiedLM.parameters\(\) has 5"):
        convert_optimizer_state(theirs.state_dict(), small, ours)
    named = torch.optim.AdamW(big.named_parameters())
    run(big, named, range(1))
    saved = named.state_dict()
    saved["param_groups"][0]["param_names"][0] = "embedd.weight"
    with pytest.raises(ValueError, match=r"state_dict='embedd.weight' is invalid: names a parameter that TiedLM does "
                                         r"not have \(did you mean 'embed.weight'\?\)"):
        convert_optimizer_state(saved, small, ours)


class TorchAdamWLM(TiedLM):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.0, foreach=False, fused=False)


def test_lightning_checkpoint_from_torch_adamw_converts_and_resumes(tmp_path):
    """A plain Lightning run with torch AdamW, 3 steps (one epoch), then converted: resuming it
    with OptimizerCallback(adamw) for 3 more steps equals resuming the original checkpoint with
    torch AdamW (the module's own configure_optimizers) for 3 more steps."""
    torch.manual_seed(0)
    t = trainer([], max_steps=3)
    t.fit(TorchAdamWLM(), data(batches=3))
    t.save_checkpoint(tmp_path / "plain.ckpt")
    optimizer = {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0, "backend": "reference"}
    converted = convert_checkpoint(tmp_path / "plain.ckpt", tmp_path / "ours.ckpt", TorchAdamWLM(), optimizer)
    assert converted["lr_schedulers"] == []
    assert [g["name"] for g in converted["optimizer_states"][0]["param_groups"]] == ["embedding", "no_decay", "decay"]
    verify_checkpoint(tmp_path / "ours.ckpt")
    assert not list(tmp_path.glob(".ours.ckpt.*"))  # no temporary file left

    theirs = TorchAdamWLM()
    trainer([], max_steps=6, max_epochs=-1).fit(theirs, data(batches=3), ckpt_path=tmp_path / "plain.ckpt")
    cb = OptimizerCallback(optimizer=optimizer)
    ours = TorchAdamWLM()
    trainer([cb], max_steps=6, max_epochs=-1).fit(ours, data(batches=3), ckpt_path=tmp_path / "ours.ckpt")
    assert cb.steps_taken == 3
    assert cb.optimizer.state[ours.embed.weight]["step"].item() == 6.0
    assert ours.losses == theirs.losses and len(ours.losses) == 3
    for (name, a), b in zip(theirs.named_parameters(), ours.parameters()):
        assert_rel(b, a, 1e-6, name)
        assert torch.equal(a, b), name
