"""Parity with torch.optim for every rule torch has, over every option combination.

20 steps on random data, each backend, fp32, to 1e-6 relative. The reference backend
mirrors torch's single-tensor op order, so it is also checked to be bit-identical.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import lightning_optim as lo
from conftest import assert_rel

SHAPES = [(5, 7), (3,), (11,), (1,), (0,), (4, 3, 2)]


def grid(**axes):
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def valid_sgd(kw):
    return not kw["nesterov"] or (kw["momentum"] > 0 and kw["dampening"] == 0)


# (our class, torch class, option combinations). Every option torch has for the rule.
TABLE = [
    (lo.SGD, torch.optim.SGD, [kw for kw in grid(lr=[0.05], momentum=[0.0, 0.9], dampening=[0.0, 0.3],
                                                  nesterov=[False, True], weight_decay=[0.0, 0.1],
                                                  maximize=[False, True]) if valid_sgd(kw)]),
    (lo.Adagrad, torch.optim.Adagrad, grid(lr=[0.1], lr_decay=[0.0, 0.05], weight_decay=[0.0, 0.1],
                                           initial_accumulator_value=[0.0, 0.5], maximize=[False, True])),
    (lo.RMSprop, torch.optim.RMSprop, grid(lr=[0.01], alpha=[0.9], momentum=[0.0, 0.5], centered=[False, True],
                                           weight_decay=[0.0, 0.1], maximize=[False, True])),
    (lo.Adam, torch.optim.Adam, grid(lr=[0.01], betas=[(0.8, 0.95)], amsgrad=[False, True], weight_decay=[0.0, 0.1],
                                     decoupled_weight_decay=[False, True], maximize=[False, True])),
    (lo.AdamW, torch.optim.AdamW, grid(lr=[0.01], amsgrad=[False, True], weight_decay=[0.0, 0.1],
                                       maximize=[False, True])),
    (lo.NAdam, torch.optim.NAdam, grid(lr=[0.01], momentum_decay=[4e-3, 0.05], weight_decay=[0.0, 0.1],
                                       decoupled_weight_decay=[False, True], maximize=[False, True])),
    (lo.RAdam, torch.optim.RAdam, grid(lr=[0.01], weight_decay=[0.0, 0.1], decoupled_weight_decay=[False, True],
                                       maximize=[False, True])),
]

CASES = [
    pytest.param(ours, theirs, kw, id=f"{ours.__name__}-" + "-".join(f"{k}={v}" for k, v in kw.items() if k != "lr"))
    for ours, theirs, combos in TABLE
    for kw in combos
]


def train(make, steps=20):
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
    opt = make(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


@pytest.mark.parametrize("ours, theirs, kw", CASES)
def test_matches_torch(ours, theirs, kw):
    expected, _ = train(lambda ps: theirs(ps, foreach=False, **kw))
    for backend in ("reference", "foreach", "auto"):
        got, _ = train(lambda ps: ours(ps, backend=backend, **kw))
        for i, (a, e) in enumerate(zip(got, expected)):
            assert_rel(a, e, 1e-6, f"{backend} param {i}")
            if backend == "reference":
                assert torch.equal(a, e), f"reference param {i} is not bit-identical to torch"


def test_every_torch_rule_is_covered():
    """The table above covers each registry name whose rule torch also has."""
    torch_rules = {"sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "amsgrad", "adamw", "nadam", "radam"}
    covered = {ours for ours, _, _ in TABLE}
    for name in torch_rules:
        assert lo.registry.REGISTRY[name].cls in covered, name


@pytest.mark.parametrize(
    "name, torch_make",
    [
        ("sgd", lambda ps: torch.optim.SGD(ps, lr=1e-3)),
        ("momentum", lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9)),
        ("nesterov", lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, nesterov=True)),
        ("adagrad", lambda ps: torch.optim.Adagrad(ps)),
        ("rmsprop", lambda ps: torch.optim.RMSprop(ps)),
        ("adam", lambda ps: torch.optim.Adam(ps)),
        ("amsgrad", lambda ps: torch.optim.Adam(ps, amsgrad=True)),
        ("adamw", lambda ps: torch.optim.AdamW(ps)),
        ("nadam", lambda ps: torch.optim.NAdam(ps)),
        ("radam", lambda ps: torch.optim.RAdam(ps)),
    ],
)
def test_registry_presets_match_torch_defaults(name, torch_make):
    expected, _ = train(torch_make)
    got, _ = train(lambda ps: lo.create_optimizer(name, ps, backend="reference"))
    for a, e in zip(got, expected):
        assert torch.equal(a, e)
