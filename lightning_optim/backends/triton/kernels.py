"""The ``@triton.jit`` kernels: one per update rule, the step prologue and Coupled Adam's row
update.

Every elementwise kernel has the same shape (the table of bytes moved is in ``docs/triton.md``):

1. ``_locate``: program ``pid`` reads (tensor index, block index) from the block list and
   the tensor's row of the table (numel, row length, then one int64 address per slot);
2. the per-tensor scalars: the four factors the step prologue wrote for the tensor (all
   that depends on lr or the step count), the fused-clip ``grad_scale`` and the
   ``found_inf`` flag (a set flag makes the tensor's
   length 0 for the program, so every load and store is masked off: the step is a no-op
   without a host sync);
3. the rule's ``_*_block`` on ``BLOCK`` elements: full blocks with a mask that is the same
   for every lane (so the compiler emits 16-byte vector loads when the addresses are
   aligned), the last block of a tensor with the ``offs < numel`` mask.

Math is fp32 in registers whatever the storage: ``_load`` upcasts, ``_store`` rounds once.
bf16 is moved as its raw 16 bits and rounded to nearest-even with integer ops: the
interpreter (``TRITON_INTERPRET=1``) truncates fp32 -> bf16 casts where GPUs round, and
doing it by hand makes both paths bit-identical to ``torch``'s ``.to(torch.bfloat16)``.

This module is loaded twice by :mod:`.launcher`, once compiled for GPUs and once for the
interpreter, because ``@triton.jit`` chooses between the two when it decorates.
The numbered comments are the numbered steps of :mod:`lightning_optim.backends.reference`.
"""

import triton
import triton.language as tl

from lightning_optim.rules import Prologue

# Storage kinds of params and grads (state is always fp32).
FP32: tl.constexpr = tl.constexpr(0)
BF16: tl.constexpr = tl.constexpr(1)
FP16: tl.constexpr = tl.constexpr(2)

# Table row: [numel, row length, address of slot 0, slot 1, ...]. Slot 0 is the param,
# slot 1 the grad, then the rule's state tensors in order, then the fp32 master copy.
HEADER: tl.constexpr = tl.constexpr(2)


# ----- table access, loads and stores --------------------------------------------------------


@triton.jit
def _locate(table, blocks, W: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tensor index, table row, numel, first offset and lane offsets."""
    pid = tl.program_id(0)
    ti = tl.load(blocks + 2 * pid)
    blk = tl.load(blocks + 2 * pid + 1)
    row = table + ti.to(tl.int64) * W
    n = tl.load(row)
    start = blk.to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
    return ti, row, n, start, offs


@triton.jit
def _addr(row, slot: tl.constexpr, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    """Slot ``slot`` of a table row as a typed pointer (bf16 as its raw uint16 bits)."""
    a = tl.load(row + HEADER + slot)
    if KIND == BF16:
        ptr = a.to(tl.pointer_type(tl.uint16))
    elif KIND == FP16:
        ptr = a.to(tl.pointer_type(tl.float16))
    else:
        ptr = a.to(tl.pointer_type(tl.float32))
    if ALIGNED:
        # The launcher checked every address is 16-byte aligned: allows vector accesses.
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _load(ptr, offs, mask, KIND: tl.constexpr):
    x = tl.load(ptr + offs, mask=mask, other=0)
    if KIND == BF16:
        # bf16 is the top half of an fp32: widening is a shift.
        x = (x.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store(ptr, offs, x, mask, KIND: tl.constexpr):
    if KIND == BF16:
        # Round to nearest, ties to even: add 0x7FFF plus the lowest kept bit, drop 16 bits.
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # A NaN whose payload sits in the low bits would round to inf: keep it a NaN.
        rounded = tl.where(x != x, 0x7FC0, rounded)
        tl.store(ptr + offs, rounded.to(tl.uint16), mask=mask)
    elif KIND == FP16:
        tl.store(ptr + offs, x.to(tl.float16), mask=mask)
    else:
        tl.store(ptr + offs, x, mask=mask)


@triton.jit
def _scalars(factors, ti, n, grad_scale, found_inf, HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr):
    """The tensor's four step factors (row ``ti`` of the prologue's output), the gradient
    scale, and the number of elements to update: 0 when ``found_inf`` is set, which masks
    every load and store of the program."""
    base = factors + ti.to(tl.int64) * 4
    f0 = tl.load(base)
    f1 = tl.load(base + 1)
    f2 = tl.load(base + 2)
    f3 = tl.load(base + 3)
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(grad_scale).to(tl.float32)
    if HAS_FOUND:
        n = tl.where(tl.load(found_inf) == 0, n, 0)
    return f0, f1, f2, f3, scale, n


@triton.jit
def _grad(row, offs, mask, scale, clip, GKIND: tl.constexpr, ALIGNED: tl.constexpr,
          HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, MAXIMIZE: tl.constexpr):
    """The gradient the rule sees: unscaled / clip-by-norm scaled, clamped, negated."""
    g = _load(_addr(row, 1, GKIND, ALIGNED), offs, mask, GKIND)
    if HAS_SCALE:
        g = g * scale
    if HAS_CLIP:
        g = tl.minimum(tl.maximum(g, -clip), clip)
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def _lerp(a, b, w):
    """torch.lerp's formula (exact at w = 0 and w = 1), so EMAs match the reference."""
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _finish(row, offs, mask, p, KIND: tl.constexpr, ALIGNED: tl.constexpr, MASTER: tl.constexpr,
            MSLOT: tl.constexpr):
    """Store the new param: once rounded to its dtype, and exactly into the master copy."""
    if MASTER:
        _store(_addr(row, MSLOT, FP32, ALIGNED), offs, p, mask, FP32)
    _store(_addr(row, 0, KIND, ALIGNED), offs, p, mask, KIND)


