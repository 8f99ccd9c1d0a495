"""The main job: the stdlib corpus and its tokenizer are deterministic and Zipfian, TinyGPT is
tied and causal, and a shortened ``python -m lightning_optim.train`` writes a checkpoint,
metrics and a non-blank dashboard.

Everything here uses a small corpus (``SMALL_BYTES`` of stdlib source, a 512-token BPE) in a
temporary cache, so the tests never build the full default corpus.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lightning_optim as lo
from lightning_optim.app.corpus import TokenWindows, load_corpus, split_files, stdlib_files, zipf_exponent
from lightning_optim.app.models import TinyGPT

SMALL_BYTES = 250_000
SMALL_VOCAB = 512
# Overrides that shrink the main job to seconds: a small corpus and a small model.
SMALL_JOB = [f"data.max_bytes={SMALL_BYTES}", f"data.vocab_size={SMALL_VOCAB}", "data.batch_size=8",
             "data.val_batches=2", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.seq_len=32"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return load_corpus(SMALL_VOCAB, SMALL_BYTES, cache_dir=tmp_path_factory.mktemp("cache"), verbose=False)


def test_two_builds_give_the_same_split_vocabulary_and_ids(corpus, tmp_path, capsys):
    other = load_corpus(SMALL_VOCAB, SMALL_BYTES, cache_dir=tmp_path, verbose=True)
    assert "corpus: first run" in capsys.readouterr().out  # built afresh, not read from the first cache
    assert other.path.parent == tmp_path and other.path.name == corpus.path.name
    assert other.meta["train_files"] == corpus.meta["train_files"]
    assert other.meta["val_files"] == corpus.meta["val_files"]
    assert other.tokenizer.get_vocab() == corpus.tokenizer.get_vocab()
    assert other.vocab_size == SMALL_VOCAB
    assert torch.equal(other.train, corpus.train) and torch.equal(other.val, corpus.val)
    assert (other.path / "tokenizer.json").read_bytes() == (corpus.path / "tokenizer.json").read_bytes()
    # A second load reads the cache; the build left no temporary directory behind.
    again = load_corpus(SMALL_VOCAB, SMALL_BYTES, cache_dir=tmp_path, verbose=True)
    assert capsys.readouterr().out == "" and torch.equal(again.train, other.train)
    assert [p.name for p in tmp_path.iterdir()] == [other.path.name]


def test_the_split_is_deterministic_and_disjoint():
    files = stdlib_files(SMALL_BYTES)
    assert files == sorted(files) and sum(size for _, size in files) <= SMALL_BYTES
    assert not any(part in {"test", "tests", "idlelib", "site-packages"} for rel, _ in files for part in rel.split("/"))
    train, val = split_files(files, 0.05)
    assert split_files(files, 0.05) == (train, val)
    assert set(split_files(list(reversed(files)), 0.05)[1]) == set(val)  # the hash decides, not the order
    assert train and val and not set(train) & set(val)
    assert sorted(train + val) == [rel for rel, _ in files]
    sizes = dict(files)
    held = sum(sizes[r] for r in val) / sum(sizes.values())
    assert 0.05 <= held < 0.05 + max(sizes[r] for r in val) / sum(sizes.values()) + 1e-9


def test_the_tokens_are_zipfian(corpus):
    s = zipf_exponent(corpus.train)
    assert 0.7 <= s <= 1.5, s
    # The estimator itself: samples of Zipf's law with s = 1 give ~1, uniform ids ~0.
    gen = torch.Generator().manual_seed(0)
    zipf = torch.multinomial(1.0 / torch.arange(1, 2001, dtype=torch.float64), 100_000, replacement=True, generator=gen)
    assert zipf_exponent(zipf) == pytest.approx(1.0, abs=0.1)
    assert zipf_exponent(torch.randint(0, 2000, (100_000,), generator=gen)) < 0.2


def test_ids_decode_back_to_the_source(corpus):
    eot = corpus.tokenizer.token_to_id("<|endoftext|>")
    ids = corpus.val.tolist()
    first = ids[: ids.index(eot)]
    root = Path(corpus.meta["stdlib"])
    assert corpus.tokenizer.decode(first) == (root / corpus.meta["val_files"][0]).read_text(encoding="utf-8")
    assert corpus.train.dtype == torch.int64 and int(corpus.train.max()) < corpus.vocab_size
    assert np.load(corpus.path / "train.npy").dtype == np.uint16


def test_windows_are_consecutive_tokens(corpus):
    windows = TokenWindows(corpus.train, 16)
    assert len(windows) == (len(corpus.train) - 1) // 16
    assert torch.equal(windows[1], corpus.train[16:33])
    assert len(TokenWindows(corpus.val, 16, limit=5)) == 5


def test_tinygpt_ties_the_head_to_the_embedding():
    model = TinyGPT(100, 16, 2, 2, 8)
    assert model.head.weight is model.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "wte.weight" in names and "head.weight" not in names  # one tensor, counted once
    groups = {g["name"]: g["param_names"] for g in lo.param_groups(model)}
    assert "wte.weight" in groups["embedding"]


def test_tinygpt_is_causal():
    model = TinyGPT(50, 16, 2, 2, 12).eval()
    x = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % 50
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (2, 12, 50)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)  # the past does not see the future
    assert (a[:, 7:] - b[:, 7:]).abs().amax() > 1e-4


def test_tinygpt_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"TinyGPT: d_model=10 is invalid: must be a multiple of n_heads=4"):
        TinyGPT(100, 10, 1, 4, 8)
    with pytest.raises(ValueError, match="longer than seq_len=8"):
        TinyGPT(100, 8, 1, 2, 8)(torch.zeros(1, 9, dtype=torch.long))


def test_shortened_main_job_writes_checkpoint_metrics_and_dashboard(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "LIGHTNING_OPTIM_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_optim.train", "trainer.max_steps=6", "trainer.val_check_interval=3",
         "trainer.log_every_n_steps=1", "monitor.every_n_steps=2", "monitor.expensive_every_n_steps=2",
         *SMALL_JOB, f"hydra.run.dir={out}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "corpus: first run" in proc.stdout and "Zipf exponent" in proc.stdout
    # The progress bar (Lightning's TQDM bar, on stdout) counts the run's steps in epoch 0; Lightning's
    # Rich bar, its default when rich is installed, titled it "Epoch 0/-2".
    assert "Epoch 0: 100%" in proc.stdout and "| 6/6 [" in proc.stdout
    assert "Epoch 0/" not in proc.stdout + proc.stderr
    # The run's log file holds the run's log lines: Lightning's, the optimizer's one-line summary, the paths.
    log = (out / "train.log").read_text()
    assert "OptimizerCallback: the module defines no configure_optimizers(); using CoupledAdam(lr=0.001" in log
    assert "`Trainer.fit` stopped: `max_steps=6` reached." in log
    assert f"checkpoint:    {out / 'checkpoints' / 'last.ckpt'}" in log
    assert list((tmp_path / "cache").glob("corpus-*/meta.json"))  # the corpus went to the env's cache
    assert (out / "checkpoints" / "last.ckpt").is_file()
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["vocab"] == SMALL_VOCAB and "net.wte.weight" in ckpt["state_dict"]
    rows = list(csv.DictReader((out / "logs" / "metrics.csv").open()))
    perplexity = [float(r["val/perplexity"]) for r in rows if r.get("val/perplexity")]
    val_loss = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(perplexity) == 2 and perplexity[-1] == pytest.approx(np.exp(val_loss[-1]), rel=1e-3)
    assert any(r.get("train/loss") for r in rows) and any(r.get("embedding/isotropy/net.wte.weight") for r in rows)
    figures = sorted((out / "dashboard_figures").glob("*.png"))
    assert (out / "dashboard.html").read_text().count("data:image/png;base64,") == len(figures) > 0
    from PIL import Image

    for png in figures:  # each figure drawn, not blank
        assert np.asarray(Image.open(png).convert("L"), dtype=float).std() > 5, png.name


def test_the_progress_bar_of_a_max_steps_run(corpus, tmp_path):
    """max_epochs=-1 with max_steps (the main job's trainer node): the bar says "Epoch 0" and
    counts to max_steps, as Lightning's TQDM bar formats it (Lightning's Rich bar would say
    "Epoch 0/-2", max_epochs - 1)."""
    from hydra import compose, initialize_config_module
    from lightning.pytorch.callbacks import TQDMProgressBar

    from lightning_optim.app.train import prepare

    with initialize_config_module(version_base=None, config_module="lightning_optim.conf"):
        cfg = compose("config", overrides=[*SMALL_JOB, f"data.cache_dir={corpus.path.parent}", "trainer.max_steps=3",
                                           "trainer.val_check_interval=3", "monitor=off"])
    assert (cfg.trainer.max_epochs, cfg.trainer.max_steps) == (-1, 3)
    job = prepare(cfg, tmp_path / "run")
    bar = job.trainer.progress_bar_callback
    assert type(bar) is TQDMProgressBar
    job.trainer.fit(job.model, job.train, job.val)
    assert bar.train_progress_bar.desc == "Epoch 0: "
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (3, 3)
