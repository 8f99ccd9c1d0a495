"""Optional dependencies are extras: a feature whose extra is missing says which pip install to
run (lightning_optim.extras), and ``import lightning_optim`` loads none of them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_optim.extras import MissingExtraError, import_extra, require

ROOT = Path(__file__).resolve().parents[1]


def block(monkeypatch, *modules: str) -> None:
    """Make ``import module`` fail as if it were not installed (None in sys.modules)."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def build_wandb_logger(tmp_path):
    from lightning_optim.integration.loggers import build_logger

    return build_logger({"name": "wandb"}, str(tmp_path))


def build_tensorboard_logger(tmp_path):
    from lightning_optim.integration.loggers import build_logger

    return build_logger({"name": "tensorboard"}, str(tmp_path))


def render_dashboard(tmp_path):
    from lightning_optim.dashboard import render

    (tmp_path / "metrics.csv").write_text("step,train/loss\n0,1.0\n1,0.5\n")
    return render(tmp_path, tmp_path / "out" / "dashboard.html")


def read_wandb_run(tmp_path):
    from lightning_optim.dashboard import load_run

    (tmp_path / "wandb" / "offline-run-20260101_000000-abc").mkdir(parents=True)
    (tmp_path / "wandb" / "offline-run-20260101_000000-abc" / "run-abc.wandb").write_bytes(b"")
    return load_run(tmp_path)


def load_corpus(tmp_path):
    from lightning_optim.app.corpus import load_corpus

    return load_corpus(vocab_size=300, max_bytes=60_000, cache_dir=tmp_path / "cache", verbose=False)


# (blocked modules, what uses them, the message, exactly)
MISSING = [
    (("wandb",), build_wandb_logger, 'logger=wandb needs wandb: pip install "lightning_optim[wandb]"'),
    (("tensorboardX", "tensorboard"), build_tensorboard_logger,
     'logger=tensorboard needs tensorboardX: pip install "lightning_optim[tensorboard]"'),
    (("matplotlib",), render_dashboard, 'the dashboard needs matplotlib: pip install "lightning_optim[dashboard]"'),
    (("wandb",), read_wandb_run, 'reading a W&B run needs wandb: pip install "lightning_optim[wandb]"'),
    (("tokenizers",), load_corpus, 'the main job\'s corpus needs tokenizers: pip install "lightning_optim[app]"'),
]


