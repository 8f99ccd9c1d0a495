"""Gathering a param group's tensors into (device, dtype) buckets: what one backend call takes.

A bucket is a :class:`~lightning_optim.backends.Bucket`: params, grads, the state lists by
key, the step tensors, and the params as the user holds them. This runs for every param and
step: on the triton backend its Python is most of the host time of a step, so the common
case (:func:`uniform`) is gathered with C-level ``map`` over the whole group, and only the
rest takes the general per-param loop (:func:`gather`). Both give the same bucket.
"""

from __future__ import annotations

import operator
from itertools import repeat
from typing import TYPE_CHECKING, Any

from torch import Tensor
import torch

from .. import backends, sharding
from ..backends import Bucket
from .tensors import LOW_PRECISION, SCALAR_KEYS, real, scalar

if TYPE_CHECKING:
    from .base import Optimizer

_GRAD = operator.attrgetter("grad")
_IS_SPARSE = operator.attrgetter("is_sparse")
_DEVICE = operator.attrgetter("device")
_DTYPE = operator.attrgetter("dtype")
_PLAIN_TYPES = {Tensor, torch.nn.Parameter}


def uniform(optimizer: Optimizer, group: dict[str, Any], keys: tuple[str, ...],
            on_device: bool) -> dict[tuple, Bucket] | None:
    """The common case, gathered with C-level ``map`` over the whole group instead of a
    Python loop per param: every param has a dense gradient and its state already, all
    share one device and dtype, none is sharded, master copies are there exactly as the
    group asks, and (``on_device``: a backend that counts steps on the device) the step
    counts are on that device. None otherwise: then :func:`gather` does the general work
    (creating state and masters, placing step counts, unwrapping DTensor shards, the errors)."""
    params = group["params"]
    if not params:
        return None
    grads = list(map(_GRAD, params))
    if any(map(operator.is_, grads, repeat(None))) or any(map(_IS_SPARSE, grads)):
        return None
    # Exact types: a DTensor (or any other tensor subclass) takes the general path.
    if not set(map(type, params)) <= _PLAIN_TYPES:
        return None
    devices, dtypes = set(map(_DEVICE, params)), set(map(_DTYPE, params))
    states = list(map(optimizer.state.get, params))
    if len(devices) != 1 or len(dtypes) != 1 or not all(states):
        return None
    (device,), (dtype,) = devices, dtypes
    if dtype.is_complex:  # real views: the general path
        return None
    wants = bool(group.get("master_weights", False)) and dtype in LOW_PRECISION
    has = list(map(operator.contains, states, repeat("master_param")))
    if not (all(has) if wants else not any(has)):
        return None
    names = ("step", *keys, "master_param") if wants else ("step", *keys)
    try:
        steps, *slots = (list(map(operator.itemgetter(k), states)) for k in names)
    except KeyError:  # state set from elsewhere without a key this rule reads
        return None
    if on_device:
        scalars = [steps] + [slot for k, slot in zip(names[1:], slots) if k in SCALAR_KEYS]
        if any(set(map(_DEVICE, slot)) != devices for slot in scalars):
            return None
    params = list(params)
    return {(device, dtype): Bucket(params, grads, dict(zip(names[1:], slots)), steps, params)}


def gather(optimizer: Optimizer, group: dict[str, Any], keys: tuple[str, ...], on_device: bool) -> dict[tuple, Bucket]:
    """Every param of ``group`` that has a gradient, by (device, dtype): creates missing
    state, keeps master copies as the group asks, puts step counts where the backend
    reads them, and unwraps sharded params to their local shards."""
    masters = bool(group.get("master_weights", False))
    buckets: dict[tuple, Bucket] = {}
    opt = optimizer
    for i, p in enumerate(group["params"]):
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            raise RuntimeError(
                f"{opt._owner} does not support sparse gradients, but {opt._param_name(group, i)} "
                "has one: build its module with sparse=False"
            )
        if p.is_complex():
            opt._check_complex(p, group, i)
        state = opt.state[p]
        if not state:
            state.update(opt._init_state(p, group))
            state["step"] = scalar()
        if on_device and state["step"].device != p.device:
            opt._scalars_to(state, p.device)
        # The same for every param of a bucket: one group, one dtype.
        master = (masters or "master_param" in state) and opt._sync_master(p, state, group)
        # Complex params (and their complex state) go in as real views, in the bucket of
        # the real dtype: the rules are elementwise on (re, im) pairs, as torch applies
        # them (its Adam, Adagrad, RMSprop, NAdam, RAdam view_as_real everything; its SGD
        # is linear, the same on the view), so every backend stays a real-valued rule.
        key = (p.device, backends.real_dtype(p.dtype))
        bucket = buckets.get(key)
        if bucket is None:
            slots = (*keys, "master_param") if master else keys
            bucket = buckets[key] = Bucket([], [], {k: [] for k in slots}, [], [])
        # Sharded (DTensor) params are updated through their local shards: the rules
        # are elementwise, and the one that is not gets the row-mean hook in step.
        if sharding.is_dtensor(p):
            bucket.params.append(real(sharding.local(p)))
            bucket.grads.append(real(sharding.local(g)))
            for k, values in bucket.state.items():
                values.append(real(sharding.local(state[k])))
        else:
            bucket.params.append(real(p))
            bucket.grads.append(real(g.resolve_conj()) if g.is_complex() else g)
            for k, values in bucket.state.items():
                values.append(real(state[k]))
        bucket.steps.append(state["step"])
        bucket.originals.append(p)
    return buckets
