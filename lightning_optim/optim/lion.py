"""Lion: the sign of an interpolated momentum."""

from __future__ import annotations

from typing import Any

from ..validation import betas as check_betas
from ..rules import Launch, Preset, Prologue, RuleSpec, register
from .base import Optimizer


def _launch(h):
    wd = float(h.get("weight_decay", 0.0))
    beta1, beta2 = (float(b) for b in h["betas"])
    return Launch("lion_kernel", ("exp_avg",), dict(beta1=beta1, beta2=beta2), dict(WD=wd != 0),
                  Prologue.LR, (wd, 0.0, 0.0, 0.0))


SPEC = register(RuleSpec(
    name="lion",
    options=dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False, master_weights=False,
                 backend="auto"),
    state_keys=lambda h: ("exp_avg",),
    # m is the gradient's EMA (beta2), never bias-corrected: the step is its sign.
    first_moment="exp_avg", second_moment=None, bias_corrected=False,
    bytes_per_element=lambda h, e: 8,  # p rw, g r: 3E; + exp_avg rw
    launch=_launch,
    names={"lion": Preset({}, "sign of interpolated momentum (Chen et al. 2023)")},
))


class Lion(Optimizer):
    r"""Lion (EvoLved Sign Momentum).

    .. math::
        c_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        \theta_t &= (1 - \eta\lambda)\, \theta_{t-1} - \eta\, \mathrm{sign}(c_t) \\
        m_t &= \beta_2 m_{t-1} + (1 - \beta_2) g_t

    Chen et al. (2023), "Symbolic Discovery of Optimization Algorithms", Algorithm 2.
    Every coordinate moves by exactly :math:`\eta`, so Lion wants a learning rate 3-10x
    smaller than AdamW's and a weight decay 3-10x larger (the paper's Sec. 5). One state
    tensor instead of Adam's two: less memory and less traffic per step. With
    :math:`\beta_1 = \beta_2 = 0` it is signSGD.

    Args:
        lr: :math:`\eta` (default 1e-4).
        betas: :math:`(\beta_1, \beta_2)` (default (0.9, 0.99)).
        weight_decay: decoupled :math:`\lambda`.
        maximize: ascend the objective instead of descending it.
        backend: which implementation runs the rule (see :mod:`lightning_optim.backends`).
        master_weights: an fp32 master copy of bf16/fp16 params (see :class:`~lightning_optim.optim.Optimizer`).

    State: ``exp_avg``, ``step``.
    """

    spec = SPEC

    def __init__(
        self,
        params: Any,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
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
            lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize, master_weights=master_weights,
        )
        super().__init__(params, defaults, backend, foreach=foreach, fused=fused, capturable=capturable,
                         differentiable=differentiable)

    def _validate(self, h, owner):
        h = super()._validate(h, owner)
        h["betas"] = check_betas(owner, h["betas"])
        return h
