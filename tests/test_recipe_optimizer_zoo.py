"""Smoke test of recipes/optimizer_zoo: every registry optimizer, 3 steps of a small TinyGPT on a
small corpus (temporary cache) and 5 steps of the convex problem; one PNG and the table."""


import numpy as np
import pytest

import lightning_optim as lo
from conftest import load_recipe


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("optimizer_zoo")


def test_smoke_every_optimizer_plot_and_table(recipe, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_OPTIM_CACHE", str(tmp_path / "cache"))  # never the full default corpus
    png = tmp_path / "zoo.png"
    results = recipe.main(["--gpt-steps", "3", "--batch-size", "4", "--d-model", "32", "--n-layers", "1",
                           "--n-heads", "2", "--seq-len", "32", "--vocab-size", "512", "--max-bytes", "250000",
                           "--convex-steps", "5", "--png", str(png)])
    assert [r["name"] for r in results] == lo.optimizers()
    assert set(recipe.GPT_LR) == set(recipe.CONVEX_LR) == set(lo.optimizers())
    for r in results:
        assert len(r["gpt"]) == 3 and len(r["convex"]) == 6 and r["ms"] > 0
        assert np.isfinite(r["gpt"]).all() and r["convex"][-1] < r["convex"][0]  # 5 full-batch steps descend
    table = capsys.readouterr().out
    for name in lo.optimizers():
        assert f"| {name} |" in table
    from PIL import Image

    assert np.asarray(Image.open(png).convert("L"), dtype=float).std() > 5  # drawn, not blank


def test_convex_problem_is_solved_by_the_reference(recipe):
    optimum = recipe.convex_optimum()
    assert 0 < optimum < np.log(2)
    assert recipe.run_convex("adam", steps=200)["losses"][-1] == pytest.approx(optimum, abs=0.01)
