"""Hydra: the train entry point, bad overrides, a foreign app using pkg://lightning_optim.conf,
and conf/ shipped in the wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

import lightning_optim as lo
from lightning_optim.registry import options

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "lightning_optim" / "conf"
APP = Path(__file__).parent / "hydra_app" / "app.py"
QUIET = ["hydra/job_logging=none", "hydra/hydra_logging=none"]
# The main job shrunk to seconds: a small stdlib corpus (in the test's own cache) and model.
SMALL_JOB = ["data.max_bytes=250000", "data.vocab_size=512", "data.batch_size=8", "data.val_batches=2",
             "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.seq_len=32"]


def run(args, cwd, env=None, timeout=300):
    env = {**(os.environ if env is None else env), "LIGHTNING_OPTIM_CACHE": str(Path(cwd) / "corpus_cache")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_train_runs_with_coupled_adam_and_writes_the_dashboard(tmp_path):
    out = tmp_path / "run"
    proc = run(["-m", "lightning_optim.train", "optimizer=coupled_adam", "trainer.max_steps=6",
                "trainer.val_check_interval=3", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
                "monitor.every_n_steps=1", "monitor.expensive_every_n_steps=3", *SMALL_JOB, f"hydra.run.dir={out}"],
               tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / "last.ckpt").is_file()
    metrics = (out / "logs" / "metrics.csv").read_text()
    for key in ("optim/grad_norm_total", "optim/lr/embedding", "optim/v_drift/net.wte.weight",
                "embedding/isotropy/net.wte.weight", "val/perplexity"):
        assert key in metrics, key
    assert f"checkpoint:    {out / 'checkpoints' / 'last.ckpt'}" in proc.stdout
    assert f"dashboard:     {out / 'dashboard.html'}" in proc.stdout
    html = (out / "dashboard.html").read_text()
    figures = sorted((out / "dashboard_figures").glob("*.png"))
    assert html.count("data:image/png;base64,") == len(figures) == 8
    from PIL import Image
    import numpy as np

    for png in figures:  # each figure drawn, not blank
        pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
        assert pixels.std() > 5, png.name


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer=nonexistent", "Could not find 'optimizer/nonexistent'"),
        ("optimizer.lr=-1", "optimizer: lr=-1.0 is invalid: must be > 0"),
        ("optimizer.betas=[0.9,1.5]", "betas[1]=1.5 is invalid: must be in [0, 1)"),
        ("optimizer.lrr=1", "Key 'lrr' not in 'OptimizerConfig'"),
        ("optimizer.lr=abc", "optimizer.lr"),
        ("clipping.max_norm=0", "max_norm=0.0 is invalid"),
        ("scheduler=cosine scheduler.min_lr_ratio=2", "min_lr_ratio=2.0 is invalid"),
        ("accumulation.schedule=[[0,1],[10,0]]", "must be an int >= 1"),
    ],
)
def test_bad_overrides_exit_with_one_paragraph(tmp_path, override, message):
    proc = run(["-m", "lightning_optim.train", *override.split(), f"hydra.run.dir={tmp_path}"], tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 25


def foreign(tmp_path, *overrides, env=None):
    proc = run([str(APP), *QUIET, *overrides], tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_foreign_app_uses_the_groups(tmp_path):
    got = foreign(tmp_path, "optimizer=coupled_adam", "optimizer.lr=3e-4", "scheduler=warmup_cosine",
                  "clipping=per_group", "accumulation=step_schedule")
    assert got["app"] == "foreign" and got["optimizer"] == "CoupledAdam" and got["lr"] == 3e-4
    assert got["groups"] == ["embedding", "no_decay", "decay"]
    assert (got["scheduler"], got["clipping"]) == ("warmup_cosine", "norm")
    assert got["accumulation"] == {"0": 1, "200": 4, "1000": 8}


def test_foreign_app_rejects_a_typo_at_compose_time(tmp_path):
    proc = run([str(APP), *QUIET, "optimizer.lrr=1"], tmp_path)
    assert proc.returncode != 0 and "Key 'lrr' not in 'OptimizerConfig'" in proc.stderr


@pytest.mark.slow
def test_conf_ships_in_the_wheel_and_works_from_an_install(tmp_path):
    """pip wheel, unpack it away from the checkout, and run the foreign app against it."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("lightning_optim-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for group, count in {"optimizer": 13, "scheduler": 7, "clipping": 4, "accumulation": 3, "logger": 3, "trainer": 1}.items():
        assert len([n for n in names if n.startswith(f"lightning_optim/conf/{group}/") and n.endswith(".yaml")]) == count
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    got = foreign(tmp_path, "optimizer=lion", env=env)
    assert got["optimizer"] == "Lion"
    assert got["package"].startswith(str(site))


@pytest.mark.parametrize("name", lo.optimizers())
def test_optimizer_yaml_matches_the_registry(name):
    """Each conf/optimizer file names its rule and lists every option at its default."""
    node = yaml.safe_load((CONF / "optimizer" / f"{name}.yaml").read_text())
    assert node.pop("defaults") == ["schema", "_self_"]
    assert node.pop("name") == name
    expected = {k: list(v) if isinstance(v, tuple) else v for k, v in options(name).items() if k != "coupled"}
    assert node == expected


def test_every_registry_name_has_a_config_and_nothing_else():
    assert sorted(p.stem for p in (CONF / "optimizer").glob("*.yaml")) == sorted(lo.optimizers())


def compose(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(version_base=None, config_module="lightning_optim.conf"):
        return hydra_compose("config", overrides=list(overrides))


GROUP_OPTIONS = [(group, p.stem) for group in ("optimizer", "scheduler", "clipping", "accumulation")
                 for p in sorted((CONF / group).glob("*.yaml"))]


@pytest.mark.parametrize("group, option", GROUP_OPTIONS)
def test_every_group_option_composes_and_builds(group, option):
    from lightning_optim.train import build_callback

    cfg = compose(f"{group}={option}")
    callback = build_callback(cfg)
    assert callback.optimizer_config.name == cfg.optimizer.name


def test_overrides_reach_the_callback():
    from lightning_optim.train import build_callback

    cfg = compose("optimizer=nesterov", "optimizer.lr=0.05", "scheduler=step", "scheduler.gamma=0.25",
                  "clipping=value", "clipping.max_value=0.5", "accumulation.schedule=[[0,1],[50,4]]",
                  "partition.weight_decay=0.1")
    cb = build_callback(cfg)
    assert cb.optimizer_config.kwargs()["lr"] == 0.05 and cb.optimizer_config.nesterov is True
    assert (cb.scheduler_config.name, cb.scheduler_config.gamma) == ("step", 0.25)
    assert (cb.clipper.mode, cb.clipper.max_value) == ("value", 0.5)
    assert cb.accumulator.schedule.points == {0: 1, 50: 4}
    assert cb.partition_config.weight_decay == 0.1


@pytest.mark.slow
@pytest.mark.parametrize("logger, expect", [("tensorboard", "logs/events.out.tfevents.*"), ("wandb", "wandb/offline-run-*/run-*.wandb")])
def test_other_loggers_write_their_files(tmp_path, logger, expect):
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    proc = run(["-m", "lightning_optim.train", f"logger={logger}", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
                "trainer.enable_progress_bar=false", *SMALL_JOB, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "run").glob(expect)), sorted(str(p) for p in (tmp_path / "run").rglob("*"))
    if logger == "wandb":  # the dashboard reads the offline run file back
        assert (tmp_path / "run" / "dashboard.html").is_file()
    else:
        assert "dashboard:     not written (TensorBoardLogger" in proc.stdout
