"""Hydra entry point: ``python -m lightning_optim.train [overrides]``.

Composes the top-level ``conf/`` (package ``lightning_optim.conf``) (groups optimizer, scheduler, clipping, accumulation,
partition, monitor, logger, trainer), then trains the main job with
:class:`~lightning_optim.OptimizerCallback` and prints where the checkpoint, metrics and
dashboard went.

A bad config exits with status 2 and one line naming the node, the field and the value
(``optimizer: betas[1]=1.5 is invalid: must be in [0, 1)``; see
:func:`lightning_optim.config.node_error` for how the prefix is chosen), never a traceback,
and before anything is written: :class:`CheckConfig`, a Hydra callback registered in
``conf/config.yaml``, runs :func:`check` in Hydra's ``on_run_start``, before Hydra creates the
run directory. :func:`check` builds everything the run would (every node, the Trainer, the
corpus, the model, the loaders), runs the callback's own pre-fit checks on them (the Trainer's
clipping or accumulation next to ours, the partition rules on the model) and, where the run's
length is known from ``trainer.max_steps``, builds the optimizer and the LR schedule. A config
that Hydra cannot compose (``optimizer=nonexistent``, ``optimizer.lrr=1``) exits 2 too. Left for
the fit itself: a schedule whose total comes from counting the epochs' batches.

The run's log file, ``<run dir>/train.log`` (Hydra's job logging), holds the run's log lines:
Lightning's (it keeps its own console handler), this package's (the optimizer's one-line
summary among them) and the paths printed at the end.

Stop and resume (:mod:`lightning_optim.app.resume`): ``checkpoint.every_n_steps`` writes atomic
checkpoints, committed after the metrics before them; ``resume=auto`` (or a path) continues
the run in ``hydra.run.dir`` bit-identically, its ``metrics.csv`` cut back to the checkpoint
and continued; without ``resume`` a directory holding a run is refused, as is a key the
config does not have (``+ckpt_path=...``).

The main job: a tiny GPT (:class:`~lightning_optim.app.models.TinyGPT`, tied embeddings) on the
running interpreter's standard-library source, byte-level BPE tokens
(:mod:`lightning_optim.app.corpus`; prepared once, then cached). No download.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import hydra
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torchmetrics.text import Perplexity

from .. import conf  # noqa: F401  (registers the config schemas)
from ..integration import MomentMonitor, OptimizerCallback
from ..data import ResumableDataLoader
from ..config import COMPONENT_NODES, CheckpointConfig, compose_error, node_error
from .corpus import Corpus, TokenWindows, load_corpus, zipf_exponent
from ..dashboard import NoMetricsError, render
from ..extras import MissingExtraError, require, require_logger
from ..integration.loggers import build_logger, close, cut_metrics
from .models import TinyGPT
from .resume import AtomicCheckpointIO, StepCheckpoint, config_changes, resolve_resume
from ..validation import ConfigurationError, invalid, suggest

log = logging.getLogger(__name__)
# The main job's own components, by the node their errors belong to (with the library's).
NODES = {**COMPONENT_NODES, "TinyGPT": "model", "corpus": "data"}
# Loggers that do not hand their records to the root logger, where Hydra's file handler is:
# Lightning gives its own a console handler and stops propagation when it is imported before
# logging is configured, as it is here; lightning_optim may do the same. This module's logger
# writes the closing summary to the file only (it is printed as well).
_TO_RUN_LOG = ("lightning.pytorch", "lightning.fabric", "lightning_optim", __name__)


class GPTTask(pl.LightningModule):
    """Next-token cross-entropy of a :class:`TinyGPT` on windows of ``seq_len + 1`` token ids."""

    def __init__(self, vocab: int, d_model: int, n_layers: int, n_heads: int, seq_len: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = TinyGPT(vocab, d_model, n_layers, n_heads, seq_len, dropout)
        self.val_perplexity = Perplexity()

    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch[:, :-1], batch[:, 1:]
        logits = self.net(x)
        return logits, y, F.cross_entropy(logits.flatten(0, 1), y.flatten())

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._forward(batch)[2]
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        logits, y, loss = self._forward(batch)
        self.val_perplexity.update(logits, y)
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/perplexity", self.val_perplexity)


def gpt_data(corpus: Any, seq_len: int, batch_size: int, val_batches: int, seed: int) -> tuple[DataLoader, DataLoader]:
    """Shuffled (seeded) training windows; ``val_batches`` batches of windows spread over the validation split.

    The training loader is a :class:`~lightning_optim.data.ResumableDataLoader`: a run
    resumed mid-epoch continues with the batches (and the global RNG states) the interrupted
    one would have seen. The validation loader gets a generator of its own, so that starting
    its iterator does not draw from the global RNG (torch's loader does, for its worker seed):
    a resumed run, which skips the validation Lightning ran right after the checkpoint, then
    draws the same dropout masks as an uninterrupted one."""
    train = TokenWindows(corpus.train, seq_len)
    val = TokenWindows(corpus.val, seq_len, limit=val_batches * batch_size)
    return (ResumableDataLoader(train, batch_size=batch_size, shuffle=True, seed=seed, drop_last=True, num_workers=0),
            DataLoader(val, batch_size=batch_size, num_workers=0, generator=torch.Generator()))


def build_callback(cfg: DictConfig) -> OptimizerCallback:
    """Every optimizer-side node, checked: raises ValueError naming the node and the field."""
    try:
        return OptimizerCallback(
            optimizer=cfg.optimizer,
            scheduler=cfg.scheduler,
            clipping=cfg.clipping,
            accumulation=cfg.accumulation,
            partition=cfg.partition,
        )
    except ConfigurationError as err:
        raise node_error(err) from err


class Job(NamedTuple):
    """Everything a run needs, built by :func:`prepare`."""

    trainer: pl.Trainer
    model: GPTTask
    train: DataLoader
    val: DataLoader
    callback: OptimizerCallback
    checkpoint: ModelCheckpoint
    logger: Logger
    corpus: Corpus
    resume: Path | None  # the checkpoint the run continues from
    resume_step: int  # its optimizer steps (0 for a new run)
    notes: list[str]  # what resolving `resume` found, for the console


@contextlib.contextmanager
def node(name: str | None = None, *foreign: type[BaseException]) -> Iterator[None]:
    """Report a ``ConfigurationError`` raised inside under its config node (``name``, else the
    node of the component the message names, :data:`NODES`), and the ``foreign`` exception types
    (Lightning's, torch's) as ``name: <their message>``."""
    try:
        yield
    except ConfigurationError as err:
        raise node_error(err, name, nodes=NODES) from err
    except foreign as err:
        raise ConfigurationError(f"{name}: {err}") from err


def _known_keys() -> dict[str, set[str] | None]:
    """The root keys of ``conf/config.yaml``: its groups (None: their schemas check their keys)
    and its own nodes, with the keys each may hold (``model``, ``data``, ``checkpoint``)."""
    primary = OmegaConf.load(Path(conf.__file__).parent / "config.yaml")
    known: dict[str, set[str] | None] = {}
    for entry in primary.defaults:
        if isinstance(entry, DictConfig) or isinstance(entry, dict):
            known.update({str(group): None for group in entry})
    for key, value in primary.items():
        if key not in ("defaults", "hydra"):
            known[str(key)] = set(value) if isinstance(value, DictConfig) else None
    return known


def _check_keys(cfg: DictConfig) -> None:
    """Refuse a key the config does not have: Hydra refuses ``ckpt_path=x`` (not in the config)
    but adds ``+ckpt_path=x`` (or ``+model.foo=1``), which would then be ignored silently."""
    known = _known_keys()
    for key in cfg:
        if key == "hydra":
            continue
        if key not in known:
            hint = " (to continue a run: resume=auto or resume=PATH)" if "ckpt" in str(key) or "resum" in str(key) else ""
            raise ConfigurationError(f"config: unknown key {key}={cfg[key]!r}: the config has no such key"
                                     f"{suggest(key, known)}{hint}")
        inner = known[key]
        if inner is not None and isinstance(cfg[key], DictConfig):
            for sub in cfg[key]:
                if sub not in inner:
                    raise ConfigurationError(f"{key}: unknown key {sub}={cfg[key][sub]!r}: {key} has "
                                             f"{', '.join(sorted(inner))}{suggest(sub, inner)}")


def _positive_int(node_name: str, field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(node_name, field, value, "must be an int >= 1")
    return value


def _require_extras(cfg: DictConfig) -> None:
    """The packages of the extras this run needs (the ``app`` extra: tokenizers for the corpus,
    matplotlib for the dashboard it writes at the end; the logger's), as a config error naming
    the pip install to run, before anything is built or written."""
    try:
        require("tokenizers", extra="app", feature="the main job's corpus")
        require("matplotlib", extra="app", feature="the main job's dashboard")
    except MissingExtraError as err:
        raise ConfigurationError(str(err)) from err
    logger = cfg.logger.get("name") if isinstance(cfg.get("logger"), DictConfig) else None
    with node("logger", MissingExtraError):
        require_logger(str(logger))


def prepare(cfg: DictConfig, out: Path) -> Job:
    """Build the run from a composed config, each node checked (a ``ConfigurationError`` names
    the node). Nothing is written under ``out``; the corpus is built into its cache the first time."""
    _check_keys(cfg)
    _require_extras(cfg)
    callback = build_callback(cfg)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    with node("monitor", TypeError):
        monitor = MomentMonitor(**cfg.monitor)  # monitor=off: enabled=false, a monitor that does nothing
    with node("checkpoint", TypeError):
        saving = CheckpointConfig(**cfg.checkpoint)
    resume, resume_step, notes = resolve_resume(cfg.resume, out)
    with node("logger", TypeError, ValueError, MisconfigurationException):
        logger = build_logger(OmegaConf.to_container(cfg.logger, resolve=True), str(out), resume=resume is not None)
    ckpt = StepCheckpoint(out / "checkpoints", saving.every_n_steps, saving.keep)
    callbacks = [callback, ckpt, monitor]
    if trainer_kwargs.get("enable_progress_bar", True) is not False:
        # Lightning picks its Rich bar when rich is installed, which titles a max_steps run
        # (max_epochs=-1) "Epoch 0/-2"; the TQDM bar says "Epoch 0" and counts to max_steps.
        callbacks.append(TQDMProgressBar())
    with node("trainer", TypeError, ValueError, MisconfigurationException):
        plugins = [*(trainer_kwargs.pop("plugins", None) or []), AtomicCheckpointIO()]
        trainer = pl.Trainer(default_root_dir=str(out), logger=logger, callbacks=callbacks, plugins=plugins,
                             **trainer_kwargs)
    d, m = cfg.data, cfg.model
    with node("data"):
        batch_size = _positive_int("data", "batch_size", d.batch_size)
        val_batches = _positive_int("data", "val_batches", d.val_batches)
        corpus = load_corpus(d.vocab_size, d.max_bytes, d.val_fraction, d.cache_dir)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    with node("model"):
        model = GPTTask(corpus.vocab_size, m.d_model, m.n_layers, m.n_heads, m.seq_len, m.dropout)
        train, val = gpt_data(corpus, m.seq_len, batch_size, val_batches, cfg.seed)
    return Job(trainer, model, train, val, callback, ckpt, logger, corpus, resume, resume_step, notes)


def check(cfg: DictConfig) -> None:
    """Raise ``ConfigurationError`` for anything in ``cfg`` that would stop the run before its
    first step, without writing anything (see the module docstring): :func:`prepare`, then the
    checks the callbacks make when the fit starts, on throwaway objects."""
    out = Path(str(cfg.hydra.run.dir)) if "hydra" in cfg else Path(cfg.get("out_dir", "runs/latest"))
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)  # the real run says "GPU available: ..." and the rest
    try:
        job = prepare(cfg, out)
        if cfg.resume is not None:  # before Hydra replaces the run's .hydra/config.yaml with this one
            changes = config_changes(cfg, out)
            if changes:
                print(f"warning: resume: this run differs from the one in {str(out)!r} in {'; '.join(changes)}: "
                      "it continues it, but is not what the uninterrupted run would have been", file=sys.stderr)
        with node():
            job.callback.setup(job.trainer, job.model, "fit")  # the Trainer's clipping/accumulation next to ours
            total = job.callback.scheduler_config is None or job.callback.scheduler_config.total_steps
            if total or job.trainer.max_steps > 0:  # else the total needs the epochs' batches: at fit
                job.model.trainer = job.trainer
                job.model.configure_optimizers()  # the callback's: partition, optimizer, schedule length
    finally:
        lightning_log.setLevel(level)


class CheckConfig(HydraCallback):
    """Hydra callback (``conf/config.yaml``, ``hydra.callbacks``): :func:`check` the composed
    config before Hydra creates the run directory; exit with status 2 if it is invalid."""

    started = False  # whether a config composed: an exit before that is Hydra's own config error

    full_error: str | None = None  # the user's HYDRA_FULL_ERROR, which main() sets while Hydra composes

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        CheckConfig.started = True
        _restore_full_error()
        try:
            check(config)
        except ConfigurationError as err:
            _refuse(err)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        CheckConfig.started = True  # each job is checked by run(), in its own directory
        _restore_full_error()


def _restore_full_error() -> None:
    """Put back the user's HYDRA_FULL_ERROR once the config has composed: an error while
    running is reported by Hydra as usual."""
    if CheckConfig.full_error is None:
        os.environ.pop("HYDRA_FULL_ERROR", None)
    else:
        os.environ["HYDRA_FULL_ERROR"] = CheckConfig.full_error


def _refuse(err: ConfigurationError) -> None:
    print(f"lightning_optim.train: invalid configuration: {err}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def _run_log() -> Iterator[None]:
    """Send the loggers of :data:`_TO_RUN_LOG` that do not propagate to the run's log file
    (the root logger's file handlers, which Hydra's job logging sets up) while the run lasts."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    added = []
    for name in _TO_RUN_LOG:
        logger = logging.getLogger(name)
        if logger.propagate and name != __name__:
            continue  # reaches the root's handlers already
        for handler in files:
            if handler not in logger.handlers:
                logger.addHandler(handler)
                added.append((logger, handler))
    own = logging.getLogger(__name__)
    propagate, level = own.propagate, own.level
    own.propagate = False  # the summary is printed; the file gets it from here, the console once
    own.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, handler in added:
            logger.removeHandler(handler)
        own.propagate, own.level = propagate, level


def _say(text: str) -> None:
    print(text)
    for line in text.strip("\n").splitlines():
        log.info(line)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train once from a composed config; returns the paths and final metrics."""
    out = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(cfg.get("out_dir", "runs/latest"))
    with _run_log():
        job = prepare(cfg, out)
        corpus, trainer, logger, ckpt = job.corpus, job.trainer, job.logger, job.checkpoint
        _say(f"corpus: {corpus.meta['files']} stdlib files, vocab {corpus.vocab_size}, {len(corpus.train):,} train / "
             f"{len(corpus.val):,} validation tokens, Zipf exponent {zipf_exponent(corpus.train):.2f}")
        for note in job.notes:
            _say(note)
        if cfg.resume is not None:  # the rows the killed run logged after the checkpoint are logged again
            kept, dropped = cut_metrics(out / "logs" / "metrics.csv", job.resume_step)
            if kept or dropped:
                _say(f"metrics.csv: continued from step {job.resume_step} ({kept} rows kept, {dropped} rows "
                     "logged after the checkpoint dropped)")
        with node():  # what only the fit finds (a schedule's total counted from the epochs)
            trainer.fit(job.model, job.train, job.val, ckpt_path=job.resume)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        close(logger)
        try:
            dashboard = str(render(out, out / "dashboard.html"))
        except NoMetricsError:  # TensorBoard event files: the dashboard reads CSV and W&B runs
            dashboard = f"not written ({type(logger).__name__}: use logger=csv or logger=wandb for it)"
        result = {"run_dir": str(out), "checkpoint": ckpt.last_model_path, "metrics": metrics, "dashboard": dashboard,
                  "corpus": str(corpus.path)}
        _say(f"\nrun directory: {out}\ncheckpoint:    {ckpt.last_model_path}\ndashboard:     {dashboard}")
        _say(f"corpus:        {corpus.path} (cached tokens and tokenizer)")
        where = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        _say(f"metrics:       {where} ({type(logger).__name__})")
    return result


@hydra.main(version_base=None, config_path="pkg://lightning_optim.conf", config_name="config")
def _train(cfg: DictConfig) -> None:
    CheckConfig.started = True
    try:
        run(cfg)
    except ConfigurationError as err:  # what only the fit finds; CheckConfig found the rest
        _refuse(err)


def main() -> None:
    """``python -m lightning_optim.train [overrides]``: exit status 0, 2 for an invalid config
    (Hydra's own composition errors included), 1 for a failure while running."""
    CheckConfig.started = False
    # Hydra prints a config it cannot compose (an unknown option, a typo'd key, a wrong type) over
    # several lines and exits 1; with HYDRA_FULL_ERROR set it raises the error here instead, where
    # it becomes one line naming the key (config.compose_error) and exit 2. CheckConfig puts the
    # user's setting back as soon as the config has composed; a user who set it gets Hydra's trace.
    CheckConfig.full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _train()
    except SystemExit as exit_:
        if exit_.code == 1 and not CheckConfig.started:  # a compose error Hydra reported itself
            raise SystemExit(2) from None
        raise
    except Exception as err:
        if CheckConfig.started or CheckConfig.full_error is not None:
            raise
        _refuse(compose_error(err))
    finally:
        _restore_full_error()

