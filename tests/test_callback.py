"""OptimizerCallback on foreign LightningModules: partition, replacement, each optimizer,
clipping and the non-finite guard, accumulation equivalence, resume, precision plugins."""

from __future__ import annotations

import copy
import logging
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

import lightning_optim as lo
from lightning_optim.accumulation import AccumulationSchedule
from lightning_optim.integration import OptimizerCallback
from lightning_helpers import BareLM, TiedLM, data, flat_params, trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def test_tied_model_trains_with_coupled_adam_and_replaces_configure_optimizers(caplog):
    pl.seed_everything(0)
    model = TiedLM()
    cb = OptimizerCallback(optimizer={"name": "coupled_adam", "lr": 1e-2})
    with caplog.at_level(logging.INFO):
        t = trainer([cb], max_steps=24)
        t.fit(model, data())
    opt = t.optimizers[0]
    assert isinstance(opt, lo.CoupledAdam) and opt is cb.optimizer
    assert t.lr_scheduler_configs == []  # the module's StepLR is gone too
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["embedding"]["coupled"] is True and groups["embedding"]["weight_decay"] == 0.0
    assert groups["embedding"]["param_names"] == ["embed.weight"]  # the tied head is the same tensor
    assert groups["no_decay"]["weight_decay"] == 0.0 and not groups["no_decay"]["coupled"]
    assert groups["decay"]["weight_decay"] == 0.01
    assert opt.state[model.embed.weight]["exp_avg_sq"].shape == (1, model.embed.weight.shape[1])
    assert "replacing the module's configure_optimizers() result (SGD + StepLR)" in caplog.text
    assert caplog.text.count("OptimizerCallback: ") == 1
    first, last = sum(model.losses[:4]) / 4, sum(model.losses[-4:]) / 4
    assert last < 0.8 * first, (first, last)


# The registry names whose every group torch's fused CPU kernels compute (auto: compiled);
# CoupledAdam's coupled embedding group is not one of them.
TORCH_KERNEL_NAMES = {"sgd", "momentum", "nesterov", "adagrad", "adam", "amsgrad", "adamw"}


@pytest.mark.parametrize("name", lo.optimizers())
def test_every_optimizer_trains_a_module_without_configure_optimizers(name, caplog):
    pl.seed_everything(0)
    model = BareLM()
    lr = {"sgd": 0.5, "momentum": 0.1, "nesterov": 0.1, "adagrad": 0.1, "lion": 1e-3, "yogi": 1e-2}.get(name, 1e-2)
    cb = OptimizerCallback(optimizer={"name": name, "lr": lr})
    with caplog.at_level(logging.INFO):
        t = trainer([cb], max_steps=30)
        t.fit(model, data())
    assert type(t.optimizers[0]) is lo.registry.REGISTRY[name].cls
    assert "the module defines no configure_optimizers()" in caplog.text
    # The one line names the backend that runs and why auto chose it.
    opt = t.optimizers[0]
    assert f" on backend {opt.backend} ({opt.backend_reason})" in caplog.text
    assert opt.backend == ("compiled" if name in TORCH_KERNEL_NAMES else "foreach"), opt.backend_reason
    assert sum(model.losses[-5:]) / 5 < sum(model.losses[:5]) / 5


class SetupOnlyCallback(OptimizerCallback):
    """OptimizerCallback without its ``log`` setter: a plain attribute, so Lightning's assignment
    installs nothing and only ``setup`` puts configure_optimizers on the module."""

    log = None


