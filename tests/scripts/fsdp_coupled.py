"""Run by tests/test_fsdp.py: 2-process FSDP2 (``fully_shard``, CPU/gloo) against one
unsharded copy of the same model on every rank, fed the same global batches.

The sharded model splits the tied embedding (37 rows, so the shards are uneven) ``Shard(0)``;
each rank trains on half of every global batch, and FSDP averages the gradients, so the
sharded and unsharded runs see the same mean gradient. Each rank writes OUT/rank<r>.json with
the largest relative differences it found, and what it logged."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lightning_optim as lo
from lightning_optim.clipping import GradientClipper
from lightning_optim.sharding import full, is_dtensor, local
from lightning_optim.stats import MomentStats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_helpers import BareLM  # noqa: E402

# 37 rows: the two shards are uneven (19 and 18 rows).
VOCAB, STEPS, GLOBAL_BATCH = 37, 6, 16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if a.numel() else 0.0


def dcp_roundtrip(model: nn.Module, opt: torch.optim.Optimizer, where: Path) -> list[str]:
    """Save the optimizer with torch.distributed.checkpoint (what ModelParallelStrategy does),
    load it into a fresh optimizer; return the state entries that differ (none, we expect)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    opt.zero_grad(set_to_none=True)
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(where))
    fresh = lo.CoupledAdam(lo.param_groups(model), lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1)
    loaded = {"optim": get_optimizer_state_dict(model, fresh)}
    dcp.load(loaded, checkpoint_id=str(where))
    set_optimizer_state_dict(model, fresh, loaded["optim"])
    bad = []
    for name, p in model.named_parameters():
        for key, value in opt.state[p].items():
            other = fresh.state[p].get(key)
            if other is None or type(other) is not type(value) or not torch.equal(full(other), full(value)):
                bad.append(f"{name}.{key}")
    return bad


def main(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    reference = BareLM(vocab=VOCAB)
    sharded = BareLM(vocab=VOCAB)
    sharded.load_state_dict(reference.state_dict())
    sharded.head.weight = sharded.embed.weight
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(sharded.mlp, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    placements = {n: str(p.placements) for n, p in sharded.named_parameters()}

    def build(model):
        opt = lo.CoupledAdam(lo.param_groups(model), lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1)
        clip = GradientClipper(mode="norm", max_norm=0.5)
        return opt, clip, MomentStats(opt)

    opt_r, clip_r, stats_r = build(reference)
    opt_s, clip_s, stats_s = build(sharded)
    gen = torch.Generator().manual_seed(1)
    worst = {"params": 0.0, "total_norm": 0.0, "stats": 0.0, "embedding": 0.0, "grad_norm_group": 0.0}
    skipped = []
    for step in range(STEPS):
        x = torch.randint(0, VOCAB, (GLOBAL_BATCH,), generator=gen)
        y = (3 * x + 1) % VOCAB
        half = GLOBAL_BATCH // world
        for model, opt, xs, ys in ((reference, opt_r, x, y),
                                   (sharded, opt_s, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs), ys).backward()
        poison = step == 3
        if poison and rank == 1:  # a NaN in one rank's shard only: every rank must skip
            local(sharded.norm.weight.grad).fill_(float("nan"))
        stats_r.before_step()
        stats_s.before_step()
        rep_r, rep_s = clip_r.clip_(opt_r), clip_s.clip_(opt_s)
        skip_s = clip_s.should_skip(rep_s)
        skip_r = clip_r.should_skip(rep_r)
        skipped.append(skip_s)
        if skip_s:
            assert poison, "only the poisoned step may be skipped"
            continue
        assert not skip_r
        worst["total_norm"] = max(worst["total_norm"], rel(rep_s.total_norm, rep_r.total_norm))
        for name in rep_r.group_norms:
            worst["grad_norm_group"] = max(worst["grad_norm_group"], rel(rep_s.group_norms[name], rep_r.group_norms[name]))
        opt_r.step()
        opt_s.step()
        got, want = stats_s.after_step(), stats_r.after_step()
        assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
        for key in want:
            # log(mean v_t / mean v_prev) is near 0: compare it absolutely.
            r = float((got[key] - want[key]).abs()) if "v_log_ratio" in key else rel(got[key], want[key])
            if r > worst["stats"]:
                worst["stats"], worst["stats_key"] = r, key
        emb_s = stats_s.embedding_stats({"embed.weight": sharded.embed.weight})
        emb_r = stats_r.embedding_stats({"embed.weight": reference.embed.weight})
        for key in emb_r:
            worst["embedding"] = max(worst["embedding"], rel(emb_s[key], emb_r[key]))
    for (name, p), q in zip(sharded.named_parameters(), reference.parameters()):
        worst["params"] = max(worst["params"], rel(full(p.detach()), q.detach()))
    coupled_row = opt_s.state[sharded.embed.weight]["exp_avg_sq"]
    roundtrip = dcp_roundtrip(sharded, opt_s, Path(out, "dcp"))
    result = {
        "worst": worst, "skipped": skipped, "placements": placements,
        "coupled_row": {"dtensor": is_dtensor(coupled_row), "placements": str(coupled_row.placements),
                        "local_shape": list(local(coupled_row).shape),
                        "rel": rel(full(coupled_row), opt_r.state[reference.embed.weight]["exp_avg_sq"])},
        "local_rows": local(sharded.embed.weight).shape[0],
        "skipped_steps": clip_s.skipped_steps,
        "dcp_roundtrip": roundtrip,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(main, args=(2, port, sys.argv[1]), nprocs=2)
