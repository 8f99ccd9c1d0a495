"""Exact mid-epoch resume: a data loader that continues with the batch it stopped at.

Lightning 2.x restores its loop counters (the resumed epoch continues at ``batch_idx = k``)
but a plain ``DataLoader`` starts its epoch over: the resumed run trains on batches 0, 1, ...
again under the indices k, k+1, ..., and with ``shuffle=True`` on another permutation, drawn
from the global RNG. Lightning saves a train loader's state only when the loader itself has
``state_dict``/``load_state_dict`` (it stores it under
``loops.fit_loop.state_dict.combined_loader`` and loads it before it creates the iterator).
:class:`ResumableDataLoader` is such a loader: its shuffle order is a function of
``(seed, epoch)`` (:class:`ResumableSampler`), its state says how many batches of which epoch
it handed out, and on resume it skips those at the level of indices, so no skipped sample is
loaded. Lightning saves no RNG state either; the loader keeps the global torch/numpy/Python
RNG states of the checkpoint moment and puts them back just before the first resumed batch,
so dropout and random augmentation continue as in an uninterrupted run.

Plain PyTorch: nothing here imports Lightning.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import Sampler

from . import compat
from .validation import LightningOptimWarning, invalid

__all__ = ["ResumableSampler", "ResumableDataLoader"]


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


class ResumableDataLoader(compat.hooked_data_loader()):
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

    # DataLoader reads its index sampler for its length and whenever it starts an iterator
    # (also a persistent-workers iterator's reset), so the skip goes in there.
    def wrap_index_sampler(self, inner: Any) -> Any:
        return _SkippingIndexSampler(self, inner)

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
