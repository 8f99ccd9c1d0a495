"""The Triton self-check (:mod:`lightning_optim.backends.triton.selfcheck`) on CPU.

Runs the kernels in Triton's interpreter (TRITON_INTERPRET=1, set per test), where they
agree with the reference: ``verify`` must say so for every registry optimizer, and must turn
a launcher that raises or computes something wrong into a reason instead of an exception.
Each ``verify`` is two steps on two small tensors: a handful of interpreted programs.
"""

from __future__ import annotations

import pytest
import torch
import triton  # noqa: F401  (a missing Triton must fail this file, not skip it)
from conftest import build_for_rule
from lightning_optim import rules

import lightning_optim as lo
from lightning_optim.backends.triton import selfcheck

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _fresh_cache():
    selfcheck.clear_cache()
    yield
    selfcheck.clear_cache()


def configs(name: str, **options):
    """(rule, group, init_state) of every param group of registry optimizer ``name``, built
    as the backend tests build it (CoupledAdam: a coupled 2-D group and a plain one)."""
    params = [torch.zeros(3, 4, requires_grad=True), torch.zeros(5, requires_grad=True)]
    opt = build_for_rule(name, options, params, "reference")
    return [(opt.spec_for(g), g, opt._init_state) for g in opt.param_groups]


def counting(monkeypatch):
    """Count the launcher calls ``verify`` makes (two per check: t = 1 and t = 2)."""
    calls = []
    real = selfcheck.launcher.run

    def run(*args, **kwargs):
        calls.append((rules.get(args[0]).name, *args[1:]))
        return real(*args, **kwargs)

    monkeypatch.setattr(selfcheck.launcher, "run", run)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", lo.optimizers())
def test_every_registry_optimizer_passes(name, dtype):
    for rule, group, init_state in configs(name):
        assert selfcheck.verify(rule, group, dtype, CPU, init_state) is None, (name, rule)


@pytest.mark.parametrize("name", ["adamw", "nadam", "coupled_adam"])
def test_master_weights_pass(name):
    for rule, group, init_state in configs(name, master_weights=True):
        assert selfcheck.verify(rule, group, torch.bfloat16, CPU, init_state) is None, (name, rule)


def test_fp16_passes():
    (rule, group, init_state), = configs("adamw")
    assert selfcheck.verify(rule, group, torch.float16, CPU, init_state) is None


