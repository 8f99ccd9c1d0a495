"""A bad config, whichever layer finds it (Hydra composing, a schema, a node's own checks), exits
``python -m lightning_optim.train`` with status 2 and one line naming the key and quoting the
value; the accumulation schedule's YAML forms (pairs, and the mapping ``{start: size}``)
compose and build the schedule they say."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_optim.config import compose_error

PREFIX = "lightning_optim.train: invalid configuration: "
SCHEMA = "  - /lightning_optim_accumulation_schema@_here_\n"


def option_file(root: Path, name: str, schedule: str) -> Path:
    """An accumulation option of the user's own, ``<root>/accumulation/<name>.yaml``."""
    (root / "accumulation").mkdir(parents=True, exist_ok=True)
    (root / "accumulation" / f"{name}.yaml").write_text(f"defaults:\n{SCHEMA}  - _self_\nschedule: {schedule}\n")
    return root


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(version_base=None, config_module="lightning_optim.conf"):
        return hydra_compose("config", overrides=list(overrides))


# ----- the CLI: exit 2, exactly one line, nothing written ---------------------------------------

# (overrides, the whole line after the prefix). Hydra's composition errors (a mapping onto
# step_schedule's list, an unknown key, a wrong type, an unknown group option) and the nodes'
# own checks (a size 0, a key that is no int) read alike.
CLI_ERRORS = [
    ("accumulation=step_schedule accumulation.schedule={0:1,200:4}",
     "accumulation: schedule={0: 1, 200: 4} is invalid: a mapping cannot replace the list this option sets "
     "(Hydra merges a mapping into a mapping only); write it as pairs: accumulation.schedule=[[0,1],[200,4]]"),
    ("accumulation.schedule={0:1,200:0}",
     "accumulation: schedule[200]=0 is invalid: must be an int >= 1 (micro-batches per step)"),
    ("accumulation.schedule={warmup:4}",
     "accumulation: schedule={'warmup': 4} is invalid: keys must be >= 0 and whole (the step a size starts at), "
     "got 'warmup'"),
    ("accumulation.sched=[[0,2]]",
     "accumulation: sched=[[0, 2]] is invalid: accumulation has no option 'sched' (did you mean 'schedule'?); "
     "its options are schedule, by"),
    ("optimizer.lr=abc",
     "optimizer: lr='abc' is invalid: Value 'abc' of type 'str' could not be converted to Float"),
    ("partition.rules=[{match:'*',lrr:0.1}]",  # an option the optimizer's groups do not have
     "partition: rules[0].lrr=0.1 is invalid: coupled_adam has no option 'lrr' (did you mean 'lr'?); its options "
     "are lr, betas, eps, weight_decay, amsgrad, maximize, bias_correction, coupled, coupling_scale, master_weights"),
    ("optimizer=adamx",
     "optimizer: optimizer='adamx' is invalid: must be one of adagrad, adam, adamw, amsgrad, coupled_adam, lion, "
     "momentum, nadam, nesterov, radam, rmsprop, sgd, yogi (did you mean 'adam' or 'adamw' or 'nadam'?)"),
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus_cache")


def train(args, cwd, cache, env=None):
    env = {**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"},
           "LIGHTNING_OPTIM_CACHE": str(cache), **(env or {})}
    return subprocess.run([sys.executable, "-m", "lightning_optim.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a Python start each, ~10 s on 2 cores
@pytest.mark.parametrize("overrides, message", CLI_ERRORS, ids=[o for o, _ in CLI_ERRORS])
def test_cli_exits_2_with_one_line_naming_the_key(overrides, message, tmp_path, cache):
    proc = train([*overrides.split(), "trainer.max_steps=2"], tmp_path, cache)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [PREFIX + message], proc.stderr
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no runs/, no .hydra, no log


@pytest.mark.slow
def test_a_mapping_in_an_option_file_of_ones_own_is_checked_on_the_cli(tmp_path, cache):
    """The issue's YAML, ``schedule: {0: 1, 200: 0}``, once failed with an empty ``full_key:``."""
    conf = option_file(tmp_path / "conf", "mine", "{0: 1, 200: 0}")
    proc = train([f"hydra.searchpath=[file://{conf}]", "accumulation=mine", "trainer.max_steps=2"], tmp_path, cache)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        PREFIX + "accumulation: schedule[200]=0 is invalid: must be an int >= 1 (micro-batches per step)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf"]


def test_hydra_full_error_set_by_the_user_keeps_hydras_report(tmp_path, cache):
    proc = train(["optimizer.lr=abc"], tmp_path, cache, env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "full_key: optimizer.lr" in proc.stderr


# ----- the same formatting on the compose API, for the cases a CLI run would make slow ------------

COMPOSE_ERRORS = [
    ("accumulation=fixed accumulation.schedule={0:8}",
     "accumulation: schedule={0: 8} is invalid: a mapping cannot replace the list this option sets "
     "(Hydra merges a mapping into a mapping only); write it as pairs: accumulation.schedule=[[0,8]]"),
    ("accumulation.schedule=[[0,1],[x,2]]", None),  # composes (the field is Any); the node refuses it
    ("optimizer.lrr=1", "optimizer: lrr=1 is invalid: optimizer has no option 'lrr' (did you mean 'lr'?); "),
    ("optimizer.betas=abc", "optimizer: betas='abc' is invalid: "),
    ("trainer.max_stepss=3", "trainer: max_stepss=3 is invalid: no such key in the config (add one with "
                             "+trainer.max_stepss=...)"),
    ("ckpt_path=x", "config: ckpt_path='x' is invalid: no such key in the config (add one with +ckpt_path=...)"),
    ("scheduler=cosin", "scheduler: scheduler='cosin' is invalid: must be one of "),
    ("optimizer.lr=[", "optimizer: lr='[' is invalid: "),  # the override grammar's own error
    ("+optimizer.lr=1", "Could not append to config. An item is already at 'optimizer.lr'. "),
]


@pytest.mark.parametrize("overrides, message", COMPOSE_ERRORS, ids=[o for o, _ in COMPOSE_ERRORS])
def test_compose_errors_become_one_line_naming_the_key(overrides, message):
    if message is None:
        from lightning_optim.app.train import build_callback
        from lightning_optim.validation import ConfigurationError

        with pytest.raises(ConfigurationError, match=r"^accumulation: schedule=\{0: 1, 'x': 2\} is invalid: "
                                                     r"keys must be >= 0 and whole \(the step a size starts at\), got 'x'"):
            build_callback(compose(*overrides.split()))
        return
    with pytest.raises(Exception) as info:
        compose(*overrides.split())
    line = str(compose_error(info.value))
    assert "\n" not in line
    assert line.startswith(message), line


# ----- the valid YAML forms compose and build the schedule they say -------------------------------

@pytest.mark.parametrize("overrides, points", [
    ("", {0: 1}),  # the default option, none: schedule null
    ("accumulation.schedule={0:1,200:4}", {0: 1, 200: 4}),  # int keys from the override grammar
    ("accumulation.schedule=[[0,1],[200,4]]", {0: 1, 200: 4}),
    ("accumulation={schedule:{10:2}}", {0: 1, 10: 2}),  # no key 0: one micro-batch until the first
    ("accumulation=fixed", {0: 4}),
    ("accumulation=step_schedule", {0: 1, 200: 4, 1000: 8}),
    ("accumulation=step_schedule accumulation.schedule=[[0,1],[50,4]]", {0: 1, 50: 4}),  # pairs replace pairs
    ("accumulation=step_schedule accumulation.by=epoch", {0: 1, 200: 4, 1000: 8}),
])
def test_yaml_forms_build_the_schedule(overrides, points):
    from lightning_optim.accumulation import AccumulationSchedule
    from lightning_optim.app.train import build_callback

    cfg = compose(*overrides.split())
    schedule = build_callback(cfg).accumulation_config.build()
    assert isinstance(schedule, AccumulationSchedule)
    assert schedule.points == points
    assert schedule.by == ("epoch" if "by=epoch" in overrides else "step")


@pytest.mark.parametrize("written", ["{0: 1, 200: 4, 1000: 8}", "[[0, 1], [200, 4], [1000, 8]]",
                                     "{0: 1, '200': 4, 1000: 8}"])  # a quoted key is read as an int
def test_an_option_file_of_ones_own_takes_either_form(written, tmp_path):
    conf = option_file(tmp_path, "warmup", written)
    from lightning_optim.app.train import build_callback

    cfg = compose(f"hydra.searchpath=[file://{conf}]", "accumulation=warmup")
    acc = build_callback(cfg).accumulator  # not None: the schedule changes
    assert acc.schedule.points == {0: 1, 200: 4, 1000: 8}
    assert [acc.schedule.size_at(s) for s in (0, 199, 200, 999, 1000)] == [1, 1, 4, 4, 8]


def test_the_readme_yaml_is_the_form_this_file_tests():
    readme = (Path(__file__).resolve().parents[1] / "docs" / "reference.md").read_text()
    assert "schedule: {0: 1, 200: 4, 1000: 8}   # or [[0, 1], [200, 4], [1000, 8]]" in readme
    assert "accumulation.schedule={0:1,200:4}" in readme
