"""What every optimizer shares: validation, state, bucketing and backend dispatch. No math.

A rule class says four things: its ``rule`` (the name of its function in every backend),
``_validate`` (hyperparameter checks), ``_state_keys`` and ``_init_state`` (its state, with
torch's key names). This class does the rest, the same way for all of them:

1. ``step`` gathers the parameters that have a gradient into buckets by (device, dtype),
   creating state lazily, and counts each parameter's ``step`` (a CPU float32 tensor, as
   torch keeps it, so reading it never syncs a GPU; on the triton backend a float32 0-d
   tensor on the param's device, as torch keeps it with ``fused=True``/``capturable=True``,
   counted and read on the device only: see "Device step counts" below);
2. the resolved backend updates each bucket;
3. ``load_state_dict`` checks the shapes of what it loads, keeps fp32 state for bf16/fp16
   params (torch would cast it down to the param dtype), and fills options a torch
   state dict does not carry.

State of bf16/fp16 params is fp32: an EMA with beta2 = 0.999 moves by 0.1% a step,
below bf16's resolution (0.4%), so low-precision moments would stop moving.

Master weights (the group option ``master_weights``, every optimizer has it): a bf16/fp16
param of such a group also gets ``state["master_param"]``, an fp32 copy. Its buckets pass
that list to the backend as one more state list; the backend updates the master with fp32
math and writes the param as its rounding (one rounding per step, never accumulated), so
updates below half an ulp of the weight add up in the master instead of rounding away.
fp32/fp64 params never get one: for them the option does nothing. The master is this
optimizer's setting, not the state dict's: ``load_state_dict`` keeps each group's
``master_weights`` as this optimizer has it, creates a missing master from the loaded
param (warning once) and drops one that is not wanted (warning once).

Device step counts (the triton backend). ``state["step"]`` and NAdam's ``state["mu_product"]``
live on the param's device (created there lazily; ``load_state_dict`` puts loaded ones there,
so torch's fused/capturable state dicts load either way). A step never reads them on the
host: the triton step prologue kernel adds 1 to them on the device and computes the
step-dependent factors from them. That, with AMP's ``grad_scale``/``found_inf`` taken on the device, leaves
no per-step host value in the step, so it can be captured in a CUDA graph. AMP:
``_step_supports_amp_scaling`` is True on the triton backend, so ``torch.amp.GradScaler.step``
sets ``grad_scale`` (None when already unscaled) and ``found_inf`` on the optimizer and calls
``step``: the kernel divides the gradients by ``grad_scale`` (times any ``scale_next_step``
coefficient), and a set ``found_inf`` makes the launch a no-op and does not count the step
(as torch's fused Adam), leaving ``mu_product`` as it was.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Iterable
from itertools import chain, repeat
from typing import Any

import torch
from torch import Tensor

from .. import backends, sharding
from ..validation import ConfigurationError, LightningOptimWarning, at_least, boolean, learning_rate

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Scalar state that stays a CPU float32 tensor whatever the param: torch's format.
_SCALAR_KEYS = ("step", "mu_product")
_GRAD = operator.attrgetter("grad")
_IS_SPARSE = operator.attrgetter("is_sparse")
_DEVICE = operator.attrgetter("device")
_DTYPE = operator.attrgetter("dtype")
_PLAIN_TYPES = {Tensor, torch.nn.Parameter}


def state_dtype(p: Tensor) -> torch.dtype:
    """The dtype the moments of ``p`` are kept in: fp32 for bf16/fp16 params."""
    return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype


def zeros(p: Tensor, fill: float = 0.0) -> Tensor:
    """State like ``p``, every element ``fill``. A complex ``p``'s state is complex, and its
    real view (what the rule reads) is ``fill`` in both parts, as torch starts Adagrad's sum."""
    if p.is_complex() and fill != 0:
        fill = complex(fill, fill)
    return torch.full_like(p, fill, dtype=state_dtype(p), memory_format=torch.preserve_format)


def _real(t: Tensor) -> Tensor:
    """The real view (``torch.view_as_real``: a trailing dim of 2) of a complex tensor, else
    ``t`` itself."""
    return torch.view_as_real(t) if t.is_complex() else t


def scalar(value: float = 0.0) -> Tensor:
    return torch.tensor(value, dtype=torch.float32)


