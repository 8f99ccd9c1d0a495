"""A foreign LightningModule and data for the Lightning tests: tied embeddings, LayerNorm, biases."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

VOCAB, DIM = 40, 16


class TiedLM(pl.LightningModule):
    """Next-token model with a tied head; defines its own configure_optimizers (SGD + StepLR)."""

    def __init__(self, own_optimizer: bool = True, vocab: int = VOCAB) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.mlp = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.own_optimizer = own_optimizer
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mlp(self.norm(self.embed(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 10)}


class BareLM(TiedLM):
    """The same model with no configure_optimizers at all."""

    configure_optimizers = pl.LightningModule.configure_optimizers


def data(batches: int = 24, batch_size: int = 16, seed: int = 0) -> DataLoader:
    """A learnable task: y = (3x + 1) mod VOCAB."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (batches * batch_size,), generator=gen)
    y = (3 * x + 1) % VOCAB
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer(callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, max_epochs=1)
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


def flat_params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])
