"""Hydra: the train entry point, bad overrides, a foreign app using pkg://lightning_optim.conf,
and conf/ shipped in the wheel."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

import lightning_optim as lo
from lightning_optim.registry import create_optimizer, options

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
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


# ----- a bad config: exit 2, one line that names the node, nothing written ----- ------------------------

# (overrides, the whole message): one owner per config node, whichever layer finds the value
# (the schema, the optimizer class, the callback on the model, the Trainer); see
# lightning_optim.config.node_error. A message about two nodes names the component that saw both.
NODE_ERRORS = [
    ("optimizer.lr=-1", "optimizer: lr=-1.0 is invalid: must be > 0"),
    ("optimizer.betas=[0.9,1.5]", "optimizer: betas[1]=1.5 is invalid: must be in [0, 1)"),  # the class's check
    ("optimizer=sgd optimizer.nesterov=true", "optimizer: nesterov=True is invalid: Nesterov momentum needs momentum > 0"),
    ("optimizer=coupled_adam optimizer.coupling_scale=0", "optimizer: coupling_scale=0.0 is invalid: must be > 0"),
    ("optimizer=adam optimizer.momentum=0.9", "optimizer: momentum=0.9 is invalid: adam has no option 'momentum'"),
    ("optimizer.backend=foreac", "optimizer: backend='foreac' is invalid: must be one of auto, reference, foreach, triton, compiled"),
    ("scheduler=cosine scheduler.min_lr_ratio=2", "scheduler: min_lr_ratio=2.0 is invalid: must be in [0, 1]"),
    ("scheduler=cosine scheduler.gamma=0.5", "scheduler: gamma=0.5 is invalid: 'cosine' does not use it"),
    ("scheduler=warmup_cosine trainer.max_steps=50",  # found when the optimizer is built on the model
     "scheduler: warmup_steps=100 is invalid: must be < total_steps=50 (this run takes 50 optimizer steps)"),
    ("clipping.max_norm=0", "clipping: max_norm=0.0 is invalid: must be > 0"),
    ("accumulation.schedule=[[0,1],[10,0]]", "accumulation: schedule[10]=0 is invalid: must be an int >= 1"),
    ("partition.weight_decay=-1", "partition: weight_decay=-1.0 is invalid: must be >= 0"),
    ("partition.rules=[{match:'h.*',lr:-1}]", "partition: rules[0].lr=-1 is invalid: must be >= 0"),  # the class's check
    ("partition.rules=[{match:'haed.*',lr:0.1}]",  # param_groups, on the model
     "partition: rules[0]={'match': 'haed.*', 'lr': 0.1} is invalid: matches no trainable parameter"),
    ("monitor.every_n_steps=0", "monitor: every_n_steps=0 is invalid: must be an int >= 1"),
    ("logger.name=csvv", "logger: name='csvv' is invalid: must be one of csv, tensorboard, wandb (did you mean 'csv'?)"),
    ("+trainer.max_stepss=5", "trainer: Trainer.__init__() got an unexpected keyword argument 'max_stepss'"),
    ("data.vocab_size=100", "data: vocab_size=100 is invalid: must be an int >= 257"),
    ("data.batch_size=0", "data: batch_size=0 is invalid: must be an int >= 1"),
    ("model.d_model=31", "model: d_model=31 is invalid: must be a multiple of n_heads=2"),
    ("trainer.gradient_clip_val=1.0",
     "OptimizerCallback: Trainer(gradient_clip_val=1.0) and clipping mode 'norm' are both set: choose one"),
]


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus_cache")


@pytest.mark.parametrize("overrides, message", NODE_ERRORS, ids=[o for o, _ in NODE_ERRORS])
def test_check_names_the_node_of_the_bad_value(overrides, message, small_cache, tmp_path, monkeypatch):
    """``train.check`` (what the entry point runs before Hydra makes the run directory) on the
    composed config: the message, exactly, and nothing written."""
    from lightning_optim.app.train import check
    from lightning_optim.validation import ConfigurationError

    monkeypatch.chdir(tmp_path)
    cfg = compose(*SMALL_JOB, f"data.cache_dir={small_cache}", *overrides.split())
    with pytest.raises(ConfigurationError) as info:
        check(cfg)
    assert str(info.value).startswith(message), str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_check_passes_a_good_config_and_writes_nothing(small_cache, tmp_path, monkeypatch):
    from lightning_optim.app.train import check

    monkeypatch.chdir(tmp_path)
    check(compose(*SMALL_JOB, f"data.cache_dir={small_cache}", "scheduler=warmup_cosine", "scheduler.warmup_steps=10",
                  "trainer.max_steps=50", "logger=wandb"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overrides, message", [
    ("optimizer=schema",  # Hydra's own composition error
     "lightning_optim.train: invalid configuration: optimizer: optimizer='schema' is invalid: must be one of adagrad"),
    ("optimizer.betas=[0.9,1.5]", "lightning_optim.train: invalid configuration: optimizer: betas[1]=1.5 is invalid"),
    ("scheduler=warmup_cosine trainer.max_steps=50",
     "lightning_optim.train: invalid configuration: scheduler: warmup_steps=100 is invalid: must be < total_steps=50"),
], ids=["schema", "node", "run-length"])
def test_bad_overrides_exit_2_with_one_line_and_no_directory(tmp_path, overrides, message):
    """Run from a fresh directory with the default run directory (runs/<date>): nothing appears."""
    proc = run(["-m", "lightning_optim.train", *SMALL_JOB, *overrides.split()], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(proc.stderr.splitlines()) == 1, proc.stderr  # tests/test_config_errors.py has more
    assert proc.stderr.startswith(message), proc.stderr
    assert {p.name for p in tmp_path.iterdir()} <= {"corpus_cache"}  # no runs/, no .hydra, no log


def test_the_schemas_are_no_group_option():
    """The dataclass schemas are stored outside the groups, so Hydra offers only the YAML files."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from lightning_optim.conf import SCHEMAS, schema_name

    with initialize_config_module(version_base=None, config_module="lightning_optim.conf"):
        loader = GlobalHydra.instance().config_loader()
        groups = loader.list_groups("")
        for group in ("optimizer", "scheduler", "clipping", "accumulation", "partition", "monitor", "logger", "trainer"):
            assert group in groups
            assert loader.get_group_options(group) == sorted(p.stem for p in (CONF / group).glob("*.yaml")), group
        assert all("schema" not in g for g in groups)
        for group in SCHEMAS:  # each schema is a root-level config, no group's option
            assert schema_name(group) in loader.get_group_options("")


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


