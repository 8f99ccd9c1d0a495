"""Optimizer state survives checkpoint and resume exactly, moves to and from torch.optim, and
a state dict that does not fit is refused with a message naming what differs."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import assert_rel
from torch import nn

import lightning_optim as lo
from lightning_optim import SGD, Adam, AdamW, CoupledAdam, create_optimizer
from lightning_optim.registry import REGISTRY

NAMES = lo.optimizers()
BACKENDS = ["reference", "foreach"]
SCALAR_KEYS = ("step", "mu_product")  # CPU float32 scalars whatever the param

# Registry names plus variants whose state the defaults do not create (momentum buffers,
# centered averages, AMSGrad maxima on coupled rows, a non-zero accumulator start, ...).
VARIANTS = [(name, {}) for name in NAMES] + [
    ("sgd", {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    ("rmsprop", {"momentum": 0.9, "centered": True, "weight_decay": 0.01}),
    ("adagrad", {"lr_decay": 0.01, "initial_accumulator_value": 0.1}),
    ("adam", {"weight_decay": 0.1, "bias_correction": False}),
    ("nadam", {"decoupled_weight_decay": True, "weight_decay": 0.1}),
    ("radam", {"decoupled_weight_decay": True, "weight_decay": 0.1}),
    ("coupled_adam", {"amsgrad": True}),
]


class Net(nn.Module):
    """A token embedding tied to an output head (the unembedding, coupled for CoupledAdam), a
    biased Linear: three groups from param_groups (embedding, no_decay, decay)."""

    def __init__(self, vocab: int = 12, hidden: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.fc = nn.Linear(hidden, 3)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.emb.weight


def set_grads(model: nn.Module, step: int) -> None:
    """Random grads from a generator seeded by the step, so an interrupted run sees the same
    ones. fc.bias gets none on step 0: its step count lags the others' in the same bucket."""
    gen = torch.Generator().manual_seed(1000 + step)
    for name, p in model.named_parameters():
        g = torch.randn(p.shape, generator=gen).to(p.dtype)
        p.grad = None if (name == "fc.bias" and step == 0) else g


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        set_grads(model, step)
        opt.step()


def through_bytes(state_dict: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf)


def state_bytes(opt: torch.optim.Optimizer, keys=("exp_avg", "exp_avg_sq")) -> int:
    return sum(s[k].numel() * s[k].element_size() for s in opt.state.values() for k in keys if k in s)


