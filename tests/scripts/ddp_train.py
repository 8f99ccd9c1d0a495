"""Run by tests/test_ddp.py: 2-process CPU DDP (gloo) training with OptimizerCallback
(CoupledAdam, clipping by norm, an accumulation schedule) and MomentMonitor, logging to CSV.

Usage: ``python ddp_train.py OUT``. Lightning's DDP launcher re-runs this file for rank 1
(with ``LOCAL_RANK=1`` in the environment), so everything below ``__main__`` runs on both ranks.

What it writes:

- ``OUT/init.pt`` (rank 0): the parameters before the first step, so the single-process
  reference in the test starts from the same bits whatever RNG state it has.
- ``OUT/rank<r>.json``: each rank's final parameters, clip/skip counters, steps taken, the
  input ids of every batch it saw (to check DistributedSampler's split), and the batches
  whose backward all-reduced gradients (a counting DDP communication hook: every other
  backward ran under ``no_sync``).
- ``OUT/logs_rank<r>/``: each rank's CSVLogger directory. Only rank 0 may write into its own.

The test process imports :func:`build` to run the same configuration single-process on the
global batches (see tests/test_ddp.py for why the two must agree).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_helpers import BareLM, data  # noqa: E402

import lightning_optim as lo  # noqa: E402

PER_RANK_BATCH = 8
WORLD = 2
BATCHES = 16  # per rank (DDP) = per epoch (single process): one epoch, so the windows align
# Thresholds inside the range of this run's norms, so some steps clip and some do not (the
# embedding group's norm falls from 0.91 to 0.59, the others' joint norm from 5.3 to 3.0); the
# test checks that no norm is within 1e-3 of its threshold, where rounding could flip a decision.
EMBEDDING_MAX_NORM = 0.65
MAX_NORM = 3.8
# Steps 0-2 one batch each, then windows of two from batch 3, which is not a multiple of 2
# (Lightning is given k = 5, 7, 3, 11, 13, 3 for windows 3-4, ..., 13-14), and batch 15 alone
# (cut short by the epoch end): 10 steps in all.
ACCUMULATION = {0: 1, 3: 2}
WINDOW_ENDS = [0, 1, 2, 4, 6, 8, 10, 12, 14, 15]  # the batches whose backward must all-reduce
BAD_STEP = 5  # global_step of the poisoned window (batches 5 and 6, accumulated)
BAD_RANK = 1  # under DDP only rank 1's loss becomes inf; single-process, the only rank
EVERY = 2  # MomentMonitor cadence


class PoisonedLM(BareLM):
    """BareLM whose loss is multiplied by inf on one rank during one optimizer step's window.

    ``inf * loss`` backpropagates inf (and NaN where a local gradient is 0) into every
    gradient of that rank; DDP's all-reduce then spreads it to the other rank, so every rank
    must see a non-finite norm and skip the same step."""

    def __init__(self, bad_step: int, bad_rank: int) -> None:
        super().__init__()
        self.bad_step, self.bad_rank = bad_step, bad_rank
        self.batches: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.batches.append(batch[0].tolist())
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_step == self.bad_step and self.global_rank == self.bad_rank:
            loss = loss * float("inf")
        return loss


def build(log_dir: Path, bad_rank: int) -> tuple[PoisonedLM, list[pl.Callback], dict]:
    """The model, callbacks and Trainer options shared by the DDP run and its reference."""
    pl.seed_everything(0)
    model = PoisonedLM(BAD_STEP, bad_rank)
    callbacks = [
        lo.OptimizerCallback(
            optimizer={"name": "coupled_adam", "lr": 1e-2},
            clipping={"mode": "norm", "max_norm": MAX_NORM, "per_group": {"embedding": EMBEDDING_MAX_NORM}},
            accumulation=ACCUMULATION,
        ),
        lo.MomentMonitor(every_n_steps=EVERY, expensive_every_n_steps=EVERY * 2),
    ]
    options = dict(max_epochs=1, logger=CSVLogger(str(log_dir), name="", version=""), log_every_n_steps=1,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return model, callbacks, options


def flat(module: torch.nn.Module) -> list[float]:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).tolist()


class Dump(pl.Callback):
    """Write the initial params (rank 0) and each rank's final state, as the module docstring says."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.allreduces = 0
        self.synced: list[int] = []  # batch_idx of the batches whose backward all-reduced

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == 0:  # after DDP's broadcast from rank 0: what both ranks start from
            torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items()}, self.out / "init.pt")
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_allreduce(state, bucket):  # DDP's default all-reduce, counted
            self.allreduces += 1
            return allreduce_hook(state, bucket)

        trainer.strategy.model.register_comm_hook(None, counting_allreduce)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.allreduces:
            self.synced.append(batch_idx)
        self.allreduces = 0

    def on_train_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, lo.OptimizerCallback))
        state = [v.tolist() for entry in cb.optimizer.state.values() for v in entry.values() if torch.is_tensor(v)]
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
            "params": flat(pl_module), "state": state, "batches": pl_module.batches,
            "global_step": trainer.global_step, "steps_taken": cb.steps_taken, "clipper": cb.clipper.state_dict(),
            "world_size": trainer.world_size, "synced": self.synced,
        }))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    rank = int(os.environ.get("LOCAL_RANK", "0"))  # set by the launcher before it re-runs us (one node)
    model, callbacks, options = build(out / f"logs_rank{rank}", bad_rank=BAD_RANK)
    # Lightning's own sampler for a training loader is DistributedSampler(shuffle=True) whatever
    # the loader says, so put ours in and keep Lightning's out: with shuffle=False rank r gets
    # the samples r, r + 2, ..., and batch i of rank r is the even (r=0) or odd (r=1) half of
    # samples [16 i, 16 i + 16), which the single-process reference loads as its batch i.
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy="ddp", callbacks=[*callbacks, Dump(out)],
                         use_distributed_sampler=False, **options)
    dataset = data(batches=BATCHES * WORLD, batch_size=PER_RANK_BATCH).dataset
    sampler = DistributedSampler(dataset, num_replicas=WORLD, rank=rank, shuffle=False)
    trainer.fit(model, DataLoader(dataset, batch_size=PER_RANK_BATCH, sampler=sampler))
