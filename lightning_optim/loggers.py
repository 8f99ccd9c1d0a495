"""Lightning loggers from the ``logger`` config node: csv, tensorboard or wandb.

W&B defaults to offline (files under the run directory, no server): a run goes online only
when the node says ``mode: online`` or the environment sets ``WANDB_MODE``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from .validation import choice, invalid

LOGGERS = ("csv", "tensorboard", "wandb")


def build_logger(node: Mapping[str, Any], save_dir: str) -> Logger:
    """The logger named by ``node["name"]``, writing under ``save_dir``."""
    options = dict(node)
    name = choice("logger", "name", options.pop("name", "csv"), LOGGERS)
    if name == "csv":
        return CSVLogger(save_dir=save_dir, name="logs", version="", **options)
    if name == "tensorboard":
        return TensorBoardLogger(save_dir=save_dir, name="logs", version="", **options)
    from lightning.pytorch.loggers import WandbLogger

    mode = options.pop("mode", None) or os.environ.get("WANDB_MODE", "offline")
    choice("logger", "mode", mode, ("offline", "online", "disabled"))
    if "offline" in options:
        raise invalid("logger", "offline", options["offline"], "use mode: offline|online instead")
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(save_dir=save_dir, mode=mode, **options)


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Device tensors -> Python floats with one host transfer per device: the only place
    the statistics pipeline synchronizes."""
    import torch

    out: dict[str, float] = {}
    by_device: dict[Any, list[tuple[str, Any]]] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            by_device.setdefault(value.device, []).append((key, value))
        else:
            out[key] = float(value)
    for items in by_device.values():
        values = torch.stack([v.detach().float().reshape(()) for _, v in items]).tolist()
        out.update({k: v for (k, _), v in zip(items, values)})
    return out


def log_metrics(trainer: Any, metrics: Mapping[str, Any], step: int) -> None:
    """Send ``metrics`` to every logger of ``trainer``, from rank zero only."""
    if not metrics or trainer.global_rank != 0 or not trainer.loggers:
        return
    floats = to_floats(metrics)
    for logger in trainer.loggers:
        logger.log_metrics(floats, step=step)


def log_histograms(trainer: Any, values: Mapping[str, Any], step: int, *, num_bins: int = 64) -> bool:
    """Histograms of ``values`` (tensors) to the W&B loggers of ``trainer``, rank zero only.
    Other loggers have no histogram type here; returns whether any logger took them."""
    if not values or trainer.global_rank != 0:
        return False
    from lightning.pytorch.loggers import WandbLogger

    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    if not loggers:
        return False
    import wandb

    hists = {k: wandb.Histogram(v.detach().float().reshape(-1).cpu().numpy(), num_bins=num_bins) for k, v in values.items()}
    for logger in loggers:
        logger.log_metrics(hists, step=step)
    return True


def close(logger: Logger) -> None:
    """Flush and close ``logger`` so that its files are complete (the dashboard reads them).
    A W&B run writes through a background service; ``finish`` waits for it."""
    logger.finalize("success")
    if type(logger).__name__ == "WandbLogger":
        logger.experiment.finish()
        # finish() can return before the service has written the run file's last records (wandb
        # 0.31, offline), and the dashboard reads that file next; shutting the service down flushes it.
        import wandb

        wandb.teardown()
