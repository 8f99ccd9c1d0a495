"""Our optimizers against torch's own optimizer test database.

The torch wheel ships the inputs its optimizer tests run on:
``torch.testing._internal.common_optimizers.optim_db``, one ``OptimizerInfo`` per class
with ``optim_inputs_func`` (hyperparameter combinations torch tests) and
``optim_error_inputs_func`` (inputs torch refuses, with the exception type and message).
It is imported here at test time, never copied, so a new torch brings its new cases.

For each of the 7 classes torch and we share (SGD, Adagrad, RMSprop, Adam, AdamW, NAdam,
RAdam), every CPU input runs through torch's optimizer and ours side by side, on params
that include a 0-d tensor, a transposed and a strided (non-contiguous) view, for several
steps, in float32, float64, complex64 and complex128; the triton backend (under Triton's
interpreter) on a subset. Tolerances, and why:

- real dtypes: the reference backend is bit-identical to torch's for-loop
  (``foreach=False``). The foreach backend is bit-identical to torch's ``foreach=True`` for
  SGD, Adagrad, RMSprop and RAdam; for Adam, AdamW and NAdam it folds ``sqrt(1 - beta2^t)``
  into the step size and eps (one pass over the denominator less), so 1e-6 relative;
- complex: a complex param moves exactly (bit for bit, state included) as its real view
  does under the same backend: that is our semantics, torch's (``view_as_real``) for these
  rules. Against torch itself 1e-6 relative: torch does some ops before its real view in
  complex arithmetic (SGD throughout, the L2 term ``grad.add(param, alpha=wd)`` of
  Adagrad/RMSprop, ...), and a complex op with a real scalar rounds differently from the
  same op on the real view (by an ulp); its for-loop and foreach paths differ from each
  other on complex for the same reason;
- ``fused=True``: our foreach fallback against torch's for-loop, 1e-6 relative (torch's CPU
  fused kernels are not the oracle: in torch 2.13 they misread a gradient whose strides
  differ from its param's, e.g. a transposed param with a contiguous grad);
- triton: fp32 math in one fused pass, step factors from the device prologue: 1e-6 relative.

Inputs with torch's global flags (``foreach``, ``fused``, ``differentiable``, from torch's
own ``_get_optim_inputs_including_global_cliquey_kwargs``) run too: ``differentiable=True``
must raise our clear error, ``fused=True`` on CPU must fall back to foreach with one
warning, and each must leave ``backend`` saying what runs. Every error input must raise
torch's exception type; where the check is torch's own (param-group structure) the message
matches torch's regex, where it is ours it has our one error shape. The one input torch
refuses and we accept on purpose (a tensor lr with ``foreach=True``) is asserted to work,
with its reason.
"""

from __future__ import annotations

import copy
import os
import re
import warnings

import pytest
import torch

