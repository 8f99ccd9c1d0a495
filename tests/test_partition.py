"""param_groups / summarize: the default partition, user rules, and every error message."""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from lightning_optim.app.models import TinyGPT
from lightning_optim.partition import find_unembedding, param_groups, summarize
from lightning_optim.validation import LightningOptimWarning

raises = functools.partial(pytest.raises, ValueError)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)


class TinyLM(nn.Module):
    """Tied input/output embedding, a position embedding, LayerNorms, biased Linears, a frozen scale."""

    def __init__(self, vocab: int = 50, d: int = 8, ctx: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.block = Block(d)
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.tok.weight
        self.frozen_scale = nn.Parameter(torch.ones(d, d), requires_grad=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        x = x + self.block.proj(torch.relu(self.block.fc(self.block.norm(x))))
        return self.lm_head(self.ln_f(x) @ self.frozen_scale)


NO_DECAY = ["block.norm.weight", "block.norm.bias", "block.fc.bias", "block.proj.bias",
            "ln_f.weight", "ln_f.bias"]


def names(groups: list[dict]) -> dict[str, list[str]]:
    return {g["name"]: g["param_names"] for g in groups}


def options(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in ("name", "params", "param_names")}


def test_default_partition_names_membership_and_options():
    model = TinyLM()
    groups = param_groups(model, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["embedding", "no_decay", "decay"]
    assert names(groups) == {
        "embedding": ["tok.weight"],  # the tied head weight once, under its first name
        "no_decay": ["pos.weight", *NO_DECAY],  # the position embedding: not decayed, not coupled
        "decay": ["block.fc.weight", "block.proj.weight"],
    }
    assert [options(g) for g in groups] == [
        {"coupled": True, "weight_decay": 0.0}, {"weight_decay": 0.0}, {"weight_decay": 0.1}]
    for g in groups:  # names and tensors line up
        assert all(t is model.get_parameter(n) for n, t in zip(g["param_names"], g["params"]))


class Untied(nn.Module):
    """A token and a position table, an MLP whose width equals the position table's rows, and
    the heads named in ``heads`` (name -> out_features), registered in that order."""

    def __init__(self, heads: dict[str, int], vocab: int = 50, d: int = 8, ctx: int = 32) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.fc, self.proj = nn.Linear(d, ctx), nn.Linear(ctx, d)  # fc.out_features == ctx rows
        for name, out in heads.items():
            self.add_module(name, nn.Linear(d, out, bias=False))


def unembedding_names(model: nn.Module) -> list[str]:
    return sorted(find_unembedding(model).values())


def _tiny_gpt(tied: bool) -> nn.Module:
    model = TinyGPT(vocab=50, d_model=8, n_layers=1, n_heads=2, seq_len=32)
    if not tied:
        model.head = nn.Linear(8, 50, bias=False)
    return model


def _frozen_tied() -> nn.Module:
    model = TinyLM()
    model.tok.weight.requires_grad_(False)
    return model


@pytest.mark.parametrize("build, expected", [
    (TinyLM, ["tok.weight"]),  # tied: the shared tensor, under its first name
    (lambda: _tiny_gpt(tied=True), ["wte.weight"]),  # the main job's model
    (lambda: _tiny_gpt(tied=False), ["head.weight"]),
    (lambda: Untied({"lm_head": 50}), ["lm_head.weight"]),  # named and last
    (lambda: Untied({"lm_head": 50, "value_head": 1}), ["lm_head.weight"]),  # named, not last
    (lambda: Untied({"readout": 50}), ["readout.weight"]),  # last, sized to the vocabulary
    (lambda: Untied({"readout": 50, "score": 1}), []),  # neither named nor last
    (lambda: Untied({"classifier": 10}), []),  # a classifier: fc (32 = ctx outputs) is not last
    (lambda: Untied({"classifier": 32}), ["classifier.weight"]),  # last with a table's size: taken
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 10)), []),
    (_frozen_tied, []),  # a frozen tied tensor is nobody's to couple; the untied search finds no head
])
def test_find_unembedding(build, expected):
    assert unembedding_names(build()) == expected


def test_untied_head_is_coupled_and_the_input_embeddings_are_not():
    groups = param_groups(Untied({"lm_head": 50}), weight_decay=0.1)
    assert names(groups) == {"embedding": ["lm_head.weight"],
                             "no_decay": ["tok.weight", "pos.weight", "fc.bias", "proj.bias"],
                             "decay": ["fc.weight", "proj.weight"]}
    assert [options(g) for g in groups] == [
        {"coupled": True, "weight_decay": 0.0}, {"weight_decay": 0.0}, {"weight_decay": 0.1}]


