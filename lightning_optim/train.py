"""Hydra entry point: ``python -m lightning_optim.train [overrides]``.

Composes ``lightning_optim/conf`` (groups optimizer, scheduler, clipping, accumulation,
partition, monitor, logger, trainer), checks every node before anything is built (the LR schedule's
total, known only once the trainer sizes the data, is checked when the optimizer is built), then trains the
main job with :class:`~lightning_optim.OptimizerCallback` and prints where the checkpoint,
metrics and dashboard went. A bad config exits with status 2 and one paragraph naming the
field, never a traceback.

The main job: a tiny GPT (:class:`~lightning_optim.models.TinyGPT`, tied embeddings) on the
running interpreter's standard-library source, byte-level BPE tokens
(:mod:`lightning_optim.corpus`; prepared once, then cached). No download.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torchmetrics.text import Perplexity

from . import conf  # noqa: F401  (registers the config schemas)
from .callback import MomentMonitor, OptimizerCallback
from .corpus import TokenWindows, load_corpus, zipf_exponent
from .dashboard import NoMetricsError, render
from .loggers import build_logger, close
from .models import TinyGPT
from .validation import ConfigurationError


class GPTTask(pl.LightningModule):
    """Next-token cross-entropy of a :class:`TinyGPT` on windows of ``seq_len + 1`` token ids."""

    def __init__(self, vocab: int, d_model: int, n_layers: int, n_heads: int, seq_len: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = TinyGPT(vocab, d_model, n_layers, n_heads, seq_len, dropout)
        self.val_perplexity = Perplexity()

    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch[:, :-1], batch[:, 1:]
        logits = self.net(x)
        return logits, y, F.cross_entropy(logits.flatten(0, 1), y.flatten())

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._forward(batch)[2]
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        logits, y, loss = self._forward(batch)
        self.val_perplexity.update(logits, y)
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/perplexity", self.val_perplexity)


def gpt_data(corpus: Any, seq_len: int, batch_size: int, val_batches: int, seed: int) -> tuple[DataLoader, DataLoader]:
    """Shuffled (seeded) training windows; ``val_batches`` batches of windows spread over the validation split."""
    train = TokenWindows(corpus.train, seq_len)
    val = TokenWindows(corpus.val, seq_len, limit=val_batches * batch_size)
    gen = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen, drop_last=True, num_workers=0),
            DataLoader(val, batch_size=batch_size, num_workers=0))


def build_callback(cfg: DictConfig) -> OptimizerCallback:
    """Every optimizer-side node, checked: raises ValueError naming the field."""
    return OptimizerCallback(
        optimizer=cfg.optimizer,
        scheduler=cfg.scheduler,
        clipping=cfg.clipping,
        accumulation=cfg.accumulation,
        partition=cfg.partition,
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train once from a composed config; returns the paths and final metrics."""
    out = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(cfg.get("out_dir", "runs/latest"))
    callback = build_callback(cfg)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    logger = build_logger(OmegaConf.to_container(cfg.logger, resolve=True), str(out))
    monitor = MomentMonitor(**cfg.monitor)  # monitor=off: enabled=false, a monitor that does nothing
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True)
    callbacks = [callback, ckpt, monitor]
    try:
        trainer = pl.Trainer(default_root_dir=str(out), logger=logger, callbacks=callbacks, **trainer_kwargs)
    except (TypeError, ValueError, MisconfigurationException) as err:
        raise ConfigurationError(f"trainer: {err}") from err
    d, m = cfg.data, cfg.model
    corpus = load_corpus(d.vocab_size, d.max_bytes, d.val_fraction, d.cache_dir)
    print(f"corpus: {corpus.meta['files']} stdlib files, vocab {corpus.vocab_size}, {len(corpus.train):,} train / "
          f"{len(corpus.val):,} validation tokens, Zipf exponent {zipf_exponent(corpus.train):.2f}")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model = GPTTask(corpus.vocab_size, m.d_model, m.n_layers, m.n_heads, m.seq_len, m.dropout)
    train, val = gpt_data(corpus, m.seq_len, d.batch_size, d.val_batches, cfg.seed)
    trainer.fit(model, train, val)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    close(logger)
    try:
        dashboard = str(render(out, out / "dashboard.html"))
    except NoMetricsError:  # TensorBoard event files: the dashboard reads CSV and W&B runs
        dashboard = f"not written ({type(logger).__name__}: use logger=csv or logger=wandb for it)"
    result = {"run_dir": str(out), "checkpoint": ckpt.last_model_path, "metrics": metrics, "dashboard": dashboard,
              "corpus": str(corpus.path)}
    print(f"\nrun directory: {out}\ncheckpoint:    {ckpt.last_model_path}\ndashboard:     {dashboard}")
    print(f"corpus:        {corpus.path} (cached tokens and tokenizer)")
    where = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
    print(f"metrics:       {where} ({type(logger).__name__})")
    return result


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigurationError as err:  # raised before training, or while building the optimizer
        print(f"lightning_optim.train: invalid configuration: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
