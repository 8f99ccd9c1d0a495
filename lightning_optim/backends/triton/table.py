"""The device-side table that lets one kernel launch update a whole bucket of tensors.

For ``n`` tensors with ``k`` slots each (param, grad, state..., master), the table is an
int64 tensor of shape ``(n, 2 + k)`` on the bucket's device::

    row i = [numel_i, rowlen_i, addr(p_i), addr(g_i), addr(state0_i), ...]

``rowlen`` is the length of one row along dim 0 (Coupled Adam's column index is
``offset % rowlen``); other rules ignore it, and their tables store the numel there. The block list is an int32 tensor of shape
``(nblocks, 2)``: (tensor index, block index within the tensor) for every ``BLOCK``-sized
block of every tensor, so program ``pid`` of the launch finds its work in two loads and
empty tensors get no program at all.

The table is a pure function of the addresses, sizes and block size, so it is cached
under exactly that key: a new parameter set, a grad that moved to new storage (e.g. after
``zero_grad(set_to_none=True)`` the allocator may hand out other blocks) or new state
tensors (a loaded state dict) give another key and a rebuild; in steady state the key
matches and the step uploads nothing. Addresses alone are enough for correctness: a freed
tensor whose address is reused by another of the same size describes the same memory.
Building the key is the O(#tensors x #slots) host work of a step (``data_ptr`` calls).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

# Enough for every (device, dtype, group) bucket of a few models in one process.
_CACHE_SIZE = 64


@dataclass(frozen=True)
class Table:
    table: Tensor  # int64 (n, 2 + k) on the device
    blocks: Tensor  # int32 (nblocks, 2) on the device
    nblocks: int
    width: int  # 2 + k: the row stride of ``table``
    aligned: bool  # every address is a multiple of 16 bytes: vector loads are safe


class TableCache:
    """An LRU cache of :class:`Table` by (device, block, sizes, addresses)."""

    def __init__(self, size: int = _CACHE_SIZE) -> None:
        self.size = size
        self._tables: OrderedDict[tuple, Table] = OrderedDict()
        self.hits = 0
        self.builds = 0

    def get(self, slots: list[list[Tensor]], rowlens: list[int] | None, block: int) -> Table:
        """The table of ``slots[j][i]`` (slot j of tensor i); every slot list has n tensors.
        ``rowlens``: Coupled Adam's row lengths, or None where the kernel never reads them.

        Slot 0 decides numel; all tensors of one index must share its layout (the launcher
        makes sure), except rows (Coupled Adam's second moment), read through ``rowlen``.
        """
        first = slots[0]
        device = first[0].device
        # map over the C methods: this key is built every step, for every tensor and slot.
        numels = tuple(map(Tensor.numel, first))
        addrs = tuple(tuple(map(Tensor.data_ptr, slot)) for slot in slots)
        rowlens = numels if rowlens is None else tuple(rowlens)
        key = (device, block, numels, rowlens, addrs)
        hit = self._tables.get(key)
        if hit is not None:
            self._tables.move_to_end(key)
            self.hits += 1
            return hit
        self.builds += 1
        built = _build(device, block, numels, rowlens, addrs)
        self._tables[key] = built
        if len(self._tables) > self.size:
            self._tables.popitem(last=False)
        return built

    def clear(self) -> None:
        self._tables.clear()
        self.hits = self.builds = 0


def _build(device: torch.device, block: int, numels, rowlens, addrs) -> Table:
    n = len(numels)
    rows = [[numels[i], rowlens[i], *(slot[i] for slot in addrs)] for i in range(n)]
    table = torch.tensor(rows, dtype=torch.int64)
    counts = torch.tensor([-(-m // block) for m in numels], dtype=torch.int64)
    owner = torch.repeat_interleave(torch.arange(n), counts)
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    blocks = torch.stack([owner, torch.arange(owner.numel()) - first], dim=1).to(torch.int32)
    aligned = all(a % 16 == 0 for slot in addrs for a in slot)
    return Table(_upload(table, device), _upload(blocks, device), int(owner.numel()), table.shape[1], aligned)


def _upload(t: Tensor, device: torch.device) -> Tensor:
    """Host -> device without blocking the host (pinned source), or as is on the CPU."""
    if device.type == "cpu":
        return t.contiguous()
    return t.pin_memory().to(device, non_blocking=True)
