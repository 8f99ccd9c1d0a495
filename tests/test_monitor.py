"""MomentMonitor in training: keys, cadence, step axis, pre-clip norms, no syncs on quiet steps,
W&B; built from its config node, with README, constructor, MonitorConfig and YAML in agreement."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

from lightning_optim.integration import MomentMonitor, OptimizerCallback
from lightning_optim.config import MonitorConfig, monitor_config
from lightning_optim.stats import STATS
from lightning_helpers import BareLM, TiedLM, data, trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
ROOT = Path(__file__).resolve().parents[1]
MONITOR_NODES = sorted((ROOT / "conf" / "monitor").glob("*.yaml"))


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
            # Optimizer steps 3, 6, 9, 12 are logged at Lightning's step for their batch, k - 1.
            if stat in ("v_drift", "v_log_ratio"):
                assert [s for s, _ in logged] == [5, 8, 11], key  # needs a previous log
            else:
                assert [s for s, _ in logged] == [2, 5, 8, 11], key
            assert all(math.isfinite(v) for _, v in logged), key
    # Gradient norms are taken before clipping: with max_norm=0.01 they are far above it.
    assert float(next(r for r in rows if r.get("optim/grad_norm/mlp.weight"))["optim/grad_norm/mlp.weight"]) > 0.01
    # Per group: the clipped fraction (every step clipped here) and, for the coupled embedding, geometry.
    fractions = [float(r["optim/clipped_fraction/decay"]) for r in rows if r.get("optim/clipped_fraction/decay")]
    assert fractions == [1.0, 1.0, 1.0, 1.0]
    iso = [(int(r["step"]), float(r["embedding/isotropy/embed.weight"])) for r in rows if r.get("embedding/isotropy/embed.weight")]
    assert [s for s, _ in iso] == [5, 11] and all(0 < v <= 1 for _, v in iso)
    ratio = [float(r["embedding/mean_ratio/embed.weight"]) for r in rows if r.get("embedding/mean_ratio/embed.weight")]
    assert len(ratio) == 4 and all(0 <= v <= 1 for v in ratio)


class LossLM(TiedLM):
    """TiedLM logging its loss as a user's training_step does; ``own_optimizer=False``: no
    configure_optimizers (the OptimizerCallback's), else its own torch SGD."""

    def __init__(self, own_optimizer: bool) -> None:
        super().__init__()
        if not own_optimizer:
            self.configure_optimizers = pl.LightningModule.configure_optimizers.__get__(self)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", loss)
        return loss


class StepRecorder(pl.Callback):
    """For each optimizer step k (1-based): the loss of the batch that ran it and
    ||embed.weight|| after it."""

    def __init__(self) -> None:
        self.loss: dict[int, float] = {}
        self.norm: dict[int, float] = {}

    def on_train_batch_end(self, trainer_, pl_module, outputs, batch, batch_idx):
        k = trainer_.global_step
        if k and k not in self.loss:
            self.loss[k] = pl_module.losses[-1]
            self.norm[k] = pl_module.embed.weight.detach().double().norm().item()


@pytest.mark.parametrize("setup, accumulate", [("callback", 1), ("own-optimizer", 3)])
def test_cadence_is_every_n_steps_and_rows_line_up_with_lightnings_own(tmp_path, setup, accumulate):
    """log_every_n_steps=7, every_n_steps=5: the monitor logs optimizer steps 5, 10, ..., 35,
    exactly those, at steps 4, 9, ..., 34; Lightning logs train/loss of steps 7, 14, ..., 35 at
    6, 13, ..., 34. Each row describes the optimizer step one above its step value: the
    monitor's param norm is the one after that step, the loss that of the batch which ran it
    (the last of its window of 3 micro-batches, with accumulation). At step 34 both rows are
    optimizer step 35's."""
    pl.seed_everything(0)
    own = setup == "own-optimizer"
    model, rec = LossLM(own_optimizer=own), StepRecorder()
    callbacks = [MomentMonitor(every_n_steps=5, expensive_every_n_steps=35), rec]
    if not own:
        callbacks.append(OptimizerCallback(optimizer="adamw"))
    trainer(callbacks, max_steps=35, max_epochs=-1, accumulate_grad_batches=accumulate, log_every_n_steps=7,
            logger=CSVLogger(tmp_path, name="", version="")).fit(model, data())
    rows = csv_rows(tmp_path / "metrics.csv")
    key = "optim/param_norm/" + ("group0.0" if own else "embed.weight")  # torch's SGD has no param names
    monitored = {int(r["step"]): float(r[key]) for r in rows if r.get(key)}
    losses = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    assert sorted(monitored) == [4, 9, 14, 19, 24, 29, 34]
    assert sorted(losses) == [6, 13, 20, 27, 34]
    assert sorted(rec.norm) == list(range(1, 36)) and len(model.losses) == 35 * accumulate
    for step, value in monitored.items():
        assert value == pytest.approx(rec.norm[step + 1], rel=1e-6), step
        assert value != pytest.approx(rec.norm[step], rel=1e-6), step  # the params did move in that step
    for step, value in losses.items():
        assert value == pytest.approx(rec.loss[step + 1], rel=1e-6), step
    assert [int(r["step"]) for r in rows if r.get("embedding/isotropy/embed.weight")] == [34]


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

    from lightning_optim.dashboard.wandb_history import read_history

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
    # Optimizer steps 2, 4, 6, 8 at Lightning's step for their batch, in W&B's trainer/global_step
    # column (what the dashboard reads), as the callback's own keys for the same steps.
    monitored = [r["trainer/global_step"] for r in rows if "optim/param_norm/embed.weight" in r]
    histograms = [r["trainer/global_step"] for r in rows if any(k.startswith("optim/log10_sqrt_v/") for k in r)]
    callback = [r["trainer/global_step"] for r in rows if "optim/grad_norm_total" in r]
    assert monitored == [1, 3, 5, 7] and histograms == [3, 7]
    assert callback[:7] == list(range(7))  # the run's very last row W&B (0.31, offline) keeps only in its summary


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
    checkpoint: v_drift, v_log_ratio and clipped_fraction of optimizer step 6 in a run resumed
    from step 4 equal those of a run that never stopped, and are logged at the same step."""
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
    # Optimizer step 6 is logged at step 5 in both runs: the resumed run's step axis goes on as Lightning's does.
    assert sorted(whole) == [3, 5] and sorted(resumed) == [5]
    keys = [k for k in whole[5] if k.startswith(("optim/v_drift/", "optim/v_log_ratio/", "optim/clipped_fraction/"))]
    assert len(keys) >= 8
    for k in keys:
        assert resumed[5][k] != "" and float(resumed[5][k]) == pytest.approx(float(whole[5][k]), rel=1e-6), k


# ----- one way to build it: MomentMonitor(**node); README, constructor, MonitorConfig and YAML agree -----


def _literal(value):
    return list(value) if isinstance(value, tuple) else value


def monitor_yaml(path: Path) -> dict:
    """A ``conf/monitor`` file's own keys (its defaults list, which names the schema or
    ``default``, dropped)."""
    node = yaml.safe_load(path.read_text())
    assert node.pop("defaults")[-1] == "_self_"
    return node


def constructor_options() -> list[tuple[str, object]]:
    params = list(inspect.signature(MomentMonitor.__init__).parameters.values())[1:]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
    return [(p.name, _literal(p.default)) for p in params]


def readme_options() -> list[tuple[str, object]]:
    """The rows of the monitor option table of docs/reference.md: name and default, the default read as YAML."""
    text = (ROOT / "docs" / "reference.md").read_text()
    section = text.split("### Moment statistics: `MomentMonitor`", 1)[1].split("\n### ", 1)[0]
    table = section.split("| option | default | meaning |\n|---|---|---|\n", 1)[1].split("\n\n", 1)[0]
    lines = table.splitlines()
    rows = [re.match(r"\| `(\w+)` \| `([^`|]*)` \|", line) for line in lines]
    assert all(rows), [line for line, row in zip(lines, rows) if not row]  # one option, one literal default
    return [(row[1], yaml.safe_load(row[2])) for row in rows]


def test_readme_table_constructor_and_monitor_config_agree():
    """Same options, same order, same defaults: the README's table, MomentMonitor's keyword
    arguments and the fields of MonitorConfig (the Hydra schema of the ``monitor`` node)."""
    fields = [(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
              for f in dataclasses.fields(MonitorConfig)]
    ctor = constructor_options()
    assert [name for name, _ in ctor] == [f for f, _ in fields] == [name for name, _ in readme_options()]
    assert ctor == fields == readme_options()
    assert MomentMonitor().config == MonitorConfig()
    assert MonitorConfig().stats == list(STATS)  # null: all of them


@pytest.mark.parametrize("path", MONITOR_NODES, ids=[p.stem for p in MONITOR_NODES])
def test_every_monitor_yaml_node_is_keyword_arguments_of_the_constructor(path):
    node = monitor_yaml(path)
    names = [name for name, _ in constructor_options()]
    assert set(node) <= set(names), sorted(set(node) - set(names))
    monitor = MomentMonitor(**node)
    assert monitor.config == monitor_config(node)
    assert monitor.config == dataclasses.replace(MonitorConfig(), **{k: v for k, v in node.items() if k != "stats"})
    if path.stem == "default":  # every option, at the constructor's default
        assert list(node) == names and node == dict(constructor_options())
    assert monitor.config.enabled is (path.stem != "off")


@pytest.mark.parametrize("path", MONITOR_NODES, ids=[p.stem for p in MONITOR_NODES])
def test_the_hydra_node_builds_the_monitor(path):
    """``MomentMonitor(**cfg.monitor)`` on the composed node, as ``lightning_optim.app.train`` builds
    it, gives what the same keys as a plain dict give, and that is what the chosen file says
    over the defaults (the main config shadows no choice: ``monitor=every_step`` logs every
    step); ``monitor=off`` gives a disabled one."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(version_base=None, config_module="lightning_optim.conf"):
        cfg = compose("config", overrides=[f"monitor={path.stem}"])
    plain = OmegaConf.to_container(cfg.monitor, resolve=True)
    built = MomentMonitor(**cfg.monitor).config
    assert built == MomentMonitor(**plain).config == MonitorConfig(**plain)
    assert built == dataclasses.replace(MonitorConfig(), **{k: v for k, v in monitor_yaml(path).items() if k != "stats"})
    assert built.enabled is (path.stem != "off")