@triton.jit
def _param(row, offs, mask, KIND: tl.constexpr, ALIGNED: tl.constexpr, MASTER: tl.constexpr,
           MSLOT: tl.constexpr):
    if MASTER:
        return _load(_addr(row, MSLOT, FP32, ALIGNED), offs, mask, FP32)
    return _load(_addr(row, 0, KIND, ALIGNED), offs, mask, KIND)


@triton.jit
def _state(row, slot: tl.constexpr, offs, mask, ALIGNED: tl.constexpr):
    ptr = _addr(row, slot, FP32, ALIGNED)
    return ptr, tl.load(ptr + offs, mask=mask, other=0)


# ----- SGD -------------------------------------------------------------------------------


@triton.jit
def _sgd_block(row, offs, mask, neg_lr, wd, mu, damp, scale, clip,
               KIND: tl.constexpr, GKIND: tl.constexpr, ALIGNED: tl.constexpr, MASTER: tl.constexpr,
               MSLOT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
               MAXIMIZE: tl.constexpr, WD: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr):
    p = _param(row, offs, mask, KIND, ALIGNED, MASTER, MSLOT)
    g = _grad(row, offs, mask, scale, clip, GKIND, ALIGNED, HAS_SCALE, HAS_CLIP, MAXIMIZE)
    if WD:
        g = g + wd * p
    if MOMENTUM:
        # 1. buf = mu * buf + (1 - dampening) * g, undampened on the tensor's first step.
        bp, buf = _state(row, 2, offs, mask, ALIGNED)
        buf = buf * mu + damp * g
        tl.store(bp + offs, buf, mask=mask)
        # 2. Nesterov: g + mu * buf.
        if NESTEROV:
            g = g + mu * buf
        else:
            g = buf
    # 3. p = p - lr * g
    p = p + neg_lr * g
    _finish(row, offs, mask, p, KIND, ALIGNED, MASTER, MSLOT)


# Every kernel: common arguments first (table, blocks, factors, grad_scale, found_inf), then
# the rule's lr-free hyperparameters as runtime fp32 scalars and the clip bound, then the
# compile-time switches. Everything that depends on lr or on the step count (-lr, the bias
# corrections, 1 - lr * wd) is a per-tensor factor from the step prologue, which reads lr
# from a device tensor when it is one: a new lr is a new value, never a new kernel, and a
# captured CUDA graph sees it. The last block of a tensor takes the masked path; the others
# a lane-uniform mask.


@triton.jit
def sgd_kernel(table, blocks, factors, grad_scale, found_inf, wd, mu, clip,
               W: tl.constexpr, BLOCK: tl.constexpr, KIND: tl.constexpr, GKIND: tl.constexpr,
               ALIGNED: tl.constexpr, HAS_SCALE: tl.constexpr,
               HAS_FOUND: tl.constexpr, HAS_CLIP: tl.constexpr, MASTER: tl.constexpr, MSLOT: tl.constexpr,
               MAXIMIZE: tl.constexpr, WD: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr):
    # f0: 1 - dampening, or 1 on the tensor's first step; f1: -lr.
    ti, row, n, start, offs = _locate(table, blocks, W, BLOCK)
    f0, f1, f2, f3, scale, n = _scalars(factors, ti, n, grad_scale, found_inf, HAS_SCALE, HAS_FOUND)
    if start + BLOCK <= n:
        _sgd_block(row, offs, tl.full([BLOCK], 1, tl.int1), f1, wd, mu, f0, scale, clip, KIND, GKIND,
                   ALIGNED, MASTER, MSLOT, HAS_SCALE, HAS_CLIP, MAXIMIZE, WD, MOMENTUM, NESTEROV)
    else:
        _sgd_block(row, offs, offs < n, f1, wd, mu, f0, scale, clip, KIND, GKIND,
                   ALIGNED, MASTER, MSLOT, HAS_SCALE, HAS_CLIP, MAXIMIZE, WD, MOMENTUM, NESTEROV)


