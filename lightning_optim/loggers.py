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
