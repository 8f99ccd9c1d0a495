"""GradientClipper's ways of combining per-tensor norms give torch's bits on every path.

``clip_`` buckets the grads by (device, dtype) once. With one bucket it takes each group's norm
from a slice of the total's stacked norms (or a stack of the group's, for a clipping set that
is not a contiguous run of the grad list); with several it regroups a subset as
``clip_grad_norm_`` would. Every path must equal torch's ``get_total_norm`` /
``clip_grad_norm_`` on the same tensors bit for bit. Sharded (DTensor) grads take the
local-shard path, checked in a one-rank process group in a child process."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from lightning_optim.clipping import GradientClipper

INF = float("inf")
F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64

# Per group, the dtype of each of its params' grads (None: the param has no grad). One bucket:
# all one dtype; several: mixed. A missing grad leaves the group a contiguous run of the list.
LAYOUTS = {
    "fp32": [[F32, F32], [F32, F32, F32], [F32, F32], [F32]],
    "bf16": [[BF16, BF16], [BF16, BF16, BF16], [BF16, BF16], [BF16]],
    "fp32-gaps": [[F32, None, F32], [None, F32, F32], [F32, None], [F32]],
    "mixed": [[F32, BF16], [BF16, F32, F64], [F32, F32], [BF16]],
    "mixed-by-group": [[F32, F32], [BF16, BF16, BF16], [F32, F32], [F64]],
}
NAMES = ["embedding", "decay", "no_decay", "rest"]
# Listed groups (each clipped by its own norm) and so the joint set of the others: all four
# groups, a contiguous run (decay..rest), runs with holes (embedding+no_decay+rest, embedding+no_decay).
PER_GROUP = [(), ("embedding",), ("decay",), ("decay", "rest")]


def _groups(layout: list[list[torch.dtype | None]]) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    groups = []
    for name, dtypes, scale in zip(NAMES, layout, [3.0, 0.5, 0.1, 0.2]):
        params = []
        for k, dtype in enumerate(dtypes):
            p = nn.Parameter(torch.zeros(7 + 3 * k, 5, dtype=dtype or F32))
            if dtype is not None:
                p.grad = (scale * torch.randn(p.shape, generator=gen)).to(dtype)
            params.append(p)
        groups.append({"name": name, "params": params})
    return groups


def _with_grad(grad: torch.Tensor) -> nn.Parameter:
    p = nn.Parameter(torch.zeros(grad.shape, dtype=grad.dtype))
    p.grad = grad
    return p


def _params(groups, *names) -> list[nn.Parameter]:
    return [p for g in groups if g["name"] in names for p in g["params"] if p.grad is not None]


def _grads(groups, *names) -> list[torch.Tensor]:
    return [p.grad for p in _params(groups, *names)]


@pytest.mark.parametrize("per_group", PER_GROUP, ids=lambda v: "+".join(v) or "global")
@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.5, INF])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_norms_and_clipped_grads_equal_torchs_on_every_path(layout, norm_type, per_group):
    groups = _groups(LAYOUTS[layout])
    ref = [{"name": g["name"], "params": [_with_grad(p.grad.clone()) for p in _params([g], g["name"])]}
           for g in groups]
    group_norm = {n: torch.nn.utils.get_total_norm(_grads(ref, n), norm_type) for n in NAMES}
    others = [n for n in NAMES if n not in per_group]
    thresholds = {n: 0.5 * group_norm[n].item() for n in per_group}
    max_norm = 0.5 * torch.nn.utils.get_total_norm(_grads(ref, *others), norm_type).item()
    for n, t in thresholds.items():
        torch.nn.utils.clip_grad_norm_(_params(ref, n), t, norm_type, foreach=True)
    torch.nn.utils.clip_grad_norm_(_params(ref, *others), max_norm, norm_type, foreach=True)
    expected_total = torch.nn.utils.get_total_norm([t for g in groups for p in g["params"]
                                                    if (t := p.grad) is not None], norm_type)

    clipper = GradientClipper("norm", max_norm=max_norm, norm_type=norm_type, per_group=thresholds)
    report = clipper.clip_(torch.optim.SGD(groups, lr=0.1))

    assert torch.equal(report.total_norm, expected_total)
    assert list(report.group_norms) == NAMES == list(report.clipped)
    for n in NAMES:
        assert torch.equal(report.group_norms[n], group_norm[n]), n
    for got, want in zip(_grads(groups, *NAMES), _grads(ref, *NAMES)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert [bool(report.clipped[n]) for n in NAMES] == [True] * 4  # every set at half its norm


@pytest.mark.parametrize("layout", ["fp32", "mixed"])
def test_one_group_reports_the_total_as_its_norm(layout):
    groups = _groups(LAYOUTS[layout])
    opt = torch.optim.SGD([{"name": "all", "params": [p for g in groups for p in g["params"]]}], lr=0.1)
    report = GradientClipper("none").clip_(opt)
    assert torch.equal(report.group_norms["all"], report.total_norm)
    assert torch.equal(report.total_norm, torch.nn.utils.get_total_norm(_grads(groups, *NAMES)))


# A one-rank process group in a child process (this one stays without torch.distributed).
# Some grads are Shard(0) DTensors, some plain: the report and the clipped grads must equal
# those of plain copies of every grad, up to the all-reduce's pow(p)/pow(1/p) round trip.
SHARDED = r"""
import math, os, sys, tempfile, torch, torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from lightning_optim.clipping import GradientClipper

dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "store"),
                        rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
gen = torch.Generator().manual_seed(0)
dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float32, torch.float32]
values = [torch.randn(6 + i, 4, generator=gen).to(dt) for i, dt in enumerate(dtypes)]
failures = []
for all_sharded in (False, True):
    for mode, kw in (("none", {}), ("norm", {"max_norm": 1.0, "per_group": {"b": 0.5}}),
                     ("value", {"max_value": 0.5})):
        for norm_type in (2.0, math.inf):
            def optimizer(shard):
                params = []
                for i, v in enumerate(values):
                    if shard and (all_sharded or i % 2 == 0):
                        zeros = torch.zeros(v.shape, dtype=v.dtype)
                        p = nn.Parameter(DTensor.from_local(zeros, mesh, [Shard(0)]))
                        p.grad = DTensor.from_local(v.clone(), mesh, [Shard(0)])
                    else:
                        p = nn.Parameter(torch.zeros(v.shape, dtype=v.dtype))
                        p.grad = v.clone()
                    params.append(p)
                groups = [{"name": "a", "params": params[:3]}, {"name": "b", "params": params[3:]}]
                return torch.optim.SGD(groups, lr=0.1)
            reports, grads = [], []
            for shard in (True, False):
                opt = optimizer(shard)
                reports.append(GradientClipper(mode, norm_type=norm_type, **kw).clip_(opt))
                grads.append([p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                              for g in opt.param_groups for p in g["params"]])
            (s, p), case = reports, (all_sharded, mode, norm_type)
            if not torch.allclose(s.total_norm, p.total_norm, rtol=1e-6, atol=0):
                failures.append((case, "total", s.total_norm.item(), p.total_norm.item()))
            for n in ("a", "b"):
                if not torch.allclose(s.group_norms[n], p.group_norms[n], rtol=1e-6, atol=0):
                    failures.append((case, n, s.group_norms[n].item(), p.group_norms[n].item()))
                if bool(s.clipped[n]) != bool(p.clipped[n]):
                    failures.append((case, "clipped", n))
            if list(s.clipped) != ["a", "b"] or bool(s.finite) != bool(p.finite):
                failures.append((case, "report"))
            for gs, gp in zip(*grads):
                if gs.dtype != gp.dtype or not torch.allclose(gs.float(), gp.float(), rtol=1e-5, atol=0):
                    failures.append((case, "grad", (gs.float() - gp.float()).abs().max().item()))
dist.destroy_process_group()
print("FAILURES", failures)
"""


def test_sharded_grads_clip_like_their_plain_copies():
    out = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, timeout=300)
    assert "FAILURES []" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
