"""Non-finite and extreme gradients: what is skipped, what is clipped, and what stays finite.

The guard (:mod:`lightning_optim.clipping`): a step whose total gradient norm is not finite
is skipped, whether the gradients hold an inf or NaN or are finite but so large that the norm
overflows the dtype (its docstring: "a norm that overflows ... is counted as non-finite").
A skipped step must leave params and optimizer state bit for bit as they were.

Plain PyTorch (``GradientClipper`` + optimizer, the order OptimizerCallback runs them) for the
table over every registry optimizer; Trainer runs for the precisions. The 2-rank case (inf on
one rank only) is in tests/test_ddp.py, in the same DDP launch as the other DDP checks.

Without the guard, a finite gradient above about 1.8e19 squares to inf in fp32, so every rule
with a second moment (Adagrad, RMSprop, the Adam family, Yogi) stores an inf, exactly as
torch's own optimizers do; a param whose second moment is inf then never moves again
(m / inf = 0). The guard is what keeps the state finite: the 2-norm overflows first.
"""

from __future__ import annotations

import copy
import logging

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

import lightning_optim as lo
from lightning_optim.clipping import GradientClipper
from lightning_optim.registry import create_optimizer

INF, NAN = float("inf"), float("nan")
NAMES = lo.optimizers()


class Small(nn.Module):
    """An embedding (coupled under CoupledAdam), a matrix, and 1-d params (no weight decay):
    68 numbers, so a 2-norm of gradients of 1e18 (sum of squares 6.8e37) still fits fp32."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)  # tied: the embedding is the unembedding, no new numbers
        self.head.weight = self.embed.weight


def _small(name: str, dtype: torch.dtype = torch.float32, **options):
    torch.manual_seed(0)
    module = Small().to(dtype)
    return module, create_optimizer(name, module, **options)


def _grads(module: nn.Module, gen: torch.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {n: (torch.randn(p.shape, generator=gen) * scale).to(p.dtype) for n, p in module.named_parameters()}


def _signs(module: nn.Module, gen: torch.Generator, value: float) -> dict[str, torch.Tensor]:
    """Every entry +-value (random signs), in each param's dtype."""
    return {n: (torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.dtype) * value
            for n, p in module.named_parameters()}


def _step(clipper: GradientClipper | None, opt, module: nn.Module, grads: dict[str, torch.Tensor]):
    """What OptimizerCallback does around one step: clip, decide, step or skip, zero.
    Returns (skipped, report)."""
    for n, p in module.named_parameters():
        p.grad = grads[n].clone()
    report, skipped = None, False
    if clipper is not None:
        report = clipper.clip_(opt)
        skipped = clipper.should_skip(report)
    if not skipped:
        opt.step()
    opt.zero_grad()
    return skipped, report


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _state_tensors(opt) -> list[torch.Tensor]:
    return [v for entry in opt.state.values() for v in entry.values() if torch.is_tensor(v)]


def _assert_all_finite(module: nn.Module, opt) -> None:
    for n, p in module.named_parameters():
        assert torch.isfinite(p).all(), n
    for entry in opt.state.values():
        for key, v in entry.items():
            if torch.is_tensor(v):
                assert torch.isfinite(v).all(), key


def _assert_unchanged(module: nn.Module, opt, params: dict, state: dict) -> None:
    """Params and optimizer state are the same bits as in the snapshot."""
    for n, p in module.named_parameters():
        assert torch.equal(p.detach(), params[n]), n
    now = opt.state_dict()["state"]
    assert now.keys() == state["state"].keys()
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(now[pid][key], value), (pid, key)