def _packaging_copy(dest: Path) -> Path:
    """What a clean checkout gives setuptools: pyproject.toml, README.md, lightning_optim/, conf/.
    Built from a copy because setuptools ships whatever an earlier build left in ./build/lib
    (a module since moved or deleted would ride along), and so that nothing is written here."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("lightning_optim", "conf"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    return dest


def _wheel_problems(names: list[str]) -> list[str]:
    """What is wrong with a wheel's file list: each YAML file of conf/ exactly once, at the same
    relative path under lightning_optim/conf/; every module of lightning_optim/ and conf/ (so
    every subpackage: pyproject.toml lists them one by one, and one left out fails here), and
    no module the checkout does not have; nothing at the top level but lightning_optim/ and
    the dist-info (no stray conf/ package)."""
    problems = [f"{n} is in the wheel {c} times" for n, c in collections.Counter(names).items() if c > 1]
    yaml_in_wheel = sorted(n[len("lightning_optim/conf/"):] for n in names
                           if n.startswith("lightning_optim/conf/") and n.endswith(".yaml"))
    yaml_in_repo = sorted(p.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml"))
    if yaml_in_wheel != yaml_in_repo:
        problems.append(f"conf YAML in the wheel {yaml_in_wheel} != in conf/ {yaml_in_repo}")
    package = ROOT / "lightning_optim"
    modules = {f"lightning_optim/{p.relative_to(package).as_posix()}" for p in package.rglob("*.py")
               if "__pycache__" not in p.parts}
    modules |= {f"lightning_optim/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*.py")}
    py_in_wheel = {n for n in names if n.endswith(".py")}
    problems += [f"{m} is missing from the wheel (its package is not listed in pyproject.toml?)"
                 for m in sorted(modules - py_in_wheel)]
    problems += [f"{m} is in the wheel but not in the checkout" for m in sorted(py_in_wheel - modules)]
    tops = {n.split("/", 1)[0] for n in names}
    problems += [f"stray top-level {t!r} in the wheel" for t in sorted(tops)
                 if t != "lightning_optim" and not t.startswith("lightning_optim-")]
    return problems


def test_the_wheel_check_catches_a_forgotten_package_and_a_stray_conf():
    """_wheel_problems itself: a complete file list passes; a subpackage left out, a YAML file
    twice, a top-level conf/ package each fail."""
    package = ROOT / "lightning_optim"
    names = [f"lightning_optim/{p.relative_to(package).as_posix()}" for p in package.rglob("*.py")
             if "__pycache__" not in p.parts]
    names += [f"lightning_optim/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*") if p.suffix in (".py", ".yaml")]
    names.append("lightning_optim-0.1.0.dist-info/RECORD")
    assert _wheel_problems(names) == []
    without = [n for n in names if not n.startswith("lightning_optim/dashboard/")]
    assert "lightning_optim/dashboard/__init__.py is missing from the wheel" in " ".join(_wheel_problems(without))
    problems = _wheel_problems([*names, "lightning_optim/conf/optimizer/adamw.yaml"])
    assert len(problems) == 2 and problems[0] == "lightning_optim/conf/optimizer/adamw.yaml is in the wheel 2 times"
    assert problems[1].startswith("conf YAML in the wheel [")
    assert _wheel_problems([*names, "lightning_optim/old_module.py"]) == [
        "lightning_optim/old_module.py is in the wheel but not in the checkout"]
    assert _wheel_problems([*names, "conf/optimizer/adamw.yaml"]) == ["stray top-level 'conf' in the wheel"]


@pytest.mark.slow
def test_conf_ships_in_the_wheel_and_works_from_an_install(tmp_path):
    """``pip install .`` (not editable) into a fresh venv, then another Hydra app, run from a
    directory outside the checkout with ``pkg://lightning_optim.conf`` on its search path,
    composes ``optimizer=coupled_adam`` and builds a CoupledAdam from the installed package.

    The fresh venv gets this venv's dependencies (torch, lightning, hydra, ...) through a .pth
    line naming its site-packages: a plain path entry, so the editable install's finder there is
    never activated, and lightning_optim comes from the fresh venv alone (checked)."""
    (tmp_path / "src").mkdir()
    src = _packaging_copy(tmp_path / "src")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]

    # the wheel's contents
    proc = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("lightning_optim-*.whl")
    assert _wheel_problems(zipfile.ZipFile(wheel).namelist()) == []

    # pip install . into a fresh venv
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    fresh_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     capture_output=True, text=True, check=True).stdout.strip())
    deps = sysconfig.get_paths()["purelib"]  # this venv's: torch, lightning, hydra, pip, setuptools
    (fresh_site / "repo_venv_deps.pth").write_text(deps + "\n")
    proc = subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps",
                           "--no-build-isolation", "--no-cache-dir", "--ignore-installed", str(src)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    installed = fresh_site / "lightning_optim"
    assert (installed / "conf" / "optimizer" / "coupled_adam.yaml").is_file()
    assert not (fresh_site / "conf").exists()

    # another Hydra app, outside the checkout, with only the installed package to find
    app = tmp_path / "foreign_app"
    shutil.copytree(APP.parent, app, ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([str(python), str(app / "app.py"), *QUIET, "optimizer=coupled_adam", "optimizer.lr=3e-4"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (got["optimizer"], got["lr"], got["groups"]) == ("CoupledAdam", 3e-4, ["embedding", "no_decay", "decay"])
    assert Path(got["package"]) == installed / "__init__.py"

    # the installed commands start (their configs and entry points come from the wheel too)
    for command, says in ((["-m", "lightning_optim.train", "--help"], "coupled_adam"),
                          (["-m", "lightning_optim.dashboard", "--help"], "RUN_DIR")):
        proc = subprocess.run([str(python), *command], cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and says in proc.stdout, (command, proc.stdout[-2000:], proc.stderr[-3000:])


@pytest.mark.parametrize("name", lo.optimizers())
def test_optimizer_yaml_matches_the_registry(name):
    """Each conf/optimizer file names its rule and lists every option at its default."""
    node = yaml.safe_load((CONF / "optimizer" / f"{name}.yaml").read_text())
    assert node.pop("defaults") == ["/lightning_optim_optimizer_schema@_here_", "_self_"]
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


# ----- one source of truth for every default --------------------------------------------------------

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and list(p.glob("*.yaml")))
# The groups whose option names the Python API takes as well (optimizer="adamw",
# scheduler="warmup_cosine", clipping="norm"): the YAML must be exactly what that name gives.
NAMED = {"optimizer": "optimizer_config", "scheduler": "scheduler_config", "clipping": "clipping_config"}
# The groups whose node is a dataclass: their default option is the dataclass's defaults,
# and every option sets dataclass fields only.
DEFAULT_OPTION = {"accumulation": "none", "partition": "default", "monitor": "default", "clipping": "none"}


def test_the_groups_are_what_the_tests_know():
    assert GROUPS == ["accumulation", "clipping", "logger", "monitor", "optimizer", "partition", "scheduler", "trainer"]
    from lightning_optim.conf import SCHEMAS

    assert set(SCHEMAS) == set(NAMED) | set(DEFAULT_OPTION)


@pytest.mark.parametrize("group, option", [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))])
def test_every_group_option_agrees_with_the_python_path(group, option):
    """Hydra's ``group=option`` and the Python API agree on every value: the YAML files, the
    dataclasses of lightning_optim/config.py and the Python defaults (registry, schedules)."""
    from omegaconf import OmegaConf

    from lightning_optim import config as C
    from lightning_optim.conf import SCHEMAS

    node = OmegaConf.to_container(compose(f"{group}={option}")[group], resolve=True)
    raw = yaml.safe_load((CONF / group / f"{option}.yaml").read_text())
    written = {k: v for k, v in raw.items() if k != "defaults"}
    if group in NAMED and group != "optimizer":  # OptimizerConfig keeps None for "the rule's default": below
        from_name = getattr(C, NAMED[group])(option)
        built = getattr(C, NAMED[group])(node)
        assert built == from_name, (built, from_name)
    if group == "optimizer":  # the same optimizer, with the same defaults, from the YAML and from the name
        def params():  # a coupled group, so that CoupledAdam does not warn that it is AdamW
            return [{"params": [torch.nn.Parameter(torch.zeros(2, 2))], "coupled": option == "coupled_adam"}]

        assert create_optimizer(node, params()).defaults == create_optimizer(option, params()).defaults
    if group == "scheduler":  # every option the schedule reads, at its default, and nothing else
        from lightning_optim.schedules import READS, defaults

        assert written == {"name": option, "total_steps": None, **{k: defaults(option)[k] for k in sorted(READS[option])}}
    if group in DEFAULT_OPTION:
        fields = {f.name for f in dataclasses.fields(SCHEMAS[group])}
        assert set(written) <= fields, set(written) - fields
        if option == DEFAULT_OPTION[group]:  # the group's default option is the dataclass's defaults
            assert getattr(C, f"{group}_config")(node) == getattr(C, f"{group}_config")(None)
    if group == "logger":
        from lightning_optim.integration.loggers import LOGGERS, build_logger

        assert node["name"] == option and option in LOGGERS
        build_logger(node, "unused")  # builds; writes nothing until it logs
    if group == "trainer":  # keyword arguments of lightning.Trainer, nothing else
        import inspect

        import lightning.pytorch as pl

        assert set(node) <= set(inspect.signature(pl.Trainer.__init__).parameters), set(node)
    for key, value in written.items():  # what the file says is what composes
        assert node[key] == value, (key, node[key], value)


GROUP_OPTIONS = [(group, p.stem) for group in ("optimizer", "scheduler", "clipping", "accumulation")
                 for p in sorted((CONF / group).glob("*.yaml"))]


@pytest.mark.parametrize("group, option", GROUP_OPTIONS)
def test_every_group_option_composes_and_builds(group, option):
    from lightning_optim.app.train import build_callback

    cfg = compose(f"{group}={option}")
    callback = build_callback(cfg)
    assert callback.optimizer_config.name == cfg.optimizer.name


def test_overrides_reach_the_callback():
    from lightning_optim.app.train import build_callback

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
