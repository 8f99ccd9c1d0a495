"""AdaGrad: per-coordinate steps from the sum of all past squared gradients."""

from __future__ import annotations

from typing import Any

from ..validation import at_least
from ..rules import Launch, Preset, Prologue, RuleSpec, register
from .base import Optimizer, zeros


def _launch(h):
    wd = float(h.get("weight_decay", 0.0))
    return Launch("adagrad_kernel", ("sum",), dict(wd=wd, eps=float(h["eps"])), dict(WD=wd != 0),
                  Prologue.ADAGRAD, (wd, 0.0, 0.0, float(h["lr_decay"])))


SPEC = register(RuleSpec(
    name="adagrad",
    options=dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10,
                 maximize=False, master_weights=False, backend="auto"),
    state_keys=lambda h: ("sum",),
    first_moment=None, second_moment="sum", bias_corrected=False,  # a running sum, not an EMA
    bytes_per_element=lambda h, e: 8,  # p rw, g r: 3E; + sum rw
    launch=_launch,
    torch_names=("Adagrad",),
    torch_kernel=lambda h: "_fused_adagrad_",
    names={"adagrad": Preset({}, "AdaGrad (Duchi et al. 2011)")},
))


class Adagrad(Optimizer):
    r"""AdaGrad, as ``torch.optim.Adagrad`` (dense gradients).

    .. math::
        g_t &= \nabla f(\theta_{t-1}) + \lambda \theta_{t-1}, \qquad
        \eta_t = \frac{\eta}{1 + (t - 1)\, \delta} \\
        s_t &= s_{t-1} + g_t^2 \quad (s_0 = \text{initial\_accumulator\_value}) \\
        \theta_t &= \theta_{t-1} - \eta_t \, \frac{g_t}{\sqrt{s_t} + \epsilon}

    Duchi, Hazan & Singer (2011), "Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization", JMLR 12, the diagonal update of Sec. 1.1.

    Args:
        lr: :math:`\eta`.
        lr_decay: :math:`\delta`.
        weight_decay: L2 :math:`\lambda`.
        initial_accumulator_value: :math:`s_0`.
        eps: :math:`\epsilon`.
        maximize: ascend the objective instead of descending it.
        backend: which implementation runs the rule (see :mod:`lightning_optim.backends`).
        master_weights: an fp32 master copy of bf16/fp16 params (see :class:`~lightning_optim.optim.Optimizer`).

    State: ``sum`` and ``step``.
    """

    spec = SPEC

    def __init__(
        self,
        params: Any,
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
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
            lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize,
            master_weights=master_weights,
        )
        super().__init__(params, defaults, backend, foreach=foreach, fused=fused, capturable=capturable,
                         differentiable=differentiable)

    def _validate(self, h, owner):
        h = super()._validate(h, owner)
        h["lr_decay"] = at_least(owner, "lr_decay", h["lr_decay"])
        h["initial_accumulator_value"] = at_least(owner, "initial_accumulator_value", h["initial_accumulator_value"])
        return h

    def _init_state(self, p, group):
        return {"sum": zeros(p, group["initial_accumulator_value"])}