def test_a_rule_couples_something_else_too():
    """The README's way to couple a tensor the default leaves alone: a rule with coupled=True."""
    rules = [{"match": "tok.weight", "group": "input_embedding", "coupled": True, "weight_decay": 0.0}]
    groups = param_groups(Untied({"lm_head": 50}), rules=rules)
    assert names(groups)["input_embedding"] == ["tok.weight"]
    assert names(groups)["embedding"] == ["lm_head.weight"]
    assert options(groups[0]) == {"coupled": True, "weight_decay": 0.0}


def test_every_trainable_param_exactly_once_and_frozen_excluded():
    model = TinyLM()
    ids = [id(p) for g in param_groups(model) for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(trainable) and len(ids) == len(set(ids)) == 10
    assert id(model.frozen_scale) not in ids
    embedding = param_groups(model)[0]["params"]
    assert sum(p is model.lm_head.weight for p in embedding) == 1


def test_decay_group_without_weight_decay_leaves_the_optimizer_default():
    decay = param_groups(TinyLM())[-1]
    assert decay["name"] == "decay" and options(decay) == {}


def test_coupled_false_argument():
    groups = param_groups(TinyLM(), coupled=False)
    assert options(groups[0]) == {"coupled": False, "weight_decay": 0.0}


def test_empty_groups_are_dropped():
    mlp = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False))
    assert names(param_groups(mlp)) == {"decay": ["0.weight", "1.weight"]}


def test_adamw_steps_and_keeps_param_names():
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.1), lr=1e-2)
    before = model.tok.weight.detach().clone()
    model(torch.randint(0, 50, (2, 4))).square().mean().backward()
    opt.step()
    assert [g["name"] for g in opt.param_groups] == ["embedding", "no_decay", "decay"]
    assert opt.param_groups[0]["param_names"] == ["tok.weight"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0, 0.1]
    assert opt.param_groups[0]["coupled"] is True
    assert not torch.equal(model.tok.weight, before)
    assert opt.state_dict()["param_groups"][2]["param_names"] == ["block.fc.weight", "block.proj.weight"]


def test_glob_rule_takes_precedence_and_does_not_inherit_defaults():
    groups = param_groups(TinyLM(), rules=[{"match": "block.fc.*", "lr": 1e-4}])
    assert names(groups) == {
        "block.fc.*": ["block.fc.weight", "block.fc.bias"],
        "embedding": ["tok.weight"],
        "no_decay": ["pos.weight", "block.norm.weight", "block.norm.bias", "block.proj.bias", "ln_f.weight",
                     "ln_f.bias"],
        "decay": ["block.proj.weight"],
    }
    assert options(groups[0]) == {"lr": 1e-4}  # no weight_decay=0.0 for the bias: rules give all options


def test_glob_is_case_sensitive_and_matches_tied_aliases():
    groups = param_groups(TinyLM(), rules=[{"match": "lm_head.weight", "lr": 1e-4}])
    assert names(groups)["lm_head.weight"] == ["tok.weight"]
    assert "embedding" not in names(groups) and names(groups)["no_decay"][0] == "pos.weight"
    with raises(match=r"rules\[0\]=\{'match': 'LM_HEAD\.\*'\} is invalid"):
        param_groups(TinyLM(), rules=[{"match": "LM_HEAD.*"}])


@pytest.mark.parametrize("spec", [nn.LayerNorm, "LayerNorm", "torch.nn.LayerNorm",
                                  "torch.nn.modules.normalization.LayerNorm"])
def test_module_rule_by_class_name_and_dotted_path(spec):
    groups = param_groups(TinyLM(), rules=[{"module": spec, "weight_decay": 0.0, "lr": 3e-4}])
    assert groups[0] == {**groups[0], "name": "LayerNorm", "weight_decay": 0.0, "lr": 3e-4}
    assert groups[0]["param_names"] == ["block.norm.weight", "block.norm.bias", "ln_f.weight", "ln_f.bias"]
    assert names(groups)["no_decay"] == ["pos.weight", "block.fc.bias", "block.proj.bias"]


class Gain(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(d))


def test_module_rule_by_name_of_a_class_defined_in_the_model():
    model = nn.Sequential(Gain(4), nn.Linear(4, 4), Gain(4))
    groups = param_groups(model, rules=[{"module": "Gain", "lr": 0.5}])
    assert names(groups) == {"Gain": ["0.gain", "2.gain"], "no_decay": ["1.bias"], "decay": ["1.weight"]}
    assert options(groups[0]) == {"lr": 0.5}
    # TinyLM itself holds only the frozen scale directly
    with raises(match=r"rules\[0\]=\{'module': 'TinyLM'\} is invalid: matches only frozen "
                      r"parameters \(requires_grad=False\): 'frozen_scale'"):
        param_groups(TinyLM(), rules=[{"module": "TinyLM"}])


