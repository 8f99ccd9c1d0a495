"""The rule table: every registered optimizer's spec is complete and agrees with its class,
its config file, the backends and the statistics (driven by the registry, so a new name is
checked without an edit here)."""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from pathlib import Path
from typing import Optional

import pytest
import torch
import yaml

import lightning_optim as lo
from lightning_optim import config as C
from lightning_optim import rules
from lightning_optim.backends import TORCH_KEYWORDS, foreach, reference
from lightning_optim.backends import triton as tb
from lightning_optim.backends.triton import launcher
from lightning_optim.registry import REGISTRY, options
from lightning_optim.stats import MomentStats

CONF = Path(__file__).resolve().parents[1] / "conf" / "optimizer"
NAMES = lo.optimizers()


def variants(name: str) -> list[dict]:
    """The option sets that change a rule's state or kernel: the defaults, each boolean
    flipped, momentum on (and Nesterov with it)."""
    opts = options(name)
    out = [{}]
    for key, default in opts.items():
        if isinstance(default, bool) and key not in ("maximize", "master_weights"):
            flip = {key: not default}
            if key == "nesterov" and not default:
                flip.update(momentum=0.9, dampening=0.0)
            out.append(flip)
    if "momentum" in opts and not opts["momentum"]:
        out.append({"momentum": 0.9})
    if "centered" in opts:
        out.append({"centered": True, "momentum": 0.5})
    return out


def build(name: str, variant: dict) -> tuple[lo.Optimizer, torch.Tensor]:
    """The optimizer over one 2-D param (a coupled group for CoupledAdam) and that param."""
    p = torch.randn(6, 5, requires_grad=True)
    group = {"params": [p], "coupled": True} if REGISTRY[name].cls.couples else {"params": [p]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = lo.create_optimizer({"name": name, **variant}, [group], backend="reference")
    return opt, p


CASES = [(name, v) for name in NAMES for v in variants(name)]
IDS = [f"{name}-{'+'.join(f'{k}={v}' for k, v in variant.items()) or 'defaults'}" for name, variant in CASES]


@pytest.mark.parametrize("name", NAMES)
def test_the_registry_is_read_from_the_table(name):
    """Each registry name is declared once, in its class's spec, with its preset and summary."""
    entry = REGISTRY[name]
    preset = entry.cls.spec.names[name]
    assert (entry.preset, entry.summary) == (dict(preset.options), preset.summary)
    assert options(name) == {**entry.cls.spec.options, **preset.options}


@pytest.mark.parametrize("name", NAMES)
def test_options_are_the_class_signature_and_the_config_file(name):
    """One declaration of the options (the spec), the same as the constructor's signature (what
    IDEs and ``help`` show) and the YAML file Hydra composes (with the registry's preset)."""
    entry = REGISTRY[name]
    sig = inspect.signature(entry.cls.__init__)
    signature = {k: p.default for k, p in sig.parameters.items() if k not in ("self", "params", *TORCH_KEYWORDS)}
    assert list(entry.cls.spec.options.items()) == list(signature.items())
    yaml_values = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    yaml_values = {k: v for k, v in yaml_values.items() if k not in ("defaults", "name")}
    expected = {k: list(v) if isinstance(v, tuple) else v for k, v in options(name).items() if k != "coupled"}
    assert yaml_values == expected


@pytest.mark.parametrize("name", NAMES)
def test_every_rule_has_its_functions_and_kernel(name):
    """The places a rule's math lives: the reference and foreach functions and the kernel its
    launch names (the compiled backend has a pure function for it, or runs foreach's)."""
    opt, p = build(name, {})
    for group in opt.param_groups:
        spec = opt.spec_for(group)
        assert rules.get(spec.name) is not None
        assert callable(reference.RULES[spec.name]) and callable(foreach.RULES[spec.name])
        plan = spec.launch(group)
        assert isinstance(plan.prologue, rules.Prologue)
        assert callable(getattr(launcher.kernels(torch.device("cpu")), plan.kernel))


def test_prologue_codes_are_defined_once_and_bound_in_the_kernels():
    """The kernels bind every :class:`~lightning_optim.rules.Prologue` code, and nothing else."""
    module = launcher.kernels(torch.device("cpu"))
    bound = {n.removeprefix("P_"): int(getattr(module, n).value if hasattr(getattr(module, n), "value")
                                        else getattr(module, n))
             for n in dir(module) if n.startswith("P_")}
    assert bound == {code.name: int(code) for code in rules.Prologue}


@pytest.mark.parametrize("name,variant", CASES, ids=IDS)
def test_state_keys_are_what_the_state_holds(name, variant):
    """The spec's state keys are exactly what ``_init_state`` creates and what a step leaves
    (besides ``step``); the moments it names are among them; the launch's slots too."""
    opt, p = build(name, variant)
    group = opt.param_groups[0]
    spec = opt.spec_for(group)
    keys = spec.state_keys(group)
    assert list(opt._init_state(p, group)) == list(keys)
    p.grad = torch.randn_like(p)
    opt.step()
    assert set(opt.state[p]) == {*keys, "step"}
    for moment in (spec.first_moment, spec.second_moment):
        assert moment is None or moment in keys or not keys  # (plain SGD keeps no state)
    plan = spec.launch(group)
    assert set(plan.slots) <= set(keys) and set(plan.rows) <= set(keys)
    assert set(spec.scalar_state) <= set(keys)
    assert all(opt.state[p][k].numel() == 1 for k in spec.scalar_state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,variant", CASES, ids=IDS)
def test_bytes_per_param_is_what_the_launcher_moves(name, variant, dtype):
    """The bytes a spec declares are the tensors the launcher hands the kernel: p rw, g r, 8
    per full-size fp32 state slot; a (1, H) row slot is per tensor, but the row pass reads g
    once more; an fp32 master replaces the param read."""
    opt, p = build(name, variant)
    group = opt.param_groups[0]
    spec = opt.spec_for(group)
    e = torch.empty((), dtype=dtype).element_size()
    state = opt._init_state(p, group)
    full = [k for k in spec.launch(group).slots if state[k].shape == p.shape]
    moved = 3 * e + 8 * len(full) + (e if spec.row_coupled else 0)
    assert tb.bytes_per_param(spec, group, dtype) == moved
    if dtype == torch.bfloat16:
        assert tb.bytes_per_param(spec, group, dtype, master=True) == moved + 8 - e


@pytest.mark.parametrize("name,variant", CASES, ids=IDS)
def test_the_statistics_read_the_moments_the_spec_names(name, variant):
    """Every rule gets statistics: ``exp_avg_norm`` where the spec names a first moment, the
    second-moment statistics where it names a second one, and none where it names neither."""
    opt, p = build(name, variant)
    spec = opt.spec_for(opt.param_groups[0])
    p.grad = torch.randn_like(p)
    opt.step()
    out = MomentStats(opt, stats=("exp_avg_norm", "sqrt_v_mean")).after_step()
    got = {key.split("/")[1] for key in out}
    held = opt.state[p]  # (plain SGD keeps no momentum buffer)
    assert got == {s for s, moment in (("exp_avg_norm", spec.first_moment), ("sqrt_v_mean", spec.second_moment))
                   if moment is not None and moment in held}
    assert all(torch.isfinite(v) for v in out.values())


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.RMSprop,
                                 torch.optim.Adagrad, torch.optim.NAdam, torch.optim.RAdam])