# torch's test database (it needs the ``expecttest`` package, in the dev extra). Importing it
# runs torch's test-suite setup, which changes process-wide state that the rest of our suite
# relies on: it freezes the cudnn flags (``torch.backends.disable_global_flags``, so every later
# ``Trainer(deterministic=True)`` raises) and points Inductor at a fresh cache directory. Both
# are put back right after the import.
_INDUCTOR_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
from torch.testing._internal.common_optimizers import (  # noqa: E402
    OptimizerErrorEnum,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

# The flag lives in torch.backends' own globals (the attribute is a module proxy's).
torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
if _INDUCTOR_CACHE is None:
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
else:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_CACHE

import lightning_optim as lo
from lightning_optim import backends
from lightning_optim.validation import ConflictingOptions, LightningOptimWarning
from conftest import assert_rel

SHARED = ("SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "NAdam", "RAdam")
# Where our foreach backend has torch's foreach op order (module docstring).
FOREACH_AS_TORCH = {"SGD", "Adagrad", "RMSprop", "RAdam"}
INFOS = {info.optim_cls.__name__: info for info in optim_db if info.optim_cls.__name__ in SHARED}
DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)
# RAdam rectifies from step 6 at beta2 = 0.999: 7 steps see both of its branches.
STEPS = 7
TOL = 1e-6


def test_importing_the_database_leaves_process_state_as_it_was():
    # The rest of the suite builds Trainer(deterministic=True) and compiles with Inductor's cache.
    assert not torch.backends.flags_frozen()
    torch.backends.cudnn.benchmark = False  # what Lightning's Trainer sets: must not raise
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == _INDUCTOR_CACHE


def test_database_has_every_shared_class():
    assert sorted(INFOS) == sorted(SHARED)
    for name, info in INFOS.items():
        assert info.supports_complex, f"torch's {name} takes complex params: so must ours"
        assert len(info.optim_inputs_func(device="cpu")) >= 5, name


def _inputs(name: str) -> list:
    return INFOS[name].optim_inputs_func(device="cpu")


def _make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """A (3, 4) tensor, a 0-d tensor, a transposed (dense, non-contiguous) and a strided
    slice (non-dense) view, all leaves."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    params = [randn(3, 4), randn(()), randn(5, 3).t(), randn(4, 6)[:, ::2]]
    assert not params[2].is_contiguous() and not params[3].is_contiguous()
    return [p.detach().requires_grad_() for p in params]


def _grad(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # Laid out like the param where it is dense (as autograd lays out .grad), else contiguous.
    return torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _run(make, dtype: torch.dtype, steps: int = STEPS, params: list | None = None):
    """Params after ``steps`` steps of ``make(params)`` on seeded gradients, and the optimizer.
    Given real views of complex ``params``, the gradients are the views of the same complex
    gradients."""
    params = _make_params(dtype) if params is None else params
    opt = make(params)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            if p.dtype == dtype:
                p.grad = _grad(p, gen)
            else:  # a real view (..., 2) of a complex param
                p.grad = torch.view_as_real(_grad(torch.view_as_complex(p.detach()), gen))
        opt.step()
    return params, opt


def _real_views(dtype: torch.dtype) -> list[torch.Tensor]:
    """The params of :func:`_make_params` as real leaves ``view_as_real(p)`` (the same strides)."""
    return [torch.view_as_real(p.detach()).requires_grad_() for p in _make_params(dtype)]


def _kwargs(optim_input) -> dict:
    # deepcopy: a tensor lr is mutable state of one optimizer, never shared between two.
    return copy.deepcopy(optim_input.kwargs)


def _torch(name: str, kwargs: dict):
    return lambda ps: getattr(torch.optim, name)(ps, **kwargs)


def _ours(name: str, kwargs: dict, **extra):
    return lambda ps: getattr(lo, name)(ps, **kwargs, **extra)


def _compare(got, expected, *, exact: bool, what: str) -> None:
    (gp, gopt), (ep, eopt) = got, expected
    for i, (a, e) in enumerate(zip(gp, ep)):
        assert a.dtype == e.dtype and a.stride() == e.stride(), f"{what} param {i}"
        if exact:
            assert torch.equal(a, e), f"{what}: param {i} is not bit-identical to torch"
        else:
            assert_rel(torch.view_as_real(a) if a.is_complex() else a,
                       torch.view_as_real(e) if e.is_complex() else e, TOL, f"{what} param {i}")
        # Same state keys, dtypes (complex state for complex params, as torch keeps it) and values.
        ours, theirs = gopt.state[a], eopt.state[e]
        # (SGD: torch keeps no step count; ours does, for every rule.)
        assert set(ours) - {"step"} == set(theirs) - {"step"}, \
            f"{what} param {i}: state keys {sorted(ours)} != torch's {sorted(theirs)}"
        for key, value in theirs.items():
            mine = ours[key]
            assert mine.dtype == value.dtype, f"{what} param {i} {key}: {mine.dtype} != {value.dtype}"
            if key == "step" or not exact:
                assert_rel(torch.view_as_real(mine) if mine.is_complex() else mine,
                           torch.view_as_real(value) if value.is_complex() else value, TOL, f"{what} {key}")
            else:
                assert torch.equal(mine, value), f"{what} param {i}: {key} is not bit-identical to torch's"


PARITY = [
    pytest.param(name, i, dtype, id=f"{name}-{i}-{oi.desc.replace(' ', '_')}-{str(dtype)[6:]}")
    for name in SHARED
    for i, oi in enumerate(_inputs(name))
    for dtype in DTYPES
]


@pytest.mark.parametrize("name, index, dtype", PARITY)
def test_every_input_matches_torch(name, index, dtype):
    """Every CPU input of torch's database, on each of our CPU backends, against torch's
    for-loop and foreach implementations (see the module docstring for the tolerances)."""
    kwargs = _kwargs(_inputs(name)[index])
    loop = _run(_torch(name, {**kwargs, "foreach": False}), dtype)
    multi = _run(_torch(name, {**_kwargs(_inputs(name)[index]), "foreach": True}), dtype)
    for backend, oracle, what in (("reference", loop, "for-loop"), ("foreach", multi, "foreach")):
        got = _run(_ours(name, _kwargs(_inputs(name)[index]), backend=backend), dtype)
        assert got[1].backend == backend
        exact = not dtype.is_complex and (backend == "reference" or name in FOREACH_AS_TORCH)
        _compare(got, oracle, exact=exact, what=f"{backend} vs torch {what}")
        if dtype.is_complex:
            _compare(got, loop if oracle is multi else multi, exact=False, what=f"{backend} vs torch (complex)")
            # Our semantics, exactly: the rule on the real view.
            views = _run(_ours(name, _kwargs(_inputs(name)[index]), backend=backend), dtype,
                         params=_real_views(dtype))
            for i, (a, e) in enumerate(zip(got[0], views[0])):
                assert torch.equal(torch.view_as_real(a), e), f"{backend} complex param {i} vs its real view"
                for key, value in views[1].state[e].items():
                    mine = got[1].state[a][key]
                    assert torch.equal(torch.view_as_real(mine) if mine.is_complex() else mine, value), key


# ----- torch's global flags: foreach / fused / differentiable ---------------------------------

def _flag_inputs():
    for name in SHARED:
        for i, oi in enumerate(_get_optim_inputs_including_global_cliquey_kwargs("cpu", None, INFOS[name])):
            flags = {k: oi.kwargs[k] for k in backends.TORCH_KEYWORDS if k in oi.kwargs}
            yield pytest.param(name, i, id=f"{name}-{i}-{oi.desc.replace(' ', '_')}-"
                               + ",".join(f"{k}={v}" for k, v in flags.items()))


def _flag_input(name: str, index: int):
    return _get_optim_inputs_including_global_cliquey_kwargs("cpu", None, INFOS[name])[index]


@pytest.mark.parametrize("name, index", list(_flag_inputs()))
def test_every_input_with_torchs_flags(name, index):
    """The same inputs with the flags torch's tests add (all False, or one of them True):
    ours takes torch's keywords as they are and maps them onto ``backend``."""
    kwargs = _kwargs(_flag_input(name, index))
    dtype = torch.float32
    if kwargs.get("differentiable"):
        # torch runs this; we refuse it, saying what to use instead.
        with pytest.raises(ValueError, match=re.escape(f"{name}: differentiable=True is invalid: not supported")
                           + rf".*torch\.optim\.{name}\(\.\.\., differentiable=True\)"):
            _ours(name, kwargs)(_make_params(dtype))
        return
    if kwargs.get("fused"):
        # No fused kernel for CPU tensors here (ours are Triton kernels for CUDA): foreach,
        # with one warning that says why.
        with pytest.warns(LightningOptimWarning, match=re.escape(f"{name}: fused=True, but the parameters are on cpu")) as record:
            got = _run(_ours(name, kwargs), dtype)
        assert len([w for w in record if issubclass(w.category, LightningOptimWarning)]) == 1
        assert got[1].backend == "foreach"
        expected = _run(_torch(name, {**_kwargs(_flag_input(name, index)), "fused": False, "foreach": False}), dtype)
        _compare(got, expected, exact=False, what="fused=True (our foreach) vs torch's for-loop")
        return
    expected = _run(_torch(name, _kwargs(_flag_input(name, index))), dtype)
    got = _run(_ours(name, kwargs), dtype)
    # torch leaves foreach unset on CPU in these inputs (its default there is the for-loop);
    # unset, ours is auto: foreach on CPU.
    assert got[1].backend == {True: "foreach", False: "reference", None: "foreach"}[kwargs.get("foreach")], kwargs
    same_order = got[1].backend == "reference" or name in FOREACH_AS_TORCH
    _compare(got, expected, exact=same_order, what=f"torch keywords {kwargs}")
    # torch's keywords pick the backend; they are not group options (state dicts carry none).
    saved = got[1].state_dict()
    assert not set(backends.TORCH_KEYWORDS) & {k for g in saved["param_groups"] for k in g}


# ----- error inputs ---------------------------------------------------------------------------

# Inputs torch refuses that we take on purpose, with the reason (each is asserted to work).
ACCEPTED_ON_PURPOSE = {
    "lr as a Tensor is not supported for capturable=False and foreach=True":
        "our foreach backend reads a tensor lr on the host once per group and step, so it "
        "follows the tensor's value exactly as torch's for-loop does",
}


def _error_inputs():
    for name in SHARED:
        for i, ei in enumerate(INFOS[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)):
            yield pytest.param(name, i, id=f"{name}-{i}-{ei.optimizer_error_input.desc.replace(' ', '_')}")


def _error_input(name: str, index: int):
    return INFOS[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)[index]


def test_error_inputs_are_not_vacuous():
    assert sum(1 for _ in _error_inputs()) >= 6 * len(SHARED)


@pytest.mark.parametrize("name, index", list(_error_inputs()))
def test_every_error_input_raises_what_torch_raises(name, index):
    ei = _error_input(name, index)
    oi = ei.optimizer_error_input
    params = oi.params if oi.params is not None else _make_params(torch.float32)[:1]
    kwargs = _kwargs(oi)
    # Torch's own run, so the database's expectation is checked against this torch too.
    if ei.error_regex in ACCEPTED_ON_PURPOSE:
        with pytest.raises(ei.error_type, match=ei.error_regex):
            getattr(torch.optim, name)(params, **copy.deepcopy(kwargs))
        got = _run(_ours(name, kwargs), torch.float32)
        assert got[1].backend == "foreach"
        expected = _run(_torch(name, {**_kwargs(oi), "foreach": False}), torch.float32)
        _compare(got, expected, exact=False, what=f"accepted on purpose: {ACCEPTED_ON_PURPOSE[ei.error_regex]}")
        return
    assert ei.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR, "a step-time error input: extend this test"
    if issubclass(ei.error_type, Warning):
        with pytest.warns(ei.error_type, match=ei.error_regex):
            getattr(lo, name)(params, **kwargs)
        return
    with pytest.raises(ei.error_type) as raised:
        getattr(lo, name)(params, **kwargs)
    message = str(raised.value)
    if message.startswith(f"{name}: "):  # our check: our one error shape
        assert re.match(rf"^{name}: [\w\[\]]+=.* is invalid: ", message), message
    else:  # torch's own check (param-group structure), reached through torch's base class
        assert re.search(ei.error_regex, message), message


# ----- hyperparameter checks: exactly torch's, on finite values ------------------------------

EDGES = (-1.0, -1e-9, 0.0, 0.5, 0.999, 1.0, 1.5)
FIELDS = {
    "SGD": ("lr", "momentum", "dampening", "weight_decay"),
    "Adagrad": ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"),
    "RMSprop": ("lr", "alpha", "eps", "weight_decay", "momentum"),
    "Adam": ("lr", "eps", "weight_decay"),
    "AdamW": ("lr", "eps", "weight_decay"),
    "NAdam": ("lr", "eps", "weight_decay", "momentum_decay"),
    "RAdam": ("lr", "eps", "weight_decay"),
}


def _refuses(make) -> bool:
    try:
        make()
    except ValueError:
        return True
    return False


def _validation_cases():
    for name in SHARED:
        for field in FIELDS[name]:
            for value in EDGES:
                yield pytest.param(name, {field: value}, id=f"{name}-{field}={value}")
        if name in ("Adam", "AdamW", "NAdam", "RAdam"):
            for b1 in EDGES:
                yield pytest.param(name, {"betas": (b1, 0.999)}, id=f"{name}-betas0={b1}")
                yield pytest.param(name, {"betas": (0.9, b1)}, id=f"{name}-betas1={b1}")
    for momentum in (0.0, 0.9, 1.0):
        for dampening in (0.0, 0.5):
            yield pytest.param("SGD", {"momentum": momentum, "dampening": dampening, "nesterov": True},
                               id=f"SGD-nesterov-momentum={momentum}-dampening={dampening}")
    for alpha in (0.0, 1.0, 1.5):
        yield pytest.param("RMSprop", {"centered": True, "alpha": alpha, "momentum": 1.0},
                           id=f"RMSprop-centered-alpha={alpha}")


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_tensor_betas_are_refused_on_purpose(name):
    """torch takes two 1-element tensor betas (read on the device with capturable=True); we
    refuse them, clearly: our kernels take betas as numbers, so a later in-place change of
    the tensors would be silently lost. torch's error inputs for mixed pairs and for tensor
    betas with foreach=True raise a ValueError in both (test above)."""
    betas = (torch.tensor(0.9), torch.tensor(0.99))
    getattr(torch.optim, name)(_make_params(torch.float32), betas=betas)  # legal in torch
    with pytest.raises(ValueError, match=re.escape(f"{name}: betas=") + r".* is invalid: must be a pair of numbers: "
                       r"tensor betas \(torch's form for capturable=True\) are not supported"):
        getattr(lo, name)(_make_params(torch.float32), betas=betas)


@pytest.mark.parametrize("name, kwargs", list(_validation_cases()))
def test_hyperparameters_are_refused_exactly_where_torch_refuses_them(name, kwargs):
    """torch.optim's constructor checks, value by value: ours raises a ValueError exactly when
    torch's does (e.g. SGD(momentum=1) and RMSprop(alpha=1.5) are legal in both). Non-finite
    values are the one place we are stricter: an infinite lr or momentum turns every
    parameter into inf or NaN (tests/test_validation.py)."""
    params = _make_params(torch.float32)
    theirs = _refuses(lambda: getattr(torch.optim, name)(params, **kwargs))
    ours = _refuses(lambda: getattr(lo, name)(params, **kwargs))
    assert ours == theirs, f"torch {'refuses' if theirs else 'accepts'} {kwargs}, ours {'refuses' if ours else 'accepts'}"


# ----- triton under the interpreter, on a subset ------------------------------------------------

TRITON = [
    pytest.param(name, i, dtype, id=f"{name}-{i}-{_inputs(name)[i].desc.replace(' ', '_')}-{str(dtype)[6:]}")
    for name in SHARED
    # The default input and the last one (the most options on, in torch's lists).
    for i in sorted({0, len(_inputs(name)) - 1})
    for dtype in (torch.float32, torch.complex64)
]


@pytest.mark.parametrize("name, index, dtype", TRITON)
def test_triton_matches_torch_under_the_interpreter(monkeypatch, name, index, dtype):
    pytest.importorskip("triton", reason="Triton (the dev extra) runs the kernels in its interpreter")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kwargs = _kwargs(_inputs(name)[index])
    expected = _run(_torch(name, {**kwargs, "foreach": True}), dtype, steps=3)
    got = _run(_ours(name, _kwargs(_inputs(name)[index]), backend="triton"), dtype, steps=3)
    assert got[1].backend == "triton"
    _compare(got, expected, exact=False, what="triton (interpreter) vs torch foreach")


def test_triton_refuses_complex128_naming_the_fix(monkeypatch):
    pytest.importorskip("triton", reason="Triton (the dev extra) runs the kernels in its interpreter")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match=re.escape("(and complex64, as float32 pairs), not ['torch.complex128']: "
                                                   "use backend='foreach'")):
        lo.Adam(_make_params(torch.complex128), backend="triton")


