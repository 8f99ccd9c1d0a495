"""Adam and AdamW: momentum plus per-coordinate scaling by the second moment."""

from __future__ import annotations

from typing import Any

from ..validation import betas as check_betas
from ..validation import boolean
from dataclasses import replace

from ..rules import Launch, Preset, Prologue, RuleSpec, register
from .base import Optimizer


def _launch(h):
    wd, amsgrad = float(h.get("weight_decay", 0.0)), bool(h["amsgrad"])
    beta1, beta2 = (float(b) for b in h["betas"])
    return Launch("adam_kernel", ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()),
                  dict(wd=wd, beta1=beta1, beta2=beta2, eps=float(h["eps"]), coupling_scale=1.0),
                  dict(WD=wd != 0, DECOUPLED=bool(h["decoupled_weight_decay"]), AMSGRAD=amsgrad),
                  Prologue.ADAM, (wd, beta1, beta2, 0.0), bias=bool(h.get("bias_correction", True)))


SPEC = register(RuleSpec(
    name="adam",
    options=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                 decoupled_weight_decay=False, bias_correction=True, master_weights=False, backend="auto"),
    state_keys=lambda h: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if h["amsgrad"] else ("exp_avg", "exp_avg_sq"),
    # With amsgrad the statistics describe the EMA, not its running max.
    first_moment="exp_avg", second_moment="exp_avg_sq", bias_corrected=True,
    # p rw, g r: 3E; + exp_avg rw, exp_avg_sq rw, + max_exp_avg_sq rw (amsgrad).
    bytes_per_element=lambda h, e: 16 + 8 * bool(h.get("amsgrad")),
    launch=_launch,
    torch_names=("Adam", "AdamW"),
    # torch's fused Adam/AdamW compute this rule, bias-corrected only.
    torch_kernel=lambda h: (("_fused_adamw_" if h.get("decoupled_weight_decay") else "_fused_adam_")
                            if h.get("bias_correction", True) else None),
    names={"adam": Preset({}, "Adam with L2 decay (Kingma & Ba 2015)"),
           "amsgrad": Preset({"amsgrad": True}, "Adam with the running-max second moment (Reddi et al. 2018)")},
))
# AdamW: the same rule, its own options (decoupled decay always, a weight decay by default).
ADAMW = replace(SPEC, options=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                                   maximize=False, bias_correction=True, master_weights=False, backend="auto"),
                names={"adamw": Preset({}, "Adam with decoupled weight decay (Loshchilov & Hutter 2019)")})


class Adam(Optimizer):
    r"""Adam, as ``torch.optim.Adam``, plus ``bias_correction``.

    .. math::
        g_t &= \nabla f(\theta_{t-1}) + \lambda \theta_{t-1} \quad \text{(L2; decoupled: see AdamW)} \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        \hat v_t &= \max(\hat v_{t-1}, v_t) \ \text{(amsgrad) else } v_t \\
        \theta_t &= \theta_{t-1} - \frac{\eta}{1 - \beta_1^t}\,
                    \frac{m_t}{\sqrt{\hat v_t / (1 - \beta_2^t)} + \epsilon}

    Kingma & Ba (2015), "Adam: A Method for Stochastic Optimization", Algorithm 1. AMSGrad:
    Reddi, Kale & Kumar (2018), "On the Convergence of Adam and Beyond", Algorithm 2 (with
    torch's bias correction). Registry names: ``adam``, ``amsgrad`` (amsgrad=True).

    With bias correction the first step moves each coordinate by
    :math:`\eta |g| / (|g| + \epsilon) \approx \eta`; without it (``bias_correction=False``,
    the two EMAs start at zero uncorrected) the first step is
    :math:`(1 - \beta_1)/\sqrt{1 - \beta_2}` times that, about 3.2x at the defaults.

    Args:
        lr: :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`.
        eps: :math:`\epsilon`.
        weight_decay: :math:`\lambda`.
        amsgrad: use the running max of :math:`v`.
        decoupled_weight_decay: decay the weights instead of the gradient (AdamW).
        bias_correction: divide by :math:`1 - \beta^t`.
        maximize: ascend the objective instead of descending it.
        backend: which implementation runs the rule (see :mod:`lightning_optim.backends`).
        master_weights: an fp32 master copy of bf16/fp16 params (see :class:`~lightning_optim.optim.Optimizer`).

    State: ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad), ``step``: torch's
    keys and shapes, so state dicts move between this class and ``torch.optim.Adam``.
    """

    spec = SPEC

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        bias_correction: bool = True,
        master_weights: bool = False,
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, decoupled_weight_decay=decoupled_weight_decay,
            bias_correction=bias_correction, master_weights=master_weights,
        )
        super().__init__(params, defaults, backend, foreach=foreach, fused=fused, capturable=capturable,
                         differentiable=differentiable)

    def _validate(self, h, owner):
        h = super()._validate(h, owner)
        h["betas"] = check_betas(owner, h["betas"])
        for flag in ("amsgrad", "decoupled_weight_decay", "bias_correction"):
            boolean(owner, flag, h[flag])
        return h


class AdamW(Adam):
    r"""AdamW, as ``torch.optim.AdamW``, plus ``bias_correction``: Adam with decoupled decay.

    .. math::
        \theta_{t-1} \leftarrow (1 - \eta \lambda)\, \theta_{t-1}, \quad \text{then the Adam step of}
        \ g_t = \nabla f(\theta_{t-1}) \text{ (no L2 term)}

    Loshchilov & Hutter (2019), "Decoupled Weight Decay Regularization", Algorithm 2
    (with the schedule multiplier folded into :math:`\eta`, as torch does). Decay then
    shrinks weights by the same factor whatever the gradient scale, which L2 through
    Adam's denominator does not. Registry name: ``adamw``.
    """

    spec = ADAMW

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        bias_correction: bool = True,
        master_weights: bool = False,
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
            decoupled_weight_decay=True, bias_correction=bias_correction,
            master_weights=master_weights, backend=backend,
            foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable,
        )
