"""Hydra entry point: ``python -m lightning_optim.train [overrides]``.

Composes ``lightning_optim/conf`` (groups optimizer, scheduler, clipping, accumulation,
partition, logger, trainer), checks every node before anything is built (the LR schedule's
total, known only once the trainer sizes the data, is checked when the optimizer is built), then trains the
stand-in task with :class:`~lightning_optim.OptimizerCallback` and prints where the
checkpoint and metrics went. A bad config exits with status 2 and one paragraph naming the
field, never a traceback.

The stand-in task until the main job lands: a tied-embedding next-token model on
synthetic Zipfian pairs (no download).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from . import conf  # noqa: F401  (registers the config schemas)
from .callback import MomentMonitor, OptimizerCallback
from .demo import TiedBigram, zipf_pairs
from .dashboard import NoMetricsError, render
from .loggers import build_logger, close
from .validation import ConfigurationError


class ToyLM(pl.LightningModule):
    """Next-token cross-entropy on (x, y) pairs with a tied embedding model."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.net = TiedBigram(vocab, dim)
        self.loss = nn.CrossEntropyLoss()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss(self.net(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        loss = self.loss(self.net(x), y)
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/perplexity", loss.exp())


def toy_data(vocab: int, batch_size: int, train_batches: int, val_batches: int, seed: int) -> tuple[DataLoader, DataLoader]:
    gen = torch.Generator().manual_seed(seed)
    x, y = zipf_pairs(vocab, (train_batches + val_batches) * batch_size, gen)
    cut = train_batches * batch_size
    train = DataLoader(TensorDataset(x[:cut], y[:cut]), batch_size=batch_size, shuffle=False)
    val = DataLoader(TensorDataset(x[cut:], y[cut:]), batch_size=batch_size)
    return train, val


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
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model = ToyLM(cfg.model.vocab, cfg.model.dim)
    train, val = toy_data(cfg.model.vocab, cfg.data.batch_size, cfg.data.train_batches, cfg.data.val_batches, cfg.seed)
    monitor = MomentMonitor.from_config(cfg.monitor)
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True)
    callbacks = [callback, ckpt] + ([monitor] if monitor is not None else [])
    try:
        trainer = pl.Trainer(default_root_dir=str(out), logger=logger, callbacks=callbacks, **trainer_kwargs)
    except (TypeError, ValueError, MisconfigurationException) as err:
        raise ConfigurationError(f"trainer: {err}") from err
    trainer.fit(model, train, val)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    close(logger)
    try:
        dashboard = str(render(out, out / "dashboard.html"))
    except NoMetricsError:  # TensorBoard event files: the dashboard reads CSV and W&B runs
        dashboard = f"not written ({type(logger).__name__}: use logger=csv or logger=wandb for it)"
    result = {"run_dir": str(out), "checkpoint": ckpt.last_model_path, "metrics": metrics, "dashboard": dashboard}
    print(f"\nrun directory: {out}\ncheckpoint:    {ckpt.last_model_path}\ndashboard:     {dashboard}")
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
