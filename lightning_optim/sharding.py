"""Sharded parameters (FSDP2's ``DTensor``): local views for the update, global reductions
where the math needs every row.

FSDP2 (``torch.distributed.fsdp.fully_shard``, and Lightning's ``ModelParallelStrategy`` and
``FSDPStrategy`` built on it) hands the optimizer ``DTensor`` parameters sharded ``Shard(0)``:
each rank holds a contiguous block of rows, and the gradients arrive reduce-scattered the same
way. Every elementwise rule is exact on a shard: a coordinate's update needs only its own p,
g and state, and the state is sharded like the param. Three things need all the rows:

- CoupledAdam's second moment, the mean of g^2 over dim 0 (the vocabulary): each rank sums
  its rows, one all-reduce of an H-vector adds the shards, and the division is by the global
  row count (:func:`row_mean`);
- the gradient norm for clipping and the non-finite guard: per-tensor norms of the shards
  are combined across ranks (:func:`global_norms_`), so every rank clips by the same
  coefficient and skips the same steps;
- statistics of a whole tensor (the monitor's norms, means and embedding geometry), which
  use :class:`Rows` or :func:`full`.

Everything else works on the local tensors: :func:`local` unwraps a DTensor to the tensor
that aliases its storage, so the backends (reference, foreach, Triton) never see a DTensor
and pay no dispatch overhead. Plain tensors pass through every function here unchanged,
and a process without ``torch.distributed`` initialized never calls a collective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import compat

try:  # public since torch 2.5
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]

__all__ = ["Rows", "full", "global_norms_", "is_dtensor", "local", "row_mean", "row_state", "shard_groups"]


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The tensor holding this rank's part of ``t`` (``t`` itself if it is not a DTensor).
    In-place updates of the result update ``t``: it is the DTensor's own local storage."""
    return compat.dtensor_local_storage(t) if is_dtensor(t) else t


def shard_groups(t: Tensor, dim: int | None = None) -> list:
    """The process groups over which ``t`` is split along ``dim`` (any dim when None): the
    groups a sum over those elements must all-reduce over. Empty for a replicated tensor."""
    if not is_dtensor(t):
        return []
    mesh = t.device_mesh
    return [mesh.get_group(d) for d, pl in enumerate(t.placements)
            if isinstance(pl, Shard) and (dim is None or pl.dim % t.dim() == dim)]


def _all_reduce_(x: Tensor, groups: Sequence, op: str = "sum") -> Tensor:
    import torch.distributed as dist

    reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
    for group in groups:
        dist.all_reduce(x, op=reduce_op, group=group)
    return x


def row_state(p: Tensor, dtype: torch.dtype) -> Tensor:
    """A zero ``(1, *p.shape[1:])`` row for CoupledAdam's shared second moment of ``p``.

    For a row-sharded DTensor the row is the same on every rank along the row-sharding mesh
    dims (``Replicate``) and keeps any other placement, so checkpointing tools (DCP) see a
    well-formed DTensor."""
    if not is_dtensor(p):
        return torch.zeros((1, *p.shape[1:]), dtype=dtype, device=p.device)
    placements = [Replicate() if isinstance(pl, Shard) and pl.dim % p.dim() == 0 else pl for pl in p.placements]
    lp = local(p)
    row = torch.zeros((1, *lp.shape[1:]), dtype=dtype, device=lp.device)
    return DTensor.from_local(row, p.device_mesh, placements, run_check=False,
                              shape=torch.Size((1, *p.shape[1:])), stride=row.stride())


def row_mean(params: Sequence[Tensor]) -> Callable[[int, Tensor], Tensor] | None:
    """The backends' ``row_mean(i, local_row_sum)`` hook for a bucket of coupled params:
    all-reduce the sum of g^2 over the rows held here and divide by the global row count.
    None when no param of the bucket is row-sharded (then the backends divide locally)."""
    groups = [shard_groups(p, 0) for p in params]
    if not any(groups):
        return None
    rows = [p.shape[0] for p in params]

    def finish(i: int, row_sum: Tensor) -> Tensor:
        return _all_reduce_(row_sum, groups[i]).div_(rows[i])

    return finish


def global_norms_(tensors: Sequence[Tensor], norms: list[Tensor], norm_type: float) -> None:
    """Turn the norms of the local shards of ``tensors`` into the norms of the whole tensors,
    in place in ``norms``: one all-reduce per distinct set of process groups.

    ``||g||_p = (sum over ranks ||g_r||_p^p)^(1/p)``, and ``||g||_inf = max_r ||g_r||_inf``.
    A NaN or inf on one rank reaches every rank, so the non-finite guard agrees everywhere."""
    by_groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups = shard_groups(t)
        if groups:
            by_groups.setdefault(tuple(groups), []).append(i)
    for groups, idx in by_groups.items():
        stacked = torch.stack([norms[i] for i in idx])
        if math.isinf(norm_type):
            _all_reduce_(stacked, groups, "max")
        else:
            _all_reduce_(stacked.pow_(norm_type), groups).pow_(1.0 / norm_type)
        for j, i in enumerate(idx):
            norms[i] = stacked[j]


def full(t: Tensor) -> Tensor:
    """A DTensor statistic as a plain tensor, the same on every rank (collective: call it on
    every rank); a plain tensor unchanged."""
    return t.full_tensor() if is_dtensor(t) else t


class Rows:
    """The rows of a (V x ...) tensor held on this rank, and reductions over all V rows.

    ``Rows(e).local`` is the local block; ``sum_`` / ``max_`` / ``logsumexp`` finish a
    per-rank partial result over every rank that holds rows; ``count`` is the global V.
    For a plain tensor they are the identity, so one formula serves both."""

    def __init__(self, t: Tensor) -> None:
        self.local = local(t)
        self.count = t.shape[0]
        self._groups = shard_groups(t, 0)

    def sum_(self, x: Tensor) -> Tensor:
        return _all_reduce_(x, self._groups) if self._groups else x

    def max_(self, x: Tensor) -> Tensor:
        return _all_reduce_(x, self._groups, "max") if self._groups else x

    def logsumexp(self, lse: Tensor) -> Tensor:
        """log(sum over all rows of exp(.)) from each rank's logsumexp over its rows."""
        if not self._groups:
            return lse
        top = self.max_(lse.clone())
        # A rank with no rows has lse = -inf, which adds exp(-inf) = 0.
        return top + self.sum_(torch.exp(lse - top)).log()
