"""The public contract, written out: every exported name, registry name, Hydra group and option,
config key, logged metric key and command. Each list here is literal on purpose: a change to
any of them breaks users' code, configs, dashboards or scripts, so it must show up as an edit
of this file (and of the README and docs/reference.md), never as a side effect."""

from __future__ import annotations

import csv
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import lightning_optim as lo

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

EXPORTS = [
    "SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "NAdam", "RAdam", "Lion", "Yogi", "CoupledAdam",
    "param_groups", "summarize", "create_optimizer", "optimizers", "LightningOptimWarning", "OptimizerCallback",
    "MomentMonitor", "CheckpointError", "verify_checkpoint", "ResumableDataLoader", "ResumableSampler",
    "convert_optimizer_state", "convert_checkpoint",
]

# In the registry's order (lightning_optim.optimizers(), the README's table).
REGISTRY = ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "amsgrad", "adamw", "nadam", "radam", "lion",
            "yogi", "coupled_adam"]
REGISTRY_CLASSES = {"sgd": "SGD", "momentum": "SGD", "nesterov": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop",
                    "adam": "Adam", "amsgrad": "Adam", "adamw": "AdamW", "nadam": "NAdam", "radam": "RAdam",
                    "lion": "Lion", "yogi": "Yogi", "coupled_adam": "CoupledAdam"}

# Hydra: group -> its options (the YAML files under conf/<group>/).
GROUPS = {
    "accumulation": ["fixed", "none", "step_schedule"],
    "clipping": ["none", "norm", "per_group", "value"],
    "logger": ["csv", "tensorboard", "wandb"],
    "monitor": ["default", "every_step", "main_job", "off"],
    "optimizer": ["adagrad", "adam", "adamw", "amsgrad", "coupled_adam", "lion", "momentum", "nadam", "nesterov",
                  "radam", "rmsprop", "sgd", "yogi"],
    "partition": ["default"],
    "scheduler": ["constant", "cosine", "exponential", "step", "time_decay", "warmup_cosine", "warmup_linear"],
    "trainer": ["default"],
}

# The top-level keys of python -m lightning_optim.train's config, and each node's keys (sorted).
# The nodes with a dataclass schema (lightning_optim.config) take exactly its fields.
SCHEMA_KEYS = {
    "optimizer": ["alpha", "amsgrad", "backend", "betas", "bias_correction", "centered", "coupling_scale", "dampening",
                  "decoupled_weight_decay", "eps", "initial_accumulator_value", "lr", "lr_decay", "master_weights",
                  "maximize", "momentum", "momentum_decay", "name", "nesterov", "weight_decay"],
    "scheduler": ["decay", "gamma", "min_lr_ratio", "name", "step_size", "total_steps", "warmup_steps"],
    "clipping": ["max_consecutive_skips", "max_norm", "max_value", "mode", "norm_type", "per_group", "skip_nonfinite"],
    "accumulation": ["by", "schedule"],
    "partition": ["coupled", "rules", "weight_decay"],
    "monitor": ["drift_max_elements", "embeddings", "enabled", "every_n_steps", "exclude", "expensive_every_n_steps",
                "histograms", "include", "stats", "update_ratio"],
}
CONFIG_KEYS = {
    **SCHEMA_KEYS,
    "logger": ["name"],
    "trainer": ["accelerator", "accumulate_grad_batches", "check_val_every_n_epoch", "deterministic", "devices",
                "enable_model_summary", "enable_progress_bar", "gradient_clip_val", "log_every_n_steps", "max_epochs",
                "max_steps", "precision", "val_check_interval"],
    "seed": None,
    "model": ["d_model", "dropout", "n_heads", "n_layers", "seq_len"],
    "data": ["batch_size", "cache_dir", "max_bytes", "val_batches", "val_fraction", "vocab_size"],
    "checkpoint": ["every_n_steps", "keep"],
    "resume": None,
}
LOGGER_KEYS = {"csv": ["name"], "tensorboard": ["name"], "wandb": ["mode", "name", "project"]}

# What a short run of OptimizerCallback + MomentMonitor logs to a CSV logger, with the parameter
# and group names replaced by <param> and <group> (optim/grad_norm/ has both: per group from the
# callback, per tensor from the monitor). W&B runs add the histograms optim/log10_sqrt_v/<param>.
METRIC_KEYS = [
    "embedding/isotropy/<param>", "embedding/mean_norm/<param>", "embedding/mean_ratio/<param>",
    "optim/accumulation",
    "optim/clipped/<group>", "optim/clipped_fraction/<group>", "optim/clipped_steps",
    "optim/dead_fraction/<param>", "optim/exp_avg_norm/<param>",
    "optim/grad_norm/<group>", "optim/grad_norm/<param>", "optim/grad_norm_total",
    "optim/lr/<group>", "optim/param_norm/<param>", "optim/skipped_steps", "optim/snr/<param>",
    "optim/sqrt_v_max/<param>", "optim/sqrt_v_mean/<param>", "optim/update_ratio/<param>",
    "optim/v_drift/<param>", "optim/v_log_ratio/<param>",
    "step",
]

