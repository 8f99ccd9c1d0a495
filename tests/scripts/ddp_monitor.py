"""Run by tests/test_monitor.py: 2-process CPU DDP training with OptimizerCallback and
MomentMonitor; each rank writes what the monitor computed, and its final params, to OUT/rank<r>.json."""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_helpers import BareLM, data  # noqa: E402

import lightning_optim as lo  # noqa: E402
from lightning_optim.stats import MomentStats  # noqa: E402

out = Path(sys.argv[1])
seen: list[dict] = []
original = MomentStats.after_step


def recording(self):
    result = original(self)
    seen.append({k: float(v) for k, v in result.items()})
    return result


MomentStats.after_step = recording


class Dump(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        params = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()]).tolist()
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"stats": seen, "params": params}))


if __name__ == "__main__":
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[lo.OptimizerCallback(optimizer={"name": "coupled_adam", "lr": 1e-2},
                                        clipping={"mode": "norm", "max_norm": 1.0}),
                   lo.MomentMonitor(every_n_steps=2, expensive_every_n_steps=2), Dump()],
    )
    trainer.fit(BareLM(), data())