def test_mapping_shorthand():
    rules = {"block.*.weight": {"lr": 1e-3}, nn.LayerNorm: {"weight_decay": 0.0}}
    groups = param_groups(TinyLM(), rules=rules)
    assert names(groups) == {
        "block.*.weight": ["block.norm.weight", "block.fc.weight", "block.proj.weight"],
        "LayerNorm": ["block.norm.bias", "ln_f.weight", "ln_f.bias"],
        "embedding": ["tok.weight"],
        "no_decay": ["pos.weight", "block.fc.bias", "block.proj.bias"],
    }
    assert [options(g) for g in groups[:2]] == [{"lr": 1e-3}, {"weight_decay": 0.0}]


def test_first_matching_rule_wins():
    rules = [{"match": "block.fc.weight", "lr": 1.0}, {"match": "block.*", "lr": 2.0}]
    groups = param_groups(TinyLM(), rules=rules)
    assert names(groups)["block.fc.weight"] == ["block.fc.weight"]
    assert names(groups)["block.*"] == ["block.norm.weight", "block.norm.bias", "block.fc.bias",
                                        "block.proj.weight", "block.proj.bias"]


def test_custom_group_name_and_merging_of_equal_options():
    rules = [{"match": "block.fc.*", "group": "mlp", "lr": 1e-3},
             {"match": "block.proj.*", "group": "mlp", "lr": 1e-3},
             {"module": nn.LayerNorm, "group": "no_decay", "weight_decay": 0.0}]
    groups = param_groups(TinyLM(), rules=rules)
    assert [g["name"] for g in groups] == ["mlp", "no_decay", "embedding"]
    assert groups[0]["param_names"] == ["block.fc.weight", "block.fc.bias",
                                        "block.proj.weight", "block.proj.bias"]
    assert options(groups[0]) == {"lr": 1e-3}
    # a rule named like a default group merges with it when the options agree
    assert groups[1]["param_names"] == ["pos.weight", "block.norm.weight", "block.norm.bias", "ln_f.weight",
                                        "ln_f.bias"]


def test_same_group_name_with_different_options_is_an_error():
    rules = [{"match": "block.fc.*", "group": "mlp", "lr": 1e-3},
             {"match": "block.proj.*", "group": "mlp", "lr": 2e-3}]
    with raises(match=r"param_groups: rules\[1\]=.*'block\.proj\.\*'.* group 'mlp' "
                      r"already has options \{'lr': 0\.001\}"):
        param_groups(TinyLM(), rules=rules)
    with raises(match=r"rules\[0\]=.*group 'decay' is also a default group"):
        param_groups(TinyLM(), rules=[{"match": "block.fc.weight", "group": "decay", "lr": 1.0}])


def test_fully_shadowed_rule_warns_once():
    rules = [{"match": "block.*", "lr": 1.0}, {"match": "block.fc.*", "lr": 2.0}]
    with pytest.warns(LightningOptimWarning, match=r"rules\[1\]=.*gets no parameter"):
        groups = param_groups(TinyLM(), rules=rules)
    assert "block.fc.*" not in names(groups)


def test_rule_matching_nothing_suggests_close_names():
    with raises(match=r"rules\[0\]=\{'match': 'block\.fc\.wieght', 'lr': 0\.1\} is invalid: "
                      r"matches no trainable parameter; did you mean 'block\.fc\.weight'"):
        param_groups(TinyLM(), rules=[{"match": "block.fc.wieght", "lr": 0.1}])


def test_rule_matching_nothing_lists_first_ten_names_and_count():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(6)])
    with raises(match=r"trainable ones: '0\.weight', '0\.bias', .*'4\.bias', \.\.\. \(12 in all\)"):
        param_groups(model, rules={"zzz": {"lr": 1.0}})
    with raises(match=r"rules\[0\]=\{'module': <class .*Conv2d'>\} is "
                      r"invalid: matches no trainable parameter; trainable ones: '0\.weight'"):
        param_groups(model, rules=[{"module": nn.Conv2d}])


def test_module_rule_on_a_container_says_it_holds_no_parameters():
    with raises(match=r"rules\[0\]=\{'module': 'Block'\} is invalid: .*hold none directly"):
        param_groups(TinyLM(), rules=[{"module": "Block"}])