# ----- AdaGrad -----------------------------------------------------------------------------


@triton.jit
def _adagrad_block(row, offs, mask, wd, eps, neg_clr, scale, clip,
                   KIND: tl.constexpr, GKIND: tl.constexpr, ALIGNED: tl.constexpr, MASTER: tl.constexpr,
                   MSLOT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
                   MAXIMIZE: tl.constexpr, WD: tl.constexpr):
    p = _param(row, offs, mask, KIND, ALIGNED, MASTER, MSLOT)
    g = _grad(row, offs, mask, scale, clip, GKIND, ALIGNED, HAS_SCALE, HAS_CLIP, MAXIMIZE)
    if WD:
        g = g + wd * p
    # 2. sum = sum + g^2
    sp, s = _state(row, 2, offs, mask, ALIGNED)
    s = s + g * g
    tl.store(sp + offs, s, mask=mask)
    # 3. p = p - clr * g / (sqrt(sum) + eps), clr (step 1) from the step prologue.
    p = p + neg_clr * (g / (tl.sqrt(s) + eps))
    _finish(row, offs, mask, p, KIND, ALIGNED, MASTER, MSLOT)


@triton.jit
def adagrad_kernel(table, blocks, factors, grad_scale, found_inf, wd, eps, clip,
                   W: tl.constexpr, BLOCK: tl.constexpr, KIND: tl.constexpr, GKIND: tl.constexpr,
                   ALIGNED: tl.constexpr, HAS_SCALE: tl.constexpr,
                   HAS_FOUND: tl.constexpr, HAS_CLIP: tl.constexpr, MASTER: tl.constexpr, MSLOT: tl.constexpr,
                   MAXIMIZE: tl.constexpr, WD: tl.constexpr):
    # f0: -lr / (1 + (t - 1) * lr_decay).
    ti, row, n, start, offs = _locate(table, blocks, W, BLOCK)
    f0, f1, f2, f3, scale, n = _scalars(factors, ti, n, grad_scale, found_inf, HAS_SCALE, HAS_FOUND)
    if start + BLOCK <= n:
        _adagrad_block(row, offs, tl.full([BLOCK], 1, tl.int1), wd, eps, f0, scale, clip, KIND, GKIND,
                       ALIGNED, MASTER, MSLOT, HAS_SCALE, HAS_CLIP, MAXIMIZE, WD)
    else:
        _adagrad_block(row, offs, offs < n, wd, eps, f0, scale, clip, KIND, GKIND,
                       ALIGNED, MASTER, MSLOT, HAS_SCALE, HAS_CLIP, MAXIMIZE, WD)


# ----- RMSprop -----------------------------------------------------------------------------


@triton.jit
def _rmsprop_block(row, offs, mask, neg_lr, wd, alpha, eps, mom, scale, clip,
                   KIND: tl.constexpr, GKIND: tl.constexpr, ALIGNED: tl.constexpr, MASTER: tl.constexpr,
                   MSLOT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
                   MAXIMIZE: tl.constexpr, WD: tl.constexpr, CENTERED: tl.constexpr, MOMENTUM: tl.constexpr):
    p = _param(row, offs, mask, KIND, ALIGNED, MASTER, MSLOT)
    g = _grad(row, offs, mask, scale, clip, GKIND, ALIGNED, HAS_SCALE, HAS_CLIP, MAXIMIZE)
    if WD:
        g = g + wd * p
    # 1. square_avg = alpha * square_avg + (1 - alpha) * g^2
    sqp, sq = _state(row, 2, offs, mask, ALIGNED)
    sq = sq * alpha + (1.0 - alpha) * (g * g)
    tl.store(sqp + offs, sq, mask=mask)
    if CENTERED:
        # 2c. sqrt(E[g^2] - E[g]^2); grad_avg is slot 3.
        gap, ga = _state(row, 3, offs, mask, ALIGNED)
        ga = _lerp(ga, g, 1.0 - alpha)
        tl.store(gap + offs, ga, mask=mask)
        var = sq + (-1.0) * (ga * ga)
        avg = tl.sqrt(tl.where(var < 0, 0.0, var))  # the reference's clamp at 0 (NaN stays NaN)
    else:
        avg = tl.sqrt(sq)
    avg = avg + eps
    if MOMENTUM:
        # 3m. buf = momentum * buf + g / avg; p = p - lr * buf. The buffer follows the
        #     square average (and grad_avg when centered).
        bp, buf = _state(row, 3 + CENTERED, offs, mask, ALIGNED)
        buf = buf * mom + g / avg
        tl.store(bp + offs, buf, mask=mask)
        p = p + neg_lr * buf
    else:
        # 3. p = p - lr * g / avg
        p = p + neg_lr * (g / avg)
    _finish(row, offs, mask, p, KIND, ALIGNED, MASTER, MSLOT)


