"""NAdam: Adam with Nesterov momentum."""

from __future__ import annotations

from typing import Any

from ..validation import at_least, boolean
from ..validation import betas as check_betas
from ..rules import Launch, Preset, Prologue, RuleSpec, register
from .base import Optimizer, scalar, zeros


def _launch(h):
    wd = float(h.get("weight_decay", 0.0))
    beta1, beta2 = (float(b) for b in h["betas"])
    return Launch("nadam_kernel", ("exp_avg", "exp_avg_sq"), dict(wd=wd, beta1=beta1, beta2=beta2, eps=float(h["eps"])),
                  dict(WD=wd != 0, DECOUPLED=bool(h["decoupled_weight_decay"]), RADAM=False),
                  Prologue.NADAM, (wd, beta1, beta2, 0.96 ** float(h["momentum_decay"])))


SPEC = register(RuleSpec(
    name="nadam",
    options=dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum_decay=4e-3,
                 decoupled_weight_decay=False, maximize=False, master_weights=False, backend="auto"),
    state_keys=lambda h: ("exp_avg", "exp_avg_sq", "mu_product"),
    first_moment="exp_avg", second_moment="exp_avg_sq", bias_corrected=True,
    bytes_per_element=lambda h, e: 16,  # p rw, g r: 3E; + exp_avg rw, exp_avg_sq rw
    launch=_launch,
    scalar_state=("mu_product",),
    torch_names=("NAdam",),
    names={"nadam": Preset({}, "Adam with Nesterov momentum (Dozat 2016)")},
))


class NAdam(Optimizer):
    r"""NAdam, as ``torch.optim.NAdam``.

    .. math::
        \mu_t &= \beta_1 \left(1 - \tfrac12\, 0.96^{t \psi}\right), \qquad
        \Pi_t = \textstyle\prod_{i \le t} \mu_i \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \qquad
        d_t = \sqrt{v_t / (1 - \beta_2^t)} + \epsilon \\
        \theta_t &= \theta_{t-1} - \eta\, \frac{1 - \mu_t}{1 - \Pi_t} \frac{g_t}{d_t}
                   - \eta\, \frac{\mu_{t+1}}{1 - \Pi_t \mu_{t+1}} \frac{m_t}{d_t}

    Dozat (2016), "Incorporating Nesterov Momentum into Adam", ICLR workshop, Algorithm 2,
    with the momentum schedule :math:`\mu_t` of its Sec. 3 (:math:`\psi` =
    ``momentum_decay``). ``decoupled_weight_decay=True`` gives NAdamW.

    Args:
        lr: :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`.
        eps: :math:`\epsilon`.
        weight_decay: :math:`\lambda` (L2, added to the gradient, unless decoupled).
        momentum_decay: :math:`\psi` of the momentum schedule.
        decoupled_weight_decay: decay the weights instead of the gradient (NAdamW).
        maximize: ascend the objective instead of descending it.
        backend: which implementation runs the rule (see :mod:`lightning_optim.backends`).
        master_weights: an fp32 master copy of bf16/fp16 params (see :class:`~lightning_optim.optim.Optimizer`).

    State: ``exp_avg``, ``exp_avg_sq``, ``mu_product`` (:math:`\Pi_t`, a float32 scalar: on the CPU,
    or on the param's device with ``backend="triton"``, which updates it there), ``step``.
    """

    spec = SPEC

    def __init__(
        self,
        params: Any,
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum_decay: float = 4e-3,
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
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
            decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, master_weights=master_weights,
        )
        super().__init__(params, defaults, backend, foreach=foreach, fused=fused, capturable=capturable,
                         differentiable=differentiable)

    def _validate(self, h, owner):
        h = super()._validate(h, owner)
        h["betas"] = check_betas(owner, h["betas"])
        h["momentum_decay"] = at_least(owner, "momentum_decay", h["momentum_decay"])
        boolean(owner, "decoupled_weight_decay", h["decoupled_weight_decay"])
        return h

    def _init_state(self, p, group):
        return {"exp_avg": zeros(p), "exp_avg_sq": zeros(p), "mu_product": scalar(1.0)}
