"""The foreach backend: every rule of :mod:`.reference`, over lists of tensors.

Each function takes a whole (device, dtype) bucket, ``P, G, S, T, h``: params, grads,
state lists by key, step counts and the group, and follows the numbered steps of the
reference rule of the same name. ``torch._foreach_*`` ops run one fused launch per op
over the bucket on CUDA and a C++ loop on CPU, so Python overhead stays per bucket.

Step counts can differ inside a bucket (a parameter that first got a gradient late), so
per-tensor factors go through :func:`_per_tensor`, which collapses to one scalar in the
common case where every tensor is on the same step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import rules

Tensors = list[Tensor]
ForeachRule = Callable[[Tensors, Tensors, dict[str, Tensors], list[float], dict, bool], None]


def _per_tensor(values: Sequence[float]) -> float | list[float]:
    """One scalar when all tensors share it (faster overloads), else the list."""
    first = values[0]
    return first if all(v == first for v in values) else list(values)


def _grad(P: Tensors, G: Tensors, h: dict, *, l2: bool, owned: bool) -> Tensors:
    """Reference ``_grad`` over a list. ``owned``: G are our copies and may be modified."""
    if h["maximize"]:
        G = torch._foreach_neg(G)
        owned = True
    if l2 and h["weight_decay"] != 0:
        if owned:
            torch._foreach_add_(G, P, alpha=h["weight_decay"])
        else:
            G = torch._foreach_add(G, P, alpha=h["weight_decay"])
    return G


def _decay(P: Tensors, h: dict) -> None:
    if h["weight_decay"] != 0:
        torch._foreach_mul_(P, 1 - h["lr"] * h["weight_decay"])


def _add_scaled_(dst: Tensors, src: Tensors, alpha: float | list[float]) -> None:
    """dst += alpha * src, with one alpha or one per tensor (no foreach overload has that)."""
    if isinstance(alpha, list):
        for d, s, a in zip(dst, src, alpha):
            d.add_(s, alpha=a)
    else:
        torch._foreach_add_(dst, src, alpha=alpha)


def sgd(P, G, S, T, h, owned):
    G = _grad(P, G, h, l2=True, owned=owned)
    mu = h["momentum"]
    if mu != 0:
        # 1. Undampened on each tensor's first step, so the zero buffer becomes g.
        B = S["momentum_buffer"]
        torch._foreach_mul_(B, mu)
        _add_scaled_(B, G, _per_tensor([1.0 if t == 1 else 1 - h["dampening"] for t in T]))
        # 2. Nesterov: g + mu * buf.
        G = torch._foreach_add(G, B, alpha=mu) if h["nesterov"] else B
    # 3.
    torch._foreach_add_(P, G, alpha=-h["lr"])


def adagrad(P, G, S, T, h, owned):
    G = _grad(P, G, h, l2=True, owned=owned)
    # 1.
    clr = [h["lr"] / (1 + (t - 1) * h["lr_decay"]) for t in T]
    # 2.
    torch._foreach_addcmul_(S["sum"], G, G, 1)
    # 3.
    std = torch._foreach_sqrt(S["sum"])
    torch._foreach_add_(std, h["eps"])
    torch._foreach_addcdiv_(P, G, std, [-c for c in clr])


def rmsprop(P, G, S, T, h, owned):
    G = _grad(P, G, h, l2=True, owned=owned)
    alpha = h["alpha"]
    # 1.
    sq = S["square_avg"]
    torch._foreach_mul_(sq, alpha)
    torch._foreach_addcmul_(sq, G, G, 1 - alpha)
    if h["centered"]:
        # 2c.
        ga = S["grad_avg"]
        torch._foreach_lerp_(ga, G, 1 - alpha)
        avg = torch._foreach_addcmul(sq, ga, ga, -1)
        torch._foreach_clamp_min_(avg, 0.0)
        torch._foreach_sqrt_(avg)
    else:
        avg = torch._foreach_sqrt(sq)
    torch._foreach_add_(avg, h["eps"])
    if h["momentum"] > 0:
        # 3m.
        buf = S["momentum_buffer"]
        torch._foreach_mul_(buf, h["momentum"])
        torch._foreach_addcdiv_(buf, G, avg)
        torch._foreach_add_(P, buf, alpha=-h["lr"])
    else:
        # 3.
        torch._foreach_addcdiv_(P, G, avg, -h["lr"])


def _adam(P, G, S, T, h, owned, *, coupled, row_mean=None):
    decoupled = h["decoupled_weight_decay"]
    G = _grad(P, G, h, l2=not decoupled, owned=owned)
    if decoupled:
        _decay(P, h)
    beta1, beta2 = h["betas"]
    M, V = S["exp_avg"], S["exp_avg_sq"]
    # 1.
    torch._foreach_lerp_(M, G, 1 - beta1)
    # 2. Coupled: the row means of g^2 are small (one row each), a per-tensor loop is cheap.
    if coupled:
        rows = [g.square().sum(0, keepdim=True) for g in G]
        rows = [row_mean(i, r) for i, r in enumerate(rows)] if row_mean is not None else \
            [r.div_(g.shape[0]) for r, g in zip(rows, G)]
        torch._foreach_mul_(V, beta2)
        torch._foreach_add_(V, rows, alpha=1 - beta2)
    else:
        torch._foreach_mul_(V, beta2)
        torch._foreach_addcmul_(V, G, G, 1 - beta2)
    # 3.
    if h["amsgrad"]:
        torch._foreach_maximum_(S["max_exp_avg_sq"], V)
        V = S["max_exp_avg_sq"]
    # 4.
    if h["bias_correction"]:
        bc1 = [1 - beta1**t for t in T]
        bc2_sqrt = [math.sqrt(1 - beta2**t) for t in T]
    else:
        bc1 = bc2_sqrt = [1.0] * len(T)
    # 5. sqrt(v/bc2) + eps = (sqrt(v) + eps*sqrt(bc2)) / sqrt(bc2): folding sqrt(bc2) into the
    #    step size and eps saves a full read-write pass over the denominator.
    if coupled:
        D = [(v * h["coupling_scale"]).sqrt_() for v in V]
    else:
        D = torch._foreach_sqrt(V)
    eps = h["eps"]
    torch._foreach_add_(D, _per_tensor([eps * b for b in bc2_sqrt]))
    step = _per_tensor([-h["lr"] * b / c for b, c in zip(bc2_sqrt, bc1)])
    if coupled:
        # D has one row and broadcasts; foreach ops want equal shapes, so loop (1-2 tensors).
        steps = step if isinstance(step, list) else [step] * len(P)
        for p, m, d, s in zip(P, M, D, steps):
            p.addcdiv_(m, d, value=s)
    else:
        torch._foreach_addcdiv_(P, M, D, step)


def adam(P, G, S, T, h, owned):
    _adam(P, G, S, T, h, owned, coupled=False)


def coupled_adam(P, G, S, T, h, owned, row_mean=None):
    _adam(P, G, S, T, h, owned, coupled=True, row_mean=row_mean)


def nadam(P, G, S, T, h, owned):
    decoupled = h["decoupled_weight_decay"]
    G = _grad(P, G, h, l2=not decoupled, owned=owned)
    if decoupled:
        _decay(P, h)
    beta1, beta2 = h["betas"]
    lr, psi = h["lr"], h["momentum_decay"]
    # 1. mu_product lives in float32 scalar tensors (torch's state format); read back once.
    mus = [beta1 * (1.0 - 0.5 * 0.96 ** (t * psi)) for t in T]
    mu_nexts = [beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi)) for t in T]
    torch._foreach_mul_(S["mu_product"], mus)
    prods = [x.item() for x in S["mu_product"]]
    # 2.
    M, V = S["exp_avg"], S["exp_avg_sq"]
    torch._foreach_lerp_(M, G, 1 - beta1)
    torch._foreach_mul_(V, beta2)
    torch._foreach_addcmul_(V, G, G, 1 - beta2)
    D = torch._foreach_div(V, [1 - beta2**t for t in T])
    torch._foreach_sqrt_(D)
    torch._foreach_add_(D, h["eps"])
    # 3.
    torch._foreach_addcdiv_(P, G, D, [-lr * (1.0 - mu) / (1.0 - pr) for mu, pr in zip(mus, prods)])
    torch._foreach_addcdiv_(P, M, D, [-lr * mn / (1.0 - pr * mn) for mn, pr in zip(mu_nexts, prods)])


def radam(P, G, S, T, h, owned):
    decoupled = h["decoupled_weight_decay"]
    G = _grad(P, G, h, l2=not decoupled, owned=owned)
    if decoupled:
        _decay(P, h)
    beta1, beta2 = h["betas"]
    lr = h["lr"]
    M, V = S["exp_avg"], S["exp_avg_sq"]
    torch._foreach_lerp_(M, G, 1 - beta1)
    torch._foreach_mul_(V, beta2)
    torch._foreach_addcmul_(V, G, G, 1 - beta2)
    # 1. rho_t per tensor; split the bucket into rectified and plain-momentum parts.
    rho_inf = 2 / (1 - beta2) - 1
    rect, plain = [], []
    for i, t in enumerate(T):
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        rho_t = rho_inf - 2 * t * beta2**t / bc2
        if rho_t > 5.0:
            r = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
            rect.append((i, -lr * r * math.sqrt(bc2) / bc1))
        else:
            plain.append((i, -lr / bc1))
    # 2. p += -lr * r * sqrt(bc2)/bc1 * m / (sqrt(v) + eps), or p += -lr/bc1 * m.
    if rect:
        idx = [i for i, _ in rect]
        D = torch._foreach_sqrt([V[i] for i in idx])
        torch._foreach_add_(D, h["eps"])
        torch._foreach_addcdiv_([P[i] for i in idx], [M[i] for i in idx], D, [s for _, s in rect])
    if plain:
        for i, s in plain:
            P[i].add_(M[i], alpha=s)


def lion(P, G, S, T, h, owned):
    G = _grad(P, G, h, l2=False, owned=owned)
    _decay(P, h)
    beta1, beta2 = h["betas"]
    M = S["exp_avg"]
    # 1.
    C = torch._foreach_lerp(M, G, 1 - beta1)
    torch._foreach_sign_(C)
    torch._foreach_add_(P, C, alpha=-h["lr"])
    # 2.
    torch._foreach_lerp_(M, G, 1 - beta2)


def yogi(P, G, S, T, h, owned):
    G = _grad(P, G, h, l2=False, owned=owned)
    _decay(P, h)
    beta1, beta2 = h["betas"]
    M, V = S["exp_avg"], S["exp_avg_sq"]
    torch._foreach_lerp_(M, G, 1 - beta1)
    # 1.
    G2 = torch._foreach_mul(G, G)
    torch._foreach_clamp_max_(G2, torch.finfo(G2[0].dtype).max)
    sign = torch._foreach_sub(V, G2)
    torch._foreach_sign_(sign)
    torch._foreach_addcmul_(V, sign, G2, -(1 - beta2))
    # 2.
    bc1 = [1 - beta1**t for t in T]
    bc2_sqrt = [math.sqrt(1 - beta2**t) for t in T]
    D = torch._foreach_sqrt(V)
    torch._foreach_add_(D, _per_tensor([h["eps"] * b for b in bc2_sqrt]))
    torch._foreach_addcdiv_(P, M, D, _per_tensor([-h["lr"] * b / c for b, c in zip(bc2_sqrt, bc1)]))


RULES: dict[str, ForeachRule] = {
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


def run(rule: rules.RuleSpec | str, params, grads, state, steps, group, row_mean=None) -> None:
    """Apply ``rule`` to one (device, dtype) bucket with multi-tensor ops.

    Low-precision buckets are upcast to fp32 lists once, updated, and copied back once,
    which keeps the math fp32 and lets the rule modify the grad copies in place. With
    master weights (``state["master_param"]``) the masters are the fp32 lists, updated in
    place, and the params are copied from them (one rounding); the rule never sees them.
    ``row_mean`` is the reference's: it finishes a ``row_coupled`` rule's mean over dim 0.
    """
    spec = rules.get(rule)
    fn = RULES[spec.name]
    extra = {"row_mean": row_mean} if spec.row_coupled and row_mean is not None else {}
    masters = state.get("master_param")
    if masters is not None:
        state = {k: v for k, v in state.items() if k != "master_param"}
        work = list(masters)
    elif params[0].dtype in (torch.float32, torch.float64):
        fn(params, grads, state, steps, group, False, **extra)
        return
    else:
        work = [p.float() for p in params]
    fn(work, [g.float() for g in grads], state, steps, group, True, **extra)
    torch._foreach_copy_(params, work)