# ----- inf / NaN in one tensor: every optimizer, fp32 and bf16 params ------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bad", [INF, -INF, NAN], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_entry_in_one_tensor_skips_the_step(name, bad, dtype):
    module, opt = _small(name, dtype)
    clipper = GradientClipper("norm", max_norm=1.0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        assert not _step(clipper, opt, module, _grads(module, gen, 3.0))[0]
    params, state = _params(module), copy.deepcopy(opt.state_dict())

    grads = _grads(module, gen, 3.0)
    grads["lin.weight"][1, 2] = bad
    skipped, report = _step(clipper, opt, module, grads)
    assert skipped and clipper.skipped_steps == 1 and clipper.consecutive_skips == 1
    assert not torch.isfinite(report.total_norm)
    _assert_unchanged(module, opt, params, state)

    for _ in range(3):
        assert not _step(clipper, opt, module, _grads(module, gen, 3.0))[0]
    assert clipper.skipped_steps == 1 and clipper.consecutive_skips == 0
    assert any(not torch.equal(p.detach(), params[n]) for n, p in module.named_parameters())
    _assert_all_finite(module, opt)


def test_norm_mode_leaves_nonfinite_grads_as_they_came():
    """The docstring's promise: a non-finite norm scales nothing (torch would scale by NaN or 0)."""
    module, opt = _small("adamw")
    grads = _grads(module, torch.Generator().manual_seed(0), 3.0)
    grads["lin.weight"][0, 0] = INF
    for n, p in module.named_parameters():
        p.grad = grads[n].clone()
    GradientClipper("norm", max_norm=1e-3).clip_(opt)
    for n, p in module.named_parameters():
        assert torch.equal(p.grad, grads[n]), n


# ----- extreme finite values ------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_overflowing_norm_is_skipped_and_a_large_finite_one_is_clipped(name):
    """Gradients of 1e30 are finite, but their squares (1e60) overflow fp32, so the 2-norm is
    inf: counted as non-finite and skipped, as clipping.py documents, and the state is not
    touched. Gradients of 1e18 have a finite norm (sqrt(68) * 1e18): clipped to max_norm, stepped."""
    module, opt = _small(name)
    clipper = GradientClipper("norm", max_norm=1.0)
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        _step(clipper, opt, module, _grads(module, gen))
    params, state = _params(module), copy.deepcopy(opt.state_dict())

    skipped, report = _step(clipper, opt, module, _signs(module, gen, 1e30))
    assert skipped and clipper.skipped_steps == 1
    assert report.total_norm.item() == INF
    _assert_unchanged(module, opt, params, state)

    clipped_before = clipper.clipped_steps
    skipped, report = _step(clipper, opt, module, _signs(module, gen, 1e18))
    assert not skipped and clipper.clipped_steps == clipped_before + 1
    assert report.total_norm.item() == pytest.approx(68**0.5 * 1e18, rel=1e-5)
    _assert_all_finite(module, opt)
    for _ in range(3):
        assert not _step(clipper, opt, module, _grads(module, gen))[0]
    _assert_all_finite(module, opt)


@pytest.mark.parametrize("backend", ["reference", "foreach"])
@pytest.mark.parametrize("name", NAMES)
def test_huge_gradients_without_the_guard_never_make_nan(name, backend):
    """No clipper: two steps of 1e30 gradients, then ordinary ones. The second moments
    overflow to inf (as in torch, see below), but nothing may become NaN and params stay finite."""
    module, opt = _small(name, backend=backend)
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        _step(None, opt, module, _signs(module, gen, 1e30))
    for _ in range(3):
        _step(None, opt, module, _grads(module, gen))
    for n, p in module.named_parameters():
        assert torch.isfinite(p).all(), n
    for v in _state_tensors(opt):
        assert not torch.isnan(v).any()


TORCH_TWINS = {
    "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW, "nadam": torch.optim.NAdam, "radam": torch.optim.RAdam,
}


@pytest.mark.parametrize("name", list(TORCH_TWINS))
def test_without_the_guard_squared_gradients_overflow_exactly_as_in_torch(name):
    """A 1e30 gradient makes g^2 = inf in fp32: the second moment is inf in torch's optimizer
    as in ours, with the same params after the step. This is the limitation the guard covers."""
    torch.manual_seed(0)
    module = Small()
    twin = copy.deepcopy(module)
    opt = create_optimizer(name, list(module.parameters()), lr=1e-3, weight_decay=0.0)
    ref = TORCH_TWINS[name](twin.parameters(), lr=1e-3, weight_decay=0.0)
    grads = _signs(module, torch.Generator().manual_seed(4), 1e30)
    _step(None, opt, module, grads)
    for n, p in twin.named_parameters():
        p.grad = grads[n].clone()
    ref.step()
    key = {"adagrad": "sum", "rmsprop": "square_avg"}.get(name, "exp_avg_sq")
    for (n, p), q in zip(module.named_parameters(), twin.parameters()):
        ours, theirs = opt.state[p][key], ref.state[q][key]
        assert torch.isinf(ours).all() and torch.isinf(theirs).all(), n
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=0, msg=n)