# The commands (python -m ...) and a line each must print for --help.
COMMANDS = {
    "lightning_optim.train": "optimizer: adagrad, adam, adamw, amsgrad, coupled_adam, lion, momentum, nadam, nesterov, "
                             "radam, rmsprop, sgd, yogi",
    "lightning_optim.dashboard": "usage: python -m lightning_optim.dashboard [-h] [-o OUTPUT]",
    "lightning_optim.demo": "usage: python -m lightning_optim.demo [-h] [--steps STEPS]",
}


def test_exports():
    assert lo.__all__ == EXPORTS
    for name in EXPORTS:
        assert getattr(lo, name) is not None, name
    for name in ("OptimizerCallback", "MomentMonitor"):  # loaded on first access, from the Lightning side
        assert getattr(lo, name).__module__.startswith("lightning_optim.integration"), name


def test_registry_names_in_order_and_their_classes():
    assert lo.optimizers() == REGISTRY
    for name in REGISTRY:
        params = [{"params": [torch.nn.Parameter(torch.zeros(2, 2))], "coupled": name == "coupled_adam"}]
        opt = lo.create_optimizer(name, params)
        assert type(opt).__name__ == REGISTRY_CLASSES[name] and type(opt) is getattr(lo, REGISTRY_CLASSES[name])


def test_config_groups_and_options_are_the_files_under_conf():
    on_disk = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in sorted(CONF.iterdir()) if p.is_dir()
               and list(p.glob("*.yaml"))}
    assert on_disk == GROUPS


def test_schema_keys_are_the_dataclass_fields():
    from lightning_optim.conf import SCHEMAS

    assert {group: sorted(f.name for f in dataclasses.fields(cls)) for group, cls in SCHEMAS.items()} == SCHEMA_KEYS


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(version_base=None, config_module="lightning_optim.conf"):
        return hydra_compose("config", overrides=list(overrides))


def node_keys(cfg) -> dict:
    from omegaconf import DictConfig

    return {key: sorted(cfg[key]) if isinstance(cfg[key], DictConfig) else None for key in cfg}


def test_the_main_jobs_config_keys():
    assert node_keys(compose()) == CONFIG_KEYS
    for option, keys in LOGGER_KEYS.items():
        assert sorted(compose(f"logger={option}").logger) == keys, option


@pytest.mark.parametrize("group", sorted(SCHEMA_KEYS))
def test_every_option_of_a_schema_group_has_the_schemas_keys(group):
    for option in GROUPS[group]:
        assert sorted(compose(f"{group}={option}")[group]) == SCHEMA_KEYS[group], (group, option)


def placeholder(key: str, params: set[str], groups: set[str]) -> str:
    head, _, last = key.rpartition("/")
    if last in params:
        return f"{head}/<param>"
    if last in groups:
        return f"{head}/<group>"
    return key


def test_metric_keys_of_a_short_run(tmp_path):
    """One tiny CPU fit: Coupled Adam, a schedule, norm clipping and accumulation through
    OptimizerCallback, every statistic on every step through MomentMonitor, a CSV logger."""
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger

    sys.path.insert(0, str(Path(__file__).parent))
    from lightning_helpers import TiedLM, data, trainer

    pl.seed_everything(0, verbose=False)
    model = TiedLM()
    callback = lo.OptimizerCallback(optimizer={"name": "coupled_adam", "lr": 1e-2}, scheduler="cosine",
                                    clipping={"mode": "norm", "max_norm": 1.0}, accumulation=2)
    monitor = lo.MomentMonitor(every_n_steps=1, expensive_every_n_steps=1)
    logger = CSVLogger(str(tmp_path), name="", version="")
    trainer([callback, monitor], logger=logger, max_steps=2, log_every_n_steps=1).fit(model, data(batches=4))
    with open(tmp_path / "metrics.csv", newline="") as f:
        header = next(csv.reader(f))
    params = {name for name, _ in model.named_parameters()}
    groups = {"embedding", "decay", "no_decay"}
    assert sorted({placeholder(key, params, groups) for key in header}) == METRIC_KEYS
    # every tensor and every group has its keys
    for stat in ("v_drift", "sqrt_v_mean", "snr", "update_ratio", "dead_fraction", "grad_norm"):
        assert {f"optim/{stat}/{p}" for p in params} <= set(header), stat
    assert {f"optim/lr/{g}" for g in groups} <= set(header)


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """``python -m <command> --help`` of each command, started together; its stdout."""
    procs = {module: subprocess.Popen([sys.executable, "-m", module, "--help"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for module in COMMANDS}
    out = {}
    for module, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, (module, stderr[-3000:])
        out[module] = stdout
    return out


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_commands_answer_help(module, helps):
    assert COMMANDS[module] in helps[module], helps[module][:2000]


def test_the_train_commands_help_lists_the_groups_and_keys(helps):
    """Hydra's --help of the main job shows the groups with their options and the composed config."""
    text = helps["lightning_optim.train"]
    groups_block = text.split("== Configuration groups ==", 1)[1].split("== Config ==", 1)[0]
    listed = dict(line.split(": ", 1) for line in groups_block.splitlines() if ": " in line)
    assert {g: o.split(", ") for g, o in listed.items()} == GROUPS
    config_block = text.split("Override anything in the config (foo.bar=value)", 1)[1].split("Powered by Hydra", 1)[0]
    shown = yaml.safe_load(config_block)
    assert {k: sorted(v) if isinstance(v, dict) else None for k, v in shown.items()} == CONFIG_KEYS
