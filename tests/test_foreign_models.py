"""Models nobody here wrote, trained for a few steps on CPU under OptimizerCallback + MomentMonitor.

Lightning's demo ``Transformer`` (an untied ``decoder`` head), a Hugging Face
``GPT2LMHeadModel`` built from a small ``GPT2Config`` (its ``lm_head`` tied to ``wte``; built
from the config only, nothing downloaded) and a small BatchNorm CNN. For each:

- the partition, checked against the model's own structure: the output embedding alone in the
  coupled ``embedding`` group (the tied tensor once), every other embedding, bias and norm
  undecayed, the remaining matrices decayed;
- the training loss falls;
- a run resumed from a checkpoint taken mid-epoch ends bit-identical to the uninterrupted run:
  every parameter, buffer (BatchNorm's running statistics) and optimizer state tensor
  ``torch.equal``. ``ResumableDataLoader`` replays the batch order and the RNG (dropout).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos import Transformer
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import lightning_optim as lo

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # build from a config; never reach the Hub

VOCAB, SEQ, BATCH, BATCHES = 32, 8, 8, 6  # 6 batches an epoch
STEPS, CKPT_STEP = 10, 4  # the checkpoint is mid-epoch (batch 4 of 6); the run crosses an epoch


class Foreign(pl.LightningModule):
    """Holds a foreign ``net`` as ``self.net``; ``loss(net, batch)`` is the model's own loss.
    No ``configure_optimizers``: OptimizerCallback provides it."""

    def __init__(self, net: nn.Module, loss: Callable[[nn.Module, tuple], torch.Tensor]) -> None:
        super().__init__()
        self.net, self._loss = net, loss
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self._loss(self.net, batch)
        self.losses.append(loss.item())
        self.log("train/loss", loss)
        return loss


def token_data() -> TensorDataset:
    """Random first tokens, then x_{t+1} = (5 x_t + 3) mod VOCAB: random, but learnable."""
    gen = torch.Generator().manual_seed(1)
    x = torch.empty(BATCHES * BATCH, SEQ + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (len(x),), generator=gen)
    for t in range(SEQ):
        x[:, t + 1] = (5 * x[:, t] + 3) % VOCAB
    return TensorDataset(x)


def image_data() -> TensorDataset:
    """1 x 8 x 8 noise; the label says whether the left half is brighter than the right."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES * BATCH, 1, 8, 8, generator=gen)
    return TensorDataset(x, (x[..., :4].mean((1, 2, 3)) > x[..., 4:].mean((1, 2, 3))).long())


def demo_transformer() -> nn.Module:
    return Transformer(vocab_size=VOCAB, ninp=16, nhead=2, nhid=32, nlayers=1, dropout=0.1)


def demo_loss(net: nn.Module, batch: tuple) -> torch.Tensor:
    (x,) = batch  # as Lightning's own LightningTransformer demo: nll of the decoder's log-probs
    target = x[:, 1:]
    return F.nll_loss(net(x[:, :-1], target), target.reshape(-1))


def gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (dev extra)")
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ + 1, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def gpt2_loss(net: nn.Module, batch: tuple) -> torch.Tensor:
    (x,) = batch
    return net(input_ids=x, labels=x).loss  # the model shifts the labels itself


def bn_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 8 * 8, 2))


def cnn_loss(net: nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(net(x), y)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], nn.Module]
    loss: Callable[[nn.Module, tuple], torch.Tensor]
    data: Callable[[], TensorDataset]
    optimizer: dict
    unembedding: str | None  # the output embedding's name (net.<its first name>), or none
    tied: str | None = None  # the head's name for the same tensor, when tied
    max_loss_ratio: float = 0.9  # mean of the last 3 losses / mean of the first 3 (the losses fall)


CASES = [
    Case("lightning_demo_transformer", demo_transformer, demo_loss, token_data,
         {"name": "coupled_adam", "lr": 1e-2}, "net.decoder.weight"),
    Case("hf_gpt2_tied", gpt2, gpt2_loss, token_data, {"name": "coupled_adam", "lr": 1e-2},
         "net.transformer.wte.weight", tied="net.lm_head.weight"),
    Case("batchnorm_cnn", bn_cnn, cnn_loss, image_data, {"name": "adamw", "lr": 1e-2}, None),
]