@pytest.mark.parametrize("name", NAMES)
def test_tiny_gradients_stay_finite(name):
    """Gradients of 1e-30: their squares underflow fp32 to 0, so the norm is (about) 0, nothing
    is clipped or skipped, and no rule divides 0 by 0 (eps keeps the denominators positive)."""
    module, opt = _small(name)
    clipper = GradientClipper("norm", max_norm=1.0)
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        skipped, report = _step(clipper, opt, module, _signs(module, gen, 1e-30))
        assert not skipped and report.total_norm.item() < 1e-25
    assert clipper.clipped_steps == 0 and clipper.skipped_steps == 0
    _assert_all_finite(module, opt)


@pytest.mark.parametrize("name", NAMES)
def test_zero_gradients_for_many_steps(name):
    """200 steps of zero gradients from the start: params without weight decay stay the same
    bits (Adam's 0 / (sqrt(0) + eps) is 0, not NaN); after real steps, 200 more zero steps
    leave params and state finite."""
    module, opt = _small(name)
    clipper = GradientClipper("norm", max_norm=1.0)
    zeros = {n: torch.zeros_like(p) for n, p in module.named_parameters()}
    start = _params(module)
    for _ in range(200):
        assert not _step(clipper, opt, module, zeros)[0]
    no_decay = {n for g in opt.param_groups if g["weight_decay"] == 0 for n in g["param_names"]}
    assert {"lin.bias", "norm.weight", "norm.bias"} <= no_decay
    for n, p in module.named_parameters():
        if n in no_decay:
            assert torch.equal(p.detach(), start[n]), n
    _assert_all_finite(module, opt)
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        _step(clipper, opt, module, _grads(module, gen))
    for _ in range(200):
        _step(clipper, opt, module, zeros)
    assert clipper.skipped_steps == 0
    _assert_all_finite(module, opt)


# ----- embedding rows that get no gradient -------------------------------------------------------