@pytest.mark.parametrize("modules, use, message", MISSING, ids=[m[1].__name__ for m in MISSING])
def test_a_missing_extra_names_the_pip_install(modules, use, message, tmp_path, monkeypatch):
    block(monkeypatch, *modules)
    with pytest.raises(MissingExtraError) as info:
        use(tmp_path)
    assert str(info.value) == message
    assert isinstance(info.value, ImportError) and info.value.name == modules[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # found before writing


@pytest.mark.parametrize("modules, use, message", MISSING, ids=[m[1].__name__ for m in MISSING])
def test_with_the_extra_installed_the_feature_works(modules, use, message, tmp_path):
    """The same calls with nothing blocked: the check itself does not refuse an installed extra."""
    pytest.importorskip(modules[0])
    if use is read_wandb_run:  # past the check, the reader gets to the (empty) file
        with pytest.raises(ValueError, match="is not a W&B run file: 0 bytes"):
            use(tmp_path)
    else:
        assert use(tmp_path) is not None


def test_one_of_several_modules_is_enough(monkeypatch):
    """Lightning's TensorBoardLogger writes with tensorboard or tensorboardX: either will do."""
    block(monkeypatch, "tensorboard")
    require(("tensorboard", "json"), extra="tensorboard", feature="logger=tensorboard")
    with pytest.raises(MissingExtraError, match=r"^x needs tensorboard: pip install \"lightning_optim\[e\]\"$"):
        require(("tensorboard",), extra="e", feature="x")


def test_a_broken_install_is_not_reported_as_missing(tmp_path, monkeypatch):
    """An installed module whose own import fails raises its own error, not 'pip install'."""
    (tmp_path / "broken_extra_pkg.py").write_text("import a_module_that_is_not_there_either\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        import_extra("broken_extra_pkg", extra="e", feature="x")
    assert not isinstance(info.value, MissingExtraError) and info.value.name == "a_module_that_is_not_there_either"
    assert import_extra("json", extra="e", feature="x") is sys.modules["json"]


def test_the_dashboard_command_exits_2_naming_the_extra(tmp_path, monkeypatch, capsys):
    from lightning_optim.dashboard import main

    (tmp_path / "metrics.csv").write_text("step,train/loss\n0,1.0\n")
    block(monkeypatch, "matplotlib")
    assert main([str(tmp_path), "-o", str(tmp_path / "d.html")]) == 2
    err = capsys.readouterr().err
    assert err == 'error: the dashboard needs matplotlib: pip install "lightning_optim[dashboard]"\n'
    assert not (tmp_path / "d.html").exists()


@pytest.mark.parametrize("modules, overrides, message", [
    (("wandb",), ["logger=wandb"], 'logger: logger=wandb needs wandb: pip install "lightning_optim[wandb]"'),
    (("tensorboardX", "tensorboard"), ["logger=tensorboard"],
     'logger: logger=tensorboard needs tensorboardX: pip install "lightning_optim[tensorboard]"'),
    (("tokenizers",), [], 'the main job\'s corpus needs tokenizers: pip install "lightning_optim[app]"'),
    (("matplotlib",), [], 'the main job\'s dashboard needs matplotlib: pip install "lightning_optim[app]"'),
], ids=["wandb", "tensorboard", "tokenizers", "matplotlib"])
def test_the_main_jobs_check_reports_a_missing_extra(modules, overrides, message, tmp_path, monkeypatch):
    """The config check (run before Hydra makes the run directory) refuses the run: a
    ConfigurationError, which the command reports on one line with exit status 2."""
    from hydra import compose, initialize_config_module

    from lightning_optim.app.train import check
    from lightning_optim.validation import ConfigurationError

    with initialize_config_module(version_base=None, config_module="lightning_optim.conf"):
        cfg = compose("config", overrides=[f"data.cache_dir={tmp_path / 'cache'}", *overrides])
    monkeypatch.chdir(tmp_path)
    block(monkeypatch, *modules)
    with pytest.raises(ConfigurationError) as info:
        check(cfg)
    assert str(info.value) == message
    assert list(tmp_path.iterdir()) == []


def test_the_train_command_exits_2_before_the_run_directory(tmp_path):
    code = ("import sys; sys.modules['wandb'] = None; sys.argv = ['train', 'logger=wandb', 'data.cache_dir=cache']; "
            "from lightning_optim.app.train import main; main()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr == ("lightning_optim.train: invalid configuration: logger: logger=wandb needs wandb: "
                           'pip install "lightning_optim[wandb]"\n')
    assert list(tmp_path.iterdir()) == []  # no runs/, no corpus cache


# Optional or heavy packages that the optimizers must not load.
NOT_LOADED = ("lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics", "wandb", "matplotlib", "tokenizers",
              "tensorboardX", "tensorboard", "hydra", "omegaconf")


def test_import_and_step_load_no_optional_package():
    """``import lightning_optim``, building an AdamW and a CoupledAdam and stepping them: none of
    Lightning, W&B, matplotlib, tokenizers, tensorboardX or Hydra is imported."""
    code = f"""
import json, sys
import torch
import lightning_optim as lo

emb = torch.nn.Embedding(8, 4)
head = torch.nn.Linear(4, 8)
model = torch.nn.Sequential(emb, head)
for opt in (lo.AdamW(model.parameters(), lr=1e-3),
            lo.CoupledAdam([{{"params": [emb.weight], "coupled": True}}, {{"params": list(head.parameters())}}], lr=1e-3)):
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    opt.zero_grad()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
lo.param_groups(model)
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({list(NOT_LOADED)!r}))))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_reading_a_runs_metrics_needs_no_matplotlib(tmp_path, monkeypatch):
    """The dashboard's reader is plain Python: load_run works without the dashboard extra."""
    block(monkeypatch, "matplotlib")
    from lightning_optim.dashboard import load_run

    (tmp_path / "metrics.csv").write_text("step,train/loss\n0,1.0\n1,0.5\n")
    assert load_run(tmp_path) == {"train/loss": ([0, 1], [1.0, 0.5])}
