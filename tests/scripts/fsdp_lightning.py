"""Run by tests/test_fsdp.py: Lightning's ModelParallelStrategy (FSDP2 on CPU/gloo, 2 ranks)
with OptimizerCallback (CoupledAdam, clip-by-norm) and MomentMonitor, the way README's
"FSDP2" section says to use them. Rank r writes OUT/rank<r>.json: its full params after
training, the callback's counters, and (rank 0) the logged metric names."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_helpers import BareLM, data  # noqa: E402

import lightning_optim as lo  # noqa: E402
from lightning_optim.sharding import full  # noqa: E402


class ShardedLM(BareLM):
    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.mlp, mesh=mesh)
        fully_shard(self, mesh=mesh)


class Dump(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        params = {n: full(p.detach()).reshape(-1).tolist() for n, p in pl_module.named_parameters()}
        placements = {n: str(getattr(p, "placements", None)) for n, p in pl_module.named_parameters()}
        opt = next(cb for cb in trainer.callbacks if isinstance(cb, lo.OptimizerCallback))
        Path(sys.argv[1], f"rank{trainer.global_rank}.json").write_text(json.dumps(
            {"params": params, "placements": placements, "steps_taken": opt.steps_taken,
             "clipped_steps": opt.clipper.clipped_steps}))


if __name__ == "__main__":
    pl.seed_everything(0)
    out = Path(sys.argv[1])
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_steps=6, log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, logger=CSVLogger(out, name="csv", version=0),
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        callbacks=[lo.OptimizerCallback(optimizer={"name": "coupled_adam", "lr": 1e-2},
                                        clipping={"mode": "norm", "max_norm": 0.5}),
                   lo.MomentMonitor(every_n_steps=2, expensive_every_n_steps=2), Dump()],
    )
    trainer.fit(ShardedLM(), data(batches=12))