def test_rule_matching_only_frozen_parameters():
    with raises(match=r"rules\[0\]=\{'match': 'frozen_\*', 'lr': 1\.0\} is invalid: "
                      r"matches only frozen parameters \(requires_grad=False\): 'frozen_scale'"):
        param_groups(TinyLM(), rules=[{"match": "frozen_*", "lr": 1.0}])


@pytest.mark.parametrize("rule, message", [
    ({"lr": 1.0}, r"rules\[0\]=\{'lr': 1\.0\} is invalid: needs exactly one of 'match' \(a glob\) or "
                  r"'module'"),
    ({"match": "a*", "module": nn.Linear}, r"rules\[0\]=.*'match': 'a\*'.* needs exactly one of"),
    ({"module": "LayerNrom"}, r"rules\[0\]\.module='LayerNrom' is invalid: is not a known nn\.Module type "
                              r"\(did you mean 'LayerNorm'"),
    ({"module": "torch.nn.NoSuchNorm"}, r"rules\[0\]\.module='torch\.nn\.NoSuchNorm' is invalid"),
    ({"module": "nosuchpkg.Norm"}, r"rules\[0\]\.module='nosuchpkg\.Norm' is invalid"),
    ({"module": int}, r"rules\[0\]\.module=<class 'int'> is invalid: must be an nn\.Module subclass"),
    ({"match": "block.*", "params": []}, r"rules\[0\]\.params=\[\] is invalid: option names must be "
                                         r"strings other than 'params', 'param_names', 'name'"),
    ({"match": "block.*", "param_names": ["x"]}, r"rules\[0\]\.param_names=\['x'\] is invalid"),
    ({"match": "block.*", "name": "x"}, r"rules\[0\]\.name='x' is invalid"),
    ({"match": "block.*", "group": ""}, r"rules\[0\]\.group='' is invalid: must be a non-empty string"),
    ({"match": "block.*", "coupled": "yes"}, r"rules\[0\]\.coupled='yes' is invalid: must be true or false"),
    ({"match": 3}, r"rules\[0\]\.match=3 is invalid: must be a non-empty glob string"),
])
def test_malformed_rules(rule, message):
    with raises(match=message):
        param_groups(TinyLM(), rules=[rule])


def test_malformed_rule_containers():
    with raises(match=r"rules\['block\.\*'\]=0\.1 is invalid: must be a mapping like "
                      r"\{'lr': 0\.1\}"):
        param_groups(TinyLM(), rules={"block.*": 0.1})
    with raises(match=r"rules\[0\]='block\.\*' is invalid: must be a mapping like \{'match'"):
        param_groups(TinyLM(), rules=["block.*"])
    with raises(match=r"rules='block\.\*' is invalid: must be a list of mappings"):
        param_groups(TinyLM(), rules="block.*")
    with raises(match=r"rules\[LayerNorm\]=\{'match': 'x'\} is invalid: the key already says"):
        param_groups(TinyLM(), rules={nn.LayerNorm: {"match": "x"}})


def test_coupled_rule_on_a_vector_is_an_error():
    with raises(match=r"rules\[0\]=\{'module': <class .*LayerNorm'>, 'coupled': True\} is "
                      r"invalid: coupled groups must be 2-D or wider, but 'block\.norm\.weight' "
                      r"has shape \(8,\)"):
        param_groups(TinyLM(), rules=[{"module": nn.LayerNorm, "coupled": True}])
    groups = param_groups(TinyLM(), rules=[{"match": "block.fc.weight", "coupled": True}])
    assert options(groups[0]) == {"coupled": True}


def test_module_without_trainable_parameters():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with raises(match=r"module='Linear' is invalid: has no trainable parameters "
                      r"\(all 2 are frozen\)"):
        param_groups(frozen)
    with raises(match=r"module='ReLU' is invalid: has no trainable parameters$"):
        param_groups(nn.ReLU())


@pytest.mark.parametrize("kwargs, message", [
    ({"weight_decay": -0.1}, r"param_groups: weight_decay=-0\.1 is invalid: must be >= 0"),
    ({"weight_decay": "0.1"}, r"param_groups: weight_decay='0\.1' is invalid: must be a number"),
    ({"coupled": 1}, r"param_groups: coupled=1 is invalid: must be true or false"),
    ({"log": "yes"}, r"param_groups: log='yes' is invalid: must be true or false"),
])
def test_bad_arguments(kwargs, message):
    with raises(match=message):
        param_groups(TinyLM(), **kwargs)


def test_not_a_module():
    with raises(match=r"param_groups: module=\[1\] is invalid: must be a torch\.nn\.Module"):
        param_groups([1])


