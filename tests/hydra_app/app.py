"""A foreign Hydra app: its own config, plus lightning_optim's groups through the search path.

Builds an OptimizerCallback from the composed nodes and an optimizer for a small model, and
prints what it got as JSON, for tests/test_hydra.py.
"""

import json

import hydra
import torch
from omegaconf import DictConfig

import lightning_optim as lo


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    callback = lo.OptimizerCallback(
        optimizer=cfg.optimizer, scheduler=cfg.scheduler, clipping=cfg.clipping, accumulation=cfg.accumulation
    )
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 10))  # 2: the LM head
    opt = lo.create_optimizer(cfg.optimizer, model)
    print(json.dumps({
        "app": cfg.app_name,
        "optimizer": type(opt).__name__,
        "lr": opt.param_groups[0]["lr"],
        "groups": [g["name"] for g in opt.param_groups],
        "scheduler": callback.scheduler_config.name,
        "clipping": callback.clipping_config.mode,
        "accumulation": {str(k): v for k, v in callback.accumulation_config.points().items()},
        "package": lo.__file__,
    }))


if __name__ == "__main__":
    main()
