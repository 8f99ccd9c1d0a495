"""What every optimizer shares: validation, state, bucketing and backend dispatch. No math.

A rule class says what is its own: its ``spec`` (a :class:`~lightning_optim.rules.RuleSpec`:
the rule's name in every backend, its state keys with torch's names, its moments, its
options, what the kernels need), ``_validate`` (hyperparameter checks) and, where a state
tensor does not start at zero, ``_init_state``. This class does the rest, the same way for
all of them, and names no rule and no backend (it reads the spec and the backend's declared
capabilities, :mod:`lightning_optim.backends.protocol`):

1. ``step`` gathers the parameters that have a gradient into buckets by (device, dtype)
   (:mod:`.buckets`), creating state lazily, and hands each bucket to the resolved backend
   with one call, ``backend.step(spec, bucket, group, ...)``. Each parameter's ``step`` is a
   CPU float32 tensor, as torch keeps it, so reading it never syncs a GPU; on a backend with
   ``device_steps`` a float32 0-d tensor on the param's device, as torch keeps it with
   ``fused=True``/``capturable=True``, counted and read on the device only (see "Device
   step counts" below);
2. ``load_state_dict`` (:mod:`.state_dict`) checks the shapes of what it loads, keeps fp32
   state for bf16/fp16 params (torch would cast it down to the param dtype), and fills
   options a torch state dict does not carry.

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

Device step counts and AMP (a backend with ``device_steps``: triton): ``state["step"]`` and
NAdam's ``state["mu_product"]`` live on the param's device and are counted there, and
``torch.amp.GradScaler`` hands its ``grad_scale``/``found_inf`` to the step
(``_step_supports_amp_scaling``). The contract is written once, in ``docs/triton.md``.
"""

from __future__ import annotations

import warnings
from itertools import chain
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import backends, rules, sharding
from ..rules import RuleSpec
from ..validation import ConfigurationError, LightningOptimWarning, at_least, boolean, learning_rate
from . import buckets
from .state_dict import StateDictMixin
from .tensors import LOW_PRECISION, SCALAR_KEYS, real, scalar, state_dtype, zeros

__all__ = ["Optimizer", "state_dtype", "zeros", "scalar"]
_real = real  # (the name this helper had here)


