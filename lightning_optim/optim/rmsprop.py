"""RMSProp: steps scaled by a moving average of squared gradients."""

from __future__ import annotations

from typing import Any

from ..validation import at_least, boolean
from ..rules import Launch, Preset, Prologue, RuleSpec, register
from .base import Optimizer


def _state_keys(h):
    return ("square_avg",) + (("momentum_buffer",) if h["momentum"] > 0 else ()) + (("grad_avg",) if h["centered"] else ())


def _launch(h):
    wd, centered, momentum = float(h.get("weight_decay", 0.0)), bool(h["centered"]), h["momentum"] > 0
    # The kernel's slots: square_avg, grad_avg (centered), momentum_buffer (momentum).
    slots = ("square_avg",) + (("grad_avg",) if centered else ()) + (("momentum_buffer",) if momentum else ())
    return Launch("rmsprop_kernel", slots,
                  dict(wd=wd, alpha=float(h["alpha"]), eps=float(h["eps"]), mom=float(h["momentum"])),
                  dict(WD=wd != 0, CENTERED=centered, MOMENTUM=momentum), Prologue.LR, (wd, 0.0, 0.0, 0.0))


SPEC = register(RuleSpec(
    name="rmsprop",
    options=dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False,
                 master_weights=False, backend="auto"),
    state_keys=_state_keys,
    # The momentum buffer accumulates already-normalized updates: not the gradient's EMA.
    first_moment=None, second_moment="square_avg", bias_corrected=False,
    # p rw, g r: 3E; + square_avg rw, + grad_avg rw (centered), + momentum_buffer rw (momentum).
    bytes_per_element=lambda h, e: 8 + 8 * bool(h.get("centered")) + 8 * (h.get("momentum", 0) > 0),
    launch=_launch,
    torch_names=("RMSprop",),
    names={"rmsprop": Preset({}, "RMSProp (Hinton 2012)")},
))


class RMSprop(Optimizer):
    r"""RMSProp, as ``torch.optim.RMSprop``.

    .. math::
        g_t &= \nabla f(\theta_{t-1}) + \lambda \theta_{t-1} \\
        s_t &= \alpha s_{t-1} + (1 - \alpha) g_t^2, \qquad
        \bar g_t = \alpha \bar g_{t-1} + (1 - \alpha) g_t \ \text{(centered)} \\
        d_t &= \sqrt{s_t - \bar g_t^2 \text{ (centered) }} + \epsilon \\
        b_t &= \mu b_{t-1} + g_t / d_t, \qquad
        \theta_t = \theta_{t-1} - \eta\, b_t \quad (\mu = 0: \ \theta_t = \theta_{t-1} - \eta\, g_t / d_t)

    Hinton, Srivastava & Swersky (2012), "Neural Networks for Machine Learning", lecture
    6e; the centered variant from Graves (2013), "Generating Sequences With Recurrent
    Neural Networks", eq. 38-45.

    Args:
        lr: :math:`\eta`.
        alpha: :math:`\alpha`, the smoothing constant.
        eps: :math:`\epsilon`.
        weight_decay: L2 :math:`\lambda`.
        momentum: :math:`\mu`.
        centered: normalize by the estimated variance.
        maximize: ascend the objective instead of descending it.
        backend: which implementation runs the rule (see :mod:`lightning_optim.backends`).
        master_weights: an fp32 master copy of bf16/fp16 params (see :class:`~lightning_optim.optim.Optimizer`).

    State: ``square_avg``, ``momentum_buffer`` (momentum > 0), ``grad_avg`` (centered), ``step``.
    """

    spec = SPEC

    def __init__(
        self,
        params: Any,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
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
            lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
            centered=centered, maximize=maximize, master_weights=master_weights,
        )
        super().__init__(params, defaults, backend, foreach=foreach, fused=fused, capturable=capturable,
                         differentiable=differentiable)

    def _validate(self, h, owner):
        h = super()._validate(h, owner)
        # torch.optim.RMSprop's checks: alpha >= 0 and momentum >= 0, nothing above (alpha > 1
        # gives the squared average a negative weight, momentum >= 1 sums instead of averaging,
        # centered with alpha = 0 divides by eps: torch allows them, and so do we).
        for field in ("alpha", "momentum"):
            h[field] = at_least(owner, field, h[field])
        boolean(owner, "centered", h["centered"])
        return h