@triton.jit
def rmsprop_kernel(table, blocks, factors, grad_scale, found_inf, wd, alpha, eps, mom, clip,
                   W: tl.constexpr, BLOCK: tl.constexpr, KIND: tl.constexpr, GKIND: tl.constexpr,
                   ALIGNED: tl.constexpr, HAS_SCALE: tl.constexpr,
                   HAS_FOUND: tl.constexpr, HAS_CLIP: tl.constexpr, MASTER: tl.constexpr, MSLOT: tl.constexpr,
                   MAXIMIZE: tl.constexpr, WD: tl.constexpr, CENTERED: tl.constexpr, MOMENTUM: tl.constexpr):
    # f0: -lr (no step-dependent factor).
    ti, row, n, start, offs = _locate(table, blocks, W, BLOCK)
    f0, f1, f2, f3, scale, n = _scalars(factors, ti, n, grad_scale, found_inf, HAS_SCALE, HAS_FOUND)
    if start + BLOCK <= n:
        _rmsprop_block(row, offs, tl.full([BLOCK], 1, tl.int1), f0, wd, alpha, eps, mom, scale, clip,
                       KIND, GKIND, ALIGNED, MASTER, MSLOT, HAS_SCALE, HAS_CLIP, MAXIMIZE, WD, CENTERED, MOMENTUM)
    else:
        _rmsprop_block(row, offs, offs < n, f0, wd, alpha, eps, mom, scale, clip,
                       KIND, GKIND, ALIGNED, MASTER, MSLOT, HAS_SCALE, HAS_CLIP, MAXIMIZE, WD, CENTERED, MOMENTUM)


# ----- Adam, AdamW, AMSGrad, Coupled Adam, Yogi ---------------------------------------------


@triton.jit
def _adam_block(row, offs, mask, wd, decay, beta1, beta2, eps, coupling_scale, neg_step, inv_sqrt_bc2,
                scale, clip, rowlen,
                KIND: tl.constexpr, GKIND: tl.constexpr, ALIGNED: tl.constexpr, MASTER: tl.constexpr,
                MSLOT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
                MAXIMIZE: tl.constexpr, WD: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr,
                COUPLED: tl.constexpr, YOGI: tl.constexpr):
    p = _param(row, offs, mask, KIND, ALIGNED, MASTER, MSLOT)
    g = _grad(row, offs, mask, scale, clip, GKIND, ALIGNED, HAS_SCALE, HAS_CLIP, MAXIMIZE)
    if WD:
        if DECOUPLED:
            p = p * decay  # decay = 1 - lr * wd (Loshchilov & Hutter 2019)
        else:
            g = g + wd * p
    # 1. m = beta1 * m + (1 - beta1) * g
    mp, m = _state(row, 2, offs, mask, ALIGNED)
    m = _lerp(m, g, 1.0 - beta1)
    tl.store(mp + offs, m, mask=mask)
    if COUPLED:
        # 2. (done before this kernel, on the (1, H) row: it needs all rows' g^2.) Slot 3 is
        #    the row to divide by, exp_avg_sq or max_exp_avg_sq; element k is in column k % H.
        vrow = _addr(row, 3, FP32, False)
        vhat = tl.load(vrow + offs % rowlen, mask=mask, other=0) * coupling_scale
    else:
        vp, v = _state(row, 3, offs, mask, ALIGNED)
        if YOGI:
            # Yogi 1. v = v - (1 - beta2) * sign(v - g^2) * g^2 (Zaheer et al. 2018, Alg. 2)
            g2 = g * g
            g2 = tl.where(g2 > 3.4028234663852886e38, 3.4028234663852886e38, g2)  # the reference's cap (NaN stays)
            v = v + (beta2 - 1.0) * (_sign(v - g2) * g2)
        else:
            # 2. v = beta2 * v + (1 - beta2) * g^2
            v = v * beta2 + (1.0 - beta2) * (g * g)
        tl.store(vp + offs, v, mask=mask)
        vhat = v
        if AMSGRAD:
            # 3. the running maximum of v, slot 4.
            xp, vmax = _state(row, 4, offs, mask, ALIGNED)
            vhat = tl.maximum(vmax, v)
            tl.store(xp + offs, vhat, mask=mask)
    # 4-5. p = p - lr/bc1 * m / (sqrt(v) / sqrt(bc2) + eps); neg_step = -lr / bc1.
    denom = tl.sqrt(vhat) * inv_sqrt_bc2 + eps
    p = p + neg_step * (m / denom)
    _finish(row, offs, mask, p, KIND, ALIGNED, MASTER, MSLOT)


