"""Lightning loggers from the ``logger`` config node: csv, tensorboard or wandb.

W&B defaults to offline (files under the run directory, no server): a run goes online only
when the node says ``mode: online`` or the environment sets ``WANDB_MODE``.

A resumed run continues its predecessor's history: the CSV logger appends to the same
``metrics.csv`` (Lightning's deletes it when its directory is reused) after
:func:`cut_metrics` has dropped the rows logged after the checkpoint, and a W&B run resumes
the same run id (``resume="allow"``).
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from ..extras import require_logger
from ..validation import choice, invalid
from ..compat import hooked_experiment_writer, set_csv_experiment

LOGGERS = ("csv", "tensorboard", "wandb")


class ContinuingExperimentWriter(hooked_experiment_writer()):  # type: ignore[misc]
    """Lightning's CSV writer that continues an existing ``metrics.csv`` instead of deleting it.

    Its columns start as the file's header, so appended rows line up with the old ones; a
    new column rewrites the file under the wider header (as Lightning does), atomically.
    The two steps it replaces are private in Lightning's writer:
    :func:`.compat.hooked_experiment_writer` gives them public names.
    """

    def prepare_log_dir(self) -> None:
        if self.fs.isfile(self.metrics_file_path):
            with self.fs.open(self.metrics_file_path, "r", newline="") as file:
                header = next(csv.reader(file), [])
            self.metrics_keys = list(header)

    def rewrite_with_header(self, fieldnames: list[str]) -> None:
        from ..checkpoint import atomic_write

        with self.fs.open(self.metrics_file_path, "r", newline="") as file:
            metrics = list(csv.DictReader(file))
        out = io.StringIO(newline="")
        writer = csv.DictWriter(out, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(metrics)
        atomic_write(out.getvalue().encode(), self.metrics_file_path)


class ContinuingCSVLogger(CSVLogger):
    """``CSVLogger`` writing through :class:`ContinuingExperimentWriter`."""

    @property
    def experiment(self) -> ExperimentWriter:
        return set_csv_experiment(self, ContinuingExperimentWriter)


def cut_metrics(path: str | os.PathLike, before_step: int) -> tuple[int, int]:
    """Keep the rows of the CSV log at ``path`` whose ``step`` is below ``before_step``.

    A run resumed from a checkpoint of optimizer step k logs again from Lightning's step k on
    (the batch that makes step k+1); the rows of steps >= k in the file were written by the
    killed run after that checkpoint and would otherwise appear twice. A trailing line
    without its newline (cut by the kill) and rows whose step does not parse are dropped
    too. The file is replaced atomically, header unchanged. Returns (kept, dropped); a file
    that does not exist gives (0, 0).
    """
    from ..checkpoint import atomic_write

    path = Path(path)
    if not path.is_file():
        return 0, 0
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]  # the cut line, if any
    lines = data.decode("utf-8", errors="replace").splitlines(keepends=True)
    if not lines:
        return 0, 0
    header = next(csv.reader([lines[0]]), [])
    column = header.index("step") if "step" in header else None
    kept, dropped = [lines[0]], 0
    for line in lines[1:]:
        fields = next(csv.reader([line]), [])
        try:
            ok = column is not None and len(fields) == len(header) and int(fields[column]) < before_step
        except ValueError:
            ok = False
        if ok:
            kept.append(line)
        else:
            dropped += 1
    atomic_write("".join(kept).encode(), path)
    return len(kept) - 1, dropped


def wandb_run_id(save_dir: str | os.PathLike) -> str | None:
    """The id of the newest W&B run under ``save_dir/wandb`` (``offline-run-<time>-<id>`` or
    ``run-<time>-<id>``), or None."""
    runs = sorted((p.name for p in (Path(save_dir) / "wandb").glob("*run-*-*") if p.is_dir()),
                  key=lambda name: name.split("run-", 1)[1])
    match = re.fullmatch(r"(?:offline-)?run-\d{8}_\d{6}-(?P<id>\w+)", runs[-1]) if runs else None
    return match["id"] if match else None


def build_logger(node: Mapping[str, Any], save_dir: str, resume: bool = False) -> Logger:
    """The logger named by ``node["name"]``, writing under ``save_dir``; ``resume``: continue
    the run found there (W&B: its run id, ``resume="allow"``; CSV continues its file anyway)."""
    options = dict(node)
    name = choice("logger", "name", options.pop("name", "csv"), LOGGERS)
    require_logger(name)  # its extra (wandb, tensorboardX), before anything is built
    if name == "csv":
        return ContinuingCSVLogger(save_dir=save_dir, name="logs", version="", **options)
    if name == "tensorboard":
        return TensorBoardLogger(save_dir=save_dir, name="logs", version="", **options)
    from lightning.pytorch.loggers import WandbLogger

    mode = options.pop("mode", None) or os.environ.get("WANDB_MODE", "offline")
    choice("logger", "mode", mode, ("offline", "online", "disabled"))
    if "offline" in options:
        raise invalid("logger", "offline", options["offline"], "use mode: offline|online instead")
    os.environ.setdefault("WANDB_SILENT", "true")
    run_id = wandb_run_id(save_dir) if resume else None
    if run_id is not None and "id" not in options:
        options.update(id=run_id, resume="allow")
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