class Bag(nn.Module):
    """Token ids -> embedding -> linear classifier; only a few ids ever occur."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 5)

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.head(self.embed(ids)), targets)


@pytest.mark.parametrize("name, embedding_decay", [("coupled_adam", 0.0), ("coupled_adam", 0.1), ("adam", 0.0)])
def test_embedding_rows_without_gradient_for_200_steps(name, embedding_decay):
    """Ids 1-3 occur in every step, id 4 only in the first, the other 46 rows never. A row
    with no gradient moves only by its momentum (id 4) or the decoupled weight decay (the
    others); its second moment is never 0/0: Adam's row of v is exactly 0, CoupledAdam's
    shared row is positive."""
    torch.manual_seed(0)
    module = Bag()
    # An input embedding (the head is a classifier's): coupled only by a rule, as the README says.
    couples = name == "coupled_adam"
    rule = {"match": "embed.weight", "group": "embedding", "coupled": couples, "weight_decay": 0.0}
    opt = create_optimizer({"name": name, "lr": 1e-2}, lo.param_groups(module, rules=[rule], coupled=couples))
    embedding = next(g for g in opt.param_groups if g["name"] == "embedding")
    assert embedding.get("coupled", False) == (name == "coupled_adam")
    embedding["weight_decay"] = embedding_decay
    w = module.embed.weight
    start = w.detach().clone()
    gen = torch.Generator().manual_seed(0)
    after_first = m_first = None
    for step in range(200):
        ids = torch.randint(1, 4, (16,), generator=gen)
        if step == 0:
            ids[0] = 4
        opt.zero_grad()
        module.loss(ids, ids % 5).backward()
        opt.step()
        if step == 0:
            after_first = w.detach().clone()
            m_first = opt.state[w]["exp_avg"][4].clone()

    never = [0, *range(5, 50)]
    expected = start[never].clone()
    for _ in range(200):  # what the backends do: p *= 1 - lr * wd, in fp32, once a step
        expected.mul_(1 - 1e-2 * embedding_decay)
    if embedding_decay == 0:
        assert torch.equal(w.detach()[never], start[never])
    else:
        torch.testing.assert_close(w.detach()[never], expected, rtol=1e-6, atol=0)
        assert not torch.equal(expected, start[never])
    state = opt.state[w]
    assert torch.equal(state["exp_avg"][never], torch.zeros_like(state["exp_avg"][never]))
    if name == "adam":
        assert torch.equal(state["exp_avg_sq"][never], torch.zeros_like(state["exp_avg_sq"][never]))
    else:
        assert state["exp_avg_sq"].shape == (1, 8) and (state["exp_avg_sq"] > 0).all()
    # id 4: no gradient after the first step, but its momentum keeps moving it, and decays as beta1^t
    assert not torch.equal(w.detach()[4], after_first[4])
    torch.testing.assert_close(state["exp_avg"][4], m_first * 0.9**199, rtol=1e-4, atol=0)
    assert all(torch.isfinite(t).all() for t in (w, *state.values()))


# ----- through the Trainer: each precision ---------------------------------------------------


class InfAt(pl.LightningModule):
    """A regression whose loss becomes inf (``how="loss"``) or whose one gradient entry
    becomes inf (``how="grad"``) on the chosen optimizer steps."""

    def __init__(self, bad_steps, how: str = "loss") -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
        self.bad_steps, self.how = set(bad_steps), how

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.how == "loss" and self.trainer.global_step in self.bad_steps:
            loss = loss * INF
        return loss

    def on_after_backward(self):
        if self.how == "grad" and self.trainer.global_step in self.bad_steps:
            self.net[2].bias.grad.fill_(INF)


def _regression(batches=8, batch_size=4):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batches * batch_size, 6, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.sin(x.sum(1, keepdim=True))),
                                       batch_size=batch_size)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("precision, how", [
    ("32-true", "loss"), ("32-true", "grad"), ("bf16-mixed", "loss"), ("bf16-true", "loss"),
    ("16-mixed", "loss"),  # fp16 autocast with a GradScaler, through an explicit plugin on CPU
])
def test_trainer_skips_the_inf_step_bit_for_bit(precision, how):
    from lightning.pytorch.plugins.precision import MixedPrecision

    from lightning_helpers import trainer

    torch.manual_seed(0)
    model = InfAt(bad_steps={3}, how=how)
    cb = lo.OptimizerCallback(optimizer={"name": "adamw", "lr": 1e-2}, clipping={"mode": "norm", "max_norm": 0.5})
    snapshots = {}

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots[batch_idx] = (_params(pl_module), copy.deepcopy(cb.optimizer.state_dict()))

    if precision == "16-mixed":
        # Lightning maps precision="16-mixed" on CPU to bf16; the plugin keeps fp16 and a scaler.
        plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
        options = {"plugins": [plugin]}
    else:
        options = {"precision": precision}
    trainer([cb, Spy()], max_steps=6, **options).fit(model, _regression())

    params_2, state_2 = snapshots[2]
    assert cb.clipper.skipped_steps == 1 and cb.steps_taken == 5
    for n in params_2:
        assert torch.equal(snapshots[3][0][n], params_2[n]), n
    for pid, entry in state_2["state"].items():
        for key, value in entry.items():
            assert torch.equal(snapshots[3][1]["state"][pid][key], value), (pid, key)
    assert any(not torch.equal(snapshots[4][0][n], params_2[n]) for n in params_2)  # training goes on
    _assert_all_finite(model, cb.optimizer)
    if precision == "bf16-true":
        assert model.net[0].weight.dtype == torch.bfloat16
        assert cb.optimizer.state[model.net[0].weight]["exp_avg_sq"].dtype == torch.float32
    if precision == "16-mixed":
        assert plugin.scaler.get_scale() == 2.0**9  # the scaler saw the overflow too, and backed off


class NaNLossAt(InfAt):
    """The loss is NaN on the chosen optimizer steps (0-based ``global_step``)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * NAN if self.trainer.global_step in self.bad_steps else loss


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_skipped_steps_print_one_line_at_each_doubling_and_count_toward_max_steps(caplog):
    """Six NaN steps: lines at the 1st, 2nd and 4th skip only (the next would be the 8th), each
    naming the step and the count; max_steps=12 runs 12 Lightning steps, of which 6 update."""
    from lightning_helpers import trainer

    torch.manual_seed(0)
    model = NaNLossAt(bad_steps={2, 3, 5, 6, 7, 9})
    cb = lo.OptimizerCallback(optimizer={"name": "adamw", "lr": 1e-2}, scheduler={"name": "exponential", "gamma": 0.5})
    run = trainer([cb], max_steps=12, max_epochs=-1)
    with caplog.at_level(logging.WARNING, logger="lightning_optim"):
        run.fit(model, _regression())
    lines = [r.getMessage() for r in caplog.records if r.name == "lightning_optim"]
    tail = "parameters, optimizer state and LR schedule unchanged."
    assert lines == [
        f"OptimizerCallback: skipped the optimizer step at global_step 2: non-finite gradients in group(s) no_decay, "
        f"decay; {tail} 1 step(s) skipped so far; they count toward max_steps. Next message at 2 skips.",
        f"OptimizerCallback: skipped the optimizer step at global_step 3: non-finite gradients in group(s) no_decay, "
        f"decay; {tail} 2 step(s) skipped so far, 1 since the last message; they count toward max_steps. "
        "Next message at 4 skips.",
        f"OptimizerCallback: skipped the optimizer step at global_step 6: non-finite gradients in group(s) no_decay, "
        f"decay; {tail} 4 step(s) skipped so far, 2 since the last message; they count toward max_steps. "
        "Next message at 8 skips.",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "lightning_optim")
    # Lightning's global_step counts every optimizer.step call, skipped or not: max_steps is reached
    # after 12 of them, 6 of which updated the parameters and advanced the LR schedule.
    assert (run.global_step, cb.clipper.skipped_steps, cb.steps_taken) == (12, 6, 6)
    assert cb.optimizer.param_groups[0]["lr"] == 1e-2 * 0.5**6
    assert cb.scheduler.last_epoch == 6


@pytest.mark.slow  # a fresh Python process: the console as a script sees it
def test_a_skip_prints_on_the_console_when_logging_is_not_configured():
    """No handler configured (a plain script): the line reaches stderr, once."""
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import sys, torch; sys.path[:0] = ['tests']\n"
        "import lightning_optim as lo\n"
        "from lightning_helpers import trainer\n"
        "from test_nonfinite import NaNLossAt, _regression\n"
        "torch.manual_seed(0)\n"
        "cb = lo.OptimizerCallback(optimizer='adamw')\n"
        "trainer([cb], max_steps=4, max_epochs=-1).fit(NaNLossAt(bad_steps={1}), _regression())\n"
        "print('taken', cb.steps_taken)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = [line for line in proc.stderr.splitlines() if "skipped the optimizer step" in line]
    assert skipped == [
        "OptimizerCallback: skipped the optimizer step at global_step 1: non-finite gradients in group(s) no_decay, "
        "decay; parameters, optimizer state and LR schedule unchanged. 1 step(s) skipped so far; they count toward "
        "max_steps. Next message at 2 skips."]
    assert proc.stdout.splitlines()[-1] == "taken 3"