@pytest.mark.parametrize("callback_cls, module_cls, trains", [
    (OptimizerCallback, BareLM, True),
    (SetupOnlyCallback, BareLM, False),  # setup comes after Lightning's check: why the setter stays
    (SetupOnlyCallback, TiedLM, True),   # a module with its own configure_optimizers needs setup only
])
def test_log_setter_is_what_lets_a_module_without_configure_optimizers_train(callback_cls, module_cls, trains, caplog):
    """Lightning checks that the module overrides configure_optimizers before it calls any
    callback hook, but after it assigns each callback's ``log``: the setter installs ours there.
    Either way one line says what was replaced, and after fit the module pickles again
    (``torch.save(model)``): teardown took our closure off it."""
    import pickle

    from lightning.fabric.utilities.exceptions import MisconfigurationException

    model = module_cls()
    t = trainer([callback_cls(optimizer={"name": "adamw", "lr": 1e-2})], max_steps=3)
    if not trains:
        with pytest.raises(MisconfigurationException, match=r"No `configure_optimizers\(\)` method defined"):
            t.fit(model, data())
        return
    with caplog.at_level(logging.INFO):
        t.fit(model, data())
    assert type(t.optimizers[0]) is lo.AdamW
    assert caplog.text.count("OptimizerCallback: ") == 1
    assert "configure_optimizers" not in model.__dict__
    assert pickle.loads(pickle.dumps(model)).embed.weight.shape == model.embed.weight.shape


def test_scheduler_steps_per_optimizer_step_not_per_micro_batch():
    model = BareLM()
    cb = OptimizerCallback(optimizer={"name": "sgd", "lr": 1.0}, scheduler={"name": "exponential", "gamma": 0.5},
                           accumulation=3)
    trainer([cb], max_steps=4).fit(model, data())
    assert cb.steps_taken == 4
    assert cb.optimizer.param_groups[0]["lr"] == pytest.approx(0.5**4)


def test_scheduler_total_follows_the_run():
    """A cosine without total_steps ends exactly at the end of training (max_epochs, with accumulation)."""
    model = BareLM()
    cb = OptimizerCallback(optimizer={"name": "sgd", "lr": 1.0}, scheduler={"name": "cosine", "min_lr_ratio": 0.1},
                           accumulation={0: 1, 5: 2})
    trainer([cb], max_epochs=2).fit(model, data(batches=10))
    # Epoch 0: 5 steps of 1, then windows of 2 at batches 5-6, 7-8 and 9 (cut short by the
    # epoch end); epoch 1: five windows of 2. Total 5 + 3 + 5 = 13.
    assert cb.steps_taken == 13
    assert cb.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


# ----- accumulation --------------------------------------------------------------------------


class Regression(pl.LightningModule):
    """Deterministic, no dropout: the mean loss of a window equals that of its concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
        self.snapshots: list[torch.Tensor] = []
        self._seen_step = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.global_step != self._seen_step:
            self._seen_step = self.trainer.global_step
            self.snapshots.append(flat_params(self).clone())


def regression_data(batches=24, batch_size=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * batch_size, 6, generator=gen)
    y = torch.sin(x.sum(1, keepdim=True))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def keyed_windows(schedule, batches: int, epochs: int = 1) -> list[list[int]]:
    """Step s averages the next size_at(s) micro-batches; an epoch end cuts a window short.
    Windows as lists of global batch numbers (epoch * batches + batch_idx)."""
    sched, windows = AccumulationSchedule(schedule), []
    for epoch in range(epochs):
        b = 0
        while b < batches:
            n = sched.size_at(len(windows))
            windows.append([epoch * batches + i for i in range(b, min(b + n, batches))])
            b += n
    return windows


class Recording(Regression):
    """Records, per batch, Lightning's zero_grad calls and the loss it reports."""

    def __init__(self) -> None:
        super().__init__()
        self.zeroed: list[int] = []  # global batch numbers at which optimizer_zero_grad ran
        self.raw_losses: list[float] = []
        self.reported_losses: list[float] = []
        self.accumulation: list[float] = []  # optim/accumulation as logged, per optimizer step

    def _g(self, batch_idx):
        return self.trainer.current_epoch * self.trainer.num_training_batches + batch_idx

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        self.zeroed.append(self._g(batch_idx))
        super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.raw_losses.append(loss.item())
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.global_step != self._seen_step:
            self.accumulation.append(float(self.trainer.callback_metrics["optim/accumulation"]))
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.reported_losses.append(outputs["loss"].item())


