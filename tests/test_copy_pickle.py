"""``copy.deepcopy`` and ``pickle`` give an optimizer that steps exactly as the original: for
every registry name and backend (triton under Triton's interpreter, on CPU tensors), the
copy and the original, given the same gradients, keep bit-identical params and state.

The backend's function is not pickled but re-bound from the backend's name; a triton that
``backend="auto"`` chose is trusted in the copy only after the self-check passes there."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lightning_optim as lo
from lightning_optim import backends, create_optimizer
from lightning_optim.registry import REGISTRY
from lightning_optim.backends.triton import selfcheck
from lightning_optim.validation import ConfigurationError

NAMES = lo.optimizers()
BACKENDS = ["reference", "foreach", "triton"]
HOW = ["deepcopy", "pickle", "deepcopy_pair", "pickle_pair"]
# The interpreter is slow: the triton cases take one plain copy and one pickled pair (the
# backend's part of a copy, re-binding its function, is the same for all four).
BACKEND_HOW = [(b, h) for b in BACKENDS for h in HOW if b != "triton" or h in ("deepcopy", "pickle_pair")]


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the triton cases, on CPU tensors


class Net(nn.Module):
    """Tiny (the interpreter runs every Triton program in numpy): an embedding and a biased
    Linear, in three groups (see :func:`build`)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.fc = nn.Linear(4, 3)


def build(name: str, model: Net, **options) -> torch.optim.Optimizer:
    """Three named groups, the embedding coupled for CoupledAdam (spelled out here, so the
    test does not depend on what param_groups couples by default)."""
    couples = REGISTRY[name].cls.couples
    groups = [
        {"params": [model.emb.weight], "param_names": ["emb.weight"], "name": "embedding",
         **({"coupled": True} if couples else {})},
        {"params": [model.fc.weight], "param_names": ["fc.weight"], "name": "decay"},
        {"params": [model.fc.bias], "param_names": ["fc.bias"], "name": "no_decay", "weight_decay": 0.0},
    ]
    return create_optimizer(name, groups, **options)


def params_of(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def set_grads(params: list[torch.Tensor], step: int) -> None:
    """The same grads for the original and the copy. The last param has none on step 0, so
    its step count lags the others' in its bucket."""
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen).to(p.dtype)
        p.grad = None if (i == len(params) - 1 and step == 0) else g


