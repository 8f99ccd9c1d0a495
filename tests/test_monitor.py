"""MomentMonitor in training: keys, cadence, pre-clip norms, no syncs on quiet steps, W&B."""

from __future__ import annotations

import math
import re

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_optim.callback import MomentMonitor, OptimizerCallback
from lightning_optim.stats import STATS
from lightning_helpers import BareLM, TiedLM, data, trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def csv_rows(path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_keys_cadence_and_values(tmp_path):
    pl.seed_everything(0)
    model = BareLM()
    cbs = [MomentMonitor(every_n_steps=3, expensive_every_n_steps=6),
           OptimizerCallback(optimizer={"name": "coupled_adam", "lr": 1e-2}, clipping={"mode": "norm", "max_norm": 0.01})]
    trainer(cbs, max_steps=12, logger=CSVLogger(tmp_path, name="", version=""), log_every_n_steps=1).fit(model, data())
    rows = csv_rows(tmp_path / "metrics.csv")
    params = [n for n, p in model.named_parameters()]
    for stat in STATS:
        for name in params:
            key = f"optim/{stat}/{name}"
            logged = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
            if stat in ("v_drift", "v_log_ratio"):
                assert [s for s, _ in logged] == [6, 9, 12], key  # needs a previous log
            else:
                assert [s for s, _ in logged] == [3, 6, 9, 12], key
            assert all(math.isfinite(v) for _, v in logged), key
    # Gradient norms are taken before clipping: with max_norm=0.01 they are far above it.
    assert float(next(r for r in rows if r.get("optim/grad_norm/mlp.weight"))["optim/grad_norm/mlp.weight"]) > 0.01
    # Per group: the clipped fraction (every step clipped here) and, for the coupled embedding, geometry.
    fractions = [float(r["optim/clipped_fraction/decay"]) for r in rows if r.get("optim/clipped_fraction/decay")]
    assert fractions == [1.0, 1.0, 1.0, 1.0]
    iso = [(int(r["step"]), float(r["embedding/isotropy/embed.weight"])) for r in rows if r.get("embedding/isotropy/embed.weight")]
    assert [s for s, _ in iso] == [6, 12] and all(0 < v <= 1 for _, v in iso)
    ratio = [float(r["embedding/mean_ratio/embed.weight"]) for r in rows if r.get("embedding/mean_ratio/embed.weight")]
    assert len(ratio) == 4 and all(0 <= v <= 1 for v in ratio)


def test_works_with_torch_optimizers_from_configure_optimizers(tmp_path):
    """No OptimizerCallback: the module's own torch.optim.SGD; the monitor logs lr itself."""
    pl.seed_everything(0)
    model = TiedLM()
    trainer([MomentMonitor(every_n_steps=2, stats=["grad_norm", "exp_avg_norm", "param_norm"])], max_steps=4,
            logger=CSVLogger(tmp_path, name="", version=""), log_every_n_steps=1).fit(model, data())
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "optim/lr/group0" in header and "optim/grad_norm/group0.0" in header
    assert not any(k.startswith("optim/exp_avg_norm/") for k in header)  # SGD without momentum has no m


def test_quiet_steps_make_no_host_sync(monkeypatch, tmp_path):
    """On steps that do not log, the monitor's hooks read nothing back from the device."""
    calls = {"n": 0, "inside": False}
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__float__")}

    def counting(name):
        def wrapper(self, *args, **kwargs):
            if calls["inside"]:
                calls["n"] += 1
            return originals[name](self, *args, **kwargs)
        return wrapper

    for name in originals:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    monitor = MomentMonitor(every_n_steps=5, expensive_every_n_steps=5)
    per_step: dict[int, int] = {}

    for hook in ("on_before_optimizer_step", "on_train_batch_end"):
        inner = getattr(monitor, hook)

        def wrapped(trainer_, *args, _inner=inner, **kwargs):
            calls["inside"] = True
            before = calls["n"]
            try:
                return _inner(trainer_, *args, **kwargs)
            finally:
                calls["inside"] = False
                step = trainer_.global_step
                per_step[step] = per_step.get(step, 0) + calls["n"] - before

        setattr(monitor, hook, wrapped)
    trainer([monitor, OptimizerCallback(optimizer="adamw")], max_steps=10,
            logger=CSVLogger(tmp_path, name="", version="")).fit(BareLM(), data())
    quiet = {s: n for s, n in per_step.items() if s not in (5, 10)}
    assert len(quiet) == 9 and all(n == 0 for n in quiet.values()), per_step
    assert per_step[5] > 0  # the counter does see the logging step's one read-back


def test_monitor_keeps_bounded_memory():
    """One drift reference per tensor, overwritten: the memory held stops growing after the first log."""
    pl.seed_everything(0)
    monitor = MomentMonitor(every_n_steps=1, expensive_every_n_steps=1)
    held = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer_, pl_module, outputs, batch, batch_idx):
            held.append(monitor.stats.reference_bytes())

    model = BareLM()
    trainer([monitor, OptimizerCallback(optimizer="adamw"), Spy()], max_steps=9).fit(model, data())
    v_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert len(held) == 9 and len(set(held)) == 1 and held[0] <= v_bytes + 1024


