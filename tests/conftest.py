"""Shared helpers for the optimizer tests."""

from __future__ import annotations

import pytest
import torch


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """max|a - e| <= tol * max|e|: relative to the tensor's scale, so near-zero entries
    don't turn one rounding step into a huge elementwise ratio."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = actual.detach().double(), expected.detach().double()
    if e.numel() == 0:
        return
    err = (a - e).abs().max().item()
    scale = max(e.abs().max().item(), 1e-30)
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol:g} * {scale:.3e}"


def build_for_rule(name: str, variant_options: dict, params: list, backend: str):
    """The optimizer of registry ``name`` over ``params`` (CoupledAdam: the 2-D tensors in a
    coupled group, the rest in a plain one), as the backend tests build it."""
    import lightning_optim as lo

    if name == "coupled_adam":
        groups = [{"params": [p for p in params if p.dim() >= 2], "coupled": True},
                  {"params": [p for p in params if p.dim() < 2]}]
    else:
        groups = params
    return lo.create_optimizer({"name": name, **variant_options, "lr": 1e-2}, groups, backend=backend)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def load_recipe(name: str):
    """Import ``recipes/<name>/run.py`` (recipes are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / name / "run.py"
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
