"""Bad input fails early and clearly: every hyperparameter of every registry name, param
groups, backends, registry look-ups, sparse gradients and CoupledAdam's group checks.

The table is driven by the registry: ``options(name)`` says which fields a rule has, so a
new rule or option is checked without editing this file. Messages have one shape,
``Owner: field=value!r is invalid: requirement`` (lightning_optim.validation).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import lightning_optim as lo
from lightning_optim import AdamW, CoupledAdam, LightningOptimWarning, create_optimizer
from lightning_optim.registry import REGISTRY, options

NAMES = lo.optimizers()
# Options that take a number >= 0 (any rule that has them); coupling_scale must be > 0.
# (SGD's dampening has no bound in torch, nor here: only finite.)
NON_NEGATIVE = ("lr", "eps", "weight_decay", "momentum", "alpha", "lr_decay",
                "initial_accumulator_value", "momentum_decay")


def _params() -> list[nn.Parameter]:
    return [nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(2))]


def _shape(owner: str, field: str, value, requirement: str) -> str:
    """The full error regex: ``Owner: field=value!r is invalid: requirement``."""
    return "^" + re.escape(f"{owner}: {field}={value!r} is invalid: ") + requirement


def _cases():
    """(name, bad kwargs, message regex) for every field of every registry name."""
    for name in NAMES:
        opts, owner = options(name), REGISTRY[name].cls.__name__
        for field in NON_NEGATIVE:
            if field in opts:
                yield name, {field: -1}, _shape(owner, field, -1, re.escape("must be >= 0"))
        yield name, {"lr": "abc"}, _shape(owner, "lr", "abc", "must be a number")
        yield name, {"lr": True}, _shape(owner, "lr", True, "must be a number")  # bools are not numbers
        yield name, {"lr": float("nan")}, _shape(owner, "lr", float("nan"), re.escape("must be >= 0"))
        if "betas" in opts:
            yield name, {"betas": (0.9, 1.5)}, _shape(owner, "betas[1]", 1.5, re.escape("must be in [0, 1)"))
            yield name, {"betas": (-0.1, 0.9)}, _shape(owner, "betas[0]", -0.1, re.escape("must be in [0, 1)"))
            yield name, {"betas": (0.9,)}, _shape(owner, "betas", (0.9,), r"must be a pair")
            yield name, {"betas": "ab"}, _shape(owner, "betas", "ab", r"must be a pair")
        if "dampening" in opts:
            yield name, {"dampening": float("inf")}, _shape(owner, "dampening", float("inf"), "must be finite")
        if "coupling_scale" in opts:
            yield name, {"coupling_scale": 0}, _shape(owner, "coupling_scale", 0, re.escape("must be > 0"))
        for field, default in opts.items():
            if isinstance(default, bool):
                yield name, {field: "yes"}, _shape(owner, field, "yes", "must be true or false")
        if owner == "SGD":
            yield name, {"nesterov": True, "momentum": 0}, _shape(
                owner, "nesterov", True, r"Nesterov momentum needs momentum > 0.*got momentum=0")
            yield name, {"nesterov": True, "momentum": 0.9, "dampening": 0.5}, _shape(
                owner, "nesterov", True, r"Nesterov momentum needs .*dampening = 0.*dampening=0.5")
        yield name, {"backend": "foreac"}, _shape(
            owner, "backend", "foreac", re.escape("must be one of auto, reference, foreach, triton, compiled (did you mean 'foreach'?)"))


CASES = list(_cases())


def _case_id(case) -> str:
    name, kwargs, _ = case
    return name + "-" + ",".join(f"{k}={v!r}" for k, v in kwargs.items())


def test_table_covers_every_rule_and_field():
    """The table is not vacuous: every registry name has cases, and each rule-specific field
    named in the brief appears for the rules that have it."""
    by_name = {n: set().union(*(kw.keys() for m, kw, _ in CASES if m == n)) for n in NAMES}
    assert all({"lr", "backend"} <= fields for fields in by_name.values())
    assert {"momentum", "dampening", "nesterov"} <= by_name["sgd"]
    assert {"alpha", "momentum", "centered", "eps"} <= by_name["rmsprop"]
    assert {"lr_decay", "initial_accumulator_value"} <= by_name["adagrad"]
    assert {"momentum_decay", "betas", "decoupled_weight_decay"} <= by_name["nadam"]
    assert {"coupling_scale", "coupled", "amsgrad"} <= by_name["coupled_adam"]
    assert "eps" not in by_name["lion"] and "betas" not in by_name["sgd"]


@pytest.mark.parametrize("name", NAMES)
def test_defaults_construct_cleanly(name):
    """Control for the table below: the defaults raise and warn nothing, so each failure
    there comes from the one field the case changes."""
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5))  # the head: CoupledAdam's coupled group
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = create_optimizer(name, model)
    assert isinstance(opt, REGISTRY[name].cls)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_hyperparameter_raises_naming_field_and_value(case):
    name, kwargs, pattern = case
    with pytest.raises(ValueError, match=pattern):
        create_optimizer(name, _params(), **kwargs)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_hyperparameter_raises_on_the_class_too(case):
    """The class itself validates (not just create_optimizer): same message."""
    name, kwargs, pattern = case
    entry = REGISTRY[name]
    with pytest.raises(ValueError, match=pattern):
        entry.cls(_params(), **{**entry.preset, **kwargs})


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("field, value", [("lr", -1), ("weight_decay", -0.5), ("lr", "abc")])
def test_bad_value_in_a_param_group_names_the_group(name, field, value):
    entry = REGISTRY[name]
    owner = f"{entry.cls.__name__} group 'decay'"
    groups = [{"params": _params(), field: value, "name": "decay"}]
    with pytest.raises(ValueError, match="^" + re.escape(f"{owner}: {field}={value!r} is invalid: ")):
        entry.cls(groups, **entry.preset)


def test_betas_in_a_group_are_checked_like_defaults():
    groups = [{"params": _params()[:1], "name": "embedding"},
              {"params": _params()[1:], "name": "head", "betas": (0.9, 1.0)}]
    with pytest.raises(ValueError, match=re.escape("AdamW group 'head': betas[1]=1.0 is invalid: must be in [0, 1)")):
        AdamW(groups)


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_rejects_bad_group_and_keeps_the_optimizer_intact(name):
    entry = REGISTRY[name]
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5))
    opt = create_optimizer(name, model)
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=re.escape(f"{entry.cls.__name__} group 'extra': lr=-1 is invalid")):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "lr": -1, "name": "extra"})
    assert [g["name"] for g in opt.param_groups] == [g["name"] for g in before]


# ----- backends and the registry ---------------------------------------------------------------


def test_unknown_backend_lists_the_valid_ones_and_suggests():
    with pytest.raises(ValueError, match=re.escape(
            "AdamW: backend='foreac' is invalid: must be one of auto, reference, foreach, triton, compiled "
            "(did you mean 'foreach'?)")):
        AdamW(_params(), backend="foreac")


def test_unknown_backend_far_from_any_has_no_suggestion():
    with pytest.raises(ValueError, match=r"backend='cuda' is invalid: must be one of auto, reference, foreach, triton, compiled$"):
        AdamW(_params(), backend="cuda")


def test_triton_backend_on_cpu_says_what_to_do(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"^AdamW: backend='triton' got CPU parameters.*TRITON_INTERPRET=1.*'foreach'"):
        AdamW(_params(), backend="triton")


@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_explicit_backend_is_kept(backend):
    assert AdamW(_params(), backend=backend).backend == backend


def test_unknown_registry_name_lists_names_and_suggests():
    with pytest.raises(ValueError) as info:
        create_optimizer("adamx", _params())
    msg = str(info.value)
    assert msg.startswith("optimizer: name='adamx' is invalid: must be one of " + ", ".join(NAMES))
    # The closest first, ties in the registry's order: 'adamw' before 'nadam' and 'radam'.
    assert re.search(r"\(did you mean 'adam' or 'adamw'[ ?]", msg), msg


def test_unknown_option_in_mapping_suggests_the_close_one():
    with pytest.raises(ValueError, match=re.escape(
            "create_optimizer: betaz=[0.9, 0.99] is invalid: adamw has no option 'betaz' (did you mean 'betas'?)")):
        create_optimizer({"name": "adamw", "betaz": [0.9, 0.99]}, _params())


def test_option_of_another_rule_is_rejected_not_ignored():
    """momentum is an SGD option: given to adamw it must not silently vanish."""
    with pytest.raises(ValueError, match=r"adamw has no option 'momentum'.*its options are lr, betas"):
        create_optimizer({"name": "adamw", "momentum": 0.9}, _params())


def test_mapping_without_name_raises():
    with pytest.raises(ValueError, match=r"^create_optimizer: optimizer=\{'lr': 0.1\} is invalid: has no 'name' \(one of sgd, "):
        create_optimizer({"lr": 0.1}, _params())


def test_neither_name_nor_mapping_raises():
    with pytest.raises(ValueError, match=r"^create_optimizer: optimizer=3 is invalid: must be a registry name or a mapping"):
        create_optimizer(3, _params())


def test_mapping_lists_become_tuples_and_presets_apply():
    opt = create_optimizer({"name": "nesterov", "lr": 0.5}, _params())
    assert (opt.defaults["momentum"], opt.defaults["nesterov"], opt.defaults["lr"]) == (0.9, True, 0.5)
    opt = create_optimizer({"name": "adamw", "betas": [0.8, 0.95]}, _params())
    assert opt.defaults["betas"] == (0.8, 0.95)


# ----- sparse gradients ------------------------------------------------------------------------


class SparseModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, sparse=True)
        self.head = nn.Linear(4, 10, bias=False)  # tied, so CoupledAdam has its coupled group
        self.head.weight = self.emb.weight


@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradient_raises_naming_the_parameter_and_changes_nothing(name):
    model = SparseModel()
    opt = create_optimizer(name, model)  # param_groups(model): groups carry param_names
    model.emb(torch.tensor([1, 2, 2])).sum().backward()
    assert model.emb.weight.grad.is_sparse
    before = model.emb.weight.detach().clone()
    cls = REGISTRY[name].cls.__name__
    with pytest.raises(RuntimeError, match=rf"^{cls} does not support sparse gradients, but parameter 'emb.weight' has one"):
        opt.step()
    assert torch.equal(model.emb.weight, before)


def test_sparse_gradient_without_param_names_names_the_index_and_group():
    model = SparseModel()
    opt = lo.SGD([{"params": [model.emb.weight], "name": "embedding"}], lr=0.1)
    model.emb(torch.tensor([3])).sum().backward()
    with pytest.raises(RuntimeError, match=r"sparse gradients, but parameter 0 of group 'embedding' has one"):
        opt.step()


# ----- CoupledAdam's groups, coupled=True elsewhere -----------------------------------------------


def test_coupled_group_with_a_vector_raises():
    groups = [{"params": [nn.Parameter(torch.ones(4, 3)), nn.Parameter(torch.ones(3))],
               "param_names": ["emb.weight", "emb.bias"], "coupled": True, "name": "embedding"}]
    with pytest.raises(ValueError, match=r"^CoupledAdam: coupled groups must be 2-D or wider, but parameter 'emb.bias' has shape \[3\]"):
        CoupledAdam(groups)


def test_coupled_vector_added_later_raises_and_is_not_kept():
    opt = CoupledAdam([{"params": [nn.Parameter(torch.ones(4, 3))], "coupled": True, "name": "embedding"}])
    with pytest.raises(ValueError, match="2-D or wider"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3))], "coupled": True, "name": "bias"})
    assert [g["name"] for g in opt.param_groups] == ["embedding"]


def test_coupled_adam_without_coupled_group_warns_exactly_once():
    model = nn.Linear(3, 2)
    with pytest.warns(LightningOptimWarning) as record:
        opt = CoupledAdam(model.parameters())
        for _ in range(3):
            model(torch.ones(1, 3)).sum().backward()
            opt.step()
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2, 2))]})
    messages = [str(w.message) for w in record]
    assert len(messages) == 1, messages
    assert "CoupledAdam has no param group with coupled=True, so it is plain AdamW" in messages[0]


def test_coupled_adam_with_a_coupled_group_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CoupledAdam([{"params": [nn.Parameter(torch.ones(4, 3))], "coupled": True}])


@pytest.mark.parametrize("name", [n for n in NAMES if not REGISTRY[n].cls.couples])
def test_coupled_group_elsewhere_warns_once(name):
    entry = REGISTRY[name]
    groups = [{"params": [nn.Parameter(torch.ones(4, 3))], "coupled": True, "name": "embedding"},
              {"params": [nn.Parameter(torch.ones(5, 3))], "coupled": True, "name": "more"}]
    with pytest.warns(LightningOptimWarning) as record:
        opt = entry.cls(groups, **entry.preset)
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2, 2))], "coupled": True, "name": "late"})
    messages = [str(w.message) for w in record]
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"{entry.cls.__name__} group 'embedding' has coupled=True, but only CoupledAdam couples")


def test_coupled_warning_is_an_error_under_the_project_filter():
    """pyproject turns LightningOptimWarning into an error: a silent fallback cannot slip by."""
    with pytest.raises(LightningOptimWarning, match="only CoupledAdam couples"):
        AdamW([{"params": [nn.Parameter(torch.ones(4, 3))], "coupled": True}])


# ----- parameters in two groups ----------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_parameter_in_two_groups_raises(name):
    entry = REGISTRY[name]
    shared = nn.Parameter(torch.ones(3, 2))
    groups = [{"params": [shared]}, {"params": [nn.Parameter(torch.ones(2)), shared]}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LightningOptimWarning)  # CoupledAdam: no coupled group
        with pytest.raises(ValueError, match="more than one parameter group"):
            entry.cls(groups, **entry.preset)
