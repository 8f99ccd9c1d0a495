"""Gradient clipping by value or by norm, globally or per named param group, with a guard
against non-finite gradients. Plain PyTorch: the Lightning callback calls it in
``on_before_optimizer_step``, after AMP has unscaled the gradients.

The math. Clipping by value clamps every coordinate, ``g <- clamp(g, -c, c)``: cheap, but it
changes the gradient's direction. Clipping by norm rescales the whole gradient,
``g <- g * min(1, c / ||g||_p)``, which keeps its direction and only bounds the step when a
cliff in the loss surface makes the gradient explode (Pascanu, Mikolov & Bengio 2013, "On the
difficulty of training recurrent neural networks", ICML, Sec. 3.2). The formula is exactly
``torch.nn.utils.clip_grad_norm_``'s: ``coef = min(1, c / (||g||_p + 1e-6))``, so results
match torch to the bit.

Why per group. One global norm lets the largest gradient decide for everyone: the embedding
rows of a language model get large, sparse gradients (a rare token's row only when it occurs),
and with one global threshold they shrink the update of every other weight whenever they spike.
``per_group={"embedding": 0.1}`` clips the embedding group by its own norm with its own
threshold; the groups not listed are clipped together, by their joint norm, with the global
``max_norm`` (or ``max_value``), or not at all when that is None.

One host sync per step. ``clip_`` only launches kernels: norms, coefficients and flags stay
0-d tensors on the gradients' device, and the multiply uses the coefficient clamped to 1
rather than an ``if norm > c`` that would have to wait for the GPU. ``should_skip`` is the
single place that reads a value back (``finite`` and the any-group-clipped flag, stacked and
read together), so a step costs one device-to-host round trip however many groups there are.

The guard. ``finite`` is ``isfinite(total_norm)``: one NaN or inf anywhere makes the norm NaN
or inf for every p, and a norm that overflows (finite grads, but too large for the dtype) is
counted as non-finite too, as no coefficient computed from it is meaningful. With
``mode="none"`` and a 1- or inf-norm, the 2-norm is checked as well: finite gradients whose
squares overflow would otherwise make the second moments inf for good. In norm mode a
non-finite norm leaves the grads as they came (coefficient 1, where torch would scale by NaN
or 0). ``should_skip`` tells the caller to skip the step; after ``max_consecutive_skips``
skips in a row the next non-finite step raises, since training has then diverged rather than
hit one bad batch. Under fp16 AMP, the GradScaler's own overflow steps (the unscaled grads
are inf) are counted here as well.

Fused with the step. On a backend that applies gradient transforms inside its update
(``fused_grad_transform``, :mod:`lightning_optim.backends.protocol`: triton, compiled) ``clip_`` does
not rescale or clamp the gradients: it hands each group's coefficient (a 0-d device tensor) or bound to the optimizer
(``Optimizer.scale_next_step``), and the update kernel applies it to g in registers while
it reads g anyway. That saves a pass that reads and writes every gradient (8 of fp32
AdamW's 36 bytes per parameter); the ``.grad`` tensors then stay unclipped. ``fused=False``
forces the separate pass.

Sharded gradients (FSDP2's ``Shard(0)`` DTensors) are clipped through their local shards,
by the norm of the whole tensor: each rank's per-tensor norms are combined across ranks in
one all-reduce (:func:`lightning_optim.sharding.global_norms_`), so every rank computes the
same coefficient, and a NaN on one rank makes every rank skip the step.

Per-tensor norms are computed once (one ``torch._foreach_norm`` per device and dtype) and
combined into the total, each group's and each clipping set's norm, in the order
``clip_grad_norm_`` combines them, so that ``report.total_norm`` and every group's norm equal
torch's bit for bit. The host work around those kernels is kept small, as it is paid every
step for every tensor: the grads are bucketed once, and with one device and dtype (the usual
case) a group's norm reuses the total's stacked per-tensor norms instead of regrouping and
restacking them (:class:`_Grads`, :class:`_Norms`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from .compat import group_tensors_by_device_and_dtype as _group_tensors_by_device_and_dtype
from .compat import has_foreach_support as _has_foreach_support

from . import backends, sharding
from .validation import boolean, choice, invalid, positive, suggest

__all__ = ["ClipReport", "GradientClipper", "NonFiniteGradientError"]

OWNER = "clipping"
MODES = ("none", "value", "norm")
_COUNTERS = ("skipped_steps", "consecutive_skips", "clipped_steps")


class NonFiniteGradientError(RuntimeError):
    """Too many consecutive steps had NaN or inf gradients: training has diverged."""


@dataclass
class ClipReport:
    """What one ``clip_`` saw. Every field is a tensor on the gradients' device: reading one is
    a host sync, so loggers read them, and the step reads them only through ``should_skip``."""

    total_norm: Tensor  # pre-clip norm over all grads (norm_type), computed in every mode
    group_norms: dict[str, Tensor]  # pre-clip norm of each group, by name
    clipped: dict[str, Tensor]  # per group, 0-d bool: did clipping change its grads
    finite: Tensor  # 0-d bool: the total norm is finite (no NaN/inf grad, no overflow)


class GradientClipper:
    """Clip gradients in place, and decide whether a step with non-finite gradients is skipped.

    Args:
        mode: ``"none"`` (report only), ``"value"`` or ``"norm"``.
        max_norm: norm mode: the threshold of the groups not listed in ``per_group``.
        max_value: value mode: the bound of the groups not listed in ``per_group``.
        norm_type: the p of the p-norm (``float("inf")`` for the max norm); also the norm
            reported in ``"none"`` and ``"value"`` modes.
        per_group: ``{group name: threshold}``; each listed group is clipped on its own.
            Unnamed groups are called ``"group{i}"``.
        skip_nonfinite: ``should_skip`` says to skip steps whose gradients are not finite.
        max_consecutive_skips: the most consecutive steps skipped; one more non-finite step
            raises :class:`NonFiniteGradientError`.

    Use::

        report = clipper.clip_(optimizer)
        if clipper.should_skip(report):  # the one host sync
            optimizer.zero_grad()        # the caller skips the step
        else:
            optimizer.step()
    """

    def __init__(
        self,
        mode: str = "none",
        *,
        max_norm: float | None = None,
        max_value: float | None = None,
        norm_type: float = 2.0,
        per_group: Mapping[str, float] | None = None,
        skip_nonfinite: bool = True,
        max_consecutive_skips: int = 10,
    ) -> None:
        self.mode = choice(OWNER, "mode", mode, MODES)
        self.norm_type = positive(OWNER, "norm_type", norm_type, allow_inf=True)  # rejects NaN, accepts inf
        self.max_norm = None if max_norm is None else positive(OWNER, "max_norm", max_norm)
        self.max_value = None if max_value is None else positive(OWNER, "max_value", max_value)
        if per_group is not None and not isinstance(per_group, Mapping):
            raise invalid(OWNER, "per_group", per_group, "must be a mapping {group name: threshold}")
        self.per_group: dict[str, float] = {}
        for name, threshold in (per_group or {}).items():
            if not isinstance(name, str) or not name:
                raise invalid(OWNER, "per_group", dict(per_group),
                              f"has key {name!r}: keys must be group names")
            self.per_group[name] = positive(OWNER, f"per_group[{name!r}]", threshold)
        self.skip_nonfinite = boolean(OWNER, "skip_nonfinite", skip_nonfinite)
        if isinstance(max_consecutive_skips, bool) or not isinstance(max_consecutive_skips, int):
            raise invalid(OWNER, "max_consecutive_skips", max_consecutive_skips, "must be an integer >= 1")
        if max_consecutive_skips < 1:
            raise invalid(OWNER, "max_consecutive_skips", max_consecutive_skips, "must be an integer >= 1")
        self.max_consecutive_skips = max_consecutive_skips

        # A threshold the mode never reads would let a config look like it clips when it does
        # not (e.g. mode=value with max_norm=1.0): say so instead of ignoring it.
        uses = {"none": (), "value": ("max_value",), "norm": ("max_norm",)}[self.mode]
        for field in ("max_norm", "max_value"):
            if getattr(self, field) is not None and field not in uses:
                raise invalid(OWNER, field, getattr(self, field), f"is not used by mode={self.mode!r}"
                              + (f"; use {uses[0]}" if uses else "; set mode 'norm' or 'value' to clip"))
        if self.mode == "none" and self.per_group:
            raise invalid(OWNER, "per_group", dict(self.per_group), "is not used by mode='none'; "
                          "set mode 'norm' or 'value' to clip")
        if self.mode != "none" and self.threshold is None and not self.per_group:
            field = "max_norm" if self.mode == "norm" else "max_value"
            raise invalid(OWNER, field, None,
                          f"mode={self.mode!r} needs {field} > 0 or per_group thresholds")

        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.clipped_steps = 0
        self.group_clipped_steps: dict[str, int] = {}  # per group name, for clipped fractions

    @property
    def threshold(self) -> float | None:
        """The global threshold of the mode: max_norm, max_value, or None."""
        return {"none": None, "value": self.max_value, "norm": self.max_norm}[self.mode]

    # ----- the step ---------------------------------------------------------------------------

    @torch.no_grad()
    def clip_(self, optimizer: torch.optim.Optimizer, *, fused: bool | None = None) -> ClipReport:
        """Clip ``optimizer``'s gradients and report the pre-clip norms. No host sync.

        ``fused`` (default: when the optimizer's backend has ``fused_grad_transform``): leave the gradients
        as they are and hand each group's coefficient or bound to the optimizer's next step
        (:meth:`lightning_optim.optim.base.Optimizer.scale_next_step`), which applies it while
        it reads the gradient anyway, instead of a pass that reads and writes every gradient."""
        if fused is None:
            backend = backends.capabilities(optimizer)
            fused = backend is not None and backend.fused_grad_transform
        if fused and not hasattr(optimizer, "scale_next_step"):
            raise invalid(OWNER, "fused", fused, f"needs a lightning_optim optimizer, not {type(optimizer).__name__}")
        names, members, raw = self._collect(optimizer)
        grads = _Grads(raw)
        device = grads.device
        norms = grads.norms(self.norm_type)
        total = norms.total
        group_norms = {n: norms.of(members[n]) for n in names}
        finite = total_finite = torch.isfinite(total)
        if self.mode == "none" and self.norm_type != 2.0 and raw:
            # Finite grads can have squares that overflow (|g| > 1.8e19 in fp32) and would make
            # Adam-style second moments inf for good; a 1- or inf-norm does not see that, and
            # with no clipping nothing else bounds them, so ask the 2-norm too.
            finite = finite & torch.isfinite(grads.norms(2.0).total)
        clipped: dict[str, Tensor] = {}

        if self.mode == "value":  # max|g| says whether a clamp changes a grad: the inf-norm
            max_abs = norms.per_tensor if math.isinf(self.norm_type) else grads.tensor_norms(math.inf)
        if self.mode != "none":
            for set_names, threshold in self._clipping_sets(names):
                idx = [i for n in set_names for i in members[n]]
                if not idx:
                    continue
                if self.mode == "norm":
                    norm = group_norms[set_names[0]] if len(set_names) == 1 else norms.of(idx)
                    coef = _coefficient(norm, threshold, total_finite if norm is total else None)
                    if fused:
                        for n in set_names:
                            optimizer.scale_next_step(names.index(n), grad_scale=coef)
                    else:
                        grads.scale_(idx, coef)
                    scaled = coef < 1.0
                    for n in set_names:  # a group of zeros is not changed by a shared coefficient
                        clipped[n] = scaled & (group_norms[n] > 0)
                else:
                    for n in set_names:
                        clipped[n] = grads.exceeds(max_abs, members[n], threshold)
                        if fused:
                            optimizer.scale_next_step(names.index(n), clip_value=threshold)
                    if not fused:
                        grads.clamp_(idx, threshold)
        # In the groups' order; a group no clipping set touched is not clipped.
        false = None if len(clipped) == len(names) else torch.zeros((), dtype=torch.bool, device=device)
        clipped = {n: clipped.get(n, false) for n in names}
        return ClipReport(total_norm=total, group_norms=group_norms, clipped=clipped, finite=finite)

    def should_skip(self, report: ClipReport) -> bool:
        """Read ``report`` (the one host sync of the step), update the counters, and say
        whether the caller must skip this optimizer step (and zero the gradients).

        Raises :class:`NonFiniteGradientError` when more than ``max_consecutive_skips``
        consecutive steps in a row had non-finite gradients."""
        device = report.finite.device
        flags = torch.stack([report.finite, *(c.to(device) for c in report.clipped.values())])
        finite, *clipped = flags.tolist()
        if finite or not self.skip_nonfinite:
            self.consecutive_skips = 0
            self.clipped_steps += any(clipped)
            for name, flag in zip(report.clipped, clipped):
                self.group_clipped_steps[name] = self.group_clipped_steps.get(name, 0) + int(flag)
            return False
        if self.consecutive_skips >= self.max_consecutive_skips:
            # Training stops here, so a second read of the device costs nothing that matters.
            bad = [n for n, v in report.group_norms.items() if not math.isfinite(float(v))]
            where = ", ".join(map(repr, bad)) or "none (the total norm overflowed)"
            raise NonFiniteGradientError(
                f"{OWNER}: non-finite gradients in {self.consecutive_skips + 1} consecutive steps, more "
                f"than max_consecutive_skips={self.max_consecutive_skips}; groups with a non-finite "
                f"{self.norm_type:g}-norm: {where}. Training has diverged: lower the learning rate, "
                "check the data, or use bf16/fp32."
            )
        self.consecutive_skips += 1
        self.skipped_steps += 1
        return True

    # ----- state and logs ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        return {**{k: getattr(self, k) for k in _COUNTERS}, "group_clipped_steps": dict(self.group_clipped_steps)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        where = "GradientClipper.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise invalid(where, "state_dict", state_dict, 
                          f"must be a mapping with keys {', '.join(_COUNTERS)}")
        values = {}
        for k in _COUNTERS:
            if k not in state_dict:
                raise invalid(where, "state_dict", dict(state_dict),
                              f"has no {k!r}: was it saved by a GradientClipper?")
            v = state_dict[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise invalid(where, k, v, "must be an integer >= 0")
            values[k] = v
        for k, v in values.items():  # all checked first: a bad dict changes nothing
            setattr(self, k, v)
        self.group_clipped_steps = dict(state_dict.get("group_clipped_steps", {}))

    def describe(self) -> str:
        """One line for the logs."""
        p = "inf" if math.isinf(self.norm_type) else f"{self.norm_type:g}"
        if self.mode == "none":
            clip = f"gradient clipping: none (logging the {p}-norm)"
        else:
            field = "max_norm" if self.mode == "norm" else "max_value"
            listed = ", ".join(f"{n}={t:g}" for n, t in self.per_group.items())
            parts = [f"per group {listed}"] if self.per_group else []
            if self.threshold is None:
                parts.append("other groups not clipped")
            else:
                others = " for the other groups" if self.per_group else ""
                parts.append(f"{field}={self.threshold:g}{others}")
            what = f"by {p}-norm" if self.mode == "norm" else "by value"
            clip = f"gradient clipping {what}: {'; '.join(parts)}"
        guard = (f"skip non-finite steps, raise after {self.max_consecutive_skips} in a row"
                 if self.skip_nonfinite else "non-finite steps not skipped")
        return f"{clip}; {guard}"

    def __repr__(self) -> str:
        return f"GradientClipper({self.describe()})"

    # ----- helpers ----------------------------------------------------------------------------

    def _clipping_sets(self, names: list[str]) -> list[tuple[list[str], float]]:
        """Each listed group alone with its threshold, then the others together with the global one."""
        sets = [([n], self.per_group[n]) for n in names if n in self.per_group]
        rest = [n for n in names if n not in self.per_group]
        if rest and self.threshold is not None:
            sets.append((rest, self.threshold))
        return sets

    def _collect(self, optimizer: Any) -> tuple[list[str], dict[str, list[int]], list[Tensor]]:
        """Group names in order, each group's indices into the flat grad list, and that list."""
        groups = getattr(optimizer, "param_groups", None)
        if groups is None:
            raise invalid(OWNER, "optimizer", type(optimizer).__name__, "must be a torch.optim.Optimizer")
        names: list[str] = []
        members: dict[str, list[int]] = {}
        grads: list[Tensor] = []
        for i, group in enumerate(groups):
            name = str(group.get("name", f"group{i}"))
            if name in members:  # two groups under one name would share a report entry and threshold
                raise invalid(OWNER, "optimizer", _group_list(groups),
                              f"has two param groups named {name!r}; group names must be unique")
            names.append(name)
            present = [g for g in [p.grad for p in group["params"]] if g is not None]
            # A contiguous ascending run of the flat list: _Norms.of relies on it.
            members[name] = list(range(len(grads), len(grads) + len(present)))
            grads += present
        unknown = [n for n in self.per_group if n not in members]
        if unknown:
            raise invalid(OWNER, "per_group", unknown[0], "names no param group of the optimizer, whose "
                          f"groups are {', '.join(map(repr, names))}{suggest(unknown[0], names)}")
        return names, members, grads


class _Grads:
    """The flat gradient list of one ``clip_``, bucketed once by (device, dtype).

    ``clip_grad_norm_`` computes the per-tensor norms bucket by bucket (one ``_foreach_norm``
    per bucket) and stacks them in the grouping helper's bucket order, not the list's order;
    the final reduction's rounding depends on that order, so every norm here follows it. The
    grouping is done once per ``clip_`` (a C++ pass over the list). In the common case of a
    single bucket (one device, one dtype), every subset's order is simply the list's order, so
    subsets are never regrouped; only with several buckets is a subset that spans several of
    them regrouped, by the same helper, to get the bucket order torch would give it.

    Sharded (DTensor) grads are replaced by their local shards; their norms are made global
    by :func:`lightning_optim.sharding.global_norms_`. A list of plain tensors (the common case,
    checked once by type) skips that and the per-tensor foreach-support check."""

    def __init__(self, raw: list[Tensor]) -> None:
        self.raw = raw
        # Plain tensors are not DTensors, and torch's foreach ops take any plain tensor
        # (``has_foreach_support`` checks the types, then the device): with the types checked
        # here once, only the device is left to check per bucket.
        self.plain = set(map(type, raw)) <= {Tensor}
        self.grads = raw if self.plain else [sharding.local(g) for g in raw]
        self.device = self.grads[0].device if self.grads else torch.device("cpu")
        # (device, tensors, flat indices, foreach-capable), in the grouping helper's order.
        self.buckets: list[tuple[torch.device, list[Tensor], list[int], bool]] = []
        if self.grads:  # the grouping helper rejects an empty list
            grouped = _group_tensors_by_device_and_dtype([self.grads], with_indices=True)
            for (dev, _), ([ts], indices) in grouped.items():
                self.buckets.append((dev, ts, indices, _has_foreach_support([] if self.plain else ts, dev)))
        self.single = len(self.buckets) == 1
        # clip_grad_norm_ moves every norm to the first grad's device before stacking them;
        # on one device that ``.to`` returns the tensor itself, so it is skipped.
        self.one_device = len({dev for dev, *_ in self.buckets}) <= 1

    def norms(self, norm_type: float) -> _Norms:
        """Each tensor's ``norm_type``-norm and the norms combined from them."""
        return _Norms(self, self.tensor_norms(norm_type), norm_type)

    def tensor_norms(self, norm_type: float) -> list[Tensor]:
        """Each tensor's ``norm_type``-norm (of the whole tensor for sharded grads), in order."""
        per_tensor: list[Tensor] = [None] * len(self.grads)  # type: ignore[list-item]
        for dev, ts, indices, foreach in self.buckets:
            # The same choice of kernel as clip_grad_norm_, so the norms are the same bits.
            if math.isinf(norm_type) and not all(map(Tensor.numel, ts)):
                # max has no identity, so torch's inf-norm refuses an empty tensor; value mode
                # asks it of every grad, and a param with no elements exceeds no bound: 0.
                out = [torch.linalg.vector_norm(g, norm_type) if g.numel() else g.new_zeros(()) for g in ts]
            elif foreach:
                out = torch._foreach_norm(ts, norm_type)
            else:
                out = [torch.linalg.vector_norm(g, norm_type) for g in ts]
            if self.single:
                per_tensor = list(out)
            else:
                for i, n in zip(indices, out):
                    per_tensor[i] = n
        if not self.plain:
            sharding.global_norms_(self.raw, per_tensor, norm_type)
        return per_tensor

    def on_device_of(self, i: int, norms: list[Tensor]) -> list[Tensor]:
        """``norms`` moved to ``grads[i]``'s device (clip_grad_norm_ stacks its norms on the
        device of its list's first grad)."""
        if self.one_device:
            return norms
        first = self.grads[i].device
        return [n.to(first) for n in norms]

    def subsets(self, idx: list[int]) -> list[tuple[torch.device, list[Tensor], list[int], bool]]:
        """``grads[idx]`` by (device, dtype), in the grouping helper's order for that subset:
        (device, tensors, their positions in ``idx``, foreach-capable)."""
        if self.single:
            dev, _, _, foreach = self.buckets[0]
            return [(dev, [self.grads[i] for i in idx], list(range(len(idx))), foreach)]
        grouped = _group_tensors_by_device_and_dtype([[self.grads[i] for i in idx]], with_indices=True)
        return [(dev, ts, js, _has_foreach_support([] if self.plain else ts, dev))
                for (dev, _), ([ts], js) in grouped.items()]

    def scale_(self, idx: list[int], coef: Tensor) -> None:
        """Multiply ``grads[idx]`` by the 0-d ``coef``, in place."""
        for dev, ts, _, foreach in self.subsets(idx):
            c = coef.to(dev)
            if foreach:
                torch._foreach_mul_(ts, c)
            else:
                for g in ts:
                    g.mul_(c)

    def clamp_(self, idx: list[int], bound: float) -> None:
        """Clamp ``grads[idx]`` to ``[-bound, bound]``, in place."""
        for dev, ts, _, foreach in self.subsets(idx):
            if foreach:
                torch._foreach_clamp_min_(ts, -bound)
                torch._foreach_clamp_max_(ts, bound)
            else:
                for g in ts:
                    g.clamp_(min=-bound, max=bound)

    def exceeds(self, max_abs: list[Tensor], idx: list[int], bound: float) -> Tensor:
        """0-d bool: does any entry of ``grads[idx]`` exceed ``bound`` in absolute value."""
        if not idx:
            return torch.zeros((), dtype=torch.bool, device=self.device)
        # Compare in each grad's own dtype, as the clamp rounds the bound to it: a bf16 grad
        # equal to bf16(bound) is not changed, so it must not count as clipped.
        flags = [(torch.stack([max_abs[idx[j]] for j in js]).amax() > bound).to(self.device)
                 for _, _, js, _ in self.subsets(idx)]
        return flags[0] if len(flags) == 1 else torch.stack(flags).any()


class _Norms:
    """Per-tensor norms of a :class:`_Grads` and the norm of any subset of it, combined as
    ``clip_grad_norm_`` combines them: ``vector_norm(stack(per-tensor norms in bucket order))``.

    The total's stacked vector is built once. With a single bucket, a subset that is a
    contiguous run of the list (every param group is one: the list is built group by group)
    is a copy of a slice of it, the same values in the same order as a fresh stack, so the
    same bits (copied rather than viewed: a reduction over a misaligned view may split its
    vectorised loads differently on CUDA)."""

    def __init__(self, grads: _Grads, per_tensor: list[Tensor], norm_type: float) -> None:
        self.grads, self.per_tensor, self.norm_type = grads, per_tensor, norm_type
        if not per_tensor:
            self.stacked = None
            self.total = torch.zeros((), device=grads.device)
            return
        if grads.single:
            self.stacked = torch.stack(per_tensor)
        else:
            in_bucket_order = [per_tensor[i] for _, _, indices, _ in grads.buckets for i in indices]
            self.stacked = torch.stack(grads.on_device_of(0, in_bucket_order))
        self.total = torch.linalg.vector_norm(self.stacked, norm_type)

    def of(self, idx: list[int]) -> Tensor:
        """The norm of ``grads[idx]`` viewed as one vector; ``idx`` ascending, as ``_collect`` builds it."""
        if not idx:
            return torch.zeros((), device=self.grads.device)
        if len(idx) == len(self.per_tensor):  # all of them, in the list's order
            return self.total
        if self.grads.single:
            if idx[-1] - idx[0] == len(idx) - 1:  # ascending and distinct: a contiguous run
                vec = self.stacked[idx[0]:idx[-1] + 1].clone()
            else:
                vec = torch.stack([self.per_tensor[i] for i in idx])
            return torch.linalg.vector_norm(vec, self.norm_type)
        ordered = [self.per_tensor[idx[j]] for _, _, js, _ in self.grads.subsets(idx) for j in js]
        return torch.linalg.vector_norm(torch.stack(self.grads.on_device_of(idx[0], ordered)), self.norm_type)


def _coefficient(norm: Tensor, threshold: float, finite: Tensor | None = None) -> Tensor:
    """min(1, threshold / (norm + 1e-6)), clip_grad_norm_'s; 1 for a non-finite norm.
    ``finite``: ``isfinite(norm)`` when the caller has it already."""
    coef = torch.clamp(threshold / (norm + 1e-6), max=1.0)
    # A NaN/inf norm would turn every grad into NaN or 0: leave the grads as they came, so
    # the skipped step (or the user, with skip_nonfinite=False) still sees where they broke.
    return torch.where(torch.isfinite(norm) if finite is None else finite, coef, torch.ones_like(coef))


def _group_list(groups: Any) -> str:
    return ", ".join(str(g.get("name", f"group{i}")) for i, g in enumerate(groups))
