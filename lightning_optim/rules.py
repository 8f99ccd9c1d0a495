"""The rule table's type: what an update rule declares once, next to its class.

Each optimizer file in :mod:`lightning_optim.optim` declares its rule as a :class:`RuleSpec`
(``SPEC = register(RuleSpec(...))`` next to the class) and the rest of the package reads it:

- the optimizers (:mod:`lightning_optim.optim.base`): the state keys, and whether the rule
  needs Coupled Adam's row-mean hook (``row_coupled``);
- the registry and the Hydra schema (:mod:`lightning_optim.registry`,
  :class:`lightning_optim.config.OptimizerConfig`): the registry names with their presets,
  the options and their defaults (a class with a ``spec`` registers itself when it is
  defined, :func:`register_optimizer`; the registry lists them in that order);
- the statistics (:mod:`lightning_optim.stats`): which state tensors are the first and
  second moments, and whether they are bias-corrected;
- the Triton launcher and :func:`lightning_optim.backends.triton.bytes_per_param`: the kernel
  to launch, its state slots, its runtime floats and compile-time switches, which step
  factors the prologue computes (a :class:`Prologue` code, defined here once and read by
  both the launcher and the kernels), and the bytes a step moves per element;
- the benchmarks: the bytes per element again, for their floor column.

This module sits below both :mod:`lightning_optim.backends` and
:mod:`lightning_optim.optim`: the backends get a rule's spec in the call (or look a name up
with :func:`get`), so no backend imports an optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, NamedTuple

__all__ = ["Prologue", "Launch", "Preset", "RuleSpec", "register", "get", "registered", "for_torch",
           "register_optimizer", "optimizers"]


class Prologue(IntEnum):
    """Which per-tensor factors the Triton step prologue (``factors_kernel``) writes: the
    quantities of a rule that depend on lr or on the step count ``t``. ``decay`` is
    ``1 - lr * weight_decay`` (Loshchilov & Hutter 2019, decoupled weight decay)."""

    LR = 0       # f0 = -lr, f1 = decay: no step-dependent factor (RMSprop, Lion)
    SGD = 1      # f0 = 1 - dampening (1 on the first step: buf_1 = g), f1 = -lr; c = 1 - dampening
    ADAGRAD = 2  # f0 = -lr / (1 + (t - 1) * lr_decay); c = lr_decay
    ADAM = 3     # f0 = -lr / (1 - beta1^t), f1 = 1 / sqrt(1 - beta2^t) (BIAS; else -lr, 1), f2 = decay
    NADAM = 4    # f0, f1: the gradient and momentum coefficients, f2 = 1 - beta2^t, f3 = decay; c = 0.96^psi
    RADAM = 5    # f0: the step size, f1: 1 when rectified (rho_t > 5) else 0, f3 = decay


class Launch(NamedTuple):
    """One group's Triton launch: what :mod:`lightning_optim.backends.triton.launcher` needs.

    ``kernel``: the name of the ``@triton.jit`` kernel in ``kernels.py``; ``slots``: the state
    keys the kernel reads, in its slot order (slot 2, 3, ... of a table row; a key whose tensor
    is a (1, H) row in a ``row_coupled`` rule comes after the full-size ones); ``floats``: the
    lr-free hyperparameters, runtime fp32 kernel arguments by name; ``switches``: the
    compile-time options, by name; ``prologue``/``prologue_args``/``bias``: the prologue's
    code, its ``(weight_decay, beta1, beta2, c)`` and its ``BIAS`` switch; ``rows`` (a
    ``row_coupled`` rule): the (1, H) row state the row pre-pass updates before the
    elementwise kernel, the EMA first, then its running maximum (AMSGrad) if any. (A named
    tuple: one is built per bucket and step, on the host's hot path.)"""

    kernel: str
    slots: tuple[str, ...]
    floats: Mapping[str, float]
    switches: Mapping[str, bool]
    prologue: Prologue
    prologue_args: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    bias: bool = False
    rows: tuple[str, ...] = ()


class Preset(NamedTuple):
    """A registry name of a rule: the options it sets over the class's defaults, and a
    one-line summary (the README's table)."""

    options: Mapping[str, Any]
    summary: str


@dataclass(frozen=True, eq=False)
class RuleSpec:
    """An update rule, declared once.

    Args:
        name: the rule's function name in every backend (``reference.<name>``,
            ``foreach.<name>``); several classes may share a rule (Adam and AdamW).
        options: every constructor option with its default, ``backend`` included, in the
            signature's order (the class's signature must agree: a test compares).
        state_keys: ``group -> keys`` of the tensor state a step reads and writes besides
            ``step``, with torch's names, in the order the backends take them.
        first_moment: the state key of the gradient's EMA, or None where the rule keeps
            none; what :class:`lightning_optim.stats.MomentStats` reads as ``m``.
        second_moment: the state key of the squared gradient's running sum or EMA, or None;
            what the statistics read as ``v``.
        bias_corrected: both moments are EMAs started at zero that the rule divides by
            ``1 - beta^t`` (with the group's ``betas``), unless the group sets
            ``bias_correction=False``.
        bytes_per_element: ``(group, E) -> bytes`` one step must move per parameter element
            besides the param read and written and the gradient read (``3E``); ``E``: the
            bytes of a param/grad element; state is fp32 (8 bytes read and written per tensor).
        launch: ``group -> Launch``: the Triton kernel's plan for the group's options.
        row_coupled: the second moment is one (1, H) row shared by dim 0, so a bucket needs
            the row-mean hook (sharded params) and the launcher its row pre-pass.
        scalar_state: state that is a float32 0-d tensor per param, like ``step`` (NAdam's
            ``mu_product``): on the device with device step counts, never read by the host.
        torch_names: the ``torch.optim`` classes with this rule's state layout, whose state
            the statistics read with this spec.
        torch_kernel: ``group -> name or None``: torch's own fused kernel (``torch._fused_adamw_``
            and the like, what ``torch.optim``'s ``fused=True`` runs) that computes this rule
            exactly for the group's options, or None where none does; the compiled backend
            runs it instead of compiling the same loop (:mod:`lightning_optim.backends.torch_kernels`).
        names: the registry (and Hydra) names of the class declaring this spec, each a
            :class:`Preset` (``momentum`` is SGD with momentum=0.9).
    """

    name: str
    options: Mapping[str, Any]
    state_keys: Callable[[Mapping[str, Any]], tuple[str, ...]]
    first_moment: str | None
    second_moment: str | None
    bias_corrected: bool
    bytes_per_element: Callable[[Mapping[str, Any], int], int]
    launch: Callable[[Mapping[str, Any]], Launch]
    row_coupled: bool = False
    scalar_state: tuple[str, ...] = ()
    torch_names: tuple[str, ...] = field(default=())
    torch_kernel: Callable[[Mapping[str, Any]], str | None] | None = None
    names: Mapping[str, Preset] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"RuleSpec({self.name!r})"


_TABLE: dict[str, RuleSpec] = {}


def register(spec: RuleSpec) -> RuleSpec:
    """Add ``spec`` to the table of rules by name (the first spec of a name is the rule's;
    a class sharing a rule, like AdamW, declares its options with ``dataclasses.replace``
    and is not registered again). Returns ``spec``."""
    _TABLE.setdefault(spec.name, spec)
    return spec


def get(rule: RuleSpec | str) -> RuleSpec:
    """The spec of ``rule``: itself, or the registered rule of that name."""
    if isinstance(rule, RuleSpec):
        return rule
    try:
        return _TABLE[rule]
    except (KeyError, TypeError):
        raise ValueError(f"rule={rule!r} is invalid: must be one of {', '.join(_TABLE)}") from None


def registered() -> Iterator[RuleSpec]:
    """Every registered rule, in the order the optimizer files declared them."""
    return iter(tuple(_TABLE.values()))


def for_torch(class_name: str) -> RuleSpec | None:
    """The rule whose state layout the ``torch.optim`` class ``class_name`` keeps, or None."""
    return next((s for s in _TABLE.values() if class_name in s.torch_names), None)


# Registry name -> (the optimizer class, its preset), in the order the classes were defined.
_OPTIMIZERS: dict[str, tuple[type, Preset]] = {}


def register_optimizer(cls: type) -> None:
    """Register the names of ``cls.spec`` for ``cls`` (called for every optimizer class that
    declares its own ``spec``); a name already taken by another class is refused."""
    for name, preset in cls.spec.names.items():
        other = _OPTIMIZERS.get(name)
        if other is not None and other[0].__qualname__ != cls.__qualname__:
            raise ValueError(f"optimizer name {name!r} is declared by {other[0].__qualname__} and {cls.__qualname__}")
        _OPTIMIZERS[name] = (cls, preset)


def optimizers() -> dict[str, tuple[type, Preset]]:
    """Every registered name with its class and preset, in registration order."""
    return dict(_OPTIMIZERS)