def test_the_main_job_monitors_every_10_steps():
    from hydra import compose, initialize_config_module

    with initialize_config_module(version_base=None, config_module="lightning_optim.conf"):
        cfg = compose("config")
    config = MomentMonitor(**cfg.monitor).config
    assert (config.every_n_steps, config.expensive_every_n_steps, config.enabled) == (10, 50, True)


def test_a_disabled_monitor_does_nothing(tmp_path):
    """``enabled=False`` (``monitor=off``): no statistics, no metric, no checkpoint state; the
    callbacks keep their order; OptimizerCallback still logs."""
    monitor = MomentMonitor(**{"enabled": False, "every_n_steps": 1, "expensive_every_n_steps": 1})
    optimizer = OptimizerCallback(optimizer="adamw")
    t = trainer([optimizer, monitor], max_steps=3, log_every_n_steps=1, logger=CSVLogger(tmp_path, name="", version=""))
    t.fit(BareLM(), data())
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "optim/grad_norm_total" in header
    assert not [k for k in header if k.startswith(("optim/param_norm/", "optim/v_drift/", "embedding/"))], header
    assert monitor.stats is None and monitor.state_dict() == {}
    assert t.callbacks.index(optimizer) < t.callbacks.index(monitor)
    assert MomentMonitor.from_config({"enabled": False}) is None  # the older spelling keeps its meaning
    assert MomentMonitor.from_config({"every_n_steps": 2, "expensive_every_n_steps": 4}).config == \
        MomentMonitor(every_n_steps=2, expensive_every_n_steps=4).config