def test_fused_true_picks_triton_where_it_can_run(monkeypatch):
    """fused=True is the single-pass path wherever our kernels run: here CPU under the
    interpreter, standing in for CUDA (as tests/test_triton.py does for ``auto``)."""
    pytest.importorskip("triton", reason="Triton (the dev extra) runs the kernels in its interpreter")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backends, "AUTO_TRITON_DEVICES", {"cuda", "cpu"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = lo.AdamW(_make_params(torch.complex64), fused=True)
    assert opt.backend == "triton"
    with pytest.warns(LightningOptimWarning, match=r"fused=True, but the fused kernels take float32, bfloat16, "
                                                   r"float16 and complex64 parameters, not torch\.float64"):
        opt = lo.AdamW(_make_params(torch.float64), fused=True)
    assert opt.backend == "foreach"
    # fused=False rules triton out where auto would have picked it.
    assert lo.AdamW(_make_params(torch.float32), fused=False).backend == "foreach"
    assert lo.AdamW(_make_params(torch.float32)).backend == "triton"


# ----- complex for the rules torch does not have, and Coupled Adam ------------------------------

@pytest.mark.parametrize("name", ["Lion", "Yogi"])
@pytest.mark.parametrize("backend", ["reference", "foreach"])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_lion_and_yogi_update_complex_params_as_real_pairs(name, backend, dtype):
    """No torch rule to compare with: a complex param moves exactly as its real view would
    (torch's convention for its elementwise rules), state complex like the param."""
    kw = {"weight_decay": 0.1, "lr": 1e-2}
    got, opt = _run(_ours(name, kw, backend=backend), dtype)
    params, ref = _run(_ours(name, kw, backend=backend), dtype, params=_real_views(dtype))
    for a, e in zip(got, params):
        assert e.dtype == dtype.to_real() and torch.equal(torch.view_as_real(a), e)
        for key, value in ref.state[e].items():
            mine = opt.state[a][key]
            if key == "step":
                assert torch.equal(mine, value)
            else:
                assert mine.dtype == dtype and torch.equal(torch.view_as_real(mine), value), key


def test_yogi_starts_complex_second_moment_in_both_parts():
    opt = lo.Yogi([p := torch.zeros(2, dtype=torch.complex64, requires_grad=True)], initial_accumulator_value=0.5)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(torch.view_as_real(opt.state[p]["exp_avg_sq"]), torch.full((2, 2), 0.5))


def test_coupled_adam_refuses_a_complex_coupled_param_by_name():
    emb = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match=re.escape("CoupledAdam: parameter 'emb.weight' is torch.complex64 in a "
                                                   "coupled group: the coupled second moment is defined for real "
                                                   "embeddings only")):
        lo.CoupledAdam([{"params": [("emb.weight", emb)], "coupled": True}])
    # Outside a coupled group it is AdamW, complex included, bit for bit.
    kw = {"lr": 1e-2, "weight_decay": 0.1}
    with pytest.warns(LightningOptimWarning, match="no param group with coupled=True"):
        got = _run(lambda ps: lo.CoupledAdam(ps, backend="foreach", **kw), torch.complex64)
    _compare(got, _run(_ours("AdamW", kw, backend="foreach"), torch.complex64), exact=True,
             what="CoupledAdam non-coupled group vs our AdamW (complex)")
    _compare(got, _run(_torch("AdamW", kw), torch.complex64), exact=False,
             what="CoupledAdam non-coupled group vs torch AdamW (complex)")


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_complex32_is_refused_by_name():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex32))
    with pytest.raises(ValueError, match=re.escape("SGD: parameter 0 of its group is complex32")):
        lo.SGD([p])