@triton.jit
def adam_kernel(table, blocks, factors, grad_scale, found_inf, wd, beta1, beta2, eps, coupling_scale, clip,
                W: tl.constexpr, BLOCK: tl.constexpr, KIND: tl.constexpr, GKIND: tl.constexpr,
                ALIGNED: tl.constexpr, HAS_SCALE: tl.constexpr,
                HAS_FOUND: tl.constexpr, HAS_CLIP: tl.constexpr, MASTER: tl.constexpr, MSLOT: tl.constexpr,
                MAXIMIZE: tl.constexpr, WD: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr = False,
                COUPLED: tl.constexpr = False, YOGI: tl.constexpr = False):
    # f0 = -lr / bc1, f1 = 1 / sqrt(bc2) (no correction: -lr and 1), f2 = 1 - lr * wd.
    # The variants' switches default to off: a rule's launch plan names only its own.
    ti, row, n, start, offs = _locate(table, blocks, W, BLOCK)
    f0, f1, f2, f3, scale, n = _scalars(factors, ti, n, grad_scale, found_inf, HAS_SCALE, HAS_FOUND)
    rowlen = tl.load(row + 1)
    if start + BLOCK <= n:
        _adam_block(row, offs, tl.full([BLOCK], 1, tl.int1), wd, f2, beta1, beta2, eps, coupling_scale,
                    f0, f1, scale, clip, rowlen, KIND, GKIND, ALIGNED, MASTER, MSLOT, HAS_SCALE, HAS_CLIP,
                    MAXIMIZE, WD, DECOUPLED, AMSGRAD, COUPLED, YOGI)
    else:
        _adam_block(row, offs, offs < n, wd, f2, beta1, beta2, eps, coupling_scale,
                    f0, f1, scale, clip, rowlen, KIND, GKIND, ALIGNED, MASTER, MSLOT, HAS_SCALE, HAS_CLIP,
                    MAXIMIZE, WD, DECOUPLED, AMSGRAD, COUPLED, YOGI)


# ----- NAdam and RAdam ----------------------------------------------------------------------


@triton.jit
def _nadam_block(row, offs, mask, wd, decay, beta1, beta2, eps, g_step, m_step, bc2, scale, clip,
                 KIND: tl.constexpr, GKIND: tl.constexpr, ALIGNED: tl.constexpr, MASTER: tl.constexpr,
                 MSLOT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
                 MAXIMIZE: tl.constexpr, WD: tl.constexpr, DECOUPLED: tl.constexpr, RADAM: tl.constexpr):
    p = _param(row, offs, mask, KIND, ALIGNED, MASTER, MSLOT)
    g = _grad(row, offs, mask, scale, clip, GKIND, ALIGNED, HAS_SCALE, HAS_CLIP, MAXIMIZE)
    if WD:
        if DECOUPLED:
            p = p * decay
        else:
            g = g + wd * p
    # 2. The usual moments.
    mp, m = _state(row, 2, offs, mask, ALIGNED)
    m = _lerp(m, g, 1.0 - beta1)
    tl.store(mp + offs, m, mask=mask)
    vp, v = _state(row, 3, offs, mask, ALIGNED)
    v = v * beta2 + (1.0 - beta2) * (g * g)
    tl.store(vp + offs, v, mask=mask)
    if RADAM:
        # RAdam 2. g_step = -lr * r_t * sqrt(bc2) / bc1 over (sqrt(v) + eps) when m_step
        #    (the rectified flag) is set, else -lr / bc1 on the bare momentum.
        denom = tl.where(m_step != 0, tl.sqrt(v) + eps, 1.0)
        p = p + g_step * (m / denom)
    else:
        # NAdam 3. a gradient term and a look-ahead momentum term over sqrt(v / bc2) + eps.
        denom = tl.sqrt(v / bc2) + eps
        p = p + g_step * (g / denom)
        p = p + m_step * (m / denom)
    _finish(row, offs, mask, p, KIND, ALIGNED, MASTER, MSLOT)


