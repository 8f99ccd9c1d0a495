"""The Triton backend: every rule of :mod:`..reference` as one fused multi-tensor kernel.

Why fused
    An optimizer step is memory-bound: a few flops per element against reading and writing
    p, g and the state. The foreach backend makes one pass over memory per op (an Adam step
    is about ten), torch's ``fused=True`` makes one pass but exists for Adam(W), SGD and
    Adagrad only. Here every rule makes exactly one pass, whatever its options.

One launch per bucket
    ``run`` gets a (device, dtype) bucket of tensors from ``Optimizer.step``. A device-side
    int64 table holds, per tensor, its numel, its row length and the addresses of p, g,
    every state tensor and the optional fp32 master copy; an int32 block list holds
    (tensor index, block index) for every ``BLOCK`` elements of every tensor. Program
    ``pid`` reads its entry, casts the addresses to typed pointers and updates one block:
    one launch for 150 tensors as for one. The table is cached by addresses and sizes
    (:mod:`.table`): in steady state a step uploads nothing and rebuilds nothing.

    Coupled Adam's shared second moment needs every row of g^2 before any element can be
    updated, so each coupled tensor (usually one: the embedding) gets a pass of its own
    first: torch's ``vector_norm`` over dim 0 (g read once, upcast on the fly), squared,
    the sharding hook's all-reduce when the rows are spread over ranks, then one small
    launch of ``coupled_row_kernel`` for the (1, H) row's EMA (AMP/clip scale, AMSGrad
    maximum and ``found_inf`` included). The elementwise kernel then reads that row.

What reaches the kernel, and how
    Everything that depends on lr or on the step count (``-lr``, the bias corrections, the
    decay factor ``1 - lr * wd``) is a per-tensor factor computed on the device by the step
    prologue (below), which takes lr as a Python float or reads it from a 0-d device tensor
    (a group's ``lr`` may be one, as in torch). The other hyperparameters (betas, eps, wd,
    momentum...) are runtime fp32 kernel arguments: Triton never specializes on float
    values, so nothing recompiles when a value changes. Only options that change the code
    (amsgrad, nesterov, centered, maximize, weight decay on/off, decoupled, dtype) are
    compile-time switches: a handful of variants per rule, each compiled once.

Step counts on the device, and the step prologue
    ``Optimizer.step`` keeps each param's ``step`` (and NAdam's ``mu_product``) as a float32
    0-d tensor on the param's device (torch's ``fused=True``/``capturable=True`` format) and
    passes the step tensors themselves as ``steps``, with ``advance=True``. Nothing reads
    them on the host. Per bucket, one small launch of ``factors_kernel`` (the step
    prologue) counts the step (``t_i += 1``, taken back when ``found_inf`` is set: the two
    foreach launches torch's fused Adam spends on this), reads every ``t_i`` through a cached table of
    the step tensors' addresses and writes the step-dependent factors, per tensor, into an
    fp32 ``(n, 4)`` device array the elementwise kernel reads: the bias corrections
    folded into ``-lr / (1 - beta1^t)`` and ``1 / sqrt(1 - beta2^t)``, AdaGrad's decayed
    lr, NAdam's momentum-schedule coefficients, RAdam's rectification, SGD's undampened
    first step, and for every rule ``-lr`` or ``1 - lr * wd`` where it uses them. The prologue computes in float64 as the reference does on the host
    (``beta^t`` by repeated squaring of the integer t, ~1e-14 relative; fp64
    hyperparameters arrive as two fp32 arguments each, hi + lo, since Triton passes Python
    floats as fp32), and rounds each factor once to fp32: the same values as host factors,
    to an ulp. NAdam: the prologue also does ``mu_product *= mu_t``, once per tensor and
    step (one lane per tensor, not per block), skipped when ``found_inf`` is set. Tensors
    on different counts in one bucket (a param that first got a gradient late) cost
    nothing extra. RMSprop and Lion have no step factor, but their ``-lr`` and decay come
    from the prologue too: one way for lr to reach every kernel.

    ``steps`` may also be Python floats (the backend signature the reference and foreach
    backends take): they are put on the device as 0-d tensors and go through the same
    prologue, so there is one way the factors are computed.

    Per-step host work: one ``data_ptr`` per tensor and slot (the table cache keys), the
    hyperparameters as kernel arguments, two launches. None of it depends on a tensor's
    value.

Precision
    Loads upcast to fp32, the math is fp32 in registers, stores round once (bf16 by hand to
    nearest-even, identical under the interpreter). State of bf16/fp16 params is fp32, as
    ``Optimizer`` allocates it. Optional fp32 master weights: when the state has
    ``master_param`` (an fp32 copy of a bf16/fp16 param), the kernel reads and writes the
    master and writes the param as its rounding. float64 is rejected
    (:class:`~lightning_optim.validation.ConfigurationError`): use the foreach backend.

Fused clipping and AMP hooks (for :mod:`lightning_optim.clipping` and ``torch.amp``)
    ``run(..., grad_scale=t, found_inf=f, clip_value=c)``: every gradient is multiplied by
    the 0-d device tensor ``t`` (clip-by-norm coefficient, AMP unscale), then clamped to
    [-c, c], before the rule; when the 0-d tensor ``f`` is nonzero every load and store of
    the launch is masked off, so the step changes no tensor, and the prologue leaves
    ``mu_product`` alone and, with ``advance``, does not count the step, as torch's fused
    Adam does (with host ``steps`` floats the counts and a CPU ``mu_product`` still
    advance). The norm the clipping coefficient comes from is not computed here:
    :mod:`lightning_optim.clipping` takes it from ``torch._foreach_norm`` (one read of the
    grads, and the same bits as ``clip_grad_norm_``), with no host sync either.

    ``torch.amp.GradScaler``: the optimizers set ``_step_supports_amp_scaling`` on this
    backend, so ``scaler.step(opt)`` does not unscale the gradients or read ``found_inf``
    on the host; it sets ``opt.grad_scale`` (None when ``scaler.unscale_(opt)`` already
    ran, e.g. to clip first) and ``opt.found_inf`` and calls ``opt.step()``, which passes
    ``grad_scale = coef / opt.grad_scale`` (``coef``: a pending ``scale_next_step``
    coefficient, else 1) and ``found_inf`` to the kernel. An inf/NaN step is then skipped
    on the device: params, state, ``step`` and ``mu_product`` unchanged, bit for bit, and
    ``scaler.update()`` backs the scale off as usual. Caveat, Lightning 2.6: its
    ``MixedPrecision`` plugin (16-mixed) does not call ``unscale_`` for an optimizer with
    ``_step_supports_amp_scaling`` (and refuses ``gradient_clip_val``), so callbacks'
    ``on_before_optimizer_step`` see scaled gradients unless one of them calls
    ``trainer.precision_plugin.scaler.unscale_(optimizer)`` first (no host sync either).

Capturing the step in a CUDA graph
    With the counts and AMP's flags on the device, a step has no host work that changes
    from step to step, so ``torch.cuda.graphs`` can capture ``opt.step()``:

    1. keep the grads static: allocate ``p.grad`` once and ``copy_`` new gradients into it
       (or capture backward too); never ``zero_grad(set_to_none=True)`` between replays.
       Params and state must not be reallocated either (the table cache holds addresses);
    2. warm up a few eager steps on a side stream first: that creates the state, builds
       and uploads the address tables, and compiles the kernels, none of which may happen
       during capture;
    3. capture ``opt.step()`` (or the whole training step) in ``torch.cuda.graph(g)`` and
       ``g.replay()`` it. The counts and NAdam's ``mu_product`` advance on the device at
       each replay; AMP's ``grad_scale``/``found_inf`` are read from their tensors at
       replay time, if the same tensors are used (a captured GradScaler needs its scale
       and found_inf buffers static: capture ``scaler.step`` as torch documents for
       capturable optimizers).

    A changing lr: give the groups a 0-d float32 tensor ``lr`` on the params' device
    (``lr=torch.tensor(3e-4, device="cuda")``). The prologue reads it at every replay, and
    schedulers (torch's and :mod:`lightning_optim.schedules`) update it in place with
    ``fill_``, outside the graph. A Python-float lr is baked into the captured launch, as
    are the other hyperparameters (betas, eps, wd...): re-capture after changing those.
    ``scale_next_step`` coefficients are tensors and replay fine if the same tensor is
    refilled; a ``clip_value`` bound is a float, baked in.

Bytes moved per parameter (E = bytes of a param/grad element: 4 fp32, 2 bf16/fp16; state
is fp32, 4 bytes; "rw" = read and written). Each is the minimum for the rule, and the
fused kernel moves exactly that (the table, factors and Coupled Adam's (1, H) rows are
per tensor, not per element)::

    sgd               p rw, g r                        3E        (fp32 12 B)
      + momentum      + buf rw                         3E + 8    (fp32 20 B)
    adagrad           p rw, g r, sum rw                3E + 8    (fp32 20 B)
    rmsprop           p rw, g r, square_avg rw         3E + 8    (fp32 20 B)
      + centered      + grad_avg rw                    + 8
      + momentum      + momentum_buffer rw             + 8
    adam, adamw       p rw, g r, m rw, v rw            3E + 16   (fp32 28 B, bf16 22 B)
      + amsgrad       + max_exp_avg_sq rw              + 8
    coupled_adam      row pass: g r; then p rw, g r,   4E + 8    (fp32 24 B)
      (coupled group)   m rw (v is a (1, H) row)
    nadam, radam,     p rw, g r, m rw, v rw            3E + 16   (fp32 28 B)
      yogi
    lion              p rw, g r, m rw                  3E + 8    (fp32 20 B)
    master weights    master rw (8) replaces p r (E)   + 8 - E   (bf16 adamw 28 B)

:func:`bytes_per_param` computes these; ``benchmarks/step.py`` divides by the time.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ... import rules

__all__ = ["available", "why_unavailable", "interpreter_enabled", "run", "bytes_per_param"]


def available() -> bool:
    """True when Triton can be imported."""
    return why_unavailable() is None


def why_unavailable() -> str | None:
    """Why Triton cannot be used, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed: pip install lightning_optim[triton]"
    return None


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1: run the kernels on CPU tensors in Triton's interpreter (slow; tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def run(rule, params, grads, state, steps, group, row_mean=None, *, grad_scale=None, found_inf=None,
        clip_value=None, advance=False) -> None:
    """Apply ``rule`` to one (device, dtype) bucket in one fused launch.

    The backend signature ``run(rule, params, grads, state, steps, group, row_mean=None)``
    (``steps``: this step's counts, float32 0-d tensors on the params' device, or Python
    floats; see the module docstring) plus the fused-clip hooks ``grad_scale``,
    ``found_inf`` and ``clip_value`` (see the module docstring), and ``advance``: the step
    tensors hold the previous counts and the step prologue counts this step on the device
    (what ``Optimizer.step`` passes). ``row_mean(i, local_sum)``: Coupled Adam's hook
    turning the local sum over dim 0 of g^2 (fp32, shape (1, *shape[1:])) into the global
    mean.
    """
    from . import launcher

    launcher.run(rule, params, grads, state, steps, group, row_mean, grad_scale=grad_scale,
                 found_inf=found_inf, clip_value=clip_value, advance=advance)


def bytes_per_param(rule, group: dict, dtype: torch.dtype, *, master: bool = False) -> int:
    """The bytes one step of ``rule`` (its :class:`~lightning_optim.rules.RuleSpec` or name)
    must move per parameter element (table above): the param read and written and the
    gradient read, ``3E``, plus what the rule's spec declares for its state."""
    e = torch.empty((), dtype=dtype).element_size()
    return 3 * e + rules.get(rule).bytes_per_element(group, e) + ((8 - e) if master and e < 4 else 0)