@pytest.mark.parametrize("schedule, batches, epochs", [
    ({0: 1, 3: 4}, 12, 1),  # the switch lands on batch 3: windows 3-6, 7-10, then 11 cut short
    ({0: 2, 5: 3}, 14, 2),  # windows of 3 from batch 10, misaligned; an epoch end cuts one short
    ({0: 4, 2: 1}, 7, 2),  # a decrease: 0-3, 4-6 (epoch end), then ones
    ({0: 1, 1: 4}, 9, 1),  # a window from batch_idx 1, where no divisor lets Lightning zero it
])
def test_accumulation_schedule_equals_sgd_on_the_mean_gradient_of_each_keyed_window(schedule, batches, epochs):
    """Plain SGD on the hand-computed mean of the micro-batch gradients of each window, as the
    schedule keys them by optimizer step: parameters after every step to 1e-6, the gradient
    every on_before_optimizer_step hook sees (one ahead of the callback's too), the number of
    steps, one zero_grad per window (at its first batch), and the loss and window size logged."""
    torch.manual_seed(0)
    model = Recording()
    reference = copy.deepcopy(model)
    loader = regression_data(batches=batches)
    cb = OptimizerCallback(optimizer={"name": "sgd", "lr": 0.1}, accumulation=schedule)
    seen_grads = []

    class GradSpy(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen_grads.append(torch.cat([p.grad.reshape(-1) for p in pl_module.parameters()]).clone())

    trainer([GradSpy(), cb], max_epochs=epochs, logger=False).fit(model, loader)

    windows = keyed_windows(schedule, batches, epochs)
    assert cb.steps_taken == len(model.snapshots) == len(windows)
    assert cb.accumulator.count_steps(batches, epochs) == len(windows)  # what an LR schedule's total reads
    assert model.zeroed == [w[0] for w in windows]
    assert model.accumulation == [float(len(w)) for w in windows]
    sizes = {g: AccumulationSchedule(schedule).size_at(s) for s, w in enumerate(windows) for g in w}
    torch.testing.assert_close(torch.tensor(model.reported_losses),  # divided by the keyed size, as Lightning does
                               torch.tensor([l / sizes[g] for g, l in enumerate(model.raw_losses)]), rtol=1e-6, atol=0)

    batch_list = list(loader)
    params = list(reference.parameters())
    assert len(seen_grads) == len(windows)
    for window, got, grad in zip(windows, model.snapshots, seen_grads):
        mean = [torch.zeros_like(p) for p in params]
        for g in window:
            x, y = batch_list[g % batches]
            grads = torch.autograd.grad(nn.functional.mse_loss(reference.net(x), y), params)
            for m, gr in zip(mean, grads):
                m += gr / len(window)
        want_grad = torch.cat([m.reshape(-1) for m in mean])
        assert (grad - want_grad).abs().max() <= 1e-6 * want_grad.abs().max(), window
        with torch.no_grad():
            for p, m in zip(params, mean):
                p -= 0.1 * m
        want = flat_params(reference)
        assert (got - want).abs().max() <= 1e-6 * want.abs().max(), window


def test_accumulation_schedule_equals_training_on_concatenated_batches():
    torch.manual_seed(0)
    model = Regression()
    reference = copy.deepcopy(model)
    loader = regression_data()
    cb = OptimizerCallback(optimizer={"name": "adamw", "lr": 1e-2}, accumulation={0: 1, 3: 4})
    trainer([cb], max_epochs=1).fit(model, loader)
    # Windows: batches 0, 1, 2 alone (steps 1-3), then 3-6, 7-10, ..., 19-22 and 23 (cut short):
    # step 3 takes the 4 micro-batches keyed for it, though batch 3 is not a multiple of 4.
    windows = [[0], [1], [2]] + [list(range(s, s + 4)) for s in range(3, 23, 4)] + [[23]]
    assert windows == keyed_windows({0: 1, 3: 4}, 24)
    assert len(model.snapshots) == len(windows)
    batches = list(loader)
    opt = lo.create_optimizer({"name": "adamw", "lr": 1e-2}, reference)
    for window, got in zip(windows, model.snapshots):
        x = torch.cat([batches[i][0] for i in window])
        y = torch.cat([batches[i][1] for i in window])
        opt.zero_grad()
        nn.functional.mse_loss(reference.net(x), y).backward()
        opt.step()
        want = flat_params(reference)
        assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def test_window_cut_short_by_the_epoch_end_sees_the_mean_gradient():
    """6 batches in windows of 4: the last window has 2 micro-batches and must average them."""
    torch.manual_seed(0)
    model = Regression()
    reference = copy.deepcopy(model)
    loader = regression_data(batches=6)
    trainer([OptimizerCallback(optimizer={"name": "sgd", "lr": 0.1}, accumulation=4)], max_epochs=1).fit(model, loader)
    batches = list(loader)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for window in ([0, 1, 2, 3], [4, 5]):
        opt.zero_grad()
        x, y = torch.cat([batches[i][0] for i in window]), torch.cat([batches[i][1] for i in window])
        nn.functional.mse_loss(reference.net(x), y).backward()
        opt.step()
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-6, atol=1e-7)