@pytest.mark.parametrize("kwargs, match", [
    ({"every_n_steps": 0}, r"monitor: every_n_steps=0 is invalid"),
    ({"every_n_steps": 10, "expensive_every_n_steps": 15}, r"expensive_every_n_steps=15 is invalid: must be a multiple"),
    ({"stats": ["snr", "snrr"]}, r"stats='snrr' is invalid.*did you mean 'snr'"),
])
def test_bad_monitor_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MomentMonitor(**kwargs)


@pytest.mark.slow
def test_wandb_offline_run_has_per_layer_keys(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    from lightning_optim.wandb_history import read_history

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    pl.seed_everything(0)
    model = TiedLM()
    logger = WandbLogger(save_dir=str(tmp_path), mode="offline", project="test")
    trainer([MomentMonitor(every_n_steps=2, expensive_every_n_steps=4), OptimizerCallback(optimizer="coupled_adam")],
            max_steps=8, logger=logger, log_every_n_steps=1).fit(model, data())
    logger.experiment.finish()
    rows = read_history(tmp_path)
    keys = set().union(*rows)
    for name in ("embed.weight", "mlp.weight", "norm.bias"):
        for stat in ("v_drift", "sqrt_v_mean", "snr", "update_ratio", "grad_norm"):
            key = f"optim/{stat}/{name}"
            assert key in keys, key
            values = [r[key] for r in rows if key in r]
            assert values and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values), (key, values)
    assert "embedding/isotropy/embed.weight" in keys
    assert any(re.match(r"optim/log10_sqrt_v/", k) for k in keys)  # W&B histograms


@pytest.mark.slow
def test_ddp_statistics_are_rank_consistent(tmp_path):
    """Under 2-process DDP the gradients are all-reduced, so every rank computes the same statistics."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "ddp_monitor.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["params"] == r1["params"]
    assert len(r0["stats"]) == len(r1["stats"]) == 3
    assert any(k.startswith("optim/v_drift/") for k in r0["stats"][-1])
    for a, b in zip(r0["stats"], r1["stats"]):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-12), key


def test_the_first_log_after_a_resume_reads_as_an_uninterrupted_runs(tmp_path):
    """The monitor's state (drift references, the previous log's clip counts) is in the
    checkpoint: v_drift, v_log_ratio and clipped_fraction at step 6 of a run resumed from step
    4 equal those of a run that never stopped."""
    import csv

    from lightning.pytorch.callbacks import ModelCheckpoint

    import lightning_optim as lo

    def run(name, max_steps, ckpt_path=None):
        pl.seed_everything(0)
        callbacks = [OptimizerCallback(optimizer={"name": "coupled_adam", "lr": 1e-2},
                                       clipping={"mode": "norm", "max_norm": 0.5}),
                     MomentMonitor(every_n_steps=2, expensive_every_n_steps=100),
                     ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=4, save_top_k=-1)]
        loader = lo.ResumableDataLoader(data().dataset, batch_size=16, shuffle=False)
        t = trainer(callbacks, max_steps=max_steps, enable_checkpointing=True,
                    logger=CSVLogger(tmp_path, name=name, version=0))
        t.fit(BareLM(), loader, ckpt_path=ckpt_path)
        with open(tmp_path / name / "version_0" / "metrics.csv") as f:
            return {int(r["step"]): r for r in csv.DictReader(f) if r.get("optim/v_drift/embed.weight")}

    whole = run("whole", 6)
    run("first", 4)
    resumed = run("resumed", 6, ckpt_path=str(next((tmp_path / "first").glob("*step=4*.ckpt"))))
    keys = [k for k in whole[6] if k.startswith(("optim/v_drift/", "optim/v_log_ratio/", "optim/clipped_fraction/"))]
    assert len(keys) >= 8
    for k in keys:
        assert resumed[6][k] != "" and float(resumed[6][k]) == pytest.approx(float(whole[6][k]), rel=1e-6), k