def train(opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        set_grads(params_of(opt), step)
        opt.step()


def copy_of(opt: torch.optim.Optimizer, model: nn.Module, how: str) -> torch.optim.Optimizer:
    if how == "deepcopy":
        return copy.deepcopy(opt)
    if how == "pickle":
        return pickle.loads(pickle.dumps(opt))
    if how == "deepcopy_pair":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    # The pair keeps its mapping: the copy optimizes the copied model's own tensors.
    assert [id(p) for p in params_of(opt2)] == [
        id(dict(model2.named_parameters())[n]) for g in opt.param_groups for n in g["param_names"]]
    assert {id(p) for p in opt2.state} == {id(p) for p in model2.parameters()}
    return opt2


def assert_identical(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    """Bit-identical params and state (same keys, dtypes and values), distinct tensors."""
    pa, pb = params_of(a), params_of(b)
    assert len(pa) == len(pb)
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert x.dtype == y.dtype and torch.equal(x, y), f"param {i}"
        assert x.data_ptr() != y.data_ptr(), f"param {i} is shared with the copy"
        sa, sb = a.state[x], b.state[y]
        assert sa.keys() == sb.keys(), f"param {i}"
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"param {i} {k}"
            assert sa[k].data_ptr() != sb[k].data_ptr(), f"param {i} {k} is shared with the copy"


def check_copy_steps_as_original(opt, model, how, before=2, after=3):
    train(opt, range(before))
    start = [p.detach().clone() for p in params_of(opt)]
    twin = copy_of(opt, model, how)
    assert type(twin) is type(opt) and twin.backend == opt.backend
    assert_identical(opt, twin)
    train(opt, range(before, before + after))
    train(twin, range(before, before + after))
    assert_identical(opt, twin)
    assert any(not torch.equal(p, q) for p, q in zip(start, params_of(opt)))  # it did train
    return twin


@pytest.mark.parametrize("backend, how", BACKEND_HOW)
@pytest.mark.parametrize("name", NAMES)
def test_copy_steps_as_the_original(name, backend, how):
    model = Net()
    opt = build(name, model, backend=backend)
    check_copy_steps_as_original(opt, model, how)


# Options that put more than params and moments into the optimizer: a tensor lr (kept by
# identity inside one optimizer, copied with it), fp32 masters of bf16 params, CoupledAdam's
# coupled group with AMSGrad and a coupling scale, a pending fused-clipping transform.
SPECIAL = {
    "adamw+tensor_lr": ("adamw", {"lr": torch.tensor(3e-3)}, torch.float32),
    "momentum+tensor_lr": ("momentum", {"lr": torch.tensor(0.05)}, torch.float32),
    "coupled_adam+tensor_lr": ("coupled_adam", {"lr": torch.tensor(3e-3)}, torch.float32),
    "adamw+bf16_masters": ("adamw", {"master_weights": True}, torch.bfloat16),
    "nadam+bf16_masters": ("nadam", {"master_weights": True}, torch.bfloat16),
    "coupled_adam+bf16_masters": ("coupled_adam", {"master_weights": True}, torch.bfloat16),
    "coupled_adam+amsgrad+scale": ("coupled_adam", {"amsgrad": True, "coupling_scale": 0.5}, torch.float32),
    "lion+bf16": ("lion", {}, torch.bfloat16),
}


@pytest.mark.parametrize("how", ["deepcopy", "pickle_pair"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(SPECIAL))
def test_copy_keeps_tensor_lr_masters_and_coupling(variant, backend, how):
    name, options, dtype = SPECIAL[variant]
    model = Net().to(dtype)
    options = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    opt = build(name, model, backend=backend, **options)
    twin = check_copy_steps_as_original(opt, model, how)
    for g, h in zip(opt.param_groups, twin.param_groups):
        assert g.keys() == h.keys()
        for k in g:
            if k == "params":
                continue
            if isinstance(g[k], torch.Tensor):  # the copy's own tensor, of the same value
                assert g[k] is not h[k] and g[k].dtype == h[k].dtype and torch.equal(g[k], h[k]), k
            else:
                assert g[k] == h[k], k
    if "lr" in options:
        # Every group of the copy shares one lr tensor, as the original's do: a scheduler
        # built on the copy moves them all.
        assert len({id(g["lr"]) for g in twin.param_groups}) == 1
        twin.param_groups[0]["lr"].fill_(0.0)
        assert float(opt.param_groups[0]["lr"]) == float(options["lr"])
    if options.get("master_weights"):
        masters = [twin.state[p]["master_param"] for p in params_of(twin)]
        assert masters and all(m.dtype == torch.float32 for m in masters)
    if name == "coupled_adam":
        coupled = [g for g in twin.param_groups if g["coupled"]]
        assert [g["param_names"] for g in coupled] == [["emb.weight"]]
        assert twin.state[coupled[0]["params"][0]]["exp_avg_sq"].shape == (1, 4)


@pytest.mark.parametrize("backend", ["foreach", "triton"])
def test_copy_keeps_a_pending_clip_transform(backend):
    """scale_next_step applies to the next step: a copy made in between applies it too."""
    model = Net()
    opt = build("adamw", model, backend=backend)
    train(opt, range(2))
    plain = copy.deepcopy(opt)  # control: the same optimizer without the transform
    opt.scale_next_step(2, grad_scale=torch.tensor(0.25), clip_value=0.1)
    twin = pickle.loads(pickle.dumps(opt))
    for o in (opt, twin, plain):
        set_grads(params_of(o), 2)
        o.step()
    assert_identical(opt, twin)
    assert not all(torch.equal(p, q) for p, q in zip(params_of(opt), params_of(plain)))
    assert not twin._next_transforms  # used up by the step, as in the original


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "deepcopy_pair"])
def test_copy_of_an_optimizer_with_a_scheduler_steps_itself(how):
    """An LR scheduler wraps ``opt.step`` on the instance, a closure that calls the original
    optimizer's step (OptimizerCallback wraps it too). A copy that kept it would step the
    original, not itself, and could not be pickled: it gets the class's step, as torch's do."""
    model = Net()
    opt = build("adamw", model, backend="foreach")
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    for step in range(2):
        set_grads(params_of(opt), step)
        opt.step()
        sched.step()
    assert "step" in vars(opt)  # torch's wrapper, on the instance
    twin = copy_of(opt, model, how)
    assert "step" not in vars(twin) and twin.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 2.5e-4
    before = [p.detach().clone() for p in params_of(opt)]
    train(twin, range(2, 4))
    assert all(torch.equal(p, q) for p, q in zip(before, params_of(opt)))  # the original did not move
    train(opt, range(2, 4))
    assert_identical(opt, twin)


# A fresh process: loads the pickled (model, optimizer) pairs, steps them with the test's
# gradients, and pickles the optimizers back.
_STEP_ELSEWHERE = textwrap.dedent("""
    import pickle, sys
    sys.path.insert(0, sys.argv[1])
    from test_copy_pickle import train
    pairs = pickle.load(sys.stdin.buffer)
    for model, opt in pairs:
        train(opt, range(2, 5))
    pickle.dump([opt for _, opt in pairs], sys.stdout.buffer)
""")


@pytest.mark.slow
def test_pickle_steps_the_same_in_another_process():
    """Nothing process-local travels: an optimizer unpickled in a new Python process (triton:
    re-bound there, under the interpreter) steps bit-identically to the original here."""
    cases = [("coupled_adam", "foreach"), ("nadam", "reference"), ("adamw", "triton")]
    pairs = []
    for name, backend in cases:
        model = Net()
        opt = build(name, model, backend=backend)
        train(opt, range(2))
        pairs.append((model, opt))
    data = pickle.dumps(pairs)
    proc = subprocess.run([sys.executable, "-c", _STEP_ELSEWHERE, os.path.dirname(__file__)], input=data,
                          capture_output=True, env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    stepped = pickle.loads(proc.stdout)
    for (_, opt), there, (name, backend) in zip(pairs, stepped, cases):
        train(opt, range(2, 5))
        assert (type(there), there.backend) == (type(opt), backend), name
        assert_identical(opt, there)


# ----- backend="auto" and an explicit triton in the copy ------------------------------------


@pytest.fixture
def auto_on_cpu(monkeypatch):
    """Let ``auto`` pick triton for CPU params under the interpreter, as it does on CUDA."""
    monkeypatch.setattr(backends, "AUTO_TRITON_DEVICES", {"cuda", "cpu"})


def test_auto_triton_is_checked_again_in_the_copy(auto_on_cpu, monkeypatch):
    calls = []
    real = selfcheck.verify

    def verify(rule, group, dtype, device, init_state):
        calls.append(rule.name)  # the spec of the group's rule
        return real(rule, group, dtype, device, init_state)

    monkeypatch.setattr(selfcheck, "verify", verify)
    model = Net()
    opt = build("adamw", model)
    assert opt.backend == "triton" and calls == ["adam"] * 3  # one check per group
    twin = check_copy_steps_as_original(opt, model, "pickle")
    assert twin.backend == "triton" and calls == ["adam"] * 6


def test_auto_triton_falls_back_in_a_copy_whose_check_fails(auto_on_cpu, monkeypatch):
    """The copy may land on another device or process, where the kernels fail their check:
    it then falls back to foreach as the constructor would, and still steps right."""
    model = Net()
    opt = build("adamw", model)
    assert opt.backend == "triton"
    train(opt, range(2))
    monkeypatch.setattr(selfcheck, "verify", lambda *a: "the triton adam kernel failed to compile/launch")
    with pytest.warns(lo.LightningOptimWarning, match=(
            r"AdamW: backend='auto' chose the fused Triton kernels, but their check against the reference "
            r"failed on this machine: the triton adam kernel failed to compile/launch\. Using backend='foreach'")):
        twin = copy.deepcopy(opt)
    assert (opt.backend, twin.backend) == ("triton", "foreach")
    assert all(s["step"].device.type == "cpu" for s in twin.state.values())
    foreach = build("adamw", copy.deepcopy(model), backend="foreach")
    foreach.load_state_dict(opt.state_dict())
    train(twin, range(2, 4))
    train(foreach, range(2, 4))
    assert_identical(foreach, twin)


def test_explicit_triton_copy_without_the_interpreter_raises(monkeypatch):
    """CPU params need the interpreter: an unpickled explicit triton optimizer says so, as its
    constructor would, instead of failing at the first launch."""
    model = Net()
    data = pickle.dumps(build("adamw", model, backend="triton"))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigurationError, match=r"^AdamW: backend='triton' got CPU parameters"):
        pickle.loads(data)


def test_copy_does_not_add_options():
    """torch's __setstate__ adds differentiable=False to the defaults: not in ours, so a group
    added to the copy has the same keys as one added to the original."""
    model = Net()
    with pytest.warns(lo.LightningOptimWarning, match="no param group with coupled=True"):
        opt = lo.CoupledAdam(model.parameters())
    twin = pickle.loads(pickle.dumps(opt))
    assert twin.defaults == opt.defaults and "differentiable" not in twin.defaults
    extra = nn.Parameter(torch.ones(2, 2))
    twin.add_param_group({"params": [extra], "coupled": True})
    opt.add_param_group({"params": [nn.Parameter(torch.ones(2, 2))], "coupled": True})
    assert twin.param_groups[-1].keys() == opt.param_groups[-1].keys()


# ----- the Lightning callbacks --------------------------------------------------------------


def fit(callbacks, model, steps: int = 4):
    from lightning_helpers import data, trainer

    trainer(callbacks, max_steps=steps).fit(model, data(8))


def callbacks():
    return [lo.OptimizerCallback(optimizer={"name": "coupled_adam", "lr": 1e-2, "backend": "foreach"},
                                 scheduler={"name": "warmup_cosine", "warmup_steps": 2, "total_steps": 8}),
            lo.MomentMonitor(every_n_steps=2, expensive_every_n_steps=4)]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_callbacks_train_as_the_originals(how):
    """Built from config, copied (Hydra, ddp_spawn and Lightning's tuner copy or pickle
    callbacks) before the fit: the copies train the model bit for bit as the originals."""
    from lightning_helpers import BareLM, flat_params

    original = callbacks()
    twins = copy.deepcopy(original) if how == "deepcopy" else pickle.loads(pickle.dumps(original))
    a, b = BareLM(), BareLM()
    b.load_state_dict(a.state_dict())
    start = flat_params(a).clone()
    fit(original, a)
    fit(twins, b)
    assert torch.equal(flat_params(a), flat_params(b)) and not torch.equal(flat_params(a), start)
    assert twins[0].steps_taken == original[0].steps_taken == 4


def test_trained_module_and_callbacks_copy_and_pickle():
    """After fit the module is the user's again (torch.save(model) pickles it); the monitor
    pickles and both callbacks deep-copy, with a copied optimizer that steps as the callback's."""
    from lightning_helpers import BareLM

    model, (cb, monitor) = BareLM(), callbacks()
    fit([cb, monitor], model)
    assert "configure_optimizers" not in vars(model)  # our closure over the callback is off again
    again = pickle.loads(pickle.dumps(model))
    assert torch.equal(again.embed.weight, model.embed.weight)
    for obj in (cb, monitor):
        copy.deepcopy(obj)
    twin = pickle.loads(pickle.dumps(monitor))
    assert twin.config == monitor.config
    opt = cb.optimizer
    snapshot = copy.deepcopy(opt)
    for o in (opt, snapshot):
        set_grads(params_of(o), 7)
        o.step()
    assert_identical(opt, snapshot)


def test_a_second_fit_installs_the_callback_again():
    from lightning_helpers import BareLM

    model, (cb, monitor) = BareLM(), callbacks()
    fit([cb, monitor], model, steps=2)
    first = cb.optimizer
    fit([cb, monitor], model, steps=4)
    assert cb.optimizer is not first and isinstance(cb.optimizer, lo.CoupledAdam)