RESUME_SCHEDULE, RESUME_BATCHES, RESUME_EPOCHS = {0: 2, 5: 3}, 14, 2
# Checkpoints after these global batches: 7 ends a window before the switch (mid-schedule);
# 9 ends the last window of 2, so the resumed run's first window is the first of 3; 10 and 11
# are inside that window (batches 10-12, misaligned: k = 13); 12 ends it; 13 ends the epoch on
# a window cut short; 15 is inside epoch 1's second window (3-5).
RESUME_AT = (7, 9, 10, 11, 12, 13, 15)


def resume_run(ckpt_path=None, save_at=(), out=None):
    torch.manual_seed(0)
    model = Regression()
    cb = OptimizerCallback(optimizer={"name": "adamw", "lr": 1e-2},
                           scheduler={"name": "warmup_cosine", "warmup_steps": 2}, accumulation=RESUME_SCHEDULE)

    class SaveAt(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            g = trainer.current_epoch * RESUME_BATCHES + batch_idx
            if g in save_at:
                trainer.save_checkpoint(out / f"after_{g}.ckpt")

    loader = lo.ResumableDataLoader(regression_data(batches=RESUME_BATCHES).dataset, batch_size=4, shuffle=False)
    trainer([cb, SaveAt()], max_epochs=RESUME_EPOCHS).fit(model, loader, ckpt_path=ckpt_path)
    return model, cb


@pytest.fixture(scope="module")
def uninterrupted_accumulation(tmp_path_factory):
    out = tmp_path_factory.mktemp("accumulation_resume")
    model, cb = resume_run(save_at=RESUME_AT, out=out)
    return out, flat_params(model), cb


@pytest.mark.parametrize("g", RESUME_AT)
def test_resume_mid_window_and_mid_schedule_equals_the_uninterrupted_run(g, uninterrupted_accumulation):
    out, full_params, full_cb = uninterrupted_accumulation
    state = next(v for k, v in torch.load(out / f"after_{g}.ckpt", weights_only=False)["callbacks"].items()
                 if k.startswith("OptimizerCallback"))
    mid_window = g in (10, 11, 15)
    assert state["accumulator"]["open"] is mid_window
    assert ("accumulated_grads" in state) is mid_window  # the window's partial sum travels only when open
    model, cb = resume_run(ckpt_path=out / f"after_{g}.ckpt")
    assert torch.equal(flat_params(model), full_params)
    assert cb.steps_taken == full_cb.steps_taken == len(keyed_windows(RESUME_SCHEDULE, RESUME_BATCHES, RESUME_EPOCHS))
    assert cb.accumulator.state_dict() == full_cb.accumulator.state_dict()
    assert cb.scheduler.state_dict() == full_cb.scheduler.state_dict()


def test_resume_mid_window_without_its_gradients_warns_and_averages_what_it_has(uninterrupted_accumulation, tmp_path):
    """A checkpoint with an open window but no gradients (as several processes write it): the
    resumed step averages the micro-batches after the checkpoint, and says so."""
    out, full_params, _ = uninterrupted_accumulation
    ckpt = torch.load(out / "after_11.ckpt", weights_only=False)
    key = next(k for k in ckpt["callbacks"] if k.startswith("OptimizerCallback"))
    del ckpt["callbacks"][key]["accumulated_grads"]
    torch.save(ckpt, tmp_path / "lossy.ckpt")
    seen = []

    class Spy(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append((trainer.global_step, pl_module.trainer.callbacks[0].accumulator.micro_batches))

    with pytest.warns(lo.LightningOptimWarning, match=r"resuming in the middle of an accumulation window whose gradients "
                                         r"the checkpoint does not hold \(2 of 3 micro-batches lost\)"):
        torch.manual_seed(0)
        model = Regression()
        cb = OptimizerCallback(optimizer={"name": "adamw", "lr": 1e-2},
                               scheduler={"name": "warmup_cosine", "warmup_steps": 2}, accumulation=RESUME_SCHEDULE)
        loader = lo.ResumableDataLoader(regression_data(batches=RESUME_BATCHES).dataset, batch_size=4, shuffle=False)
        trainer([cb, Spy()], max_epochs=RESUME_EPOCHS).fit(model, loader, ckpt_path=tmp_path / "lossy.ckpt")
    assert seen[0] == (5, 1)  # step 5's window (batches 10-12) holds batch 12 only
    assert not torch.equal(flat_params(model), full_params)


def test_mid_window_checkpoint_under_several_processes_warns_and_holds_no_gradients():
    """Each rank's open window holds its own partial sum, which one checkpoint file cannot
    hold: the state says the window is open, carries no gradients, and the user is told once."""
    from types import SimpleNamespace

    model = Regression()
    cb = OptimizerCallback(optimizer={"name": "sgd", "lr": 0.1}, accumulation={0: 1, 3: 4})
    cb.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cb._fit_trainer = SimpleNamespace(world_size=2)
    for b, steps in ((0, 0), (1, 1), (2, 2), (3, 3), (4, 3)):
        cb.accumulator.on_batch_start(b, steps, 0)
    with pytest.warns(lo.LightningOptimWarning, match=r"middle of an accumulation window \(2 of 4 micro-batches\) under 2 "
                                         r"processes; the ranks' partial gradients are not saved"):
        state = cb.state_dict()
    assert state["accumulator"]["open"] is True and state["accumulated_grads"] is None
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        cb.state_dict()
    assert again == []  # once per run, not at every save


# ----- clipping and the non-finite guard -------------------------------------------------------


class NaNAt(Regression):
    """Poisons one gradient entry on chosen optimizer steps."""

    def __init__(self, bad_steps) -> None:
        super().__init__()
        self.bad_steps = set(bad_steps)
        self.before: dict[int, torch.Tensor] = {}

    def on_after_backward(self):
        step = self.trainer.global_step
        self.before[step] = flat_params(self).clone()
        if step in self.bad_steps:
            self.net[0].weight.grad[0, 0] = float("nan")


def test_nan_gradient_skips_the_step_and_leaves_everything_unchanged():
    torch.manual_seed(0)
    model = NaNAt(bad_steps={3})
    cb = OptimizerCallback(optimizer={"name": "adamw", "lr": 1e-2}, scheduler={"name": "exponential", "gamma": 0.9},
                           clipping={"mode": "norm", "max_norm": 1.0})
    snapshots = {}

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots[batch_idx] = (flat_params(pl_module).clone(), copy.deepcopy(cb.optimizer.state_dict()),
                                    cb.optimizer.param_groups[0]["lr"])

    trainer([cb, Spy()], max_steps=6).fit(model, regression_data())
    params_2, state_2, lr_2 = snapshots[2]
    params_3, state_3, lr_3 = snapshots[3]
    assert torch.equal(params_2, params_3)  # bit-identical
    assert lr_2 == lr_3
    for pid, entry in state_2["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, state_3["state"][pid][key]), key
    assert cb.clipper.skipped_steps == 1 and cb.steps_taken == 5
    assert not torch.equal(snapshots[4][0], params_3)  # training goes on
    assert all(torch.isfinite(snapshots[5][0]))


def test_consecutive_nan_steps_stop_training_with_a_clear_error():
    model = NaNAt(bad_steps=range(100))
    cb = OptimizerCallback(optimizer="adamw", clipping={"mode": "none", "max_consecutive_skips": 3})
    with pytest.raises(lo.clipping.NonFiniteGradientError, match="3"):
        trainer([cb], max_steps=10).fit(model, regression_data())
    assert cb.clipper.skipped_steps == 3


def test_norm_clipping_in_training_matches_torch():
    """One step with clipping equals torch's clip_grad_norm_ followed by the same optimizer."""
    torch.manual_seed(0)
    model = Regression()
    reference = copy.deepcopy(model)
    loader = regression_data(batches=1)
    trainer([OptimizerCallback(optimizer={"name": "sgd", "lr": 0.1}, clipping={"mode": "norm", "max_norm": 0.05})],
            max_steps=1).fit(model, loader)
    x, y = next(iter(loader))
    nn.functional.mse_loss(reference.net(x), y).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-6, atol=1e-7)


# ----- resume ---------------------------------------------------------------------------------


def test_resume_equals_uninterrupted_run_bit_for_bit(tmp_path):
    def make():
        return OptimizerCallback(
            optimizer={"name": "coupled_adam", "lr": 1e-2},
            scheduler={"name": "warmup_cosine", "warmup_steps": 3},
            clipping={"mode": "norm", "max_norm": 0.5},
            accumulation={0: 1, 4: 2},
        )

    torch.manual_seed(0)
    start = TiedLM()
    full = copy.deepcopy(start)
    full_cb = make()
    trainer([full_cb], max_epochs=2).fit(full, data(batches=10))

    class StopAfterFirstEpoch(pl.Callback):  # an interruption: same config, stopped early
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    first = copy.deepcopy(start)
    first_cb = make()
    t1 = trainer([first_cb, StopAfterFirstEpoch()], max_epochs=2)
    t1.fit(first, data(batches=10))
    assert 0 < first_cb.steps_taken < full_cb.steps_taken
    ckpt = tmp_path / "epoch1.ckpt"
    t1.save_checkpoint(ckpt)

    resumed = TiedLM()
    resumed_cb = make()
    trainer([resumed_cb], max_epochs=2).fit(resumed, data(batches=10), ckpt_path=ckpt)
    assert torch.equal(flat_params(resumed), flat_params(full))
    assert resumed_cb.steps_taken == full_cb.steps_taken
    assert resumed_cb.state_dict()["scheduler"] == full_cb.state_dict()["scheduler"]
    assert resumed_cb.clipper.clipped_steps == full_cb.clipper.clipped_steps


def test_resume_with_another_optimizer_name_raises(tmp_path):
    model = BareLM()
    t = trainer([OptimizerCallback(optimizer="adamw")], max_steps=2)
    t.fit(model, data())
    t.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match="trained with optimizer 'adamw', this run asks for 'lion'"):
        trainer([OptimizerCallback(optimizer="lion")], max_steps=4).fit(BareLM(), data(), ckpt_path=tmp_path / "a.ckpt")


# ----- refusals -------------------------------------------------------------------------------


def test_trainer_gradient_clip_val_and_our_clipping_conflict():
    with pytest.raises(ValueError, match=r"gradient_clip_val=1\.0.*choose one"):
        trainer([OptimizerCallback(clipping={"mode": "norm", "max_norm": 1.0})], gradient_clip_val=1.0,
                max_steps=1).fit(BareLM(), data())


def test_strategy_that_accumulates_itself_is_refused_with_a_schedule():
    """A strategy with handles_gradient_accumulation (DeepSpeed) steps on every batch and
    accumulates on its own count, so a schedule could not set its windows: refused in setup."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    class Accumulating(SingleDeviceStrategy):
        @property
        def handles_gradient_accumulation(self) -> bool:
            return True

    cb = OptimizerCallback(accumulation={0: 1, 5: 2})
    with pytest.raises(ValueError, match=r"^OptimizerCallback: strategy Accumulating accumulates gradients itself, "
                                         r"so an accumulation schedule \(accumulate 1 from step 0, 2 from step 5\)"):
        trainer([cb], strategy=Accumulating(device="cpu")).fit(BareLM(), data())


def test_a_second_fit_on_the_same_trainer_keeps_the_schedule():
    """The callback leaves the Trainer's accumulate_grad_batches at 1 after fit, so a second fit
    on the same Trainer is not refused as 'both set', and goes on with the schedule."""
    cb = OptimizerCallback(optimizer={"name": "sgd", "lr": 0.1}, accumulation={0: 1, 2: 3})
    t = trainer([cb], max_epochs=1)
    t.fit(BareLM(), data(batches=8))  # windows 0, 1, 2-4, 5-7: k = 5 and 8 for the last two
    assert (t.accumulate_grad_batches, cb.steps_taken) == (1, 4)
    t.fit_loop.max_epochs = 2
    t.fit(BareLM(), data(batches=8))  # epoch 1 of the same run: windows 0-2, 3-5, 6-7
    assert (t.accumulate_grad_batches, cb.steps_taken) == (1, 7)


def test_trainer_accumulation_and_our_schedule_conflict():
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=2.*choose one"):
        trainer([OptimizerCallback(accumulation={0: 1, 5: 2})], accumulate_grad_batches=2,
                max_steps=1).fit(BareLM(), data())


def test_manual_optimization_is_refused():
    class Manual(BareLM):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="automatic_optimization=False is not supported"):
        trainer([OptimizerCallback()], max_steps=1).fit(Manual(), data())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"optimizer": "adamx"}, r"name='adamx' is invalid.*did you mean 'adam'"),
        ({"optimizer": {"name": "adam", "lr": -1}}, r"lr=-1 is invalid"),
        ({"optimizer": {"name": "adam", "betas": [0.9, 1.5]}}, r"betas\[1\]=1\.5 is invalid"),
        ({"optimizer": {"name": "adam", "momentum": 0.9}}, r"adam has no option 'momentum'"),
        ({"optimizer": {"name": "adam", "lrr": 0.1}}, r"lrr.*did you mean 'lr'"),
        ({"scheduler": "cosin"}, r"did you mean 'cosine'"),
        ({"clipping": {"mode": "norm", "max_norm": 0}}, r"max_norm=0"),
        ({"clipping": {"mode": "nrom"}}, r"did you mean 'norm'"),
        ({"accumulation": 0}, r"must be an int >= 1"),
        ({"accumulation": {0: 1, 10: 2.5}}, r"must be an int"),
        ({"partition": {"weight_decay": -1}}, r"weight_decay=-1"),
    ],
)
def test_bad_config_raises_before_training(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerCallback(**kwargs)


# ----- precision ------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_precision_plugins(precision):
    pl.seed_everything(0)
    model = BareLM()
    cb = OptimizerCallback(optimizer={"name": "adamw", "lr": 1e-2}, clipping={"mode": "norm", "max_norm": 1.0})
    trainer([cb], max_steps=20, precision=precision).fit(model, data())
    assert cb.steps_taken == 20
    assert sum(model.losses[-4:]) < sum(model.losses[:4])


@pytest.mark.parametrize("backend", ["foreach", "triton"])
def test_fp16_clipping_sees_unscaled_gradients(backend, monkeypatch):
    """16-mixed with a GradScaler (on CPU through Lightning's MixedPrecision plugin): the
    callback clips after unscaling, so the logged pre-clip norm is the true one, not scaled.
    Lightning leaves the grads scaled for an optimizer that takes the scale itself (the
    triton backend): the callback unscales them then (triton runs interpreted here)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    monkeypatch.setenv("TRITON_INTERPRET", "1")

    torch.manual_seed(0)
    model = Regression()
    reference = copy.deepcopy(model)
    loader = regression_data(batches=1)
    seen = {}

    class Spy(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen["norm"] = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in pl_module.parameters()])).item()

    cb = OptimizerCallback(optimizer={"name": "sgd", "lr": 0.1, "backend": backend}, clipping={"mode": "norm", "max_norm": 1e6})
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    trainer([cb, Spy()], max_steps=1, plugins=[plugin]).fit(model, loader)
    x, y = next(iter(loader))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.mse_loss(reference.net(x), y)
    loss.backward()
    true_norm = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in reference.parameters()])).item()
    assert seen["norm"] == pytest.approx(true_norm, rel=1e-2)
    assert cb.steps_taken == 1


