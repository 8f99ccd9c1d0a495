"""Checkpoints: verify them before resuming, resume mid-epoch exactly, convert torch.optim state.

Three things a resumed run needs that neither torch nor Lightning gives by default.

**A damaged file is refused, by name.** torch's zip checkpoints store a CRC-32 per record,
but ``torch.load`` does not check them: a flipped byte inside a tensor loads silently as a
wrong number. :func:`verify_checkpoint` checks every record (``zipfile.ZipFile.testzip``)
and raises :class:`CheckpointError` naming the file and the bad record. ``OptimizerCallback``
runs it on the checkpoint ``Trainer.fit(ckpt_path=...)`` resumes from, before Lightning
loads it.

**Mid-epoch resume continues the same batches.** Lightning 2.x restores its loop counters
(the resumed epoch continues at ``batch_idx = k``) but a plain ``DataLoader`` starts its
epoch over: the resumed run trains on batches 0, 1, ... again under the indices k, k+1, ...,
and with ``shuffle=True`` on another permutation, drawn from the global RNG. Lightning saves
a train loader's state only when the loader itself has ``state_dict``/``load_state_dict``
(it stores it under ``loops.fit_loop.state_dict.combined_loader`` and loads it before it
creates the iterator). :class:`ResumableDataLoader` is such a loader: its shuffle order is a
function of ``(seed, epoch)`` (:class:`ResumableSampler`), its state says how many batches
of which epoch it handed out, and on resume it skips those at the level of indices, so no
skipped sample is loaded. Lightning saves no RNG state either; the loader keeps the global
torch/numpy/Python RNG states of the checkpoint moment and puts them back just before the
first resumed batch, so dropout and random augmentation continue as in an uninterrupted run.

**Moments from ``torch.optim`` move into a lightning_optim partition.**
:func:`convert_optimizer_state` maps a torch optimizer's per-parameter state (by parameter
name when torch saved ``param_names``, else by the order of ``module.parameters()``) onto
the groups of one of our optimizers; :func:`convert_checkpoint` does it to a Lightning
``.ckpt`` file.

Plain PyTorch: nothing here imports Lightning.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import signal
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from .validation import LightningOptimWarning, invalid

__all__ = [
    "CheckpointError", "verify_checkpoint", "atomic_write", "newest_intact_checkpoint", "ResumableSampler",
    "ResumableDataLoader", "convert_optimizer_state", "convert_checkpoint",
]

# torch.save's legacy (pre-1.6, ``_use_new_zipfile_serialization=False``) format opens with
# the pickled magic number 0x1950a86a20f9469cfc6c (pickle protocol 2, LONG1 of 10 bytes).
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_ZIP_MAGIC = b"PK\x03\x04"
_warned_legacy: set[str] = set()


class CheckpointError(ValueError):
    """A checkpoint file that cannot be resumed from: truncated, corrupted, or not a checkpoint.

    A ``ValueError`` (the input is bad, as everywhere in lightning_optim). The message names
    the file and says what is wrong with it, e.g. ``checkpoint '/runs/last.ckpt' is truncated
    or corrupted (record 'last/data/3' fails its CRC-32 check): it cannot be resumed from;
    use an earlier checkpoint``.
    """


# ----- verification ---------------------------------------------------------------------------


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check that the torch checkpoint at ``path`` is whole; raise :class:`CheckpointError` if not.

    - zip format (torch's default since 1.6, and Lightning's ``.ckpt``): every record is read
      and checked against the CRC-32 the zip stores for it, so truncation (the zip's central
      directory is at the end of the file) and any changed byte are both caught. It reads the
      whole file once, at disk or page-cache speed (CRC-32 runs at GB/s).
    - torch's legacy format (``_use_new_zipfile_serialization=False``) stores no checksums:
      it is loaded once (``torch.load(..., weights_only=True, map_location="cpu")``) so that
      truncation shows, and a one-time :class:`LightningOptimWarning` says that a changed
      byte inside a tensor cannot be detected. (A file holding objects that a
      ``weights_only`` load refuses is not unpickled here; it passes.) Re-save such files
      with ``torch.save``.
    - an empty file, or anything else (text, another archive), is refused.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: the file is truncated, corrupted, or not a torch checkpoint.
    """
    _verify(path, load_legacy=True)