def test_torch_optimizers_are_read_with_the_rule_of_their_state_layout(cls):
    """A ``torch.optim`` optimizer's moments come from the spec that lists its class."""
    p = torch.randn(4, 3, requires_grad=True)
    kwargs = {"momentum": 0.9} if cls is torch.optim.SGD else {}
    opt = cls([p], lr=1e-2, **kwargs)
    p.grad = torch.randn_like(p)
    opt.step()
    spec = rules.for_torch(cls.__name__)
    assert spec is not None
    out = MomentStats(opt, stats=("exp_avg_norm", "sqrt_v_mean")).after_step()
    assert ("optim/exp_avg_norm/group0.0" in out) == (spec.first_moment is not None)
    assert ("optim/sqrt_v_mean/group0.0" in out) == (spec.second_moment is not None)


def test_the_optimizer_schema_is_generated_from_the_table():
    """``OptimizerConfig`` (Hydra's schema of the ``optimizer`` node) is generated from the rule
    table: the same fields, types and defaults as the hand-kept dataclass it replaced."""
    former = dict(
        name=(str, "adamw"), lr=(Optional[float], None), betas=(Optional[list[float]], None),
        eps=(Optional[float], None), weight_decay=(Optional[float], None), momentum=(Optional[float], None),
        dampening=(Optional[float], None), nesterov=(Optional[bool], None), alpha=(Optional[float], None),
        centered=(Optional[bool], None), lr_decay=(Optional[float], None),
        initial_accumulator_value=(Optional[float], None), momentum_decay=(Optional[float], None),
        decoupled_weight_decay=(Optional[bool], None), amsgrad=(Optional[bool], None),
        maximize=(Optional[bool], None), bias_correction=(Optional[bool], None),
        coupling_scale=(Optional[float], None), master_weights=(Optional[bool], None), backend=(str, "auto"),
    )
    generated = {f.name: (f.type, f.default) for f in dataclasses.fields(C.OptimizerConfig)}
    assert generated == former
    assert list(generated)[0] == "name" and list(generated)[-1] == "backend"
    assert C.OptimizerConfig.__module__ == "lightning_optim.config"
    assert C.OptimizerConfig(name="adam", lr=0.1).kwargs() == {"lr": 0.1, "backend": "auto"}
    with pytest.raises(ValueError, match=r"optimizer: momentum=0.9 is invalid: adam has no option 'momentum'"):
        C.OptimizerConfig(name="adam", momentum=0.9)


def test_a_rule_name_that_is_not_in_the_table_is_refused():
    with pytest.raises(ValueError, match=r"rule='adamm' is invalid: must be one of sgd, adagrad, "):
        rules.get("adamm")
    assert rules.get(lo.Adam.spec) is lo.Adam.spec
    assert rules.get("adam") is lo.Adam.spec
    # In the order lightning_optim.optim imports the rule files (any further rule file after these).
    assert [s.name for s in rules.registered()][:9] == [
        "sgd", "adagrad", "rmsprop", "adam", "nadam", "radam", "lion", "yogi", "coupled_adam"]
