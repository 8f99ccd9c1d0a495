"""Stochastic gradient descent, with heavy-ball or Nesterov momentum."""

from __future__ import annotations

from typing import Any

from ..validation import at_least, boolean, finite, invalid
from ..rules import Launch, Preset, Prologue, RuleSpec, register
from .base import Optimizer


def _launch(h):
    wd, mu = float(h.get("weight_decay", 0.0)), float(h["momentum"])
    return Launch("sgd_kernel", ("momentum_buffer",) if mu != 0 else (), dict(wd=wd, mu=mu),
                  dict(WD=wd != 0, MOMENTUM=mu != 0, NESTEROV=bool(h["nesterov"])),
                  Prologue.SGD, (wd, 0.0, 0.0, 1.0 - float(h["dampening"])))


SPEC = register(RuleSpec(
    name="sgd",
    options=dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                 master_weights=False, backend="auto"),
    state_keys=lambda h: ("momentum_buffer",) if h["momentum"] != 0 else (),
    # The momentum buffer is the gradient's (dampened) EMA; plain SGD keeps no moment.
    first_moment="momentum_buffer", second_moment=None, bias_corrected=False,
    # p rw, g r: 3E; + momentum_buffer rw.
    bytes_per_element=lambda h, e: 8 if h.get("momentum", 0) != 0 else 0,
    launch=_launch,
    torch_names=("SGD",),
    torch_kernel=lambda h: "_fused_sgd_",
    names={"sgd": Preset({}, "plain SGD"),
           "momentum": Preset({"momentum": 0.9}, "SGD with heavy-ball momentum 0.9"),
           "nesterov": Preset({"momentum": 0.9, "nesterov": True}, "SGD with Nesterov momentum 0.9")},
))


class SGD(Optimizer):
    r"""SGD with optional momentum, as ``torch.optim.SGD``.

    .. math::
        g_t &= \nabla f(\theta_{t-1}) + \lambda \theta_{t-1} \\
        b_t &= \mu b_{t-1} + (1 - \tau) g_t \quad (b_1 = g_1) \\
        \theta_t &= \theta_{t-1} - \eta \, (g_t + \mu b_t \text{ if nesterov else } b_t)

    Momentum: Polyak (1964), "Some methods of speeding up the convergence of iteration
    methods"; the Nesterov form as in Sutskever et al. (2013), "On the importance of
    initialization and momentum in deep learning", eq. 3-4. Registry names: ``sgd``,
    ``momentum`` (momentum=0.9), ``nesterov`` (momentum=0.9, nesterov=True).

    Args:
        lr: :math:`\eta`.
        momentum: :math:`\mu`.
        dampening: :math:`\tau` (not applied on the first step).
        weight_decay: L2 penalty :math:`\lambda` added to the gradient.
        nesterov: use the look-ahead form (needs momentum > 0 and dampening = 0).
        maximize: ascend the objective instead of descending it.
        backend: which implementation runs the rule (see :mod:`lightning_optim.backends`).
        master_weights: an fp32 master copy of bf16/fp16 params (see :class:`~lightning_optim.optim.Optimizer`).

    State: ``momentum_buffer`` (when momentum != 0) and ``step``.
    """

    spec = SPEC

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        master_weights: bool = False,
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, master_weights=master_weights,
        )
        super().__init__(params, defaults, backend, foreach=foreach, fused=fused, capturable=capturable,
                         differentiable=differentiable)

    def _validate(self, h, owner):
        h = super()._validate(h, owner)
        # torch.optim.SGD's checks: momentum >= 0 (1 and more are legal: the buffer then sums
        # the gradients, which torch allows), any dampening; both finite here.
        h["momentum"] = at_least(owner, "momentum", h["momentum"])
        h["dampening"] = finite(owner, "dampening", h["dampening"])
        if boolean(owner, "nesterov", h["nesterov"]) and (h["momentum"] <= 0 or h["dampening"] != 0):
            raise invalid(
                owner, "nesterov", True,
                f"Nesterov momentum needs momentum > 0 and dampening = 0 (got momentum={h['momentum']!r}, "
                f"dampening={h['dampening']!r})",
            )
        return h