def _verify(path: str | os.PathLike, load_legacy: bool) -> str:
    """:func:`verify_checkpoint`; returns the format, ``"zip"`` or ``"legacy"``.

    ``load_legacy=False`` leaves the load of a legacy file to the caller, who loads it anyway
    (see :func:`guard_checkpoint_loading`): loading it here too would read it twice.
    """
    name = os.fspath(path)
    if os.path.isdir(name):
        raise CheckpointError(
            f"checkpoint {name!r} is a directory (a sharded checkpoint?): verify_checkpoint checks "
            "single-file torch checkpoints"
        )
    if not os.path.exists(name):
        raise FileNotFoundError(f"checkpoint {name!r} does not exist")
    size = os.path.getsize(name)
    if size == 0:
        raise CheckpointError(f"checkpoint {name!r} is empty (0 bytes): it cannot be resumed from; "
                              "use an earlier checkpoint")
    with open(name, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if head.startswith(_ZIP_MAGIC):
        _verify_zip(name, size)
        return "zip"
    if head == _LEGACY_MAGIC:
        _warn_legacy(name)
        if load_legacy:
            try:
                torch.load(name, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                if "Weights only load failed" not in str(err):
                    raise _legacy_error(name, err) from err
                # It holds objects a safe load refuses: reading it would mean running its pickle.
                # It is not damaged as far as we know; Lightning's own load will tell.
            except Exception as err:  # torch raises RuntimeError or EOFError on a short file
                raise _legacy_error(name, err) from err
        return "legacy"
    raise CheckpointError(
        f"checkpoint {name!r} is not a torch checkpoint: it starts with {head[:8]!r}, neither a zip "
        f"archive ({_ZIP_MAGIC!r}) nor torch's legacy format: it cannot be resumed from"
    )


def _verify_zip(name: str, size: int) -> None:
    try:
        with zipfile.ZipFile(name) as archive:
            records = archive.namelist()
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, struct.error, OSError, ValueError) as err:
        # The central directory sits at the end of the file: a truncated file loses it first.
        raise CheckpointError(
            f"checkpoint {name!r} is truncated or corrupted ({size} bytes, its zip directory cannot be "
            f"read: {err}): it cannot be resumed from; use an earlier checkpoint"
        ) from err
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {name!r} is truncated or corrupted (record {bad!r} fails its CRC-32 check): "
            "it cannot be resumed from; use an earlier checkpoint"
        )
    if not any(r == "data.pkl" or r.endswith("/data.pkl") for r in records):
        raise CheckpointError(
            f"checkpoint {name!r} is a zip archive but not a torch checkpoint (no 'data.pkl' record among "
            f"{records[:5]!r}): it cannot be resumed from"
        )


def _warn_legacy(name: str) -> None:
    if name not in _warned_legacy:
        _warned_legacy.add(name)
        warnings.warn(
            f"checkpoint {name!r} is in torch's legacy (non-zip) format, which stores no checksums: "
            "truncation is detected, a changed byte inside a tensor is not. Re-save it with torch.save "
            "(the zip format) to have it fully verified.",
            LightningOptimWarning, stacklevel=4,
        )


def _legacy_error(name: str, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {name!r} cannot be read ({type(err).__name__}: {err}); it is in torch's legacy format, "
        "which has no checksums, so it is most likely truncated or corrupted: it cannot be resumed from; "
        "use an earlier checkpoint"
    )


def guard_checkpoint_loading(strategy: Any) -> None:
    """Make ``strategy.load_checkpoint`` verify a local checkpoint file before it loads it.

    Why there. ``Trainer.fit(ckpt_path=...)`` resolves ``"last"``/``"best"`` to a file before it
    runs, but ``trainer.ckpt_path`` is only set in ``_checkpoint_connector.resume_start``, after
    every ``setup`` hook, and that same call loads the file; no callback hook runs in between.
    ``Strategy.load_checkpoint(path, weights_only)`` is the public method that call goes
    through (strategies that load sharded directories override it), so the check goes there.
    Directories and remote URLs pass unchecked. A legacy-format file is checked by the load
    itself: a failure to read it becomes a :class:`CheckpointError` naming the file.
    Installing twice is a no-op.
    """
    current = strategy.load_checkpoint
    if getattr(current, "_lightning_optim_verifies", False):
        return

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        name = os.fspath(checkpoint_path) if isinstance(checkpoint_path, (str, os.PathLike)) else None
        if name is None or not os.path.isfile(name):
            return current(checkpoint_path, *args, **kwargs)
        if _verify(name, load_legacy=False) == "legacy":
            try:
                return current(checkpoint_path, *args, **kwargs)
            except Exception as err:
                raise _legacy_error(name, err) from err
        return current(checkpoint_path, *args, **kwargs)

    load_checkpoint._lightning_optim_verifies = True  # type: ignore[attr-defined]
    strategy.load_checkpoint = load_checkpoint


