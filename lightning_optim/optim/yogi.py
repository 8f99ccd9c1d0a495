"""Yogi: Adam whose second moment moves additively, by the sign of the error."""

from __future__ import annotations

from typing import Any

from ..validation import at_least
from ..validation import betas as check_betas
from ..rules import Launch, Preset, Prologue, RuleSpec, register
from .base import Optimizer, zeros


def _launch(h):
    wd = float(h.get("weight_decay", 0.0))
    beta1, beta2 = (float(b) for b in h["betas"])
    return Launch("adam_kernel", ("exp_avg", "exp_avg_sq"),
                  dict(wd=wd, beta1=beta1, beta2=beta2, eps=float(h["eps"]), coupling_scale=1.0),
                  dict(WD=wd != 0, DECOUPLED=True, YOGI=True),
                  Prologue.ADAM, (wd, beta1, beta2, 0.0), bias=True)


SPEC = register(RuleSpec(
    name="yogi",
    options=dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-3, initial_accumulator_value=1e-6, weight_decay=0.0,
                 maximize=False, master_weights=False, backend="auto"),
    state_keys=lambda h: ("exp_avg", "exp_avg_sq"),
    first_moment="exp_avg", second_moment="exp_avg_sq", bias_corrected=True,
    bytes_per_element=lambda h, e: 16,  # p rw, g r: 3E; + exp_avg rw, exp_avg_sq rw
    launch=_launch,
    names={"yogi": Preset({}, "Adam with an additive second moment (Zaheer et al. 2018)")},
))


class Yogi(Optimizer):
    r"""Yogi.

    .. math::
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        v_t &= v_{t-1} - (1 - \beta_2)\, \mathrm{sign}(v_{t-1} - g_t^2)\, g_t^2
            \qquad (v_0 = \text{initial\_accumulator\_value}) \\
        \theta_t &= (1 - \eta\lambda)\, \theta_{t-1} - \frac{\eta}{1 - \beta_1^t}\,
                   \frac{m_t}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}

    Zaheer et al. (2018), "Adaptive Methods for Nonconvex Optimization", NeurIPS,
    Algorithm 2. Adam's :math:`v` moves multiplicatively toward :math:`g^2`, so one rare
    huge gradient inflates it at once and then it forgets fast; Yogi's additive step
    changes :math:`v` by at most :math:`(1-\beta_2) g^2` whichever way, which controls the
    effective learning rate under heavy-tailed gradients. Bias-corrected like Adam; weight
    decay is decoupled.

    Args:
        lr: :math:`\eta`, default 1e-2.
        betas: :math:`(\beta_1, \beta_2)`, default (0.9, 0.999).
        eps: :math:`\epsilon`, default 1e-3 (the paper's choice; larger than Adam's because v starts tiny).
        initial_accumulator_value: :math:`v_0`, default 1e-6.
        weight_decay: decoupled :math:`\lambda`.
        maximize: ascend the objective instead of descending it.
        backend: which implementation runs the rule (see :mod:`lightning_optim.backends`).
        master_weights: an fp32 master copy of bf16/fp16 params (see :class:`~lightning_optim.optim.Optimizer`).

    State: ``exp_avg``, ``exp_avg_sq``, ``step``.
    """

    spec = SPEC

    def __init__(
        self,
        params: Any,
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-3,
        initial_accumulator_value: float = 1e-6,
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
            lr=lr, betas=betas, eps=eps, initial_accumulator_value=initial_accumulator_value,
            weight_decay=weight_decay, maximize=maximize, master_weights=master_weights,
        )
        super().__init__(params, defaults, backend, foreach=foreach, fused=fused, capturable=capturable,
                         differentiable=differentiable)

    def _validate(self, h, owner):
        h = super()._validate(h, owner)
        h["betas"] = check_betas(owner, h["betas"])
        h["initial_accumulator_value"] = at_least(owner, "initial_accumulator_value", h["initial_accumulator_value"])
        return h

    def _init_state(self, p, group):
        return {"exp_avg": zeros(p), "exp_avg_sq": zeros(p, group["initial_accumulator_value"])}
