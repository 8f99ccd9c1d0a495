"""Coupled Adam: AdamW whose embedding rows share one second moment."""

from __future__ import annotations

from typing import Any

from .. import sharding
from ..rules import Launch, Preset, Prologue, RuleSpec, register
from ..validation import ConfigurationError, boolean, positive
from .adam import ADAMW, AdamW
from .base import Optimizer, state_dtype


def _launch(h):
    wd, amsgrad = float(h.get("weight_decay", 0.0)), bool(h["amsgrad"])
    beta1, beta2 = (float(b) for b in h["betas"])
    # The row pre-pass updates the (1, H) rows (exp_avg_sq, and its running max with amsgrad);
    # the elementwise kernel divides by the last of them, its slot 3.
    return Launch("adam_kernel", ("exp_avg", "max_exp_avg_sq" if amsgrad else "exp_avg_sq"),
                  dict(wd=wd, beta1=beta1, beta2=beta2, eps=float(h["eps"]), coupling_scale=float(h["coupling_scale"])),
                  dict(WD=wd != 0, DECOUPLED=bool(h["decoupled_weight_decay"]), COUPLED=True),
                  Prologue.ADAM, (wd, beta1, beta2, 0.0), bias=bool(h.get("bias_correction", True)),
                  rows=("exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg_sq",))


# The rule of coupled groups; the others run AdamW's (``CoupledAdam.spec_for``).
SPEC = register(RuleSpec(
    name="coupled_adam",
    options=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False,
                 bias_correction=True, coupled=False, coupling_scale=1.0, master_weights=False, backend="auto"),
    state_keys=ADAMW.state_keys,
    # exp_avg_sq is the shared (1, H) row; the statistics broadcast it over the rows.
    first_moment="exp_avg", second_moment="exp_avg_sq", bias_corrected=True,
    # The row pass reads g (E); then p rw, g r (3E) and exp_avg rw: the rows are per tensor.
    bytes_per_element=lambda h, e: e + 8,
    launch=_launch,
    row_coupled=True,
    names={"coupled_adam": Preset({}, "AdamW with the embedding second moment shared across rows (Stollenwerk & Stollenwerk 2025)")},
))