def test_complex_state_dicts_interchange_with_torch():
    """A complex Adam's state dict moves to torch and back; both then step the same."""
    params, ours = _run(_ours("Adam", {"amsgrad": True}, backend="foreach"), torch.complex64, steps=3)
    twins = [p.detach().clone().requires_grad_() for p in params]
    theirs = torch.optim.Adam(twins, amsgrad=True, foreach=True)
    # deepcopy: torch's loader keeps the very tensors of a complex param's state (no cast).
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    back = lo.Adam([p.detach().clone().requires_grad_() for p in params], amsgrad=True, backend="foreach")
    back.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert back.state_dict()["state"][0]["exp_avg"].dtype == torch.complex64
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        for group in (params, twins, back.param_groups[0]["params"]):
            for p, g in zip(group, grads):
                p.grad = g.clone()
        ours.step()
        theirs.step()
        back.step()
    for a, b, c in zip(params, twins, back.param_groups[0]["params"]):
        assert torch.equal(a, c)  # ours -> torch -> ours: bit-identical
        assert_rel(torch.view_as_real(b), torch.view_as_real(a), TOL, "torch after loading ours (its for-loop)")


# ----- torch's keywords on every class ---------------------------------------------------------

ALL = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "NAdam", "RAdam", "Lion", "Yogi", "CoupledAdam"]