def test_a_launcher_that_raises_gives_a_reason(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("PTX assembly failed\nptxas: error: more details")

    monkeypatch.setattr(selfcheck.launcher, "run", broken)
    (rule, group, init_state), = configs("adamw")
    reason = selfcheck.verify(rule, group, torch.float32, CPU, init_state)
    assert reason is not None and "PTX assembly failed" in reason and rule.name in reason
    assert "RuntimeError" in reason and "\n" not in reason
    # Cached: the failure is not retried within the process.
    assert selfcheck.verify(rule, group, torch.float32, CPU, init_state) == reason


def test_a_launcher_that_computes_wrong_gives_a_reason(monkeypatch):
    real = selfcheck.launcher.run

    def off(rule, params, *args, **kwargs):
        real(rule, params, *args, **kwargs)
        for p in params:
            p.add_(1e-3)

    monkeypatch.setattr(selfcheck.launcher, "run", off)
    (rule, group, init_state), = configs("adamw")
    reason = selfcheck.verify(rule, group, torch.float32, CPU, init_state)
    assert reason is not None and "differs from the reference" in reason and rule.name in reason


def test_a_wrong_state_gives_a_reason(monkeypatch):
    real = selfcheck.launcher.run
    calls = []

    def off(rule, params, grads, state, *args, **kwargs):
        real(rule, params, grads, state, *args, **kwargs)
        calls.append(rule)
        if len(calls) == 2:  # after the last step: only the state is off, not the params
            state["exp_avg_sq"][0].mul_(1.01)

    monkeypatch.setattr(selfcheck.launcher, "run", off)
    (rule, group, init_state), = configs("adam")
    reason = selfcheck.verify(rule, group, torch.float32, CPU, init_state)
    assert reason is not None and "exp_avg_sq" in reason


def test_a_step_count_left_behind_gives_a_reason(monkeypatch):
    """The check runs the optimizer's path, device counts advanced by the step prologue,
    and says so when a count is not where two steps leave it."""
    real = selfcheck.launcher.run
    calls = []

    def off(rule, params, grads, state, steps, *args, **kwargs):
        real(rule, params, grads, state, steps, *args, **kwargs)
        calls.append(kwargs)
        if len(calls) == 2:
            steps[0].sub_(1.0)

    monkeypatch.setattr(selfcheck.launcher, "run", off)
    (rule, group, init_state), = configs("nadam")
    reason = selfcheck.verify(rule, group, torch.float32, CPU, init_state)
    assert all(kwargs == {"advance": True} for kwargs in calls)
    assert reason == ("the triton nadam step prologue left the step counts at [1.0, 2.0] after two steps for "
                      "float32 params on cpu")


def test_results_are_cached_by_the_compiled_options(monkeypatch):
    calls = counting(monkeypatch)
    (rule, group, init_state), = configs("adam")
    assert selfcheck.verify(rule, group, torch.float32, CPU, init_state) is None
    assert len(calls) == 2
    assert selfcheck.verify(rule, group, torch.float32, CPU, init_state) is None
    assert len(calls) == 2  # same options: cached
    scheduled = {**group, "lr": 0.5, "initial_lr": 0.5}
    assert selfcheck.verify(rule, scheduled, torch.float32, CPU, init_state) is None
    assert len(calls) == 2  # lr (a schedule) is a runtime argument: no re-check
    assert selfcheck.verify(rule, {**group, "amsgrad": True}, torch.float32, CPU, init_state) is None
    assert len(calls) == 4  # amsgrad changes the kernel: checked
    assert selfcheck.verify(rule, group, torch.bfloat16, CPU, init_state) is None
    assert len(calls) == 6  # another dtype: checked
    selfcheck.clear_cache()
    assert selfcheck.verify(rule, group, torch.float32, CPU, init_state) is None
    assert len(calls) == 8


@pytest.mark.parametrize("name", ["adamw", "nadam", "sgd"])
def test_a_tensor_lr_is_fine(name, monkeypatch):
    calls = counting(monkeypatch)
    for rule, group, init_state in configs(name):
        lr = torch.tensor(1e-3)
        assert selfcheck.verify(rule, {**group, "lr": lr}, torch.float32, CPU, init_state) is None
        assert lr.item() == pytest.approx(1e-3)  # the user's tensor is left alone
        assert isinstance(calls[-1][5]["lr"], torch.Tensor)  # the launcher saw a tensor lr
    n = len(calls)
    # The same options with a float lr are another kernel variant (the step prologue reads a
    # tensor lr on the device): checked on their own, once.
    for rule, group, init_state in configs(name):
        assert selfcheck.verify(rule, {**group, "lr": 0.1}, torch.float32, CPU, init_state) is None
        assert selfcheck.verify(rule, {**group, "lr": 0.2}, torch.float32, CPU, init_state) is None
    assert len(calls) == 2 * n


def test_the_users_generator_is_untouched():
    """Scratch data comes from a private generator: the global RNG stream is not advanced."""
    (rule, group, init_state), = configs("sgd")
    before = torch.random.get_rng_state()
    selfcheck.verify(rule, group, torch.float32, CPU, init_state)
    assert torch.equal(torch.random.get_rng_state(), before)


# ----- backend="auto": the optimizer runs the check and falls back ----------------------------------


@pytest.fixture
def auto_on_cpu(monkeypatch):
    """Let ``auto`` pick triton for CPU params (under the interpreter): the code path it takes
    for CUDA params, reachable without a GPU."""
    from lightning_optim import backends

    monkeypatch.setattr(backends, "AUTO_TRITON_DEVICES", {"cuda", "cpu"})


def _counting_verify(monkeypatch, result=None):
    calls = []
    real = selfcheck.verify

    def verify(rule, group, dtype, device, init_state):
        calls.append((rules.get(rule).name, dtype))
        return real(rule, group, dtype, device, init_state) if result is None else result

    monkeypatch.setattr(selfcheck, "verify", verify)
    return calls


def _train(opt, params, steps, seed=5):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def _params():
    gen = torch.Generator().manual_seed(4)
    return [torch.randn(s, generator=gen).requires_grad_() for s in ((6, 5), (300,), (7,))]


def test_auto_picks_triton_after_the_check_passes(auto_on_cpu, monkeypatch):
    calls = _counting_verify(monkeypatch)
    params = _params()
    opt = lo.CoupledAdam([{"params": params[:1], "coupled": True}, {"params": params[1:]}], lr=1e-2)
    assert opt.backend == "triton"
    assert calls == [("coupled_adam", torch.float32), ("adam", torch.float32)]
    reference = lo.CoupledAdam([{"params": [p.detach().clone().requires_grad_() for p in params[:1]], "coupled": True},
                                {"params": [p.detach().clone().requires_grad_() for p in params[1:]]}],
                               lr=1e-2, backend="reference")
    _train(opt, params, 3)
    ref_params = [p for g in reference.param_groups for p in g["params"]]
    _train(reference, ref_params, 3)
    for a, e in zip(params, ref_params):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


def test_explicit_triton_is_not_checked(auto_on_cpu, monkeypatch):
    calls = _counting_verify(monkeypatch)
    assert lo.AdamW(_params(), backend="triton").backend == "triton"
    assert lo.AdamW(_params(), backend="foreach").backend == "foreach"
    assert calls == []


def test_auto_takes_no_triton_for_cpu_params_without_the_interpreter(auto_on_cpu, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    calls = _counting_verify(monkeypatch)
    assert lo.AdamW(_params()).backend == "compiled"  # torch's fused AdamW kernel: nothing to check
    assert calls == []


def test_a_failed_check_falls_back_to_foreach_with_a_warning(auto_on_cpu, monkeypatch):
    _counting_verify(monkeypatch, result="the triton adam kernel failed to compile/launch: RuntimeError: PTX")
    params = _params()
    with pytest.warns(lo.LightningOptimWarning, match=r"check against the reference failed on this machine: "
                      r"the triton adam kernel failed to compile/launch: RuntimeError: PTX\. Using backend='foreach'"):
        opt = lo.AdamW(params, lr=1e-2)
    assert opt.backend == "foreach"
    twin = [p.detach().clone().requires_grad_() for p in params]
    _train(opt, params, 3)
    _train(lo.AdamW(twin, lr=1e-2, backend="foreach"), twin, 3)
    assert all(torch.equal(a, b) for a, b in zip(params, twin))


def test_a_group_added_later_is_checked_and_can_fall_back(auto_on_cpu, monkeypatch):
    """The new group's check fails after triton steps: the optimizer goes on with foreach,
    its device step counts move to the CPU, and training continues as foreach would."""
    params = _params()
    opt = lo.NAdam(params[:2], lr=1e-2)
    assert opt.backend == "triton"
    _train(opt, params[:2], 2)
    calls = _counting_verify(monkeypatch, result="differs from the reference by 2 units in the last place")
    with pytest.warns(lo.LightningOptimWarning, match="differs from the reference"):
        opt.add_param_group({"params": params[2:]})
    assert calls == [("nadam", torch.float32)] and opt.backend == "foreach"
    assert all(s["step"].device.type == "cpu" and s["mu_product"].device.type == "cpu" for s in opt.state.values())
    twin = [p.detach().clone().requires_grad_() for p in params]
    other = lo.NAdam(twin[:2], lr=1e-2, backend="foreach")
    other.load_state_dict(opt.state_dict() | {"param_groups": opt.state_dict()["param_groups"][:1],
                                              "state": {k: v for k, v in opt.state_dict()["state"].items() if k < 2}})
    other.add_param_group({"params": twin[2:]})
    _train(opt, params, 2, seed=9)
    _train(other, twin, 2, seed=9)
    assert all(torch.equal(a, b) for a, b in zip(params, twin))