TINY_SUMMARY = "param groups: no_decay 1 tensor / 2 params, decay 1 tensor / 6 params"


def test_summarize_exact_line():
    model = nn.Sequential(nn.Embedding(100, 32), nn.LayerNorm(32), nn.Linear(32, 1540), nn.Linear(1540, 100))
    # embedding (the untied head) 1540 * 100; no_decay 3200 + 32 + 32 + 1540 + 100 = 4904; decay 32 * 1540
    assert summarize(param_groups(model)) == (
        "param groups: embedding 1 tensor / 154.0K params, no_decay 5 tensors / 4.9K params, "
        "decay 1 tensor / 49.3K params")
    tiny = nn.Linear(3, 2)
    assert summarize(param_groups(tiny)) == TINY_SUMMARY


@pytest.mark.parametrize("n, text", [(0, "0"), (999, "999"), (1000, "1.0K"), (999_949, "999.9K"),
                                     (999_950, "1.0M"), (12_345_678, "12.3M"), (7_000_000_000, "7.0B")])
def test_summarize_units(n, text):
    class Shape:
        def numel(self) -> int:
            return n
    assert summarize([{"name": "g", "params": [Shape()]}]) == f"param groups: g 1 tensor / {text} params"


NO_HEAD = ("param_groups: {} has no recognisable output embedding ({}), so no tensor is coupled; couple one "
           "with a rule such as {{'match': '<name>.weight', 'coupled': True, 'weight_decay': 0.0}}")


def records(caplog) -> list[tuple[str, int, str]]:
    return [(r.name, r.levelno, r.getMessage()) for r in caplog.records]


def test_log_true_emits_the_summary(caplog):
    tiny = nn.Linear(3, 2)
    with caplog.at_level(logging.INFO, logger="lightning_optim"):
        param_groups(tiny, log=True, coupled=False)
    assert records(caplog) == [("lightning_optim", logging.INFO, TINY_SUMMARY)]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning_optim"):
        param_groups(tiny, coupled=False)
    assert caplog.records == []


def test_no_unembedding_is_said_once_per_model_when_coupling_is_asked_for(caplog):
    with caplog.at_level(logging.INFO, logger="lightning_optim"):
        tiny, classifier = nn.Linear(3, 2), nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
        param_groups(tiny, log=True)
        param_groups(tiny)  # the same model again: already said
        param_groups(classifier)
        param_groups(nn.Linear(3, 2), coupled=False)  # nothing to couple was asked for
        param_groups(nn.Linear(3, 2), rules=[{"match": "weight", "coupled": True}])  # a rule couples
        param_groups(TinyLM())  # has one
    assert records(caplog) == [
        ("lightning_optim", logging.INFO, NO_HEAD.format("Linear", "no nn.Embedding")),
        ("lightning_optim", logging.INFO, TINY_SUMMARY),
        ("lightning_optim", logging.INFO, NO_HEAD.format(
            "Sequential", "no nn.Embedding tied to a head, no head nn.Linear with a vocabulary of outputs")),
    ]


def test_log_prints_on_stderr_like_lightning_unless_logging_is_configured(capsys, monkeypatch):
    """Nothing configured (no handler on the root logger): the line is on stderr, as Lightning's
    info lines are. A handler configured (pytest's own, here): it goes there, not twice."""
    param_groups(nn.Linear(3, 2), log=True, coupled=False)
    assert capsys.readouterr().err == ""  # pytest's capture handler is on the root logger
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    param_groups(nn.Linear(3, 2), log=True, coupled=False)
    assert capsys.readouterr().err == TINY_SUMMARY + "\n"
    monkeypatch.setenv("RANK", "1")  # only global rank 0 logs, as rank_zero_info
    param_groups(nn.Linear(3, 2), log=True, coupled=False)
    assert capsys.readouterr().err == ""


def test_log_is_visible_in_a_fresh_interpreter_without_lightning():
    """End to end: nobody configured logging, and ``import lightning_optim`` loads no Lightning."""
    code = ("import sys, torch, lightning_optim as lo; lo.param_groups(torch.nn.Linear(3, 2), log=True); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "SLURM_PROCID")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "[]\n"
    assert out.stderr == NO_HEAD.format("Linear", "no nn.Embedding") + "\n" + TINY_SUMMARY + "\n"


def test_deterministic_order():
    model = TinyLM()
    first = [g["param_names"] for g in param_groups(model, rules={"block.*": {"lr": 1.0}})]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = [g["param_names"] for g in param_groups(model, rules={"block.*": {"lr": 1.0}})]
    assert first == second