def test_logged_keys_are_the_documented_ones(tmp_path):
    """Every key the callback logs is in the metrics table of docs/reference.md, and vice versa."""
    import re
    from pathlib import Path

    from lightning.pytorch.loggers import CSVLogger

    model = NaNAt(bad_steps=())
    cb = OptimizerCallback(optimizer="adamw", clipping={"mode": "norm", "max_norm": 1.0}, accumulation={0: 1, 2: 2})
    trainer([cb], max_steps=4, logger=CSVLogger(tmp_path, name="", version=""), log_every_n_steps=1).fit(model, regression_data())
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    logged = {re.sub(r"/(decay|no_decay|embedding)$", "/<group>", k) for k in header if k.startswith("optim/")}
    readme = (Path(__file__).resolve().parents[1] / "docs" / "reference.md").read_text()
    table = readme[readme.index("## Logged metrics"):readme.index("### Moment statistics")]
    documented = set(re.findall(r"^\| `(optim/[^`]+)`", table, flags=re.M))
    assert logged == documented


def test_accumulation_by_epoch_changes_at_the_epoch_start():
    cb = OptimizerCallback(optimizer={"name": "sgd", "lr": 0.1}, accumulation={"schedule": [[0, 1], [1, 3]], "by": "epoch"})
    trainer([cb], max_epochs=2).fit(BareLM(), data(batches=6))
    assert cb.steps_taken == 6 + 2