# ----- round trip -------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["memory", "torch.save"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, kwargs", VARIANTS, ids=[f"{n}{kw or ''}" for n, kw in VARIANTS])
def test_round_trip_resumes_bit_identically(name, kwargs, backend, via):
    start = Net()
    whole = copy.deepcopy(start)
    opt_whole = create_optimizer(name, whole, backend=backend, **kwargs)
    train(whole, opt_whole, range(10))

    first = copy.deepcopy(start)
    opt_first = create_optimizer(name, first, backend=backend, **kwargs)
    train(first, opt_first, range(5))
    saved = opt_first.state_dict()
    if via == "torch.save":
        saved = through_bytes(saved)
    resumed = copy.deepcopy(first)
    # Built with another lr: the state dict's hyperparameters must win, as in torch.
    opt_resumed = create_optimizer(name, resumed, backend=backend, **{**kwargs, "lr": 0.123})
    opt_resumed.load_state_dict(saved)
    assert opt_resumed.param_groups[0]["lr"] == opt_first.param_groups[0]["lr"]

    # Both go on: `first` too, so loaded state that aliased the saved tensors would drift.
    train(first, opt_first, range(5, 10))
    train(resumed, opt_resumed, range(5, 10))
    for (n, a), b, c in zip(whole.named_parameters(), first.parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{n}: continuing the saved optimizer differs from one run"
        assert torch.equal(a, c), f"{n}: the resumed optimizer differs from one run"
    assert not torch.equal(whole.emb.weight, start.emb.weight)  # it did train
    for p_whole, p_resumed in zip(whole.parameters(), resumed.parameters()):
        s_whole, s_resumed = opt_whole.state[p_whole], opt_resumed.state[p_resumed]
        assert s_whole.keys() == s_resumed.keys()
        for k in s_whole:
            assert torch.equal(s_whole[k], s_resumed[k]), k
    assert opt_resumed.state[resumed.fc.bias]["step"].item() == 9.0  # it lagged one step


def test_state_dict_keeps_param_names_and_group_names():
    model = Net()
    opt = create_optimizer("adamw", model)
    train(model, opt, range(2))
    groups = through_bytes(opt.state_dict())["param_groups"]
    assert [(g["name"], g["param_names"]) for g in groups] == [
        ("embedding", ["emb.weight"]), ("no_decay", ["fc.bias"]), ("decay", ["fc.weight"])]


# ----- torch.optim interop ----------------------------------------------------------------------


TORCH_PAIRS = [
    (Adam, torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.1}),
    (Adam, torch.optim.Adam, {"lr": 1e-2, "amsgrad": True}),
    (AdamW, torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
]
PAIR_IDS = ["Adam", "Adam-amsgrad", "AdamW"]


def _assert_params_close(model_a: nn.Module, model_b: nn.Module, tol: float = 1e-6) -> None:
    for (n, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert_rel(a, b, tol, n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", TORCH_PAIRS, ids=PAIR_IDS)
def test_our_state_dict_loads_into_torch(ours_cls, torch_cls, kwargs, backend):
    ours_model = Net()
    ours = ours_cls(ours_model.parameters(), backend=backend, **kwargs)
    train(ours_model, ours, range(5))
    torch_model = copy.deepcopy(ours_model)
    theirs = torch_cls(torch_model.parameters(), lr=0.5)  # lr comes from the state dict
    theirs.load_state_dict(through_bytes(ours.state_dict()))
    assert theirs.param_groups[0]["lr"] == kwargs["lr"]
    train(ours_model, ours, range(5, 10))
    train(torch_model, theirs, range(5, 10))
    _assert_params_close(ours_model, torch_model)
    for p_ours, p_theirs in zip(ours_model.parameters(), torch_model.parameters()):
        assert theirs.state[p_theirs]["step"].item() == ours.state[p_ours]["step"].item()
        assert_rel(theirs.state[p_theirs]["exp_avg_sq"], ours.state[p_ours]["exp_avg_sq"], 1e-6, "exp_avg_sq")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", TORCH_PAIRS, ids=PAIR_IDS)
def test_torch_state_dict_loads_into_ours(ours_cls, torch_cls, kwargs, backend):
    torch_model = Net()
    theirs = torch_cls(torch_model.parameters(), **kwargs)
    train(torch_model, theirs, range(5))
    ours_model = copy.deepcopy(torch_model)
    ours = ours_cls(ours_model.parameters(), backend=backend, lr=0.5)
    ours.load_state_dict(through_bytes(theirs.state_dict()))
    assert ours.param_groups[0]["lr"] == kwargs["lr"]
    assert ours.param_groups[0]["bias_correction"] is True  # filled in: torch has no such option
    train(ours_model, ours, range(5, 10))
    train(torch_model, theirs, range(5, 10))
    _assert_params_close(ours_model, torch_model)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_sgd_without_step_loads_into_ours(backend):
    """torch.optim.SGD keeps only momentum_buffer. Ours fills step=1 (the first step is
    behind us), so the next step is dampened as torch's is; step=0 would skip dampening."""
    kwargs = {"lr": 0.1, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01}
    torch_model = Net()
    theirs = torch.optim.SGD(torch_model.parameters(), **kwargs)
    train(torch_model, theirs, range(5))
    saved = through_bytes(theirs.state_dict())
    assert all("step" not in s for s in saved["state"].values())
    ours_model = copy.deepcopy(torch_model)
    ours = SGD(ours_model.parameters(), backend=backend, **kwargs)
    ours.load_state_dict(saved)
    for p in ours_model.parameters():
        step = ours.state[p]["step"]
        assert (step.item(), step.dtype, step.device.type, step.dim()) == (1.0, torch.float32, "cpu", 0)
    train(ours_model, ours, range(5, 10))
    train(torch_model, theirs, range(5, 10))
    _assert_params_close(ours_model, torch_model)


# ----- save -> load -> save is exact -------------------------------------------------------------


def assert_same(a, b, where: str = "state_dict") -> None:
    """Deep equality: the same keys, values of the same type and value, tensors of the same
    dtype, shape and values."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a, key=str)} != {sorted(b, key=str)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: a tensor became {b!r}"
        assert (a.dtype, a.shape) == (b.dtype, b.shape) and torch.equal(a, b), f"{where}: {a} != {b}"
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


def assert_contains(saved: dict, after: dict) -> None:
    """Every key of ``saved`` (a torch.optim state dict) is in ``after`` with an equal value
    (numbers by value: torch keeps weight_decay=0 as an int), tensors of the same dtype."""
    assert len(saved["param_groups"]) == len(after["param_groups"])
    for i, (g, h) in enumerate(zip(saved["param_groups"], after["param_groups"])):
        for k, v in g.items():
            assert k in h, f"group {i} lost {k!r}"
            assert h[k] == v and isinstance(h[k], type(v) if not isinstance(v, (int, float)) else (int, float)), (
                f"group {i}[{k!r}]: {v!r} came back as {h[k]!r}")
    assert saved["state"].keys() == after["state"].keys()
    for pid, entry in saved["state"].items():
        for k, v in entry.items():
            assert k in after["state"][pid], f"state {pid} lost {k!r}"
            w = after["state"][pid][k]
            assert v.dtype == w.dtype and torch.equal(v, w), f"state {pid}[{k!r}]: {v} came back as {w}"


# Every registry name on the triton backend too (under the interpreter, where its step counts
# are device tensors on the CPU).
ROUND_TRIP = [(n, kw, b) for n, kw in VARIANTS for b in BACKENDS] + [(n, {}, "triton") for n in NAMES]


@pytest.mark.parametrize("into", ["fresh", "itself"])
@pytest.mark.parametrize("name, kwargs, backend", ROUND_TRIP,
                         ids=[f"{n}{kw or ''}-{b}" for n, kw, b in ROUND_TRIP])
def test_save_load_save_is_exact(name, kwargs, backend, into, monkeypatch):
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = Net()
    opt = create_optimizer(name, model, backend=backend, **kwargs)
    train(model, opt, range(3))
    saved = through_bytes(opt.state_dict())
    kept = copy.deepcopy(saved)
    target = opt if into == "itself" else create_optimizer(
        name, copy.deepcopy(model), backend=backend, **{**kwargs, "lr": 0.123})
    target.load_state_dict(saved)
    assert_same(kept, saved, "the loaded dict")  # loading did not change the caller's dict
    again = target.state_dict()
    assert_same(saved, again)
    assert_same(saved, through_bytes(again))
    target.load_state_dict(again)  # and once more: a fixed point
    assert_same(saved, target.state_dict())


SPECIAL_ROUND_TRIP = {
    "adamw+tensor_lr": ("adamw", {"lr": torch.tensor(3e-3)}, torch.float32),
    "coupled_adam+tensor_lr": ("coupled_adam", {"lr": torch.tensor(3e-3, dtype=torch.float64)}, torch.float32),
    "adamw+bf16_masters": ("adamw", {"master_weights": True}, torch.bfloat16),
    "coupled_adam+amsgrad+bf16_masters": ("coupled_adam", {"master_weights": True, "amsgrad": True}, torch.bfloat16),
    "nadam+bf16": ("nadam", {}, torch.bfloat16),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(SPECIAL_ROUND_TRIP))
def test_save_load_save_is_exact_with_tensor_lr_and_masters(variant, backend):
    """A tensor lr keeps its identity through the load (the saved value copied into it) and
    comes back out equal; fp32 masters and fp32 state of bf16 params come back as saved."""
    name, options, dtype = SPECIAL_ROUND_TRIP[variant]
    lr = options.get("lr")
    model = Net().to(dtype)
    opt = create_optimizer(name, model, backend=backend, **{**options, **({"lr": lr.clone()} if lr is not None else {})})
    train(model, opt, range(3))
    if lr is not None:
        opt.param_groups[0]["lr"].mul_(0.5)  # as a scheduler moves it
    saved = through_bytes(opt.state_dict())
    own_lr = None if lr is None else lr.clone()
    fresh = create_optimizer(name, copy.deepcopy(model), backend=backend,
                             **{**options, **({"lr": own_lr} if lr is not None else {})})
    fresh.load_state_dict(saved)
    again = through_bytes(fresh.state_dict())
    assert_same(saved, again)
    if lr is not None:
        assert all(g["lr"] is own_lr for g in fresh.param_groups)
        assert own_lr.item() == lr.item() * 0.5
    if options.get("master_weights"):
        assert any("master_param" in s for s in again["state"].values())


# torch.optim classes whose state dicts load into ours, with options that make every state key.
TORCH_DICTS = {
    "Adam": (torch.optim.Adam, Adam, {"lr": 1e-2}),
    "Adam-amsgrad-wd": (torch.optim.Adam, Adam, {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1}),
    "AdamW": (torch.optim.AdamW, AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    "SGD-momentum": (torch.optim.SGD, SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1}),
    "SGD-nesterov": (torch.optim.SGD, SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    "Adagrad": (torch.optim.Adagrad, lo.Adagrad, {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1}),
    "RMSprop": (torch.optim.RMSprop, lo.RMSprop, {"lr": 1e-2, "momentum": 0.9, "centered": True}),
    "NAdam": (torch.optim.NAdam, lo.NAdam, {"lr": 1e-2, "weight_decay": 0.1}),
    "RAdam": (torch.optim.RAdam, lo.RAdam, {"lr": 1e-2, "decoupled_weight_decay": True, "weight_decay": 0.1}),
}


def two_groups(model: Net, lr: float) -> list[dict]:
    return [{"params": [model.emb.weight, model.fc.weight]}, {"params": [model.fc.bias], "lr": lr / 2}]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(TORCH_DICTS))
def test_torch_state_dict_keeps_every_key_through_ours(case, backend):
    """Loaded into ours, a torch.optim state dict comes back out with every key and value it
    had; what ours adds is only its own options, and ``step`` where torch keeps none. That dict
    loads back into torch, which then steps exactly as the torch optimizer it came from."""
    torch_cls, ours_cls, kwargs = TORCH_DICTS[case]
    model = Net()
    theirs = torch_cls(two_groups(model, kwargs["lr"]), **kwargs)
    train(model, theirs, range(3))
    saved = through_bytes(theirs.state_dict())
    ours = ours_cls(two_groups(copy.deepcopy(model), 0.5), backend=backend, lr=0.5)
    ours.load_state_dict(saved)
    after = through_bytes(ours.state_dict())
    assert_contains(saved, after)
    for g, h in zip(saved["param_groups"], after["param_groups"]):
        assert set(h) - set(g) <= set(ours.defaults), sorted(set(h) - set(g))
    added = {k for pid in saved["state"] for k in set(after["state"][pid]) - set(saved["state"][pid])}
    assert added == ({"step"} if torch_cls is torch.optim.SGD else set())

    back_model = copy.deepcopy(model)
    back = torch_cls(two_groups(back_model, 0.5), lr=0.5)
    back.load_state_dict(after)
    assert_contains(saved, back.state_dict())
    train(model, theirs, range(3, 5))
    train(back_model, back, range(3, 5))
    for (n, a), b in zip(model.named_parameters(), back_model.parameters()):
        assert torch.equal(a, b), n


# ----- state dicts that do not fit ------------------------------------------------------------


def test_different_group_count_raises_naming_both_counts():
    model = Net()
    two = AdamW([{"params": [model.emb.weight], "name": "embedding"},
                 {"params": [model.fc.weight, model.fc.bias], "name": "rest"}])
    three = create_optimizer("adamw", copy.deepcopy(model))
    with pytest.raises(ValueError, match=(
            r"^AdamW.load_state_dict: the state dict has 2 param groups \(embedding, rest\), this optimizer "
            r"has 3 \(embedding, no_decay, decay\)")):
        three.load_state_dict(two.state_dict())


def test_different_group_size_raises():
    model = Net()
    saved = AdamW([{"params": [model.emb.weight], "name": "a"},
                   {"params": [model.fc.weight, model.fc.bias], "name": "b"}]).state_dict()
    other = copy.deepcopy(model)
    opt = AdamW([{"params": [other.emb.weight, other.fc.bias], "name": "a"},
                 {"params": [other.fc.weight], "name": "b"}])
    with pytest.raises(ValueError, match=r"^AdamW.load_state_dict: param group 0 \('a'\) has 2 params here but 1 in the state dict"):
        opt.load_state_dict(saved)


@pytest.mark.parametrize("name", NAMES)
def test_different_shape_raises_naming_parameter_and_shape(name):
    """Same number of tensors per group, another hidden size: every shaped state is refused."""
    small, big = Net(hidden=6), Net(hidden=8)
    opt_big = create_optimizer(name, big)
    train(big, opt_big, range(2))
    opt_small = create_optimizer(name, small)
    shaped = [k for k, v in opt_big.state[big.emb.weight].items() if v.dim() > 0]
    if not shaped:  # plain SGD keeps only step: there is nothing of a wrong shape to load
        group = opt_big.param_groups[0]
        assert opt_big.spec_for(group).state_keys(group) == ()  # (the rule table says so)
        opt_small.load_state_dict(opt_big.state_dict())
        return
    cls = REGISTRY[name].cls.__name__
    with pytest.raises(ValueError, match=(
            rf"^{cls}.load_state_dict: parameter 'emb.weight' has {shaped[0]} of shape \[12, 8\] in the "
            r"state dict, expected \[12, 6\]")):
        opt_small.load_state_dict(opt_big.state_dict())
    assert not opt_small.state  # nothing half-loaded


def test_state_of_another_optimizer_raises_naming_the_missing_key():
    model = Net()
    sgd = SGD(model.named_parameters(), momentum=0.9)
    train(model, sgd, range(1))
    adam = Adam(copy.deepcopy(model).named_parameters())
    with pytest.raises(ValueError, match=r"parameter 'emb.weight' has no 'exp_avg' in the state dict \(it has \['momentum_buffer', 'step'\]\)"):
        adam.load_state_dict(sgd.state_dict())


def test_coupled_state_into_uncoupled_group_raises():
    model = Net()
    coupled = CoupledAdam([{"params": [model.emb.weight], "param_names": ["emb.weight"], "coupled": True, "name": "embedding"}])
    train_only_emb(model, coupled)
    assert coupled.state[model.emb.weight]["exp_avg_sq"].shape == (1, 6)
    other = copy.deepcopy(model)
    # Group "x" is coupled only so that CoupledAdam does not warn that nothing is.
    plain = CoupledAdam([{"params": [other.emb.weight], "param_names": ["emb.weight"], "coupled": False, "name": "embedding"},
                         {"params": [nn.Parameter(torch.ones(2, 2))], "param_names": ["x"], "coupled": True, "name": "x"}])
    saved = coupled.state_dict()
    saved["param_groups"].append({**plain.state_dict()["param_groups"][1]})
    with pytest.raises(ValueError, match=r"group 'embedding' has coupled=False here but coupled=True in the state dict"):
        plain.load_state_dict(saved)
    assert plain.param_groups[0]["coupled"] is False


def test_loading_coupled_options_onto_a_vector_raises():
    saved = CoupledAdam([{"params": [nn.Parameter(torch.randn(4, 3))], "coupled": True, "name": "embedding"}]).state_dict()
    bias = nn.Parameter(torch.randn(3))
    with pytest.warns(lo.LightningOptimWarning, match="no param group with coupled=True"):
        opt = CoupledAdam([{"params": [bias], "param_names": ["fc.bias"], "name": "embedding"}])
    with pytest.raises(ValueError, match="coupled=False here but coupled=True"):
        opt.load_state_dict(saved)


def train_only_emb(model: Net, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    for step in range(steps):
        model.emb.weight.grad = torch.randn(model.emb.weight.shape, generator=torch.Generator().manual_seed(step))
        opt.step()


def test_coupled_state_of_another_hidden_size_raises():
    big, small = Net(hidden=8), Net(hidden=6)
    opt_big = CoupledAdam([{"params": [big.emb.weight], "param_names": ["emb.weight"], "coupled": True, "name": "embedding"}])
    train_only_emb(big, opt_big)
    opt_small = CoupledAdam([{"params": [small.emb.weight], "param_names": ["emb.weight"], "coupled": True, "name": "embedding"}])
    with pytest.raises(ValueError, match=r"parameter 'emb.weight' has exp_avg of shape \[12, 8\].*expected \[12, 6\]"):
        opt_small.load_state_dict(opt_big.state_dict())


# ----- bf16 params keep fp32 state ----------------------------------------------------------------


def _assert_state_dtypes(opt: torch.optim.Optimizer) -> int:
    checked = 0
    for state in opt.state.values():
        for key, value in state.items():
            if key in SCALAR_KEYS:
                assert (value.dtype, value.device.type, value.dim()) == (torch.float32, "cpu", 0), key
            else:
                assert value.dtype == torch.float32, f"{key} is {value.dtype}"
                checked += 1
    return checked


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_bf16_params_keep_fp32_state_through_steps_and_load(name, backend):
    model = Net().to(torch.bfloat16)
    opt = create_optimizer(name, model, backend=backend)
    train(model, opt, range(3))
    n_state = _assert_state_dtypes(opt)
    group = opt.param_groups[0]
    assert n_state > 0 or opt.spec_for(group).state_keys(group) == ()  # (plain SGD keeps none)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())

    saved = through_bytes(opt.state_dict())
    resumed = copy.deepcopy(model)
    opt_resumed = create_optimizer(name, resumed, backend=backend)
    opt_resumed.load_state_dict(saved)
    assert _assert_state_dtypes(opt_resumed) == n_state
    # Not rounded through bf16 on the way in (torch's loader would cast to the param dtype).
    for p, q in zip(model.parameters(), resumed.parameters()):
        for k in opt.state[p]:
            assert torch.equal(opt.state[p][k], opt_resumed.state[q][k]), k
    train(model, opt, range(3, 5))
    train(resumed, opt_resumed, range(3, 5))
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    _assert_state_dtypes(opt_resumed)


def test_bf16_state_loaded_from_torch_fp32_values_stay_exact():
    """A moment that bf16 cannot represent survives the load bit for bit."""
    model = Net().to(torch.bfloat16)
    opt = AdamW(model.parameters())
    train(model, opt, range(1))
    saved = opt.state_dict()
    value = torch.full_like(saved["state"][0]["exp_avg"], 1 + 2**-12)  # between two bf16 numbers
    saved["state"][0]["exp_avg"] = value
    fresh = AdamW(copy.deepcopy(model).parameters())
    fresh.load_state_dict(saved)
    loaded = fresh.state[fresh.param_groups[0]["params"][0]]["exp_avg"]
    assert loaded.dtype == torch.float32 and torch.equal(loaded, value)
    assert loaded.data_ptr() != value.data_ptr()  # a copy, not the caller's tensor


# ----- CoupledAdam's group option and memory ----------------------------------------------------


def test_coupling_scale_is_saved_and_survives_load():
    model = Net()
    opt = CoupledAdam([{"params": [model.emb.weight], "coupled": True, "coupling_scale": 2.5, "name": "embedding"},
                       {"params": [model.fc.weight, model.fc.bias], "name": "rest"}])
    train(model, opt, range(3))
    saved = through_bytes(opt.state_dict())
    assert [g["coupling_scale"] for g in saved["param_groups"]] == [2.5, 1.0]
    assert [g["coupled"] for g in saved["param_groups"]] == [True, False]

    resumed = copy.deepcopy(model)
    opt_resumed = CoupledAdam([{"params": [resumed.emb.weight], "coupled": True, "name": "embedding"},
                               {"params": [resumed.fc.weight, resumed.fc.bias], "name": "rest"}])
    assert opt_resumed.param_groups[0]["coupling_scale"] == 1.0
    opt_resumed.load_state_dict(saved)
    assert opt_resumed.param_groups[0]["coupling_scale"] == 2.5
    train(model, opt, range(3, 6))
    train(resumed, opt_resumed, range(3, 6))
    assert torch.equal(model.emb.weight, resumed.emb.weight)


def test_coupling_scale_changes_the_step():
    """Control for the test above: a lost coupling_scale would show in the params."""
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    opt_a = CoupledAdam([{"params": [a.emb.weight], "coupled": True, "coupling_scale": 2.5}])
    opt_b = CoupledAdam([{"params": [b.emb.weight], "coupled": True}])
    train_only_emb(a, opt_a)
    train_only_emb(b, opt_b)
    assert not torch.equal(a.emb.weight, b.emb.weight)


def test_coupled_adam_state_is_about_half_of_adamw():
    V, H = 1000, 64
    emb_coupled, emb_plain = nn.Embedding(V, H), nn.Embedding(V, H)
    coupled = CoupledAdam([{"params": list(emb_coupled.parameters()), "coupled": True, "name": "embedding"}])
    plain = AdamW(emb_plain.parameters())
    for emb, opt in ((emb_coupled, coupled), (emb_plain, plain)):
        emb.weight.grad = torch.randn(V, H)
        opt.step()
    assert coupled.state[emb_coupled.weight]["exp_avg_sq"].shape == (1, H)
    assert state_bytes(coupled) == (V * H + H) * 4 == 256_256
    assert state_bytes(plain) == 2 * V * H * 4 == 512_000
    assert state_bytes(coupled) / state_bytes(plain) == pytest.approx(0.5005, abs=1e-9)
