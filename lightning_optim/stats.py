r"""Optimizer moment statistics: tensors on the params' device, no host sync, no logging.

:class:`MomentStats` watches an optimizer (ours or ``torch.optim``) and returns, per
parameter tensor, 0-d tensors on that tensor's device. Nothing here reads a value back to
the host (no ``.item()``, ``.tolist()``, ``bool(t)``, printing, or Python ``if`` on a value):
the loggers are the only place that syncs, once per logging step (``torch.stack`` the values
and move them together). Reductions are batched with ``torch._foreach_*`` over tensors
grouped by (device, dtype), in chunks of at most ``2**26`` elements so the temporaries stay
bounded. bf16/fp16 tensors are reduced in fp32, fp64 ones in fp64.

Per parameter (key ``optim/<stat>/<name>``; ``name`` from the group's ``param_names``, else
``<group name>.<index>``, the group name being ``group["name"]`` or ``group<k>`` for the k-th
unnamed group):

=================  ===========================================================================
``grad_norm``      :math:`\|g\|_2`, snapshotted by :meth:`MomentStats.before_step` (call it
                   before clipping); without that call, the gradient as :meth:`after_step`
                   finds it. Sparse gradients are skipped.
``param_norm``     :math:`\|p\|_2` after the step.
``update_ratio``   :math:`\|p_{after} - p_{before}\| / \|p_{before}\|` (needs ``before_step``).
                   Where :math:`p_{before} = 0` (a zero-initialized bias) it is relative to
                   :math:`\|p_{after}\|` instead, and 0 if the tensor stayed at zero.
``exp_avg_norm``   :math:`\|\hat m\|`, :math:`\hat m = m / (1 - \beta_1^t)`.
``sqrt_v_mean``    mean of :math:`\sqrt{\hat v}`, :math:`\hat v = v / (1 - \beta_2^t)`.
``sqrt_v_max``     max of :math:`\sqrt{\hat v}`.
``v_drift``        :math:`\|\hat v_t - \hat v_{prev}\| / \|\hat v_{prev}\|` since the previous
                   :meth:`after_step` (absent the first time).
``v_log_ratio``    :math:`\log(\mathrm{mean}\,\hat v_t / \mathrm{mean}\,\hat v_{prev})` (absent the
                   first time).
``snr``            :math:`\mathrm{mean}(|\hat m| / (\sqrt{\hat v} + \epsilon))`: the size of
                   Adam's step in units of the learning rate (with CoupledAdam's
                   ``coupling_scale`` c: :math:`\sqrt{c \hat v}`, as its step).
``dead_fraction``  fraction of coordinates with :math:`\sqrt{\hat v} < \epsilon`: coordinates
                   whose step is driven by :math:`\epsilon`, not by the gradient.
=================  ===========================================================================

Which state is read: what the rule's spec in the rule table names as its first and second
moments (:class:`lightning_optim.rules.RuleSpec`, declared next to each optimizer class;
``torch.optim`` optimizers by the rule whose state layout their class keeps, ``torch_names``).
``m``: ``exp_avg`` (Adam family, Lion), ``momentum_buffer`` (SGD); RMSprop's
``momentum_buffer`` accumulates already-normalized updates, so RMSprop has no ``m``. ``v``:
``exp_avg_sq`` (Adam family), ``square_avg`` (RMSprop), ``sum`` (Adagrad). Bias correction
divides by :math:`1 - \beta^t` when the spec says its moments are bias-corrected EMAs, the
group has ``betas`` and ``bias_correction`` is true (the default; torch groups have no such
option): so the Adam family (Adam's bias-corrected EMAs, and the rules built on them), not
Lion (whose ``m`` is an uncorrected interpolation), RMSprop, Adagrad or SGD. With ``amsgrad`` the stats describe the
EMA ``exp_avg_sq``, not its running max. ``eps`` is the group's (1e-8 without). A stat the
state does not support (no ``v`` for SGD, no state before the first step, an optimizer whose
rule is not in the table) is simply absent for that tensor.

The step count is ``state["step"]``, a CPU float32 tensor in torch's format (or a device
tensor with ``capturable``/``fused``). It is never read by the host: :math:`1 - \beta^t` is a
tensor op on the step's device, and the small vector of corrections moves to the params'
device with ``non_blocking=True`` (a pageable host-to-device ``cudaMemcpyAsync``, which does
not wait for queued GPU work).

What is meaningful for coupled groups (CoupledAdam, ``coupled=True``). A coupled tensor
:math:`E \in \mathbb{R}^{V \times H}` keeps one second-moment row :math:`\bar v \in
\mathbb{R}^{1 \times H}` shared by all V rows. ``sqrt_v_mean``, ``sqrt_v_max`` and
``dead_fraction`` are over that shared row (H values: one per embedding dimension, not per
token); ``v_drift`` and ``v_log_ratio`` are of the shared row; ``snr`` broadcasts the row over
the V rows of :math:`\hat m`, so it is still a mean over V x H coordinates. ``grad_norm``,
``param_norm``, ``update_ratio`` and ``exp_avg_norm`` are over the full tensor as usual. Per
token second-moment statistics do not exist there, by construction.

Drift memory. For ``v_drift`` one previous :math:`\hat v` per tracked tensor is kept (fp32, or
fp64 for fp64 params), overwritten in place each time: no history. A tensor with more than
``drift_max_elements`` second-moment elements keeps a fixed, deterministic strided subsample
instead (flattened indices ``0, s, 2s, ...``, ``s = numel // drift_max_elements``, the first
``drift_max_elements`` of them), for both the previous and the current :math:`\hat v`: its
``v_drift`` is then an estimate on that subsample. ``v_log_ratio`` keeps only the previous
mean (one scalar), so it is exact on the full tensor. :meth:`MomentStats.reference_bytes`
says how much is held.

Embedding geometry (:meth:`MomentStats.embedding_stats`), after Stollenwerk & Stollenwerk
(2025), "Better Embeddings with Coupled Adam", arXiv:2502.08441, for :math:`E \in
\mathbb{R}^{V \times H}` with token embeddings :math:`e_i` as rows: ``mean_norm``
:math:`\|\mu\|`, :math:`\mu = \frac1V\sum_i e_i`; ``mean_ratio`` :math:`\|\mu\| /
\frac1V\sum_i\|e_i\|` (1 when all rows are equal, 0 when they cancel); ``isotropy``
:math:`\min_c Z(c) / \max_c Z(c)`, :math:`Z(c) = \sum_i \exp(c^\top e_i)`, c over the
eigenvectors of :math:`E^\top E` (Mu & Viswanath 2018, "All-but-the-top"), computed as
:math:`\exp(\min_c \log Z - \max_c \log Z)` with ``logsumexp``; near 1 for an isotropic
cloud, near 0 when the embeddings share a common direction. Isotropy costs an H x H
``torch.linalg.eigh`` (in fp64) and a V x H x H product: call it rarely. On CUDA,
``torch.linalg.eigh`` checks cuSOLVER's error flag, which synchronizes the device once per
embedding: the one sync in this module, and only with ``isotropy=True``.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from . import rules, sharding
from .validation import at_least, choice, invalid

__all__ = ["STATS", "EMBEDDING_STATS", "MomentStats", "embedding_geometry"]

STATS: tuple[str, ...] = (
    "grad_norm", "param_norm", "update_ratio", "exp_avg_norm", "sqrt_v_mean", "sqrt_v_max",
    "v_drift", "v_log_ratio", "snr", "dead_fraction",
)
EMBEDDING_STATS: tuple[str, ...] = ("mean_norm", "mean_ratio", "isotropy")

OWNER = "MomentStats"
_CHUNK_ELEMENTS = 1 << 26  # temporaries per batched reduction: at most this many elements
_V_STATS = ("sqrt_v_mean", "sqrt_v_max", "v_drift", "v_log_ratio", "dead_fraction")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tensor(value: Any) -> Tensor | None:
    return value if isinstance(value, Tensor) else None


def _host_vector(values: list, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Python numbers -> a 1-D tensor on ``device``, copied without waiting for the device."""
    return torch.tensor(values, dtype=dtype).to(device=device, non_blocking=True)