def fit(case: Case, out: Path, ckpt_path: Path | None = None) -> tuple[Foreign, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    model = Foreign(case.build(), case.loss)
    callback = lo.OptimizerCallback(optimizer=case.optimizer, clipping={"mode": "norm", "max_norm": 1.0})
    monitor = lo.MomentMonitor(every_n_steps=2, expensive_every_n_steps=4)
    checkpoints = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=CKPT_STEP, save_top_k=-1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, max_epochs=-1, log_every_n_steps=1,
                         logger=CSVLogger(out, name="", version=""),
                         callbacks=[callback, monitor, checkpoints],
                         enable_progress_bar=False, enable_model_summary=False)
    loader = lo.ResumableDataLoader(case.data(), batch_size=BATCH, shuffle=True, seed=3)
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return model, trainer


def expected_groups(model: nn.Module, case: Case) -> dict[str, set[str]]:
    """The partition the contract promises, from the model's own structure."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[str, set[str]] = {"embedding": set(), "no_decay": set(), "decay": set()}
    for name, p in model.named_parameters():
        if name == case.unembedding:
            groups["embedding"].add(name)
        elif p.dim() < 2 or id(p) in embeddings:
            groups["no_decay"].add(name)
        else:
            groups["decay"].add(name)
    return {k: v for k, v in groups.items() if v}


def state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, and every tensor of the optimizer's state, by name."""
    out = {f"model/{k}": v for k, v in model.state_dict().items()}
    names = [n for g in optimizer.param_groups for n in g["param_names"]]
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"optim/{names[i]}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_foreign_model_partition_loss_and_exact_resume(case, tmp_path):
    model, trainer = fit(case, tmp_path / "full")
    optimizer = trainer.optimizers[0]
    callback = next(cb for cb in trainer.callbacks if isinstance(cb, lo.OptimizerCallback))
    assert optimizer is callback.optimizer and type(optimizer).__name__ == {
        "coupled_adam": "CoupledAdam", "adamw": "AdamW"}[case.optimizer["name"]]

    # Partition: named groups as the contract says, each tensor once.
    got = {g["name"]: set(g["param_names"]) for g in optimizer.param_groups}
    assert got == expected_groups(model, case)
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    options = {g["name"]: {k: g[k] for k in ("weight_decay", "coupled") if k in g}
               for g in optimizer.param_groups}
    assert options["no_decay"]["weight_decay"] == 0.0 and options["decay"]["weight_decay"] == 0.01  # AdamW's
    if case.unembedding is not None:
        assert options["embedding"] == {"weight_decay": 0.0, "coupled": True}
        (coupled,) = next(g["params"] for g in optimizer.param_groups if g["name"] == "embedding")
        assert optimizer.state[coupled]["exp_avg_sq"].shape == (1, coupled.shape[1])  # one shared row
    if case.tied is not None:
        assert model.get_parameter(case.tied) is model.get_parameter(case.unembedding)

    # The loss falls.
    losses = model.losses
    assert len(losses) == STEPS
    ratio = sum(losses[-3:]) / sum(losses[:3])
    assert ratio < case.max_loss_ratio, f"losses {losses}"
    print(f"{case.id}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, last 3 / first 3 = {ratio:.3f}")

    # The monitor logged the foreign model's statistics.
    with open(tmp_path / "full" / "metrics.csv") as f:
        header = next(csv.reader(f))
    probe = case.unembedding or "net.7.weight"
    assert f"optim/v_drift/{probe}" in header
    if case.unembedding is not None:
        assert f"embedding/isotropy/{probe}" in header

    # Resume from the mid-epoch checkpoint: bit-identical to the uninterrupted run.
    (ckpt,) = (tmp_path / "full" / "ckpt").glob(f"*step={CKPT_STEP}.ckpt")
    resumed, resumed_trainer = fit(case, tmp_path / "resumed", ckpt_path=ckpt)
    assert resumed.losses == losses[CKPT_STEP:]
    want, have = state_tensors(model, optimizer), state_tensors(resumed, resumed_trainer.optimizers[0])
    assert want.keys() == have.keys() and len(want) > 2 * len(list(model.parameters()))
    different = [k for k in want if not torch.equal(want[k], have[k])]
    assert different == []
    assert resumed_trainer.optimizers[0].state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
