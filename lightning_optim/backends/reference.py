"""The reference backend: every update rule, one tensor at a time.

This file is the specification. Each rule is a function ``rule(p, g, s, t, h)`` of

- ``p``: the parameter, already in its working precision (fp32 for bf16/fp16 params);
- ``g``: its gradient in the same precision. Never modified in place: it may be the
  user's ``.grad``;
- ``s``: the parameter's state tensors by torch-compatible key (``exp_avg``, ...);
- ``t``: the step count after this step's increment, a Python float (1 on the first step);
- ``h``: the parameter group (hyperparameters by their torch names).

The rule updates ``p`` and ``s`` in place. The foreach and Triton backends implement the
same functions over lists and follow the numbered comments here; the tests hold every
backend to this file. The op order mirrors ``torch.optim``'s single-tensor code where
torch has the rule, so parity with torch is to rounding, not just to tolerance.

The class docstrings in :mod:`lightning_optim.optim` carry the math and its source.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .. import rules

Rule = Callable[[Tensor, Tensor, dict[str, Tensor], float, dict], None]
# Finishes the coupled second moment's mean over dim 0 from the sum over the rows held here:
# ``row_mean(local_row_sum) -> mean`` (see :mod:`lightning_optim.sharding`).
RowMean = Callable[[Tensor], Tensor]
# The same per bucket, given the tensor's index in the bucket: what every backend's ``run`` takes.
BucketRowMean = Callable[[int, Tensor], Tensor]


def _grad(p: Tensor, g: Tensor, h: dict, *, l2: bool) -> Tensor:
    """The gradient the rule sees: negated to maximize, plus ``wd * p`` for L2 decay."""
    if h["maximize"]:
        g = -g
    if l2 and h["weight_decay"] != 0:
        g = g.add(p, alpha=h["weight_decay"])
    return g


def _decay(p: Tensor, h: dict) -> None:
    """Decoupled weight decay (Loshchilov & Hutter 2019): shrink p before the step."""
    if h["weight_decay"] != 0:
        p.mul_(1 - h["lr"] * h["weight_decay"])


def sgd(p: Tensor, g: Tensor, s: dict[str, Tensor], t: float, h: dict) -> None:
    g = _grad(p, g, h, l2=True)
    mu = h["momentum"]
    if mu != 0:
        # 1. buf = mu * buf + (1 - dampening) * g. The buffer starts at zero and the first
        #    step is undampened, which makes buf_1 = g exactly, as torch's clone(g) does.
        buf = s["momentum_buffer"]
        dampening = 0.0 if t == 1 else h["dampening"]
        buf.mul_(mu).add_(g, alpha=1 - dampening)
        # 2. Nesterov looks ahead along the new buffer: g + mu * buf.
        g = g.add(buf, alpha=mu) if h["nesterov"] else buf
    # 3. p = p - lr * g
    p.add_(g, alpha=-h["lr"])


def adagrad(p: Tensor, g: Tensor, s: dict[str, Tensor], t: float, h: dict) -> None:
    g = _grad(p, g, h, l2=True)
    # 1. The learning rate decays with the step count: lr / (1 + (t - 1) * lr_decay).
    clr = h["lr"] / (1 + (t - 1) * h["lr_decay"])
    # 2. sum = sum + g^2: the accumulator never forgets, so steps only shrink.
    s["sum"].addcmul_(g, g, value=1)
    # 3. p = p - clr * g / (sqrt(sum) + eps)
    std = s["sum"].sqrt().add_(h["eps"])
    p.addcdiv_(g, std, value=-clr)


def rmsprop(p: Tensor, g: Tensor, s: dict[str, Tensor], t: float, h: dict) -> None:
    g = _grad(p, g, h, l2=True)
    alpha = h["alpha"]
    # 1. square_avg = alpha * square_avg + (1 - alpha) * g^2
    sq = s["square_avg"]
    sq.mul_(alpha).addcmul_(g, g, value=1 - alpha)
    if h["centered"]:
        # 2c. Centered: divide by the standard deviation, sqrt(E[g^2] - E[g]^2). The two
        #     EMAs round separately, so the variance can come out a hair below 0 (often, with
        #     a small alpha) where torch takes a NaN square root: clamp it at 0.
        ga = s["grad_avg"]
        ga.lerp_(g, 1 - alpha)
        avg = sq.addcmul(ga, ga, value=-1).clamp_min_(0.0).sqrt_()
    else:
        avg = sq.sqrt()
    avg = avg.add_(h["eps"])
    if h["momentum"] > 0:
        # 3m. buf = momentum * buf + g / avg; p = p - lr * buf
        buf = s["momentum_buffer"]
        buf.mul_(h["momentum"]).addcdiv_(g, avg)
        p.add_(buf, alpha=-h["lr"])
    else:
        # 3. p = p - lr * g / avg
        p.addcdiv_(g, avg, value=-h["lr"])


def _adam(p: Tensor, g: Tensor, s: dict[str, Tensor], t: float, h: dict, *, coupled: bool,
          row_mean: RowMean | None = None) -> None:
    decoupled = h["decoupled_weight_decay"]
    g = _grad(p, g, h, l2=not decoupled)
    if decoupled:
        _decay(p, h)
    beta1, beta2 = h["betas"]
    m, v = s["exp_avg"], s["exp_avg_sq"]
    # 1. m = beta1 * m + (1 - beta1) * g
    m.lerp_(g, 1 - beta1)
    # 2. v = beta2 * v + (1 - beta2) * g^2. Coupled: v has one row, the EMA of the mean of
    #    g^2 over dim 0 (the vocabulary); the mean commutes with the EMA, so this equals the
    #    paper's row-average of a full second moment. The mean is a sum over the rows held
    #    here, finished by ``row_mean``: for a row-sharded DTensor the rows are spread over
    #    ranks, and the hook all-reduces the sum and divides by the global vocabulary size.
    if coupled:
        row = g.square().sum(0, keepdim=True)
        row = row_mean(row) if row_mean is not None else row.div_(g.shape[0])
        v.mul_(beta2).add_(row, alpha=1 - beta2)
    else:
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    # 3. AMSGrad keeps the running maximum of v and divides by that instead.
    if h["amsgrad"]:
        torch.maximum(s["max_exp_avg_sq"], v, out=s["max_exp_avg_sq"])
        v = s["max_exp_avg_sq"]
    # 4. Bias corrections undo the zero start of both EMAs (Kingma & Ba 2015, Alg. 1).
    if h["bias_correction"]:
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    else:
        bc1, bc2 = 1.0, 1.0
    # 5. p = p - lr/bc1 * m / (sqrt(v/bc2) + eps), v scaled by coupling_scale if coupled,
    #    and broadcast over the rows.
    if coupled:
        v = v * h["coupling_scale"]
    denom = (v.sqrt() / math.sqrt(bc2)).add_(h["eps"])
    p.addcdiv_(m, denom, value=-h["lr"] / bc1)


def adam(p: Tensor, g: Tensor, s: dict[str, Tensor], t: float, h: dict) -> None:
    _adam(p, g, s, t, h, coupled=False)


def coupled_adam(p: Tensor, g: Tensor, s: dict[str, Tensor], t: float, h: dict,
                 row_mean: RowMean | None = None) -> None:
    _adam(p, g, s, t, h, coupled=True, row_mean=row_mean)


def nadam(p: Tensor, g: Tensor, s: dict[str, Tensor], t: float, h: dict) -> None:
    decoupled = h["decoupled_weight_decay"]
    g = _grad(p, g, h, l2=not decoupled)
    if decoupled:
        _decay(p, h)
    beta1, beta2 = h["betas"]
    lr, psi = h["lr"], h["momentum_decay"]
    # 1. The momentum schedule mu_t = beta1 * (1 - 0.5 * 0.96^(t * psi)) (Dozat 2016).
    #    mu_product holds prod mu_1..mu_t as a float32 scalar tensor, as torch stores it.
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * psi))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))
    mu_product = s["mu_product"]
    mu_product *= mu
    prod = mu_product.item()
    # 2. The usual moments.
    m, v = s["exp_avg"], s["exp_avg_sq"]
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = v.div(1 - beta2**t).sqrt().add_(h["eps"])
    # 3. Nesterov in Adam: a gradient term and a look-ahead momentum term.
    p.addcdiv_(g, denom, value=-lr * (1.0 - mu) / (1.0 - prod))
    p.addcdiv_(m, denom, value=-lr * mu_next / (1.0 - prod * mu_next))


def radam(p: Tensor, g: Tensor, s: dict[str, Tensor], t: float, h: dict) -> None:
    decoupled = h["decoupled_weight_decay"]
    g = _grad(p, g, h, l2=not decoupled)
    if decoupled:
        _decay(p, h)
    beta1, beta2 = h["betas"]
    m, v = s["exp_avg"], s["exp_avg_sq"]
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    m_hat = m / bc1
    # 1. rho_t, the length of the approximated simple moving average (Liu et al. 2020,
    #    eq. 5). While rho_t <= 5 the variance of the adaptive rate is intractable and the
    #    step is plain momentum SGD.
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * beta2**t / bc2
    if rho_t > 5.0:
        # 2. The variance rectification term r_t and the adaptive rate sqrt(bc2) / (sqrt(v) + eps).
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        adaptive = math.sqrt(bc2) / v.sqrt().add_(h["eps"])
        p.add_(m_hat * h["lr"] * adaptive * rect, alpha=-1.0)
    else:
        p.add_(m_hat * h["lr"], alpha=-1.0)


def lion(p: Tensor, g: Tensor, s: dict[str, Tensor], t: float, h: dict) -> None:
    g = _grad(p, g, h, l2=False)
    _decay(p, h)
    beta1, beta2 = h["betas"]
    m = s["exp_avg"]
    # 1. c = beta1 * m + (1 - beta1) * g; p = p - lr * sign(c) (Chen et al. 2023, Alg. 2).
    c = m.lerp(g, 1 - beta1)
    p.add_(c.sign_(), alpha=-h["lr"])
    # 2. Only then m = beta2 * m + (1 - beta2) * g: the two betas differ on purpose.
    m.lerp_(g, 1 - beta2)


def yogi(p: Tensor, g: Tensor, s: dict[str, Tensor], t: float, h: dict) -> None:
    g = _grad(p, g, h, l2=False)
    _decay(p, h)
    beta1, beta2 = h["betas"]
    m, v = s["exp_avg"], s["exp_avg_sq"]
    m.lerp_(g, 1 - beta1)
    # 1. v = v - (1 - beta2) * sign(v - g^2) * g^2 (Zaheer et al. 2018, Alg. 2): v moves
    #    toward g^2 by an additive step, so one huge gradient cannot blow it up at once.
    #    g^2 is capped at the largest finite float: an overflowed g^2 = inf against an
    #    overflowed v = inf would make sign(inf - inf) * inf a NaN; capped, every move is finite.
    g2 = g.square().clamp_max_(torch.finfo(g.dtype).max)
    v.addcmul_(torch.sign(v - g2), g2, value=-(1 - beta2))
    # 2. Bias-corrected like Adam.
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    denom = (v.sqrt() / math.sqrt(bc2)).add_(h["eps"])
    p.addcdiv_(m, denom, value=-h["lr"] / bc1)


RULES: dict[str, Rule] = {
    "sgd": sgd,
    "adagrad": adagrad,
    "rmsprop": rmsprop,
    "adam": adam,
    "coupled_adam": coupled_adam,
    "nadam": nadam,
    "radam": radam,
    "lion": lion,
    "yogi": yogi,
}


def run(rule: rules.RuleSpec | str, params, grads, state, steps, group, row_mean: BucketRowMean | None = None) -> None:
    """Apply ``rule`` to one (device, dtype) bucket, one tensor at a time.

    Low-precision params are updated in an fp32 copy and rounded back once, so the math
    is fp32 whatever the storage; their state is kept in fp32 by the optimizer. With
    master weights (``state["master_param"]``: fp32 copies of bf16/fp16 params) the rule
    updates the master itself instead of a fresh copy, and the param becomes its rounding;
    the master is not a rule state, so the rule never sees it.
    ``row_mean(i, local_row_sum)``, for a ``row_coupled`` rule (Coupled Adam) only, finishes
    the mean over dim 0 of tensor ``i``; None means all its rows are here. ``rule``: the
    rule's :class:`~lightning_optim.rules.RuleSpec` or name.
    """
    spec = rules.get(rule)
    fn = RULES[spec.name]
    hook = row_mean if spec.row_coupled else None
    masters = state.get("master_param")
    if masters is not None:
        state = {k: v for k, v in state.items() if k != "master_param"}
    for i, p in enumerate(params):
        if masters is not None:
            work = masters[i]
        else:
            work = p if p.dtype in (torch.float32, torch.float64) else p.float()
        g = grads[i].to(work.dtype)
        s = {k: v[i] for k, v in state.items()}
        if hook is not None:
            fn(work, g, s, steps[i], group, row_mean=lambda row, i=i: hook(i, row))
        else:
            fn(work, g, s, steps[i], group)
        if work is not p:
            p.copy_(work)