def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    t = t.detach()
    return t if t.dtype == dtype else t.to(dtype)


def _subsample(t: Tensor, k: int) -> Tensor:
    """The first ``k`` of every ``numel // k``-th element (all of ``t`` when it is small)."""
    flat = t.reshape(-1)
    n = flat.numel()
    if n <= k:
        return flat
    return flat[:: n // k][:k]


def _global(whole: list[Tensor], values: Tensor | list[Tensor], p: float) -> Tensor:
    """Per-tensor reductions of local shards (p-norms; p=1 for sums of nonnegative values,
    inf for maxima) -> the reductions of the whole tensors, stacked: see
    :func:`lightning_optim.sharding.global_norms_`. Plain tensors come back unchanged."""
    values = list(values.unbind(0)) if isinstance(values, Tensor) else list(values)
    sharding.global_norms_(whole, values, p)
    return torch.stack(values)


def _chunks(items: list, size: Any) -> Iterator[list]:
    """Split ``items`` into runs whose ``size(item)`` sum to at most _CHUNK_ELEMENTS."""
    run, total = [], 0
    for item in items:
        n = size(item)
        if run and total + n > _CHUNK_ELEMENTS:
            yield run
            run, total = [], 0
        run.append(item)
        total += n
    if run:
        yield run


class _Item:
    """One tracked tensor at one call: its param, group and the state tensors we read."""

    __slots__ = ("name", "param", "group", "m", "v", "whole_param", "whole_m", "whole_v",
                 "m_corrected", "v_corrected", "step", "eps", "scale", "c1", "c2")

    def __init__(self, name: str, param: Tensor, group: dict, state: Mapping, spec: rules.RuleSpec | None) -> None:
        self.name, self.group = name, group
        m = v = None
        if spec is not None:
            m = _tensor(state.get(spec.first_moment)) if spec.first_moment else None
            v = _tensor(state.get(spec.second_moment)) if spec.second_moment else None
        # Reductions run on the local shards of sharded tensors; ``whole_*`` finish them.
        self.whole_param, self.whole_m, self.whole_v = param, m, v
        self.param = sharding.local(param)
        self.m = None if m is None else sharding.local(m)
        self.v = None if v is None else sharding.local(v)
        corrected = spec is not None and spec.bias_corrected and "betas" in group
        corrected = corrected and bool(group.get("bias_correction", True))
        step = state.get("step")
        corrected = corrected and step is not None
        self.m_corrected = corrected and m is not None
        self.v_corrected = corrected and self.v is not None
        self.step = step
        self.eps = float(group.get("eps", 1e-8))
        self.scale = float(group.get("coupling_scale", 1.0)) if group.get("coupled", False) else 1.0
        self.c1: Tensor | None = None  # 1 / (1 - beta1^t) or 1, a 0-d tensor on the device
        self.c2: Tensor | None = None


class MomentStats:
    """Per-parameter statistics of an optimizer's moments (see the module docstring).

    Args:
        optimizer: a ``torch.optim.Optimizer`` (lightning_optim's or torch's).
        stats: which of :data:`STATS` to compute.
        include: ``fnmatch`` globs on parameter names; a parameter is tracked when it matches
            one of them and no ``exclude`` pattern. Every pattern must match some parameter.
        exclude: ``fnmatch`` globs of parameters not tracked.
        drift_max_elements: above this many second-moment elements, ``v_drift`` is estimated
            on a fixed strided subsample of that many coordinates.

    Call :meth:`before_step` before clipping and the optimizer step, :meth:`after_step` after
    the step; both only queue device work. The tracked parameters are resolved by name at
    each call, so a ``load_state_dict`` (which replaces torch's group dicts) is followed.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        stats: Iterable[str] = STATS,
        include: Iterable[str] | str = ("*",),
        exclude: Iterable[str] | str = (),
        drift_max_elements: int = 1 << 20,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise invalid(OWNER, "optimizer", optimizer, "must be a torch.optim.Optimizer")
        self.optimizer = optimizer
        if isinstance(stats, str):
            stats = (stats,)
        try:
            stats = tuple(stats)
        except TypeError:
            raise invalid(OWNER, "stats", stats, f"must be a list of names from {', '.join(STATS)}") from None
        for s in stats:
            choice(OWNER, "stats", s, STATS)
        self.stats = tuple(s for s in STATS if s in stats)  # canonical order, no duplicates
        if isinstance(drift_max_elements, bool) or not isinstance(drift_max_elements, int):
            raise invalid(OWNER, "drift_max_elements", drift_max_elements, "must be an integer >= 1")
        self.drift_max_elements = int(at_least(OWNER, "drift_max_elements", drift_max_elements, 1))
        self.include = self._patterns("include", include)
        self.exclude = self._patterns("exclude", exclude)
        if not self.include:
            raise invalid(OWNER, "include", include, "must hold at least one pattern (\"*\" for all)")

        names = [name for name, _, _ in self._walk()]
        seen: set[str] = set()
        duplicates = sorted({n for n in names if n in seen or seen.add(n)})
        if duplicates:
            raise invalid(OWNER, "optimizer", type(optimizer).__name__,
                          f"has several parameters named {', '.join(map(repr, duplicates[:5]))}: "
                          "give each group a distinct 'name' or distinct 'param_names'")
        for field, patterns in (("include", self.include), ("exclude", self.exclude)):
            for pat in patterns:
                if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                    more = f", ... ({len(names)} in all)" if len(names) > 10 else ""
                    raise invalid(OWNER, field, pat, "matches no parameter; parameters: "
                                  f"{', '.join(map(repr, names[:10]))}{more}")
        self._names = {n for n in names if self._wanted(n)}

        self._grad_norms: dict[str, Tensor] | None = None  # from before_step
        self._snapshots: dict[str, tuple[Tensor, Tensor]] = {}  # name -> (p copy, ||p||)
        self._prev_v: dict[str, Tensor] = {}  # name -> previous v_hat (or its subsample)
        self._prev_mean: dict[str, Tensor] = {}  # name -> previous mean(v_hat), 0-d

    # ----- which tensors ----------------------------------------------------------------------

    @staticmethod
    def _patterns(field: str, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = (value,)
        try:
            value = tuple(value)
        except TypeError:
            raise invalid(OWNER, field, value, "must be a glob or a list of globs") from None
        for pat in value:
            if not isinstance(pat, str):
                raise invalid(OWNER, field, pat, "must be a glob string")
        return value

    def _wanted(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.include) and not any(
            fnmatch.fnmatchcase(name, p) for p in self.exclude
        )

    def _walk(self) -> Iterator[tuple[str, Tensor, dict]]:
        unnamed = 0
        for group in self.optimizer.param_groups:
            if "name" in group:
                gname = str(group["name"])
            else:
                gname, unnamed = f"group{unnamed}", unnamed + 1
            pnames = group.get("param_names")
            for i, p in enumerate(group["params"]):
                yield (str(pnames[i]) if pnames else f"{gname}.{i}"), p, group

    def tracked(self) -> list[tuple[str, Tensor, dict]]:
        """``(name, param, group)`` of the monitored parameters, in the optimizer's order."""
        return [(n, p, g) for n, p, g in self._walk() if n in self._names]

    def _items(self) -> list[_Item]:
        state = self.optimizer.state
        return [_Item(n, p, g, state.get(p, {}), self._spec(g)) for n, p, g in self.tracked()]

    def _spec(self, group: dict) -> rules.RuleSpec | None:
        """The rule of ``group`` in the rule table: our optimizers say it; a ``torch.optim``
        one is looked up by its class (:func:`lightning_optim.rules.for_torch`)."""
        spec_for = getattr(self.optimizer, "spec_for", None)
        if spec_for is not None:
            return spec_for(group)
        return rules.for_torch(type(self.optimizer).__name__)

    @staticmethod
    def _buckets(items: Iterable[Any], tensor: Any = lambda it: it.param) -> dict[tuple, list]:
        out: dict[tuple, list] = {}
        for it in items:
            t = tensor(it)
            out.setdefault((t.device, t.dtype), []).append(it)
        return out

    # ----- before / after the step ----------------------------------------------------------

    @torch.no_grad()
    def before_step(self, *, update_ratio: bool = True) -> None:
        """Snapshot the gradient norms (call before clipping) and, when ``update_ratio`` is
        asked (here and in ``stats``), a copy of the monitored params. Queues device work only."""
        tracked = self.tracked()
        self._grad_norms = self._grad_norm(tracked) if "grad_norm" in self.stats else None
        self._snapshots = {}
        if not (update_ratio and "update_ratio" in self.stats):
            return
        for (_, dtype), bucket in self._buckets(tracked, lambda t: t[1]).items():
            cd = _compute_dtype(dtype)
            params = [sharding.local(p.detach()) for _, p, _ in bucket]
            copies = [torch.empty_like(p, dtype=cd) for p in params]
            torch._foreach_copy_(copies, params)
            norms = _global([p for _, p, _ in bucket], torch._foreach_norm(params, 2, dtype=cd), 2).unbind(0)
            for (name, _, _), copy, norm in zip(bucket, copies, norms):
                self._snapshots[name] = (copy, norm)

    @staticmethod
    def _grad_norm(tracked: list[tuple[str, Tensor, dict]]) -> dict[str, Tensor]:
        with_grad = [(n, p.grad) for n, p, _ in tracked if p.grad is not None and not p.grad.is_sparse]
        out: dict[str, Tensor] = {}
        for (_, dtype), bucket in MomentStats._buckets(with_grad, lambda t: t[1]).items():
            norms = torch._foreach_norm([sharding.local(g.detach()) for _, g in bucket], 2, dtype=_compute_dtype(dtype))
            out.update(zip((n for n, _ in bucket), _global([g for _, g in bucket], norms, 2).unbind(0)))
        return out

    @torch.no_grad()
    def after_step(self) -> dict[str, Tensor]:
        """``{"optim/<stat>/<name>": 0-d tensor}`` on each param's device; updates the drift
        references and frees the param snapshot. Queues device work only.

        Values of one (device, dtype) bucket are views of one small vector, so a logger reads
        them all with one sync: ``torch.stack(list(values)).tolist()``."""
        want = set(self.stats)
        items = self._items()
        per: dict[str, dict[str, Tensor]] = {s: {} for s in self.stats}

        if "grad_norm" in want:
            grads = self._grad_norms if self._grad_norms is not None else self._grad_norm(self.tracked())
            per["grad_norm"] = {it.name: grads[it.name] for it in items if it.name in grads}
        snapshots, self._snapshots, self._grad_norms = self._snapshots, {}, None

        for (device, dtype), bucket in self._buckets(items).items():
            cd = _compute_dtype(dtype)
            params = [it.param.detach() for it in bucket]
            if "param_norm" in want:
                norms = _global([it.whole_param for it in bucket], torch._foreach_norm(params, 2, dtype=cd), 2).unbind(0)
                per["param_norm"].update(zip((it.name for it in bucket), norms))
            snap = [it for it in bucket if it.name in snapshots]
            if "update_ratio" in want and snap:
                before = [snapshots[it.name][0] for it in snap]
                torch._foreach_sub_(before, [it.param.detach() for it in snap])  # p_before - p_after
                moved = _global([it.whole_param for it in snap], torch._foreach_norm(before, 2), 2)
                start = torch.stack([snapshots[it.name][1] for it in snap])
                # A tensor that starts at zero (a LayerNorm bias) has no relative change on its
                # first step: measure it against where it ended instead; 0 if it stayed at 0.
                after = _global([it.whole_param for it in snap],
                                torch._foreach_norm(params if len(snap) == len(bucket) else
                                                    [it.param.detach() for it in snap], 2, dtype=cd), 2)
                denom = torch.where(start > 0, start, after)
                ratio = torch.where(denom > 0, moved / denom.clamp_min(torch.finfo(denom.dtype).tiny), torch.zeros_like(moved))
                per["update_ratio"].update(zip((it.name for it in snap), ratio.unbind(0)))
                del before
            self._corrections([it for it in bucket if it.m is not None or it.v is not None], device, cd)
            self._m_stats([it for it in bucket if it.m is not None], cd, want, per)
            for chunk in _chunks([it for it in bucket if it.v is not None],
                                 lambda it: it.v.numel() + (it.m.numel() if it.m is not None else 0)):
                self._v_stats(chunk, device, cd, want, per)
        return {f"optim/{s}/{name}": value for s in self.stats for name, value in per[s].items()}

    # ----- the moments ------------------------------------------------------------------------

    @staticmethod
    def _corrections(items: list[_Item], device: torch.device, cd: torch.dtype) -> None:
        """Set ``it.c1``/``it.c2``: 1 / (1 - beta^t), or 1, as 0-d tensors on ``device``.

        The step tensors are stacked where they live (the CPU, for torch's format) and the
        arithmetic is done there as tensor ops: no value is read by the host."""
        if not items:
            return
        steps = []
        for it in items:
            s = it.step
            if isinstance(s, Tensor):
                steps.append(s.detach().reshape(()))
            else:  # absent (SGD), or a Python number (old torch state dicts)
                steps.append(torch.tensor(1.0 if s is None else s, dtype=torch.float64))
        where = steps[0].device
        if any(s.device != where for s in steps):
            where = device
        wd = torch.float32 if where.type == "mps" else torch.float64
        t = torch.stack([s.to(device=where, dtype=wd, non_blocking=True) for s in steps])
        b1 = [float(it.group["betas"][0]) if it.m_corrected else 0.0 for it in items]
        b2 = [float(it.group["betas"][1]) if it.v_corrected else 0.0 for it in items]
        flags = _host_vector([[it.m_corrected, it.v_corrected] for it in items], where, torch.bool)
        betas = _host_vector([list(b) for b in zip(b1, b2)], where, wd)
        factors = torch.where(flags, 1.0 / (1.0 - torch.pow(betas, t.unsqueeze(1))), 1.0)
        c1, c2 = factors.to(device=device, dtype=cd, non_blocking=True).unbind(1)
        for it, a, b in zip(items, c1.unbind(0), c2.unbind(0)):
            it.c1, it.c2 = a, b

    @staticmethod
    def _m_stats(items: list[_Item], cd: torch.dtype, want: set, per: dict) -> None:
        if not items or "exp_avg_norm" not in want:
            return
        norms = _global([it.whole_m for it in items], torch._foreach_norm([it.m.detach() for it in items], 2, dtype=cd), 2)
        norms = norms * torch.stack([it.c1 for it in items])
        per["exp_avg_norm"].update(zip((it.name for it in items), norms.unbind(0)))

    def _v_hat(self, items: list[_Item], cd: torch.dtype) -> list[Tensor]:
        """Fresh ``v_hat`` tensors (never the state itself)."""
        return torch._foreach_mul([_to(it.v, cd) for it in items], [it.c2 for it in items])

    def _v_stats(
        self, items: list[_Item], device: torch.device, cd: torch.dtype, want: set, per: dict
    ) -> None:
        if not (want & {*_V_STATS, "snr"}):
            return
        names = [it.name for it in items]
        whole_v = [it.whole_v for it in items]
        numel = _host_vector([it.whole_v.numel() for it in items], device, cd)
        vh = self._v_hat(items, cd)

        if "v_log_ratio" in want:
            mean = _global(whole_v, torch._foreach_norm(vh, 1), 1) / numel  # v >= 0: L1 = sum
            for name, m in zip(names, mean.unbind(0)):
                prev = self._prev_mean.get(name)
                if prev is not None and prev.device == m.device:
                    per["v_log_ratio"][name] = torch.log(m / prev)
                self._prev_mean[name] = m
        if "v_drift" in want:
            self._drift(names, whole_v, vh, per["v_drift"])

        torch._foreach_sqrt_(vh)  # vh is now sqrt(v_hat)
        if "sqrt_v_mean" in want:
            mean = _global(whole_v, torch._foreach_norm(vh, 1), 1) / numel
            per["sqrt_v_mean"].update(zip(names, mean.unbind(0)))
        if "sqrt_v_max" in want:
            # sqrt(v_hat) >= 0, so its max is its inf-norm; _foreach_max is ~10x faster on CPU
            # (one reduction, no abs), but refuses empty tensors.
            if all(t.numel() for t in vh):
                peak = torch._foreach_max(vh)
            else:
                peak = torch._foreach_norm(vh, math.inf)
            per["sqrt_v_max"].update(zip(names, _global(whole_v, [t.to(cd) for t in peak], math.inf).unbind(0)))
        if "dead_fraction" in want:
            dead = _global(whole_v, [torch.lt(s, it.eps).sum(dtype=cd) for s, it in zip(vh, items)], 1) / numel
            per["dead_fraction"].update(zip(names, dead.unbind(0)))

        pairs = [(it, s) for it, s in zip(items, vh) if it.m is not None]
        if "snr" in want and pairs:
            den = [s for _, s in pairs]
            if any(it.scale != 1.0 for it, _ in pairs):
                torch._foreach_mul_(den, [math.sqrt(it.scale) for it, _ in pairs])
            torch._foreach_add_(den, [it.eps for it, _ in pairs])  # sqrt(c v_hat) + eps
            ratio = torch._foreach_div([_to(it.m, cd) for it, _ in pairs], den)  # broadcasts a coupled row
            total = _global([it.whole_m for it, _ in pairs], torch._foreach_norm(ratio, 1), 1)
            del ratio
            m_numel = _host_vector([it.whole_m.numel() for it, _ in pairs], device, cd)
            snr = total / m_numel * torch.stack([it.c1 for it, _ in pairs])
            per["snr"].update(zip((it.name for it, _ in pairs), snr.unbind(0)))

    def _drift(self, names: list[str], whole: list[Tensor], vh: list[Tensor], out: dict[str, Tensor]) -> None:
        k = self.drift_max_elements
        current = [_subsample(v, k) for v in vh]
        old = [(n, c, w) for n, c, w in zip(names, current, whole)
               if (p := self._prev_v.get(n)) is not None and p.shape == c.shape
               and p.device == c.device and p.dtype == c.dtype]
        if old:
            prev = [self._prev_v[n] for n, _, _ in old]
            cur = [c for _, c, _ in old]
            shards = [w for _, _, w in old]  # a sharded v: the subsamples of all shards together
            moved = _global(shards, torch._foreach_norm(torch._foreach_sub(cur, prev), 2), 2)
            drift = moved / _global(shards, torch._foreach_norm(prev, 2), 2)
            out.update(zip((n for n, _, _ in old), drift.unbind(0)))
            torch._foreach_copy_(prev, cur)  # the reference buffers are reused: no new memory
        known = {n for n, _, _ in old}
        for n, c in zip(names, current):
            if n not in known:
                self._prev_v[n] = c.clone(memory_format=torch.contiguous_format)

    @torch.no_grad()
    def sqrt_v(self) -> dict[str, Tensor]:
        """``name -> sqrt(v_hat)`` (shape of the state's ``v``: one row for coupled tensors),
        fresh detached tensors for histograms. Queues device work only."""
        out: dict[str, Tensor] = {}
        items = [it for it in self._items() if it.v is not None]
        for (device, dtype), bucket in self._buckets(items).items():
            cd = _compute_dtype(dtype)
            self._corrections(bucket, device, cd)
            for chunk in _chunks(bucket, lambda it: it.v.numel()):
                vh = self._v_hat(chunk, cd)
                torch._foreach_sqrt_(vh)
                out.update(zip((it.name for it in chunk), vh))
        return out

    # ----- embeddings ---------------------------------------------------------------------------

    @torch.no_grad()
    def embedding_stats(self, params: Mapping[str, Tensor], *, isotropy: bool = True) -> dict[str, Tensor]:
        """``{"embedding/<stat>/<name>": 0-d tensor}`` for 2-D tensors (rows = tokens).

        ``isotropy`` is the expensive one (and on CUDA syncs once, inside ``linalg.eigh``)."""
        if not isinstance(params, Mapping):
            raise invalid(OWNER, "params", params, "must be a mapping name -> 2-D tensor")
        out: dict[str, Tensor] = {}
        for name, e in params.items():
            if not isinstance(e, Tensor) or e.dim() != 2:
                what = list(e.shape) if isinstance(e, Tensor) else type(e).__name__
                raise invalid(OWNER, f"params[{name!r}]", what, "must be a 2-D tensor (vocabulary x hidden)")
            for stat, value in embedding_geometry(e, isotropy=isotropy).items():
                out[f"embedding/{stat}/{name}"] = value
        return out

    # ----- memory and checkpoints -------------------------------------------------------------

    def reference_bytes(self) -> int:
        """Bytes held between calls for ``v_drift`` and ``v_log_ratio``."""
        return sum(t.numel() * t.element_size() for t in (*self._prev_v.values(), *self._prev_mean.values()))

    def state_dict(self) -> dict[str, Any]:
        """The drift references (copies), so a resumed run's first ``v_drift`` is not lost."""
        return {"prev_v": {n: t.clone() for n, t in self._prev_v.items()},
                "prev_mean": {n: t.clone() for n, t in self._prev_mean.items()},
                "drift_max_elements": self.drift_max_elements}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        devices = {n: p.device for n, p, _ in self.tracked()}
        # A sharded tensor's drift reference is one rank's subsample (a checkpoint holds rank
        # zero's), not another rank's: leave it out, on every rank alike, so the first drift
        # after a resume is absent everywhere rather than computed from the wrong shard.
        sharded = {n for n, p, _ in self.tracked() if sharding.shard_groups(p)}
        for key, target in (("prev_v", self._prev_v), ("prev_mean", self._prev_mean)):
            target.clear()
            for n, t in state.get(key, {}).items():
                if n in devices and not (key == "prev_v" and n in sharded):
                    target[n] = t.detach().to(devices[n], non_blocking=True).clone()
        if state.get("drift_max_elements", self.drift_max_elements) != self.drift_max_elements:
            self._prev_v.clear()  # another subsample: not comparable


def embedding_geometry(e: Tensor, *, isotropy: bool = True) -> dict[str, Tensor]:
    """``mean_norm``, ``mean_ratio`` and (optionally) ``isotropy`` of ``e`` (V x H), as 0-d
    tensors on its device: see the module docstring.

    Every quantity is a sum over the rows (of e_i, of ||e_i||, of e_i e_i^T, of exp(c^T e_i)),
    so a row-sharded ``e`` (FSDP2 ``Shard(0)``) gives the global values: each rank sums its
    rows and :class:`lightning_optim.sharding.Rows` adds the shards (a collective: call it on
    every rank)."""
    rows = sharding.Rows(e)
    cd = _compute_dtype(e.dtype)
    x = _to(rows.local, cd)
    mu = rows.sum_(x.sum(0)) / rows.count
    mean_norm = torch.linalg.vector_norm(mu)
    mean_row_norm = rows.sum_(torch.linalg.vector_norm(x, dim=1).sum()) / rows.count
    out = {"mean_norm": mean_norm, "mean_ratio": mean_norm / mean_row_norm}
    if isotropy:
        wd = torch.float32 if x.device.type == "mps" else torch.float64
        gram = rows.sum_((x.T @ x).to(wd))
        _, vectors = torch.linalg.eigh(gram)  # columns: eigenvectors of E^T E
        log_z = rows.logsumexp(torch.logsumexp(x @ vectors.to(cd), dim=0))  # log Z(c) per eigenvector c
        out["isotropy"] = torch.exp(log_z.min() - log_z.max())
    return out