class Optimizer(torch.optim.Optimizer):
    """Base class of the lightning_optim optimizers (a ``torch.optim.Optimizer``).

    Args:
        params: tensors, ``(name, tensor)`` pairs, or param-group dicts, as torch takes them.
        defaults: the hyperparameters, validated by the subclass's ``_validate``.
        backend: ``"auto"`` (triton for CUDA params when Triton is installed and its kernels
            pass a one-time check on the device, else foreach on every device torch
            supports), ``"reference"``, ``"foreach"`` or ``"triton"``. Resolved once, here;
            see :mod:`..backends`.
        foreach, fused, capturable, differentiable: torch's keywords, so code written for
            ``torch.optim`` runs unchanged: they choose the backend (``foreach=True``:
            foreach, ``False``: reference; ``fused=True``: triton where it runs, else foreach
            with a warning; ``capturable=True``: device step counts, which triton has);
            ``differentiable=True`` raises. Not group options: :mod:`..backends` has the map.

    Complex parameters (complex64, complex128) are updated as their real views
    (``torch.view_as_real``: the (re, im) pairs as a trailing dim of 2), on every backend,
    with complex state like the param's, as torch does for SGD, Adagrad, RMSprop, Adam(W),
    NAdam and RAdam, so state dicts move between the two; Lion and Yogi follow the same
    convention. The view is taken once, when the step gathers its buckets (a complex64 param
    joins the float32 bucket), so every backend stays a real-valued rule. Refused, with a
    ValueError naming the parameter: complex32, and a complex tensor in a coupled group of
    CoupledAdam. Against torch: 1e-6 relative, as torch does a few ops (all of SGD's, the L2
    term of others) in complex arithmetic, which rounds by an ulp unlike the real view.

    ``lr`` may be a float or, as in torch, a one-element floating-point tensor. A tensor lr
    keeps its identity (schedulers ``fill_`` it in place; ``load_state_dict`` copies the
    saved value into it). The triton backend reads it on the device at every launch, so a
    step captured in a CUDA graph follows a changing lr; the other backends read it on the
    host once per group and step.

    Every rule class also takes ``master_weights: bool = False``, a group option (param
    groups may set it each their own way): keep an fp32 master copy of every bf16/fp16
    param, ``state["master_param"]``, update the master and write the param as its rounding.
    Why: bf16 keeps 8 significant bits, so an update smaller than half an ulp of the weight
    (always so when ``|lr * u| < 2^-9 |p|``) rounds away and the weight stops moving: lr 1e-4 with
    Adam's steps of about one unit, on weights of size ~0.1, is lost entirely; an fp32
    master adds these updates up (Micikevicius et al. 2018, "Mixed Precision Training",
    ICLR, Sec. 3.1). Cost: 4 more bytes of state per param (on the triton backend also
    6 more bytes moved per bf16 param and step: the fp32 master read and written, 8, instead
    of the param read, 2). For fp32/fp64 params the option does nothing.
    """

    rule: str = ""
    couples: bool = False  # only CoupledAdam reads a group's ``coupled`` option
    # Group options that decide the shape of the state: a state dict must agree on them, as
    # it would otherwise silently change what the group does (torch lets saved options win).
    structural: tuple[str, ...] = ()

    def __init__(self, params: Any, defaults: dict[str, Any], backend: str = "auto", *,
                 foreach: bool | None = None, fused: bool | None = None, capturable: bool = False,
                 differentiable: bool = False) -> None:
        self._owner = type(self).__name__
        self._warned: set[str] = set()
        self._next_transforms: dict[int, tuple[Tensor | None, float | None]] = {}
        defaults = self._validate(dict(defaults), self._owner)
        super().__init__(params, defaults)
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        # torch's keywords only pick the backend (see lightning_optim.backends); they are not
        # group options, so state dicts carry none of them.
        backend, note = backends.from_torch_keywords(
            self._owner, backend, params, foreach=foreach, fused=fused, capturable=capturable,
            differentiable=differentiable, torch_name=self._owner if hasattr(torch.optim, self._owner) else None)
        self.backend = backends.resolve(self._owner, backend, params)
        self._run = backends.runner(self.backend)
        if note is None and capturable:
            note = backends.capturable_warning(self._owner, self.backend, params)
        if note is not None:
            self._warn_once("torch_keywords", note)
        # auto's triton is trusted only after the kernels pass their check on this device.
        self._auto_triton = backend == "auto" and self.backend == "triton"
        self._check_auto_triton(self.param_groups)

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """GradScaler's protocol: the triton step takes ``grad_scale``/``found_inf`` itself."""
        return self._device_steps

    @property
    def _device_steps(self) -> bool:
        """Step counts (and ``mu_product``) on the params' device, never read by the host."""
        return getattr(self, "backend", None) == "triton"

    # ----- what a rule class provides -------------------------------------------------------

    def _validate(self, h: dict[str, Any], owner: str) -> dict[str, Any]:
        """Check and normalize the hyperparameters in ``h``; return it."""
        h["lr"] = learning_rate(owner, h["lr"])
        if "weight_decay" in h:
            h["weight_decay"] = at_least(owner, "weight_decay", h["weight_decay"])
        if "eps" in h:
            h["eps"] = at_least(owner, "eps", h["eps"])
        if "maximize" in h:
            boolean(owner, "maximize", h["maximize"])
        if "master_weights" in h:
            boolean(owner, "master_weights", h["master_weights"])
        return h

    def _rule(self, group: dict[str, Any]) -> str:
        return self.rule

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The tensor state a step reads and writes, besides ``step``."""
        raise NotImplementedError(f"{self._owner} must define its state keys")

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """Fresh state for ``p``, without ``step``: zeros unless the rule says otherwise."""
        return {k: zeros(p) for k in self._state_keys(group)}

    def _check_params(self, group: dict[str, Any]) -> None:
        """Checks that need the group's tensors (e.g. shapes); raise ValueError."""

    def _check_complex(self, p: Tensor, group: dict[str, Any], i: int) -> None:
        """Refuse a complex ``p`` this optimizer cannot update as real (re, im) pairs: raise
        ValueError naming it. Every rule here is elementwise except Coupled Adam's coupled
        groups (see :class:`~lightning_optim.optim.CoupledAdam`); complex32 has no fp32 math."""
        if p.dtype == torch.complex32:
            raise ConfigurationError(
                f"{self._owner}: {self._param_name(group, i)} is complex32, which no backend updates (its "
                "real view is float16 without the fp32 state low-precision params get): use complex64."
            )

    # ----- master weights (every rule: not a rule's state, so not in ``_init_state``) --------

    @staticmethod
    def _wants_master(p: Tensor, group: dict[str, Any]) -> bool:
        """An fp32 master copy for ``p``: its group asks for one and ``p`` is bf16/fp16."""
        return bool(group.get("master_weights", False)) and p.dtype in _LOW_PRECISION

    def _sync_master(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> bool:
        """Make ``state`` have a ``master_param`` exactly when ``p`` wants one (also after the
        group's option changed): a new master is the param's value in fp32. Returns whether it
        has one."""
        wants = self._wants_master(p, group)
        if wants and "master_param" not in state:
            state["master_param"] = p.detach().to(dtype=torch.float32, copy=True)
        elif not wants and "master_param" in state:
            del state["master_param"]
        return wants

    # ----- backend="auto" on CUDA -------------------------------------------------------------

    def _check_auto_triton(self, groups: list[dict[str, Any]]) -> None:
        """When ``auto`` picked triton: verify each group's kernel against the reference on
        the group's devices and dtypes (:func:`~lightning_optim.backends.triton.selfcheck.verify`,
        cached per configuration and process), and on the first failure fall back to
        ``foreach`` for the whole optimizer, warning once with the reason. The check covers
        the group's options as they are now; changing a compile-time option (amsgrad,
        nesterov...) later is not checked again."""
        if not self._auto_triton:
            return
        from ..backends.triton import selfcheck

        for group in groups:
            for dtype, device in {(backends.real_dtype(p.dtype), p.device) for p in group["params"]}:
                reason = selfcheck.verify(self._rule(group), group, dtype, device, self._init_state)
                if reason is not None:
                    self._fall_back_to_foreach(reason)
                    return

    def _fall_back_to_foreach(self, reason: str) -> None:
        self._auto_triton = False
        self.backend = "foreach"
        self._run = backends.runner(self.backend)
        for state in self.state.values():  # step counts back to the CPU, where foreach keeps them
            self._scalars_to(state, torch.device("cpu"))
        self._warn_once(
            "auto_triton",
            f"{self._owner}: backend='auto' chose the fused Triton kernels, but their check against the "
            f"reference failed on this machine: {reason}. Using backend='foreach' instead (same results, "
            "slower). Please report this with your GPU, driver and Triton versions; backend='foreach' "
            "silences this warning.",
        )

    # ----- torch.optim.Optimizer ------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        name = param_group.get("name")
        owner = f"{self._owner} group {name!r}" if name is not None else self._owner
        options = {k: v for k, v in param_group.items() if k not in ("params", "param_names")}
        param_group.update(self._validate({**self.defaults, **options}, owner))
        super().add_param_group(param_group)
        try:
            self._check_params(self.param_groups[-1])
            for i, p in enumerate(self.param_groups[-1]["params"]):
                if p.is_complex():
                    self._check_complex(p, self.param_groups[-1], i)
        except ValueError:
            self.param_groups.pop()
            raise
        if getattr(self, "_auto_triton", False):  # a group added after construction
            self._check_auto_triton(self.param_groups[-1:])
        if param_group.get("coupled", False) and not self.couples:
            self._warn_once(
                "coupled",
                f"{owner} has coupled=True, but only CoupledAdam couples the second moment: here it "
                "is an ordinary group. Use CoupledAdam, or param_groups(..., coupled=False).",
            )

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        on_device = self._device_steps
        # Set by torch.amp.GradScaler.step around this call (see the module docstring).
        amp_scale = getattr(self, "grad_scale", None) if on_device else None
        amp_found = getattr(self, "found_inf", None) if on_device else None
        amp_on: dict[torch.device, tuple] = {}  # GradScaler's tensors per device, prepared once a step
        for gi, group in enumerate(self.param_groups):
            keys = self._state_keys(group)
            buckets = self._uniform_bucket(group, keys, on_device)
            if buckets is None:
                buckets = self._buckets(group, keys, on_device)
            rule = self._rule(group)
            # A tensor lr: the triton kernels read it on the device; the other backends take
            # a float (one host read per group and step).
            hyper = group if on_device or not isinstance(group["lr"], Tensor) else {**group, "lr": float(group["lr"])}
            for params, grads, state_lists, step_tensors, originals in buckets.values():
                hook = sharding.row_mean(originals) if rule == "coupled_adam" else None
                if on_device:
                    # The device step tensors themselves: the backend's step prologue counts
                    # the step on the device (t += 1, taken back when found_inf is set, as
                    # torch's fused Adam does) and reads t there.
                    device = params[0].device
                    if device not in amp_on:
                        amp_on[device] = self._amp_on(device, amp_scale, amp_found)
                    inv_scale, found = amp_on[device]
                    self._run(rule, params, grads, state_lists, step_tensors, hyper, row_mean=hook,
                              found_inf=found, advance=True, **self._gradient_transform(gi, grads, inv_scale))
                    continue
                torch._foreach_add_(step_tensors, 1.0)
                steps = torch.stack(step_tensors).tolist()
                self._run(rule, params, grads, state_lists, steps, hyper, row_mean=hook,
                          **self._gradient_transform(gi, grads))
        self._next_transforms.clear()
        return loss

    # ----- gathering a group's tensors into (device, dtype) buckets ---------------------------
    # A bucket is (params, grads, {state key: tensors}, step tensors, the params as the
    # user holds them): the lists one backend call takes. This runs for every param and
    # step: on the triton backend its Python is most of the host time of a step.

    def _uniform_bucket(self, group: dict[str, Any], keys: tuple[str, ...], on_device: bool) -> dict | None:
        """The common case, gathered with C-level ``map`` over the whole group instead of a
        Python loop per param: every param has a dense gradient and its state already, all
        share one device and dtype, none is sharded, master copies are there exactly as the
        group asks, and (triton) the step counts are on that device. None otherwise: then
        :meth:`_buckets` does the general work (creating state and masters, placing step
        counts, unwrapping DTensor shards, the errors). Both give the same bucket."""
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
        states = list(map(self.state.get, params))
        if len(devices) != 1 or len(dtypes) != 1 or not all(states):
            return None
        (device,), (dtype,) = devices, dtypes
        if dtype.is_complex:  # real views: the general path
            return None
        wants = bool(group.get("master_weights", False)) and dtype in _LOW_PRECISION
        has = list(map(operator.contains, states, repeat("master_param")))
        if not (all(has) if wants else not any(has)):
            return None
        names = ("step", *keys, "master_param") if wants else ("step", *keys)
        try:
            steps, *slots = (list(map(operator.itemgetter(k), states)) for k in names)
        except KeyError:  # state set from elsewhere without a key this rule reads
            return None
        if on_device:
            scalars = [steps] + [slot for k, slot in zip(names[1:], slots) if k in _SCALAR_KEYS]
            if any(set(map(_DEVICE, slot)) != devices for slot in scalars):
                return None
        params = list(params)
        return {(device, dtype): (params, grads, dict(zip(names[1:], slots)), steps, params)}

    def _buckets(self, group: dict[str, Any], keys: tuple[str, ...], on_device: bool) -> dict:
        """Every param of ``group`` that has a gradient, by (device, dtype): creates missing
        state, keeps master copies as the group asks, puts step counts where the backend
        reads them, and unwraps sharded params to their local shards."""
        masters = bool(group.get("master_weights", False))
        buckets: dict[tuple, tuple[list, list, dict[str, list], list, list]] = {}
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(
                    f"{self._owner} does not support sparse gradients, but {self._param_name(group, i)} "
                    "has one: build its module with sparse=False"
                )
            if p.is_complex():
                self._check_complex(p, group, i)
            state = self.state[p]
            if not state:
                state.update(self._init_state(p, group))
                state["step"] = scalar()
            if on_device and state["step"].device != p.device:
                self._scalars_to(state, p.device)
            # The same for every param of a bucket: one group, one dtype.
            master = (masters or "master_param" in state) and self._sync_master(p, state, group)
            # Complex params (and their complex state) go in as real views, in the bucket of
            # the real dtype: the rules are elementwise on (re, im) pairs, as torch applies
            # them (its Adam, Adagrad, RMSprop, NAdam, RAdam view_as_real everything; its SGD
            # is linear, the same on the view), so every backend stays a real-valued rule.
            key = (p.device, backends.real_dtype(p.dtype))
            bucket = buckets.get(key)
            if bucket is None:
                slots = (*keys, "master_param") if master else keys
                bucket = buckets[key] = ([], [], {k: [] for k in slots}, [], [])
            # Sharded (DTensor) params are updated through their local shards: the rules
            # are elementwise, and the one that is not gets the ``row_mean`` hook in step.
            if sharding.is_dtensor(p):
                bucket[0].append(_real(sharding.local(p)))
                bucket[1].append(_real(sharding.local(g)))
                for k, values in bucket[2].items():
                    values.append(_real(sharding.local(state[k])))
            else:
                bucket[0].append(_real(p))
                bucket[1].append(_real(g.resolve_conj()) if g.is_complex() else g)
                for k, values in bucket[2].items():
                    values.append(_real(state[k]))
            bucket[3].append(state["step"])
            bucket[4].append(p)
        return buckets

    # ----- fused gradient clipping ------------------------------------------------------------

    def scale_next_step(self, group_index: int, *, grad_scale: Tensor | None = None,
                        clip_value: float | None = None) -> None:
        """Have the next :meth:`step` multiply group ``group_index``'s gradients by the 0-d
        tensor ``grad_scale``, then clamp them to ``[-clip_value, clip_value]``, as part of the
        update. :class:`~lightning_optim.clipping.GradientClipper` calls this instead of
        rescaling the gradients itself when the backend is ``triton``: the kernel reads g once
        and applies the scale in registers, where a separate clipping pass would read and write
        every gradient once more (8 of fp32 AdamW's 36 bytes per parameter). Other backends
        apply it to the gradients, in place, just before the update. The ``.grad`` tensors are
        left unclipped on the triton backend. Forgotten by :meth:`zero_grad` and after a step."""
        if grad_scale is None and clip_value is None:
            self._next_transforms.pop(group_index, None)
        else:
            self._next_transforms[group_index] = (grad_scale, clip_value)

    @staticmethod
    def _amp_on(device: torch.device, amp_scale: Tensor | None,
                amp_found: Tensor | None) -> tuple[tuple[Tensor, Tensor] | None, Tensor | None]:
        """GradScaler's tensors on ``device``, once per step and device (not per group):
        ``(scale, 1 / scale)`` in fp32, or None, and ``found_inf`` as a 0-d fp32 0/1 (GradScaler
        sums the flags of several devices), or None."""
        found = None
        if amp_found is not None:
            found = amp_found.to(device=device, non_blocking=True).reshape(()).ne(0).float()
        if amp_scale is None:
            return None, found
        amp_scale = amp_scale.to(device=device, dtype=torch.float32, non_blocking=True)
        return (amp_scale, amp_scale.reciprocal()), found

    def _gradient_transform(self, group_index: int, grads: list[Tensor],
                            amp: tuple[Tensor, Tensor] | None = None) -> dict[str, Any]:
        """The pending ``scale_next_step`` of a group: keyword arguments for the triton
        backend, or applied here to ``grads`` for the others. ``amp`` (triton only): GradScaler's
        ``(grad_scale, 1 / grad_scale)`` on the device (:meth:`_amp_on`): the gradients are
        divided by the scale."""
        pending = self._next_transforms.get(group_index)
        if pending is None and amp is None:
            return {}
        scale, bound = pending if pending is not None else (None, None)
        device = grads[0].device
        scale = None if scale is None else scale.to(device=device, dtype=torch.float32, non_blocking=True)
        if self.backend == "triton":
            if amp is not None:
                scale = amp[1] if scale is None else scale / amp[0]
            return {"grad_scale": scale, "clip_value": bound}
        if scale is not None:  # the fp32 coefficient, as the clipper's own pass multiplies
            torch._foreach_mul_(grads, scale)
        if bound is not None:
            torch._foreach_clamp_min_(grads, -bound)
            torch._foreach_clamp_max_(grads, bound)
        return {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._next_transforms.clear()  # a skipped step's clip scale must not reach the next one
        super().zero_grad(set_to_none)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader, made strict about shapes and kind to low-precision state.

        Round trip: after loading a state dict saved by this library (by an optimizer of the
        same class and options), :meth:`state_dict` equals it exactly: the same keys, the same
        values, tensors of the same dtype and values. A state dict saved by ``torch.optim``
        comes back with every key and value it had, plus what it lacks and this library adds:
        options torch has no counterpart for, filled from this optimizer's defaults (e.g.
        ``bias_correction``, ``master_weights``), ``param_names`` from this optimizer's groups
        when the dict has none, and ``step`` for torch.optim.SGD's buffers (torch keeps none).
        Numbers are validated to floats of the same value (torch keeps ``weight_decay=0`` as an
        int, it comes back as ``0.0``) and a list ``betas`` as a tuple.

        What this optimizer decides rather than the dict (so it can differ after a load from a
        dict saved with other settings): ``master_weights`` and the masters that follow it
        (see below); a tensor ``lr`` stays this optimizer's tensor, the saved value copied into
        it; state of bf16/fp16 params is fp32 (torch keeps it in the param's dtype; the values
        are the same); ``step``/``mu_product`` are on this backend's device.

        torch's loader puts ``differentiable=False`` into the defaults; it is taken out again
        (see :meth:`__setstate__`), so it does not reach the groups."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{self._owner}.load_state_dict: the state dict has {len(saved_groups)} param groups "
                f"({self._group_names(saved_groups)}), this optimizer has {len(self.param_groups)} "
                f"({self._group_names(self.param_groups)}): was it saved with another partition?"
            )
        for i, (mine, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(mine["params"]) != len(saved["params"]):
                raise ValueError(
                    f"{self._owner}.load_state_dict: param group {i} ({mine.get('name', 'unnamed')!r}) has "
                    f"{len(mine['params'])} params here but {len(saved['params'])} in the state dict "
                    f"(saved group {saved.get('name', 'unnamed')!r}): was it saved with another partition?"
                )
        # Match saved ids to our params in order, as torch does, and check every tensor's shape.
        located = {}
        for mine, saved in zip(self.param_groups, saved_groups):
            for key in self.structural:
                if saved.get(key, self.defaults[key]) != mine[key]:
                    raise ValueError(
                        f"{self._owner}.load_state_dict: param group {mine.get('name', 'unnamed')!r} has "
                        f"{key}={mine[key]!r} here but {key}={saved.get(key, self.defaults[key])!r} in the "
                        "state dict: was it saved with another partition?"
                    )
            for j, (pid, p) in enumerate(zip(saved["params"], mine["params"])):
                located[pid] = (p, {**self.defaults, **saved}, mine, j)
        for pid, entry in state_dict["state"].items():
            if pid in located:
                self._check_loaded(entry, *located[pid])
        # master_weights is this optimizer's choice, as its backend is: torch lets saved options win.
        masters = [g.get("master_weights") for g in self.param_groups]
        # A tensor lr keeps its identity (a scheduler or a captured graph holds it): the saved
        # value is copied into it.
        lr_tensors = [g["lr"] if isinstance(g["lr"], Tensor) else None for g in self.param_groups]
        super().load_state_dict(state_dict)
        for pid, entry in state_dict["state"].items():
            if pid not in located:
                continue
            p = located[pid][0]
            state = self.state[p]
            for key, value in entry.items():
                if not isinstance(value, Tensor):
                    continue
                if key in _SCALAR_KEYS:
                    state[key] = value.detach().to(device=self._scalar_device(p), dtype=torch.float32, copy=True)
                elif value.is_floating_point():
                    state[key] = value.detach().to(device=p.device, dtype=state_dtype(p), copy=True)
            if "step" not in state:
                # torch.optim.SGD keeps no step; a loaded buffer means the first step is behind us.
                state["step"] = scalar(1.0).to(self._scalar_device(p))
        for group, master, lr in zip(self.param_groups, masters, lr_tensors):
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            if master is not None:
                group["master_weights"] = master
            if lr is not None and group["lr"] is not lr:
                saved = group["lr"]
                if isinstance(saved, Tensor):
                    lr.copy_(saved)
                else:
                    lr.fill_(saved)
                group["lr"] = lr
            owner = f"{self._owner} group {group.get('name', 'unnamed')!r}"
            group.update(self._validate({k: v for k, v in group.items() if k not in ("params", "param_names")}, owner))
            self._check_params(group)
        self._sync_loaded_masters()

    # ----- helpers ---------------------------------------------------------------------------

    def _scalar_device(self, p: Tensor) -> torch.device:
        """Where ``step``/``mu_product`` of ``p`` live: its device on triton, else the CPU."""
        return p.device if self._device_steps else torch.device("cpu")

    @staticmethod
    def _scalars_to(state: dict[str, Any], device: torch.device) -> None:
        """Move ``step``/``mu_product`` to ``device`` once (fresh CPU ones, or state set by
        hand): a no-op, without a copy, when they are there already."""
        for key in _SCALAR_KEYS:
            value = state.get(key)
            if isinstance(value, Tensor) and value.device != device:
                state[key] = value.to(device=device, dtype=torch.float32)

    def _check_loaded(self, entry: dict, p: Tensor, group: dict, mine: dict, j: int) -> None:
        if not entry:
            return
        expected = self._init_state(torch.empty_like(p, device="meta"), group)
        for key, shape in ((k, v.shape) for k, v in expected.items()):
            if key not in entry:
                raise ValueError(
                    f"{self._owner}.load_state_dict: {self._param_name(mine, j)} has no {key!r} in the "
                    f"state dict (it has {sorted(entry)}): was it saved by another optimizer?"
                )
            got = entry[key]
            if isinstance(got, Tensor) and got.shape != shape:
                raise ValueError(
                    f"{self._owner}.load_state_dict: {self._param_name(mine, j)} has {key} of shape "
                    f"{list(got.shape)} in the state dict, expected {list(shape)}: was it saved with "
                    "another model, partition or optimizer?"
                )
        got = entry.get("master_param")
        if isinstance(got, Tensor) and got.shape != p.shape:
            raise ValueError(
                f"{self._owner}.load_state_dict: {self._param_name(mine, j)} has master_param of shape "
                f"{list(got.shape)} in the state dict, expected {list(p.shape)}: was it saved with "
                "another model or partition?"
            )

    def _sync_loaded_masters(self) -> None:
        """After a load, the masters this optimizer's ``master_weights`` asks for: a missing one
        is made from the loaded param, an unwanted one dropped; each warned about once."""
        created, dropped = [], []
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                state = self.state.get(p)
                if not state:
                    continue  # no state yet: the first step makes it, master included
                had = "master_param" in state
                has = self._sync_master(p, state, group)
                if has != had:
                    (created if has else dropped).append(self._param_name(group, i))

        def few(names: list[str]) -> str:
            return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

        if created:
            self._warn_once(
                "master_created",
                f"{self._owner}.load_state_dict: the state dict has no fp32 master weights for {few(created)} "
                "(bf16/fp16 in a group with master_weights=True): made them from the loaded parameters. "
                "Training goes on from the parameters' rounded values; the low bits a master would have "
                "kept before this checkpoint are not in it.",
            )
        if dropped:
            self._warn_once(
                "master_dropped",
                f"{self._owner}.load_state_dict: the state dict has fp32 master weights for {few(dropped)}, "
                "which this optimizer does not keep (master_weights=False here, or not a bf16/fp16 "
                "parameter): dropped them; the parameters keep their own values (the masters' rounding).",
            )

    def _param_name(self, group: dict, i: int) -> str:
        names = group.get("param_names")
        where = f"group {group['name']!r}" if "name" in group else "its group"
        return f"parameter {names[i]!r}" if names else f"parameter {i} of {where}"

    @staticmethod
    def _group_names(groups: Iterable[dict]) -> str:
        return ", ".join(str(g.get("name", "unnamed")) for g in groups)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, LightningOptimWarning, stacklevel=3)

    # ----- copy.deepcopy and pickle ------------------------------------------------------------
    # Both go through __getstate__/__setstate__. Everything but these attributes travels:
    # ``_run`` is a function of this process's backend modules (re-bound from the backend's
    # name on the way in); torch's hook dicts (often closures) and profiler name are left
    # out as torch's own __getstate__ leaves them out. So is every other callable attribute:
    # those are wrappers bound to this instance, such as the ``step`` an LR scheduler or
    # OptimizerCallback puts on it, whose closure calls the original's step: a copy that kept
    # one would step the original, not itself (torch's copies lose them too).
    _NOT_PICKLED = frozenset({
        "_run", "_zero_grad_profile_name",
        "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
        "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
        "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks",
    })

    def __getstate__(self) -> dict[str, Any]:
        """What a copy or pickle holds: the params with their state and groups (a copy of a
        ``(model, optimizer)`` pair keeps the mapping between them), the resolved ``backend``
        by name, pending :meth:`scale_next_step` transforms and the warnings already given;
        see :meth:`__setstate__`. Hooks and methods wrapped on the instance (an LR scheduler's
        ``step``) are not copied, as in torch: the copy has the class's ``step``."""
        return {k: v for k, v in self.__dict__.items() if k not in self._NOT_PICKLED and not callable(v)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a copied or unpickled optimizer so that it steps exactly as the original
        would, and (called by torch's ``load_state_dict`` with only ``state`` and
        ``param_groups``) take loaded state.

        A copy re-binds its backend's function from the backend's name, as the constructor
        resolves it: an explicit ``"triton"`` is checked to be available here (else
        ``ValueError``, as the constructor raises); a triton that ``backend="auto"`` chose is
        trusted only after its self-check passes in this process (cached per process, so a
        deep copy costs nothing), else the copy falls back to ``foreach`` with the
        constructor's warning. An optimizer pickled before the backend was pickled resolves
        ``"auto"``."""
        defaults = state.get("defaults", self.__dict__.get("defaults", {}))
        torch_adds_differentiable = "differentiable" not in defaults
        super().__setstate__(state)
        if torch_adds_differentiable:
            # torch's __setstate__ puts differentiable=False into the defaults for its own step
            # decorator, which ours do not use; from there load_state_dict and add_param_group
            # would copy it into every group, and a saved -> loaded -> saved dict would differ.
            self.defaults.pop("differentiable", None)
        self.__dict__.setdefault("_owner", type(self).__name__)
        self.__dict__.setdefault("_warned", set())
        self.__dict__.setdefault("_next_transforms", {})
        self.__dict__.setdefault("_auto_triton", "backend" not in self.__dict__)
        if "_run" not in self.__dict__:  # a copy or an unpickled optimizer, not a load
            self._restore_backend()

    def _restore_backend(self) -> None:
        """Resolve the backend of a copy on its params (see :meth:`__setstate__`) and bind its
        function; step counts go where that backend keeps them."""
        params = [p for g in self.param_groups for p in g["params"]]
        requested = "auto" if self._auto_triton else self.__dict__.get("backend", "auto")
        self.backend = backends.resolve(self._owner, requested, params)
        self._auto_triton = requested == "auto" and self.backend == "triton"
        self._run = backends.runner(self.backend)
        if not self._device_steps:
            for state in self.state.values():
                self._scalars_to(state, torch.device("cpu"))
        self._check_auto_triton(self.param_groups)