class LoggingRegression(Regression):
    """Logs its loss as users do (``self.log``), so Lightning's own rows follow log_every_n_steps."""

    def __init__(self) -> None:
        super().__init__()
        self.lr_seen: dict[int, float] = {}  # optimizer step k (1-based) -> the lr it used

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", loss)
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.lr_seen[self.trainer.global_step + 1] = optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("accumulation", [None, {0: 1, 4: 3}])
def test_metrics_are_logged_every_optimizer_step_whatever_log_every_n_steps(tmp_path, accumulation):
    """log_every_n_steps=7 spaces Lightning's train/loss rows (steps 6, 13); the callback's rows
    are one per optimizer step k, at step k - 1 (Lightning's step value for the batch that runs
    it, MomentMonitor's convention), skipped steps included, under accumulation too."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    model = LoggingRegression()
    cb = OptimizerCallback(optimizer={"name": "adamw", "lr": 0.1}, scheduler={"name": "exponential", "gamma": 0.5},
                           accumulation=accumulation)
    run = trainer([cb], max_steps=15, max_epochs=-1, logger=CSVLogger(tmp_path, name="", version=""),
                  log_every_n_steps=7)
    run.fit(model, regression_data(batches=24))
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    lr_rows = {int(r["step"]): float(r["optim/lr/decay"]) for r in rows if r.get("optim/lr/decay")}
    assert sorted(lr_rows) == list(range(15))
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [6, 13]
    for step, lr in lr_rows.items():  # the row at step s is optimizer step s + 1's: its lr, 0.1 * 0.5**s
        assert lr == model.lr_seen[step + 1] == pytest.approx(0.1 * 0.5**step, rel=1e-12), step
    for key in ("optim/grad_norm_total", "optim/skipped_steps", "optim/clipped_steps"):
        assert sorted(int(r["step"]) for r in rows if r.get(key)) == list(range(15)), key
    if accumulation:  # steps 1-4 average one micro-batch, 5-15 three (24 batches: an epoch end cuts step 11)
        sizes = [float(r["optim/accumulation"]) for r in sorted(rows, key=lambda r: int(r["step"]))
                 if r.get("optim/accumulation")]
        assert sizes == [1.0] * 4 + [3.0] * 6 + [2.0] + [3.0] * 4
    assert float(run.callback_metrics["optim/skipped_steps"]) == 0.0  # still in callback_metrics
    last = max(rows, key=lambda r: int(r["step"]) if r.get("optim/grad_norm_total") else -1)
    assert int(last["step"]) == 14  # the two paths carry the same numbers: the last step's norm
    assert float(run.callback_metrics["optim/grad_norm_total"]) == pytest.approx(
        float(last["optim/grad_norm_total"]), rel=1e-6)
