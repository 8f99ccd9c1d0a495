"""Run by tests/test_resume.py: a small training run that can be paused (and then SIGKILLed) at
a chosen batch, and resumed from a checkpoint in a new process.

    python resume_worker.py OUT [--pause-at G] [--resume CKPT] [--plain-loader]

Three epochs of 13 batches (so the last accumulation window of an epoch is cut short), with
OptimizerCallback (CoupledAdam, warmup + cosine, norm clipping, accumulation 1 -> 2 -> 3
micro-batches changing mid-epoch), MomentMonitor, dropout (so the RNG matters), a shuffled
loader, and ModelCheckpoint every 3 optimizer steps into OUT/ckpt (all kept, plus last.ckpt).

``--pause-at G``: at the start of global batch G (epoch * 13 + batch_idx) print ``PAUSED G``
and block until killed. Every batch start prints ``BATCH G``. At the end the run writes
OUT/final.pt: the flat parameters, the OptimizerCallback state, the LRs, and a trace of
(epoch, batch_idx, sample indices, loss as a float hex) per batch this process trained on.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_helpers import VOCAB, BareLM, flat_params  # noqa: E402

import lightning_optim as lo  # noqa: E402

BATCHES, BATCH_SIZE, EPOCHS, EVERY_N_STEPS = 13, 8, 3, 3
ACCUMULATION = {0: 1, 4: 2, 10: 3}


class DropLM(BareLM):
    """BareLM with dropout: a resumed run must draw the same masks."""

    def forward(self, x):
        h = torch.tanh(self.mlp(self.norm(self.embed(x))))
        return self.head(nn.functional.dropout(h, p=0.2, training=self.training))

    def training_step(self, batch, batch_idx):
        idx, x, y = batch
        return nn.functional.cross_entropy(self(x), y)


def dataset() -> TensorDataset:
    """Sample i is (i, x_i, (3 x_i + 1) mod VOCAB): the index rides along to trace the order."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (BATCHES * BATCH_SIZE,), generator=gen)
    return TensorDataset(torch.arange(len(x)), x, (3 * x + 1) % VOCAB)


def loader(plain: bool = False) -> DataLoader:
    if plain:
        return DataLoader(dataset(), batch_size=BATCH_SIZE, shuffle=True)
    return lo.ResumableDataLoader(dataset(), batch_size=BATCH_SIZE, shuffle=True, seed=7)


def optimizer_callback() -> lo.OptimizerCallback:
    return lo.OptimizerCallback(
        optimizer={"name": "coupled_adam", "lr": 1e-2},
        scheduler={"name": "warmup_cosine", "warmup_steps": 3},
        clipping={"mode": "norm", "max_norm": 1.0},
        accumulation=ACCUMULATION,
    )


class Trace(pl.Callback):
    """Prints a marker per batch, pauses where asked, and records what each batch was."""

    def __init__(self, pause_at: int | None = None) -> None:
        self.pause_at = pause_at
        self.rows: list[tuple[int, int, list[int], str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        g = trainer.current_epoch * BATCHES + batch_idx
        print(f"BATCH {g}", flush=True)
        if g == self.pause_at:
            print(f"PAUSED {g}", flush=True)
            while True:  # the test sends SIGKILL now
                signal.pause()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
        self.rows.append((trainer.current_epoch, batch_idx, batch[0].tolist(), loss.hex()))


def make_trainer(out: Path, callbacks: list) -> pl.Trainer:
    checkpoints = ModelCheckpoint(dirpath=out / "ckpt", filename="{step}", every_n_train_steps=EVERY_N_STEPS,
                                  save_top_k=-1, save_last=True)
    return pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=EPOCHS, logger=CSVLogger(out, name="logs"),
        callbacks=[*callbacks, lo.MomentMonitor(every_n_steps=2, expensive_every_n_steps=4), checkpoints],
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        deterministic=True,
    )


def result(model: nn.Module, cb: lo.OptimizerCallback, trace: Trace, trainer: pl.Trainer) -> dict:
    return {
        "params": flat_params(model).clone(),
        "state": cb.state_dict(),
        "lrs": [g["lr"] for g in cb.optimizer.param_groups],
        "optimizer": cb.optimizer.state_dict(),
        "trace": trace.rows,
        "global_step": trainer.global_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--pause-at", type=int, default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--plain-loader", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model: more threads only contend (and test workers run side by side)
    pl.seed_everything(0, verbose=False)
    model, cb, trace = DropLM(), optimizer_callback(), Trace(args.pause_at)
    trainer = make_trainer(args.out, [cb, trace])
    trainer.fit(model, loader(args.plain_loader), ckpt_path=args.resume)
    torch.save(result(model, cb, trace, trainer), args.out / "final.pt")


if __name__ == "__main__":
    main()
