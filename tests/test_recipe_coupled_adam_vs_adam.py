"""Smoke test of recipes/coupled_adam_vs_adam: two 3-step runs of a shrunken main job (small
corpus in a temporary cache, small model), then the table from their checkpoints."""


import pytest

from conftest import load_recipe

SMALL_JOB = ["data.max_bytes=250000", "data.vocab_size=512", "data.batch_size=8", "data.val_batches=2",
             "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.seq_len=32",
             "trainer.val_check_interval=3", "monitor.every_n_steps=1", "monitor.expensive_every_n_steps=3"]


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("coupled_adam_vs_adam")


def test_smoke_two_optimizers_table(recipe, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_OPTIM_CACHE", str(tmp_path / "cache"))  # never the full default corpus
    results = recipe.main(["--seeds", "1", "--steps", "3", "--out", str(tmp_path / "runs"), *SMALL_JOB])
    assert [r["optimizer"] for r in results] == ["adamw", "coupled_adam"]
    assert all(r["step"] == 3 and r["seed"] == 0 for r in results)
    by = {r["optimizer"]: r for r in results}
    assert by["coupled_adam"]["sqrt_v_cv"] == 0.0  # one shared second-moment row
    assert by["adamw"]["sqrt_v_cv"] > 0.0  # per-token rows differ (Zipfian token counts)
    for r in results:
        assert 0.0 < r["iso"] <= 1.0 and 0.0 <= r["ratio"] and r["val_loss"] > 0
    table = capsys.readouterr().out
    assert "| adamw | 0 |" in table and "| coupled_adam | 0 |" in table and "| Iso | 0.10 → 0.83 |" in table
    assert (tmp_path / "runs" / "adamw-seed0" / "checkpoints" / "last.ckpt").is_file()