# ----- atomic writes and finding the checkpoint to resume from ------------------------------

# Test hook: an atomic_write to a file of this name writes half its bytes to the temporary
# file, flushes them and SIGKILLs the process (tests/test_kill_resume.py: a kill while a
# checkpoint is being written). Unset, nothing changes.
KILL_IN_WRITE_ENV = "LIGHTNING_OPTIM_TEST_KILL_IN_WRITE"


def _file_mode(path: Path) -> int:
    """The mode ``open(path, "w")`` would give: the old file's, else 0o666 less the umask
    (``mkstemp`` creates 0o600)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``.

    The bytes go to a temporary file in the same directory (``.<name>.<random>.tmp``: a rename
    is atomic only within one file system), are ``fsync``-ed, and ``os.replace`` puts the file
    in place; the directory is ``fsync``-ed after the rename so that the new entry survives a
    power loss (POSIX; a no-op where directories cannot be opened). A process killed at any
    moment leaves the old file whole, and at worst a temporary file, which nothing reads.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if os.environ.get(KILL_IN_WRITE_ENV) == path.name:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dir_fd)


def checkpoint_step(path: str | os.PathLike) -> int:
    """``global_step`` of a Lightning checkpoint (its optimizer steps), read without copying its tensors."""
    checkpoint = torch.load(os.fspath(path), map_location="cpu", weights_only=False, mmap=True)
    return int(checkpoint.get("global_step", 0))


def newest_intact_checkpoint(directory: str | os.PathLike) -> tuple[Path, int, list[str]] | None:
    """The checkpoint to resume a run from: the ``*.ckpt`` of ``directory`` with the most
    optimizer steps that passes :func:`verify_checkpoint` (at equal steps ``last.ckpt``,
    which later saves replace in place). Returns ``(path, global_step, skipped)``, where
    ``skipped`` holds one message per damaged file passed over (newer or not), or None when
    the directory holds no ``.ckpt`` file; raises :class:`CheckpointError` when none is intact.
    """
    directory = Path(directory)
    files = sorted(p for p in directory.glob("*.ckpt") if p.is_file()) if directory.is_dir() else []
    if not files:
        return None
    intact, skipped = [], []
    for path in files:
        try:
            verify_checkpoint(path)
            step = checkpoint_step(path)
        except (CheckpointError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
            skipped.append(str(err) if isinstance(err, CheckpointError) else f"checkpoint {str(path)!r}: {err}")
            continue
        intact.append((step, path.name == "last.ckpt", path))
    if not intact:
        raise CheckpointError(f"no intact checkpoint in {str(directory)!r}: " + "; ".join(skipped))
    step, _, path = max(intact)
    return path, step, skipped


# ----- exact mid-epoch resume -----------------------------------------------------------------


class ResumableSampler(Sampler[int]):
    """Indices of ``data_source`` in an order that is a function of ``(seed, epoch)`` only.

    ``torch.utils.data.RandomSampler`` draws each epoch's permutation from the global RNG (or a
    generator whose state moves on), so a resumed run cannot redraw it. Here the permutation
    of epoch e is ``torch.randperm(n, generator=manual_seed(seed + e))``, as in
    ``DistributedSampler``; Lightning calls :meth:`set_epoch` at every epoch start.
    ``shuffle=False`` gives ``0, 1, ..., n-1``.
    """

    def __init__(self, data_source: Any, shuffle: bool = True, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise invalid("ResumableSampler", "seed", seed, "must be an int")
        self.num_samples = len(data_source)
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        gen = torch.Generator()
        gen.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=gen).tolist())

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that Lightning can checkpoint mid-epoch and resume exactly.

    Use it where you would use ``DataLoader`` (same arguments, plus ``seed`` and
    ``restore_rng``)::

        train = ResumableDataLoader(dataset, batch_size=32, shuffle=True, seed=0, num_workers=4)
        trainer.fit(model, train, ckpt_path="last")

    - ``shuffle=True`` (and no ``sampler``) uses a :class:`ResumableSampler` seeded with
      ``seed``: the same permutation per epoch in every run. A ``sampler`` or
      ``batch_sampler`` of your own works too if its order is a function of its epoch
      (``DistributedSampler`` is: Lightning injects one under DDP).
    - :meth:`state_dict` (Lightning calls it when it saves a checkpoint) holds the epoch and
      the number of batches handed out in it; after :meth:`load_state_dict` the next iterator
      skips that many batches of indices, without loading their samples. A checkpoint taken
      after the epoch's last batch resumes at the next epoch.
    - ``restore_rng=True``: the state also holds the global torch (CPU and initialized CUDA
      devices), numpy and Python RNG states of the checkpoint moment, and they are put back
      right before the first resumed batch is fetched, after whatever Lightning drew while
      setting up. Under ``torch.distributed`` with more than one process it does not restore
      them (the checkpoint holds rank 0's only) and warns once.
    - Without a ``generator`` argument the loader draws worker seeds from its own generator,
      seeded from ``seed`` and the epoch, instead of the global RNG: creating an iterator does
      not move the global RNG, and ``num_workers > 0`` gives the same worker seeds in every run.

    State keys: ``epoch``, ``batches``, ``seed`` and, with ``restore_rng``, ``rng``.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Any = None,
        *,
        seed: int = 0,
        restore_rng: bool = True,
        **kwargs: Any,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise invalid("ResumableDataLoader", "seed", seed, "must be an int")
        if shuffle and sampler is None and kwargs.get("batch_sampler") is None:
            sampler, shuffle = ResumableSampler(dataset, shuffle=True, seed=seed), None
        self._own_generator = kwargs.get("generator") is None
        if self._own_generator:
            kwargs["generator"] = torch.Generator()
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, **kwargs)
        self.seed = seed
        self.restore_rng = bool(restore_rng)
        self._epoch = 0  # the epoch of the current (or last) iterator
        self._batches = 0  # batches handed out by it, skipped ones included
        self._resume: tuple[int, int] | None = None  # (epoch, batches) to skip on the next iterator
        self._skip = 0  # batches the current iterator skips
        self._rng: dict[str, Any] | None = None  # RNG states to restore before the next batch
        self._warned = False

    # DataLoader reads ``_index_sampler`` for its length and whenever it starts an iterator
    # (also a persistent-workers iterator's reset), so the skip goes in there.
    @property
    def _index_sampler(self) -> Any:
        return _SkippingIndexSampler(self, super()._index_sampler)

    def __iter__(self) -> Iterator[Any]:
        # Own generator, reseeded per epoch: the worker base seed is drawn from it, not from the
        # global RNG (which torch's DataLoader otherwise advances at every iter()).
        epoch = self._sampler_epoch()
        if self._own_generator:
            self.generator.manual_seed(self.seed * 1_000_003 + epoch)
        skip = 0
        if self._resume is not None:
            (resume_epoch, batches), self._resume = self._resume, None
            # A sampler without an epoch, or one still at the saved epoch: the interrupted epoch
            # goes on. Another epoch set since the load means the trainer moved on: start it whole.
            if not self._has_epoch() or epoch == resume_epoch:
                skip = batches
        # Decided once per iterator: torch's worker iterator calls iter() on the index sampler
        # twice while it starts, and a persistent-workers iterator again at each reset.
        self._epoch, self._batches, self._skip = epoch, skip, skip
        return _CountingIterator(self, super().__iter__())

    def _has_epoch(self) -> bool:
        return any(hasattr(s, "epoch") for s in (self.sampler, getattr(self.batch_sampler, "sampler", None)))

    def _sampler_epoch(self) -> int:
        for s in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if hasattr(s, "epoch"):
                return int(s.epoch)
        return self._epoch

    def _set_sampler_epoch(self, epoch: int) -> None:
        for s in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if hasattr(s, "set_epoch"):
                s.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self._epoch, "batches": self._batches, "seed": self.seed}
        if self.restore_rng:
            state["rng"] = _collect_rng()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            warnings.warn(
                f"ResumableDataLoader: the checkpoint was taken with seed={state['seed']!r}, this loader "
                f"has seed={self.seed!r}: the resumed epoch sees another order than the interrupted one",
                LightningOptimWarning, stacklevel=2,
            )
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # saved after the epoch's last batch: resume at the next epoch
            epoch, batches = epoch + 1, 0
        self._epoch = epoch
        self._set_sampler_epoch(epoch)  # Lightning sets it too, but after it creates the iterator
        self._resume = (epoch, batches)
        self._rng = state.get("rng") if self.restore_rng else None

    def _restore_rng(self) -> None:
        state, self._rng = self._rng, None
        if state is None:
            return
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    "ResumableDataLoader: RNG states are not restored under torch.distributed with "
                    f"{torch.distributed.get_world_size()} processes: the checkpoint holds rank 0's only. "
                    "Batches resume exactly; random ops (dropout) draw fresh numbers.",
                    LightningOptimWarning, stacklevel=3,
                )
            return
        _set_rng(state)


class _SkippingIndexSampler:
    """The loader's batch sampler (or sampler), minus the batches a resumed epoch already saw."""

    def __init__(self, loader: ResumableDataLoader, inner: Any) -> None:
        self.loader, self.inner = loader, inner

    def __len__(self) -> int:
        return len(self.inner)  # the full epoch: Lightning counts the resumed batch_idx from k

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.inner)
        for _ in range(self.loader._skip):  # index lists only: no sample is loaded
            next(it, None)
        return it


