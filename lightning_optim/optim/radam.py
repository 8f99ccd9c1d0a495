"""RAdam: Adam with the variance of its adaptive rate rectified."""

from __future__ import annotations

from typing import Any

from ..validation import boolean
from ..validation import betas as check_betas
from ..rules import Launch, Preset, Prologue, RuleSpec, register
from .base import Optimizer


def _launch(h):
    wd = float(h.get("weight_decay", 0.0))
    beta1, beta2 = (float(b) for b in h["betas"])
    return Launch("nadam_kernel", ("exp_avg", "exp_avg_sq"), dict(wd=wd, beta1=beta1, beta2=beta2, eps=float(h["eps"])),
                  dict(WD=wd != 0, DECOUPLED=bool(h["decoupled_weight_decay"]), RADAM=True),
                  Prologue.RADAM, (wd, beta1, beta2, 0.0))


SPEC = register(RuleSpec(
    name="radam",
    options=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                 maximize=False, master_weights=False, backend="auto"),
    state_keys=lambda h: ("exp_avg", "exp_avg_sq"),
    first_moment="exp_avg", second_moment="exp_avg_sq", bias_corrected=True,
    bytes_per_element=lambda h, e: 16,  # p rw, g r: 3E; + exp_avg rw, exp_avg_sq rw
    launch=_launch,
    torch_names=("RAdam",),
    names={"radam": Preset({}, "Adam with a rectified adaptive rate (Liu et al. 2020)")},
))


class RAdam(Optimizer):
    r"""RAdam, as ``torch.optim.RAdam``.

    .. math::
        \rho_\infty &= \frac{2}{1 - \beta_2} - 1, \qquad
        \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1 - \beta_2^t} \\
        \theta_t &= \theta_{t-1} - \eta\, \hat m_t \cdot
        \begin{cases}
          r_t \, \dfrac{\sqrt{1 - \beta_2^t}}{\sqrt{v_t} + \epsilon}, &
          r_t = \sqrt{\dfrac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}{(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}}
          \quad \text{if } \rho_t > 5 \\
          1 & \text{otherwise (momentum SGD while the variance is intractable)}
        \end{cases}

    Liu et al. (2020), "On the Variance of the Adaptive Learning Rate and Beyond", ICLR,
    Algorithm 2. ``decoupled_weight_decay=True`` gives RAdamW.

    Args:
        lr: :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`.
        eps: :math:`\epsilon`.
        weight_decay: :math:`\lambda` (L2, added to the gradient, unless decoupled).
        decoupled_weight_decay: decay the weights instead of the gradient (RAdamW).
        maximize: ascend the objective instead of descending it.
        backend: which implementation runs the rule (see :mod:`lightning_optim.backends`).
        master_weights: an fp32 master copy of bf16/fp16 params (see :class:`~lightning_optim.optim.Optimizer`).

    State: ``exp_avg``, ``exp_avg_sq``, ``step``.
    """

    spec = SPEC

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
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
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, master_weights=master_weights,
        )
        super().__init__(params, defaults, backend, foreach=foreach, fused=fused, capturable=capturable,
                         differentiable=differentiable)

    def _validate(self, h, owner):
        h = super()._validate(h, owner)
        h["betas"] = check_betas(owner, h["betas"])
        boolean(owner, "decoupled_weight_decay", h["decoupled_weight_decay"])
        return h