class CoupledAdam(AdamW):
    r"""AdamW; in param groups with ``coupled=True`` the second moment is shared across dim 0.

    For a coupled tensor :math:`E \in \mathbb{R}^{V \times H}` (V vocabulary rows):

    .. math::
        \bar v_t &= \beta_2 \bar v_{t-1} + (1 - \beta_2)\, \frac{1}{V} \sum_{i=1}^{V} g_{t,i}^2
            \qquad (\bar v \in \mathbb{R}^{1 \times H}) \\
        E_t &= (1 - \eta\lambda) E_{t-1} - \frac{\eta}{1 - \beta_1^t}\,
              \frac{m_t}{\sqrt{c\, \bar v_t / (1 - \beta_2^t)} + \epsilon}
              \quad \text{(broadcast over the rows)}

    Stollenwerk & Stollenwerk (2025), "Better Embeddings with Coupled Adam",
    arXiv:2502.08441. The matrix is the output (un)embedding: Sec. 1 introduces it (tied to
    the input embedding by weight tying), and the analysis before the experiments (Secs. 2-3;
    the experiments are Sec. 4) shows that the softmax gradients of its rows sum to zero, so
    SGD keeps their mean in place, while Adam's per-row second moment makes rare tokens' rows
    move more than frequent ones', the updates no longer cancel, and the mean embedding
    drifts away from the origin (anisotropy). Averaging the second moment over the vocabulary
    gives every row the same scale. The paper averages a full V x H second moment; because the
    mean over rows commutes with the EMA, keeping only :math:`\bar v` is exactly that, in H
    instead of V x H floats.

    Where we differ from the authors' code on purpose (github.com/flxst/coupled-adam,
    ``nanoGPT/coupled_adam.py`` at commit ba54c74). There the coupling is four lines in
    ``_multi_tensor_adamw`` (the foreach path; the single-tensor and fused paths raise
    ``RuntimeError("FUNC = ...")`` on entry, so foreach is the only one that runs), in the
    non-capturable branch and only in the ``else`` of ``if amsgrad:``: it replaces each
    tensor's ``exp_avg_sq`` in the update by ``avg_scale`` times its mean over dim 0, while
    the state keeps the full V x H moment. So with ``amsgrad=True`` their optimizer does not
    couple at all (it divides by the running maximum of the full per-coordinate moment), nor
    with ``capturable=True``. Here AMSGrad couples too: the running maximum is taken of the
    shared row, :math:`\bar v^{max}_t = \max(\bar v^{max}_{t-1}, \bar v_t)`, and the
    update divides by it; every backend couples the same way. Their ``avg_scale`` is our ``coupling_scale``
    (a per-group option here, one per optimizer there). Which tensor they couple is chosen in
    ``nanoGPT/model.py`` ``configure_optimizers``: the parameter named ``*.wte.weight``, the
    token embedding tied to ``lm_head``, alone in the CoupledAdam optimizer, without weight
    decay by default; :func:`lightning_optim.param_groups` couples the same tensor by default
    (see :func:`lightning_optim.partition.find_unembedding`).

    Under FSDP2 (a ``DTensor`` sharded ``Shard(0)``, each rank holding a block of rows) the
    mean is over the global vocabulary: each rank sums :math:`g^2` over its rows, one
    all-reduce of the H-vector adds the shards, and the sum is divided by the global V
    (:func:`lightning_optim.sharding.row_mean`); :math:`\bar v` is a replicated DTensor.

    Groups without ``coupled=True`` are plain AdamW. :func:`lightning_optim.param_groups`
    puts the output embedding (the token embedding tied to the head, or an untied head) in a
    coupled group, and nothing else unless a partition rule says ``coupled=True``.

    Args:
        coupled: a group option (default False): share the second moment across dim 0 in this group.
        coupling_scale: :math:`c` (default 1.0), saved in the state dict with the group.

    The other arguments are :class:`AdamW`'s.

    State: ``exp_avg``, ``exp_avg_sq`` (shape ``(1, *shape[1:])`` in coupled groups),
    ``max_exp_avg_sq`` (amsgrad), ``step``.
    """

    spec = SPEC
    couples = True
    structural = ("coupled",)

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
        coupled: bool = False,
        coupling_scale: float = 1.0,
        master_weights: bool = False,
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, decoupled_weight_decay=True, bias_correction=bias_correction,
            coupled=coupled, coupling_scale=coupling_scale, master_weights=master_weights,
        )
        Optimizer.__init__(self, params, defaults, backend, foreach=foreach, fused=fused,
                           capturable=capturable, differentiable=differentiable)
        if not any(g["coupled"] for g in self.param_groups):
            self._warn_once(
                "no_coupled_group",
                "CoupledAdam has no param group with coupled=True, so it is plain AdamW. Pass "
                "lightning_optim.param_groups(model), or mark the embedding group coupled=True.",
            )

    def _validate(self, h, owner):
        h = super()._validate(h, owner)
        boolean(owner, "coupled", h["coupled"])
        h["coupling_scale"] = positive(owner, "coupling_scale", h["coupling_scale"])
        return h

    def _check_params(self, group):
        if not group["coupled"]:
            return
        for i, p in enumerate(group["params"]):
            if p.dim() < 2:
                raise ConfigurationError(
                    f"CoupledAdam: coupled groups must be 2-D or wider, but {self._param_name(group, i)} "
                    f"has shape {list(p.shape)}: the second moment is shared across dim 0 (the "
                    "vocabulary rows), which a vector does not have. Leave it out of the coupled group."
                )

    def _check_complex(self, p, group, i):
        super()._check_complex(p, group, i)
        if group["coupled"]:
            # The shared second moment is a mean over the rows of |g|^2 per column; on a real
            # view it would average re and im parts as separate columns: not a rule anyone
            # defined, so a complex coupled tensor is refused rather than updated some way.
            raise ConfigurationError(
                f"CoupledAdam: {self._param_name(group, i)} is {p.dtype} in a coupled group: the coupled second "
                "moment is defined for real embeddings only. Leave it out of the coupled group (other groups "
                "are AdamW, which takes complex parameters)."
            )

    @classmethod
    def spec_for(cls, group):
        return cls.spec if group.get("coupled", False) else ADAMW

    def _init_state(self, p, group):
        state = super()._init_state(p, group)
        if group["coupled"]:
            row = sharding.row_state(p, state_dtype(p))
            state["exp_avg_sq"] = row
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = row.clone()
        return state