def _build(name: str, **kwargs):
    params = _make_params(torch.float32)
    if name == "CoupledAdam":
        params = [{"params": [p for p in params if p.dim() == 2], "coupled": True},
                  {"params": [p for p in params if p.dim() != 2]}]
    return getattr(lo, name)(params, **kwargs)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("kwargs, backend", [
    ({"foreach": None, "fused": None, "capturable": False, "differentiable": False}, "foreach"),
    ({"foreach": True}, "foreach"),
    ({"foreach": False}, "reference"),
    ({"foreach": False, "fused": False}, "reference"),
    ({"fused": False}, "foreach"),
    ({"capturable": True}, "foreach"),  # CPU params: nothing to capture, a no-op
    ({"backend": "foreach", "foreach": True}, "foreach"),
    ({"backend": "reference", "foreach": False}, "reference"),
    ({"backend": "foreach", "fused": False}, "foreach"),
])
def test_torch_keywords_map_onto_backend(name, kwargs, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = _build(name, **kwargs)
    assert opt.backend == backend
    assert not set(backends.TORCH_KEYWORDS) & set(opt.defaults)
    assert not set(backends.TORCH_KEYWORDS) & {k for g in opt.param_groups for k in g}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("kwargs, pattern", [
    ({"backend": "reference", "foreach": True},
     "backend='reference' conflicts with foreach=True, which asks for backend='foreach'"),
    ({"backend": "foreach", "foreach": False},
     "backend='foreach' conflicts with foreach=False, which asks for a backend other than 'foreach'"),
    ({"backend": "foreach", "fused": True},
     "backend='foreach' conflicts with fused=True, which asks for backend='triton'"),
    ({"backend": "triton", "fused": False},
     "backend='triton' conflicts with fused=False, which asks for a backend other than 'triton'"),
    ({"foreach": True, "fused": True}, "foreach=True and fused=True ask for two implementations"),
])
def test_conflicting_keywords_raise(name, kwargs, pattern):
    # A ValueError, and a RuntimeError as torch raises for foreach=True with fused=True.
    for kind in (ValueError, RuntimeError, ConflictingOptions):
        with pytest.raises(kind, match=re.escape(f"{name}: {pattern}")):
            _build(name, **kwargs)


@pytest.mark.parametrize("name", ALL)
def test_differentiable_and_bad_flag_values_are_refused(name):
    advice = rf"torch\.optim\.{name}\(\.\.\., differentiable=True\)" if hasattr(torch.optim, name) else \
        "a torch.optim optimizer with differentiable=True"
    with pytest.raises(ValueError, match=re.escape(f"{name}: differentiable=True is invalid: not supported") + ".*"
                       + advice):
        _build(name, differentiable=True)
    with pytest.raises(ValueError, match=re.escape(f"{name}: foreach='yes' is invalid: must be true, false or None")):
        _build(name, foreach="yes")
    with pytest.raises(ValueError, match=re.escape(f"{name}: capturable=None is invalid: must be true or false")):
        _build(name, capturable=None)


def test_capturable_warns_where_the_step_reads_counts_on_the_host():
    """On a GPU without the triton backend the step is right but not capturable: one
    warning says so (meta tensors stand in for CUDA ones: only the device type is read)."""
    cuda_like = [torch.empty(2, device="meta")]
    message = backends.capturable_warning("AdamW", "foreach", cuda_like)
    assert message.startswith("AdamW: capturable=True, but backend='foreach' keeps the step counts on the CPU")
    assert backends.capturable_warning("AdamW", "triton", cuda_like) is None
    assert backends.capturable_warning("AdamW", "foreach", [torch.empty(2)]) is None


def test_a_torch_state_dict_with_its_flags_loads_and_round_trips():
    """torch keeps foreach/fused/capturable/differentiable in every param group; such a
    state dict loads into ours, which steps as torch does and saves what it loaded."""
    params, theirs = _run(_torch("AdamW", {"foreach": True}), torch.float32, steps=2)
    saved = theirs.state_dict()
    assert {"foreach", "fused", "capturable", "differentiable"} <= set(saved["param_groups"][0])
    ours = lo.AdamW([p.detach().clone().requires_grad_() for p in params], backend="foreach")
    ours.load_state_dict(saved)
    assert ours.backend == "foreach"
    twins = ours.param_groups[0]["params"]
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        theirs.step()
        ours.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
    back = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in params])
    back.load_state_dict(ours.state_dict())