@triton.jit
def nadam_kernel(table, blocks, factors, grad_scale, found_inf, wd, beta1, beta2, eps, clip,
                 W: tl.constexpr, BLOCK: tl.constexpr, KIND: tl.constexpr, GKIND: tl.constexpr,
                 ALIGNED: tl.constexpr, HAS_SCALE: tl.constexpr,
                 HAS_FOUND: tl.constexpr, HAS_CLIP: tl.constexpr, MASTER: tl.constexpr, MSLOT: tl.constexpr,
                 MAXIMIZE: tl.constexpr, WD: tl.constexpr, DECOUPLED: tl.constexpr, RADAM: tl.constexpr):
    # NAdam: f0 = -lr (1 - mu_t) / (1 - Pi_t), f1 = -lr mu_{t+1} / (1 - Pi_t mu_{t+1}), f2 = bc2.
    # RAdam: f0 = the step size, f1 = 1 if rectified (rho_t > 5) else 0. Both: f3 = 1 - lr * wd.
    ti, row, n, start, offs = _locate(table, blocks, W, BLOCK)
    f0, f1, f2, f3, scale, n = _scalars(factors, ti, n, grad_scale, found_inf, HAS_SCALE, HAS_FOUND)
    if start + BLOCK <= n:
        _nadam_block(row, offs, tl.full([BLOCK], 1, tl.int1), wd, f3, beta1, beta2, eps, f0, f1, f2,
                     scale, clip, KIND, GKIND, ALIGNED, MASTER, MSLOT, HAS_SCALE, HAS_CLIP, MAXIMIZE, WD,
                     DECOUPLED, RADAM)
    else:
        _nadam_block(row, offs, offs < n, wd, f3, beta1, beta2, eps, f0, f1, f2,
                     scale, clip, KIND, GKIND, ALIGNED, MASTER, MSLOT, HAS_SCALE, HAS_CLIP, MAXIMIZE, WD,
                     DECOUPLED, RADAM)


# ----- Lion ---------------------------------------------------------------------------------


@triton.jit
def _lion_block(row, offs, mask, neg_lr, decay, beta1, beta2, scale, clip,
                KIND: tl.constexpr, GKIND: tl.constexpr, ALIGNED: tl.constexpr, MASTER: tl.constexpr,
                MSLOT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
                MAXIMIZE: tl.constexpr, WD: tl.constexpr):
    p = _param(row, offs, mask, KIND, ALIGNED, MASTER, MSLOT)
    g = _grad(row, offs, mask, scale, clip, GKIND, ALIGNED, HAS_SCALE, HAS_CLIP, MAXIMIZE)
    if WD:
        p = p * decay
    mp, m = _state(row, 2, offs, mask, ALIGNED)
    # 1. c = beta1 * m + (1 - beta1) * g; p = p - lr * sign(c)
    c = _lerp(m, g, 1.0 - beta1)
    p = p + neg_lr * _sign(c)
    # 2. m = beta2 * m + (1 - beta2) * g
    m = _lerp(m, g, 1.0 - beta2)
    tl.store(mp + offs, m, mask=mask)
    _finish(row, offs, mask, p, KIND, ALIGNED, MASTER, MSLOT)


@triton.jit
def lion_kernel(table, blocks, factors, grad_scale, found_inf, beta1, beta2, clip,
                W: tl.constexpr, BLOCK: tl.constexpr, KIND: tl.constexpr, GKIND: tl.constexpr,
                ALIGNED: tl.constexpr, HAS_SCALE: tl.constexpr,
                HAS_FOUND: tl.constexpr, HAS_CLIP: tl.constexpr, MASTER: tl.constexpr, MSLOT: tl.constexpr,
                MAXIMIZE: tl.constexpr, WD: tl.constexpr):
    # f0 = -lr, f1 = 1 - lr * wd.
    ti, row, n, start, offs = _locate(table, blocks, W, BLOCK)
    f0, f1, f2, f3, scale, n = _scalars(factors, ti, n, grad_scale, found_inf, HAS_SCALE, HAS_FOUND)
    if start + BLOCK <= n:
        _lion_block(row, offs, tl.full([BLOCK], 1, tl.int1), f0, f1, beta1, beta2, scale, clip,
                    KIND, GKIND, ALIGNED, MASTER, MSLOT, HAS_SCALE, HAS_CLIP, MAXIMIZE, WD)
    else:
        _lion_block(row, offs, offs < n, f0, f1, beta1, beta2, scale, clip,
                    KIND, GKIND, ALIGNED, MASTER, MSLOT, HAS_SCALE, HAS_CLIP, MAXIMIZE, WD)