class Optimizer(StateDictMixin, torch.optim.Optimizer):
    """Base class of the lightning_optim optimizers (a ``torch.optim.Optimizer``).

    Args:
        params: tensors, ``(name, tensor)`` pairs, or param-group dicts, as torch takes them.
        defaults: the hyperparameters, validated by the subclass's ``_validate``.
        backend: ``"auto"``, ``"reference"``, ``"foreach"``, ``"triton"`` or ``"compiled"``
            (what ``auto`` picks, and when: :mod:`..backends`). Resolved once, here: the
            attribute ``backend`` names what runs, ``backend_reason`` says why ``auto`` chose it.
        foreach: torch's keyword: True picks foreach, False reference.
        fused: torch's keyword: True picks the single-pass kernels where they run (triton on
            CUDA; on CPU, torch's own fused kernels where they compute the rule), else
            foreach with a warning.
        capturable: torch's keyword: True picks a backend with device step counts.
        differentiable: torch's keyword: True raises (no backend is differentiable).

    torch's four keywords are there so code written for ``torch.optim`` runs unchanged; they
    only choose the backend and are not group options (:mod:`..backends` has the map).

    Complex parameters (complex64, complex128) are updated as their real views
    (``torch.view_as_real``: the (re, im) pairs as a trailing dim of 2), on every backend,
    with complex state like the param's, as torch does for SGD, Adagrad, RMSprop, Adam(W),
    NAdam and RAdam, so state dicts move between the two; the rules torch does not have
    follow the same convention. The view is taken once, when the step gathers its buckets (a complex64 param
    joins the float32 bucket), so every backend stays a real-valued rule. Refused, with a
    ValueError naming the parameter: complex32, and a complex tensor in a coupled group of
    CoupledAdam. Against torch: 1e-6 relative, as torch does a few ops (all of SGD's, the L2
    term of others) in complex arithmetic, which rounds by an ulp unlike the real view.

    ``lr`` may be a float or, as in torch, a one-element floating-point tensor. A tensor lr
    keeps its identity (schedulers ``fill_`` it in place; ``load_state_dict`` copies the
    saved value into it). A backend with ``device_steps`` reads it on the device at every
    launch, so a step captured in a CUDA graph follows a changing lr; the other backends read
    it on the host once per group and step.

    Every rule class also takes ``master_weights: bool = False``, a group option (param
    groups may set it each their own way): keep an fp32 master copy of every bf16/fp16
    param, ``state["master_param"]``, update the master and write the param as its rounding.
    Why: bf16 keeps 8 significant bits, so an update smaller than half an ulp of the weight
    (always so when ``|lr * u| < 2^-9 |p|``) rounds away and the weight stops moving: lr 1e-4 with
    Adam's steps of about one unit, on weights of size ~0.1, is lost entirely; an fp32
    master adds these updates up (Micikevicius et al. 2018, "Mixed Precision Training",
    ICLR, Sec. 3.1). Cost: 4 more bytes of state per param (on the fused backend also
    6 more bytes moved per bf16 param and step: the fp32 master read and written, 8, instead
    of the param read, 2). For fp32/fp64 params the option does nothing.
    """

    spec: ClassVar[RuleSpec]  # the rule table's entry of this class (its options, its state...)
    couples: ClassVar[bool] = False  # only CoupledAdam reads a group's ``coupled`` option
    # Group options that decide the shape of the state: a state dict must agree on them, as
    # it would otherwise silently change what the group does (torch lets saved options win).
    structural: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "spec" in cls.__dict__:  # a class declaring its rule: its registry names join the table
            rules.register_optimizer(cls)

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
        requested, note = backends.from_torch_keywords(
            self._owner, backend, params, foreach=foreach, fused=fused, capturable=capturable,
            differentiable=differentiable, torch_name=self._owner if hasattr(torch.optim, self._owner) else None,
            groups=[(self.spec_for(g), g) for g in self.param_groups])
        self._resolve_backend(requested, params)
        if note is None and capturable:
            note = backends.capturable_warning(self._owner, self.backend, params)
        if note is not None:
            self._warn_once("torch_keywords", note)
        self._confirm_auto(self.param_groups)

    def _resolve_backend(self, requested: str, params: list[Tensor]) -> None:
        """Resolve ``requested`` on ``params`` and this optimizer's groups, once; keep the
        reason (``backend_reason``: what ``auto`` weighed, or "asked for")."""
        name, self.backend_reason = backends.resolve_why(
            self._owner, requested, params, [(self.spec_for(g), g) for g in self.param_groups])
        self._use_backend(name, auto=requested == "auto")

    def _use_backend(self, name: str, *, auto: bool) -> None:
        """Run on the resolved backend ``name``; ``auto``: ``backend="auto"`` chose it, so a
        backend that must prove itself on the device is checked first (:meth:`_confirm_auto`)."""
        self.backend = name
        self._backend = backends.get(name)
        self._auto_chosen = auto and self._backend.proves_itself

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """GradScaler's protocol: a ``device_steps`` backend takes ``grad_scale``/``found_inf`` itself."""
        return self._device_steps

    @property
    def _device_steps(self) -> bool:
        """Step counts (and ``mu_product``) on the params' device, never read by the host."""
        backend = self.__dict__.get("_backend")
        return backend is not None and backend.device_steps

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

    @classmethod
    def spec_for(cls, group: dict[str, Any]) -> RuleSpec:
        """The rule a group runs: the class's ``spec`` (CoupledAdam's depends on ``coupled``)."""
        return cls.spec

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The tensor state a step reads and writes, besides ``step``: the spec's."""
        return self.spec_for(group).state_keys(group)

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
        return bool(group.get("master_weights", False)) and p.dtype in LOW_PRECISION

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


    # ----- backend="auto": a choice that must prove itself on the device ------------------------

    def _confirm_auto(self, groups: list[dict[str, Any]]) -> None:
        """When ``auto`` picked a backend that must prove itself (:mod:`lightning_optim.backends`,
        ``proves_itself``): check each group's rule there (cached per configuration and process),
        and on the first failure fall back for the whole optimizer, warning once with the reason.
        The check covers the group's options as they are now; changing a compile-time option
        (amsgrad, nesterov...) later is not checked again."""
        if not self._auto_chosen:
            return
        outcome = backends.confirm_auto(self._owner, self.backend, [(self.spec_for(g), g) for g in groups],
                                        self._init_state)
        if outcome is None:
            return
        fallback, warning = outcome
        self._use_backend(fallback, auto=False)
        self.backend_reason = "auto's fused Triton kernels failed their check on this device"
        for state in self.state.values():  # step counts back to the CPU, where it keeps them
            self._scalars_to(state, torch.device("cpu"))
        self._warn_once("auto_backend", warning)

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
        if getattr(self, "_auto_chosen", False):  # a group added after construction
            self._confirm_auto(self.param_groups[-1:])
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
        backend = self._backend
        on_device = backend.device_steps
        # Set by torch.amp.GradScaler.step around this call (see the module docstring).
        amp_scale = getattr(self, "grad_scale", None) if on_device else None
        amp_found = getattr(self, "found_inf", None) if on_device else None
        amp_on: dict[torch.device, tuple] = {}  # GradScaler's tensors per device, prepared once a step
        for gi, group in enumerate(self.param_groups):
            spec = self.spec_for(group)
            keys = spec.state_keys(group)
            bucketed = buckets.uniform(self, group, keys, on_device)
            if bucketed is None:
                bucketed = buckets.gather(self, group, keys, on_device)
            # A tensor lr: a device_steps backend reads it on the device; the others take a
            # float (one host read per group and step).
            hyper = group if on_device or not isinstance(group["lr"], Tensor) else {**group, "lr": float(group["lr"])}
            for bucket in bucketed.values():
                hook = sharding.row_mean(bucket.originals) if spec.row_coupled else None
                found = inv_scale = None
                if on_device:
                    device = bucket.params[0].device
                    if device not in amp_on:
                        amp_on[device] = self._amp_on(device, amp_scale, amp_found)
                    inv_scale, found = amp_on[device]
                backend.step(spec, bucket, hyper, row_mean=hook, found_inf=found,
                             **self._gradient_transform(gi, bucket.grads, inv_scale))
        self._next_transforms.clear()
        return loss

    # ----- fused gradient clipping ------------------------------------------------------------

    def scale_next_step(self, group_index: int, *, grad_scale: Tensor | None = None,
                        clip_value: float | None = None) -> None:
        """Have the next :meth:`step` multiply group ``group_index``'s gradients by the 0-d
        tensor ``grad_scale``, then clamp them to ``[-clip_value, clip_value]``, as part of the
        update. :class:`~lightning_optim.clipping.GradientClipper` calls this instead of
        rescaling the gradients itself when the backend has ``fused_grad_transform``: the kernel
        reads g once and applies the scale in registers, where a separate clipping pass would
        read and write every gradient once more (8 of fp32 AdamW's 36 bytes per parameter).
        Other backends have it applied to the gradients, in place, just before the update. The
        ``.grad`` tensors are left unclipped on a fused backend. Forgotten by :meth:`zero_grad`
        and after a step."""
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
        """The pending ``scale_next_step`` of a group as the backend call's ``grad_scale`` and
        ``clip_value`` (a backend without the fused transform has them applied to the
        gradients by :meth:`~lightning_optim.backends.Backend.step`). ``amp`` (``device_steps``
        only): GradScaler's ``(grad_scale, 1 / grad_scale)`` on the device (:meth:`_amp_on`):
        the gradients are divided by the scale."""
        pending = self._next_transforms.get(group_index)
        if pending is None and amp is None:
            return {}
        scale, bound = pending if pending is not None else (None, None)
        if scale is not None:  # the fp32 coefficient, as the clipper's own pass multiplies
            scale = scale.to(device=grads[0].device, dtype=torch.float32, non_blocking=True)
        if amp is not None:
            scale = amp[1] if scale is None else scale / amp[0]
        return {"grad_scale": scale, "clip_value": bound}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._next_transforms.clear()  # a skipped step's clip scale must not reach the next one
        super().zero_grad(set_to_none)
    # ----- helpers ---------------------------------------------------------------------------

    def _scalar_device(self, p: Tensor) -> torch.device:
        """Where ``step``/``mu_product`` of ``p`` live: its device on a ``device_steps``
        backend, else the CPU."""
        return p.device if self._device_steps else torch.device("cpu")

    @staticmethod
    def _scalars_to(state: dict[str, Any], device: torch.device) -> None:
        """Move ``step``/``mu_product`` to ``device`` once (fresh CPU ones, or state set by
        hand): a no-op, without a copy, when they are there already."""
        for key in SCALAR_KEYS:
            value = state.get(key)
            if isinstance(value, Tensor) and value.device != device:
                state[key] = value.to(device=device, dtype=torch.float32)

    def _param_name(self, group: dict, i: int) -> str:
        names = group.get("param_names")
        where = f"group {group['name']!r}" if "name" in group else "its group"
        return f"parameter {names[i]!r}" if names else f"parameter {i} of {where}"


    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, LightningOptimWarning, stacklevel=3)