class _CountingIterator:
    """Counts the batches the consumer takes (not those prefetched by workers), and restores
    the checkpoint's RNG states just before the first batch after a resume."""

    def __init__(self, loader: ResumableDataLoader, inner: Any) -> None:
        self.loader, self.inner = loader, inner

    def __iter__(self) -> _CountingIterator:
        return self

    def __len__(self) -> int:
        return len(self.inner)

    def __next__(self) -> Any:
        if self.loader._rng is not None:
            self.loader._restore_rng()
        batch = next(self.inner)
        self.loader._batches += 1
        return batch

    def __getattr__(self, name: str) -> Any:  # _shutdown_workers etc. of torch's iterators
        return getattr(self.inner, name)


def _collect_rng() -> dict[str, Any]:
    """Global RNG states as tensors and ints, so a ``weights_only=True`` load reads them."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    version, internal, gauss = random.getstate()
    state["python"] = (version, torch.tensor(internal, dtype=torch.int64), gauss)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch in practice
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    return state


def _set_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in internal.tolist()), gauss))
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


# ----- torch.optim -> lightning_optim ---------------------------------------------------------


def convert_optimizer_state(
    state_dict: Mapping[str, Any], module: nn.Module, optimizer: torch.optim.Optimizer
) -> dict:
    """A state dict for ``optimizer`` carrying the per-parameter state of another optimizer's.

    Args:
        state_dict: ``torch.optim`` (or any torch-format) ``optimizer.state_dict()`` of a run on
            ``module``, with any grouping: one group of ``module.parameters()`` or the module's
            own groups.
        module: the module that run trained. Saved tensors are matched to its parameters by
            name when the saved groups carry ``param_names`` (torch >= 2.6 keeps them when the
            optimizer was given ``named_parameters()``), else by position: torch numbers the
            parameters of its groups 0, 1, ... in order, and that order must be
            ``module.parameters()``'s (the common ``torch.optim.AdamW(self.parameters())``).
        optimizer: the lightning_optim optimizer to continue with, built on ``module``, e.g.
            ``create_optimizer({"name": "coupled_adam", "lr": 3e-4}, module)``.

    Returns:
        ``optimizer.state_dict()`` with the converted per-parameter state: pass it to
        ``optimizer.load_state_dict``. Group options (lr, weight decay, ...) are
        ``optimizer``'s own, not the saved ones: the partition decides them.

    The state keys keep torch's names (``step``, ``exp_avg``, ``exp_avg_sq``, ...). In a
    ``coupled=True`` group of :class:`~lightning_optim.CoupledAdam`, ``exp_avg_sq`` of shape
    ``(V, ...)`` becomes its mean over dim 0, ``(1, ...)``. That is exactly the coupled second
    moment the same gradients would have given: coupled Adam keeps
    ``vbar_t = b2 * vbar_{t-1} + (1 - b2) * mean_rows(g_t^2)``, and the row mean commutes with
    the EMA, so ``vbar_t = mean_rows(v_t)``. AMSGrad's ``max_exp_avg_sq`` becomes its row mean
    too; that is an upper bound of the coupled maximum (a mean of maxima is at least the
    maximum of means), so the first steps are at most as large as they would have been.

    Raises:
        ValueError: a saved tensor that matches no parameter of ``module``, a count or shape that
            disagrees, or a saved parameter name that ``module`` lacks. ``optimizer.load_state_dict``
            then checks the state keys (an SGD state into AdamW is refused there).
    """
    owner = "convert_optimizer_state"
    if not isinstance(module, nn.Module):
        raise invalid(owner, "module", module, "must be a torch.nn.Module")
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        shown = sorted(state_dict)[:6] if isinstance(state_dict, Mapping) else type(state_dict).__name__
        raise invalid(owner, "state_dict", shown,
                      "must be an optimizer state dict with 'state' and 'param_groups'")
    by_name = dict(module.named_parameters(remove_duplicate=False))  # a tied tensor under each name
    saved_groups = state_dict["param_groups"]
    named = all(g.get("param_names") for g in saved_groups)
    source: dict[int, Any] = {}  # id(param) -> saved entry
    if named:
        for g in saved_groups:
            for pid, pname in zip(g["params"], g["param_names"]):
                if pname not in by_name:
                    raise invalid(owner, "state_dict", pname, f"names a parameter that "
                                  f"{type(module).__name__} does not have{_close(pname, by_name)}")
                if pid in state_dict["state"]:
                    source[id(by_name[pname])] = (pname, state_dict["state"][pid])
    else:
        params = list(module.parameters())
        ids = [pid for g in saved_groups for pid in g["params"]]
        if len(ids) != len(params):
            raise ValueError(
                f"{owner}: the state dict holds {len(ids)} parameters without names and "
                f"{type(module).__name__}.parameters() has {len(params)}: they can only be matched by position "
                "when they are the same list. Save the optimizer with named_parameters() (torch >= 2.6) "
                "to match by name."
            )
        names = {id(p): n for n, p in reversed(list(by_name.items()))}  # the first name of each tensor
        for pid, p in zip(ids, params):
            if pid in state_dict["state"]:
                source[id(p)] = (names[id(p)], state_dict["state"][pid])

    target = optimizer.state_dict()
    converted: dict[int, dict[str, Any]] = {}
    index = 0
    for group in optimizer.param_groups:
        coupled = bool(group.get("coupled", False)) and getattr(optimizer, "couples", False)
        for p in group["params"]:
            found = source.get(id(p))
            if found is not None:
                converted[index] = _convert_entry(owner, *found, p, coupled)
            index += 1
    return {"state": converted, "param_groups": target["param_groups"]}


def _convert_entry(
    owner: str, name: str, entry: Mapping[str, Any], p: torch.Tensor, coupled: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if value.shape != p.shape and not (coupled and value.shape == (1, *p.shape[1:])):
                raise ValueError(
                    f"{owner}: parameter {name!r} has {key} of shape {list(value.shape)} in the state dict but "
                    f"the parameter has shape {list(p.shape)}: was it saved from another model?"
                )
            second_moment = key in ("exp_avg_sq", "max_exp_avg_sq")
            if coupled and second_moment and value.shape == p.shape and p.shape[0] != 1:
                value = value.mean(dim=0, keepdim=True)  # the coupled second moment (see the docstring)
        out[key] = value.clone() if isinstance(value, torch.Tensor) else value
    return out


def _close(name: str, names: Mapping[str, Any]) -> str:
    import difflib

    near = difflib.get_close_matches(name, list(names), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    module: nn.Module,
    optimizer: Any,
) -> dict:
    """Convert a Lightning ``.ckpt`` trained with a ``torch.optim`` optimizer for OptimizerCallback.

    ``module`` must hold the checkpoint's architecture (its weights are not read); ``optimizer``
    is the lightning_optim optimizer the resumed run will build: the ``optimizer`` mapping of
    the ``OptimizerCallback`` (``{"name": "coupled_adam", "lr": 3e-4}``; built here with
    :func:`~lightning_optim.create_optimizer`, which partitions with the default
    :func:`~lightning_optim.param_groups`), or an optimizer built on ``module`` when the callback
    has ``partition`` rules. The first optimizer state of ``src`` is converted with
    :func:`convert_optimizer_state`; its LR-scheduler states are dropped (the callback steps
    its own schedule, which starts at step 0 of the new run); weights, loop counters and
    other callbacks' states are kept. ``src`` is verified first; ``dst`` is written to a
    temporary file next to it and renamed, so it is never left half-written.

    Returns the converted checkpoint dict.
    """
    from .registry import create_optimizer

    verify_checkpoint(src)
    checkpoint = torch.load(os.fspath(src), map_location="cpu", weights_only=False)
    states = checkpoint.get("optimizer_states") or []
    if len(states) != 1:
        raise CheckpointError(
            f"checkpoint {os.fspath(src)!r} has {len(states)} optimizer states; convert_checkpoint converts "
            "exactly one (saved with weights_only=True, or a module with several optimizers?)"
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = create_optimizer(optimizer, module)
    checkpoint["optimizer_states"] = [convert_optimizer_state(states[0], module, optimizer)]
    checkpoint["lr_schedulers"] = []
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write(buffer.getvalue(), dst)
    return checkpoint