# ----- the step prologue: lr- and step-dependent factors, on the device -----------------------

# RULE of factors_kernel: which factors to compute. The codes are defined once, in
# lightning_optim.rules.Prologue, which the rules' specs hand the launcher; Triton reads
# globals only as constexprs, hence these bindings.
P_LR: tl.constexpr = tl.constexpr(int(Prologue.LR))
P_SGD: tl.constexpr = tl.constexpr(int(Prologue.SGD))
P_ADAGRAD: tl.constexpr = tl.constexpr(int(Prologue.ADAGRAD))
P_ADAM: tl.constexpr = tl.constexpr(int(Prologue.ADAM))
P_NADAM: tl.constexpr = tl.constexpr(int(Prologue.NADAM))
P_RADAM: tl.constexpr = tl.constexpr(int(Prologue.RADAM))


@triton.jit
def _f64(hi, lo):
    """A float64 hyperparameter passed as two fp32 kernel arguments, hi + lo (Triton passes
    Python floats as fp32; 1 - beta2 needs more than fp32's 24 bits)."""
    return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)


@triton.jit
def _powi(base, e):
    """``base ** e`` in float64 for integer ``e`` in [0, 2^32), by squaring: at most 64 fp64
    products, ~1e-14 relative. (Counting in fp32 stops at 2^24, where t + 1 == t; a larger
    count can only come from a state dict, and the caller clamps it below 2^32.)"""
    r = tl.full(e.shape, 1.0, tl.float64)
    b = base
    for k in tl.static_range(32):
        r = tl.where(((e >> k) & 1) == 1, r * b, r)
        b = b * b
    return r


