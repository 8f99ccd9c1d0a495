"""Smoke and qualitative test of recipes/adaptive_generalization (Wilson et al. 2017, Sec. 3.3)."""


import pytest

import lightning_optim as lo
from conftest import load_recipe


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("adaptive_generalization")


def test_smoke_all_optimizers_table(recipe, capsys, tmp_path):
    out = tmp_path / "results.json"
    results = recipe.main(["--n", "8", "--steps", "5", "--seeds", "1", "--test-size", "20", "--json", str(out)])
    assert {r["name"] for r in results} == set(lo.optimizers())
    assert set(recipe.LR) == set(lo.optimizers())
    table = capsys.readouterr().out
    for name in lo.optimizers():
        assert f"| {name} |" in table
    assert out.exists()


def test_sgd_generalizes_adaptive_predicts_plus_one(recipe):
    n, p, steps, seeds = 40, 0.6, 400, (0, 1, 2)

    def test_error(name):
        runs = [recipe.run(name, n=n, p=p, steps=steps, seed=s, test_size=400) for s in seeds]
        assert all(r["train_error"] == 0.0 for r in runs), (name, runs)  # all fit the training set
        return sum(r["test_error"] for r in runs) / len(runs)

    assert test_error("sgd") <= 0.05
    assert test_error("adam") >= 0.35
    assert test_error("adagrad") >= 0.35