@triton.jit
def factors_kernel(table, factors, found_inf, lr_ptr, n, lr_hi, lr_lo, wd_hi, wd_lo, b1_hi, b1_lo, b2_hi, b2_lo,
                   c_hi, c_lo, W: tl.constexpr, BLOCK: tl.constexpr, RULE: tl.constexpr, BIAS: tl.constexpr,
                   HAS_FOUND: tl.constexpr, LR_TENSOR: tl.constexpr, ADVANCE: tl.constexpr):
    """Per-tensor factors ``factors[i, 0:4]`` (fp32) of the elementwise kernel: every
    quantity that depends on lr or on the step count ``t_i`` (slot 0 of table row i), in
    float64 as the reference computes them on the host.

    ADVANCE: slot 0 holds the count before this step, and the prologue counts the step:
    ``t_i += 1``, then ``t_i -= 1`` again when ``found_inf`` is set (a skipped step is not
    counted, as in torch's fused Adam), written back; the same two fp32 operations as
    ``torch._foreach_add_``/``_foreach_sub_``, without their launches. Else ``t_i`` is this
    step's count already.

    lr is ``*lr_ptr`` when LR_TENSOR (a 0-d device tensor, read at launch time, so a
    captured graph follows it), else the argument pair ``lr_hi + lr_lo``. NAdam also
    multiplies ``mu_product`` (slot 1) by ``mu_t`` here, once per tensor and step, unless
    ``found_inf`` is set. ``c``: SGD's 1 - dampening, AdaGrad's lr_decay, NAdam's 0.96^psi.
    RULE: a :class:`lightning_optim.rules.Prologue` code (what each writes is listed there).
    """
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    row = table + i.to(tl.int64) * W + HEADER
    sp = tl.load(row, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    t32 = tl.load(sp, mask=mask, other=1.0)
    if ADVANCE:
        t32 = t32 + 1.0
        if HAS_FOUND:
            t32 = t32 - tl.where(tl.load(found_inf + i * 0, mask=mask, other=0) == 0, 0.0, 1.0)
        tl.store(sp, t32, mask=mask)
    t = t32.to(tl.float64)
    e = tl.minimum(t32, 4294967295.0).to(tl.int64)
    zero = tl.full([BLOCK], 0.0, tl.float64)  # (tl.zeros is a @jit function: see the norm kernel)
    if LR_TENSOR:
        lr = tl.load(lr_ptr + i * 0, mask=mask, other=0).to(tl.float64)
    else:
        lr = _f64(lr_hi, lr_lo) + zero
    c = _f64(c_hi, c_lo)
    # Decoupled weight decay's factor (Loshchilov & Hutter 2019), in float64 as on the host.
    decay = 1.0 - lr * _f64(wd_hi, wd_lo)
    f0 = zero
    f1 = zero
    f2 = zero
    f3 = zero
    if RULE == P_SGD:
        # The first step is undampened (buf_1 = g).
        f0 = tl.where(t == 1.0, 1.0 + zero, c + zero)
        f1 = -lr
    elif RULE == P_ADAGRAD:
        f0 = -lr / (1.0 + (t - 1.0) * c)
    elif RULE == P_LR:
        f0 = -lr
        f1 = decay
    else:
        # P_ADAM, P_NADAM, P_RADAM: the bias corrections.
        beta1 = _f64(b1_hi, b1_lo)
        beta2 = _f64(b2_hi, b2_lo)
        bc1 = 1.0 - _powi(beta1, e)
        pow2 = _powi(beta2, e)
        bc2 = 1.0 - pow2
        if RULE == P_ADAM:
            if BIAS:
                f0 = -lr / bc1
                f1 = 1.0 / tl.sqrt(bc2)
            else:
                f0 = -lr
                f1 = zero + 1.0
            f2 = decay
        elif RULE == P_NADAM:
            # mu_t = beta1 (1 - 0.5 * 0.96^(t psi)) = beta1 (1 - 0.5 c^t), c = 0.96^psi.
            ct = _powi(c, e)
            mu = beta1 * (1.0 - 0.5 * ct)
            mu_next = beta1 * (1.0 - 0.5 * (ct * c))
            mp = tl.load(row + 1, mask=mask, other=0).to(tl.pointer_type(tl.float32))
            # An fp32 product, as torch's (and the reference's) fp32 mu_product *= mu.
            prod = tl.load(mp, mask=mask, other=1.0) * mu.to(tl.float32)
            keep = mask
            if HAS_FOUND:
                keep = mask & (tl.load(found_inf + i * 0, mask=mask, other=1.0) == 0)
            tl.store(mp, prod, mask=keep)
            pr = prod.to(tl.float64)
            f0 = -lr * (1.0 - mu) / (1.0 - pr)
            f1 = -lr * mu_next / (1.0 - pr * mu_next)
            f2 = bc2
            f3 = decay
        elif RULE == P_RADAM:
            # RAdam: rho_t (Liu et al. 2020, eq. 5); rectified while rho_t > 5.
            rho_inf = 2.0 / (1.0 - beta2) - 1.0
            rho = rho_inf - 2.0 * t * pow2 / bc2
            rect = rho > 5.0
            safe = tl.where(rect, rho, 6.0 + zero)
            r = tl.sqrt((safe - 4.0) * (safe - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * safe))
            f0 = tl.where(rect, -lr * r * tl.sqrt(bc2) / bc1, -lr / bc1)
            f1 = tl.where(rect, 1.0 + zero, zero)
            f3 = decay
    out = factors + i.to(tl.int64) * 4
    tl.store(out, f0.to(tl.float32), mask=mask)
    tl.store(out + 1, f1.to(tl.float32), mask=mask)
    tl.store(out + 2, f2.to(tl.float32), mask=mask)
    tl.store(out + 3, f3.to(tl.float32), mask=mask)


# ----- Coupled Adam's shared second moment ------------------------------------------------------


@triton.jit
def coupled_row_kernel(row_sum, v, vmax, grad_scale, found_inf, H, rows, beta2, BLOCK: tl.constexpr,
                       HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr, AMSGRAD: tl.constexpr):
    """Step 2 (and 3) of Coupled Adam on one tensor's (1, H) rows, in one small launch:

        vbar = beta2 * vbar + (1 - beta2) * scale^2 * row_sum / rows
        (AMSGRAD) vmax = max(vmax, vbar)

    ``row_sum``: the sum over dim 0 of g^2 (fp32), before the gradient scale ``scale``
    (clip-by-norm coefficient, AMP unscale); ``rows``: the number of rows summed, or 1 when a
    sharding hook already turned the sum into the global mean. The mean over the rows of the
    EMA is the EMA of the mean, so this one row is the row-average of a full second moment
    (Stollenwerk & Stollenwerk 2025, "Better Embeddings with Coupled Adam", arXiv:2502.08441,
    Sec. 4; the formula is :class:`~lightning_optim.CoupledAdam`'s). A set ``found_inf``
    writes nothing, as in the elementwise kernels.
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n = H
    if HAS_FOUND:
        n = tl.where(tl.load(found_inf) == 0, H, 0)
    mask = offs < n
    s = tl.load(row_sum + offs, mask=mask, other=0)
    if HAS_SCALE:
        scale = tl.load(grad_scale).to(tl.float32)
        s = s * (scale * scale)
    v_new = tl.load(v + offs, mask=mask, other=0) * beta2 + (1.0 - beta2) * (s / rows)
    tl.store(v + offs, v_new, mask=mask)
    if AMSGRAD:
        tl.store(vmax + offs, tl.maximum(tl.load(vmax + offs, mask=mask, other=0), v_new), mask=mask)
