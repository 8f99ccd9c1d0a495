"""Moments from ``torch.optim`` move into a lightning_optim partition.

:func:`convert_optimizer_state` maps a torch optimizer's per-parameter state (by parameter
name when torch saved ``param_names``, else by the order of ``module.parameters()``) onto the
groups of one of our optimizers; :func:`convert_checkpoint` does it to a Lightning ``.ckpt``
file. Plain PyTorch: nothing here imports Lightning.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, atomic_write, verify_checkpoint
from .validation import invalid

__all__ = ["convert_optimizer_state", "convert_checkpoint"]


def convert_optimizer_state(
    state_dict: Mapping[str, Any], module: nn.Module, optimizer: torch.optim.Optimizer
) -> dict:
    """A state dict for ``optimizer`` carrying the per-parameter state of another optimizer's.

    Args:
        state_dict: ``torch.optim`` (or any torch-format) ``optimizer.state_dict()`` of a run on
            ``module``, with any grouping: one group of ``module.parameters()`` or the module's
            own groups.
        module: the module that run trained. Saved tensors are matched to its parameters by
            name when the saved groups carry ``param_names`` (torch >= 2.6 keeps them when the
            optimizer was given ``named_parameters()``), else by position: torch numbers the
            parameters of its groups 0, 1, ... in order, and that order must be
            ``module.parameters()``'s (the common ``torch.optim.AdamW(self.parameters())``).
        optimizer: the lightning_optim optimizer to continue with, built on ``module``, e.g.
            ``create_optimizer({"name": "coupled_adam", "lr": 3e-4}, module)``.

    Returns:
        ``optimizer.state_dict()`` with the converted per-parameter state: pass it to
        ``optimizer.load_state_dict``. Group options (lr, weight decay, ...) are
        ``optimizer``'s own, not the saved ones: the partition decides them.

    The state keys keep torch's names (``step``, ``exp_avg``, ``exp_avg_sq``, ...). In a
    ``coupled=True`` group of :class:`~lightning_optim.CoupledAdam`, ``exp_avg_sq`` of shape
    ``(V, ...)`` becomes its mean over dim 0, ``(1, ...)``. That is exactly the coupled second
    moment the same gradients would have given: coupled Adam keeps
    ``vbar_t = b2 * vbar_{t-1} + (1 - b2) * mean_rows(g_t^2)``, and the row mean commutes with
    the EMA, so ``vbar_t = mean_rows(v_t)``. AMSGrad's ``max_exp_avg_sq`` becomes its row mean
    too; that is an upper bound of the coupled maximum (a mean of maxima is at least the
    maximum of means), so the first steps are at most as large as they would have been.

    Raises:
        ValueError: a saved tensor that matches no parameter of ``module``, a count or shape that
            disagrees, or a saved parameter name that ``module`` lacks. ``optimizer.load_state_dict``
            then checks the state keys (an SGD state into AdamW is refused there).
    """
    owner = "convert_optimizer_state"
    if not isinstance(module, nn.Module):
        raise invalid(owner, "module", module, "must be a torch.nn.Module")
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        shown = sorted(state_dict)[:6] if isinstance(state_dict, Mapping) else type(state_dict).__name__
        raise invalid(owner, "state_dict", shown,
                      "must be an optimizer state dict with 'state' and 'param_groups'")
    by_name = dict(module.named_parameters(remove_duplicate=False))  # a tied tensor under each name
    saved_groups = state_dict["param_groups"]
    named = all(g.get("param_names") for g in saved_groups)
    source: dict[int, Any] = {}  # id(param) -> saved entry
    if named:
        for g in saved_groups:
            for pid, pname in zip(g["params"], g["param_names"]):
                if pname not in by_name:
                    raise invalid(owner, "state_dict", pname, f"names a parameter that "
                                  f"{type(module).__name__} does not have{_close(pname, by_name)}")
                if pid in state_dict["state"]:
                    source[id(by_name[pname])] = (pname, state_dict["state"][pid])
    else:
        params = list(module.parameters())
        ids = [pid for g in saved_groups for pid in g["params"]]
        if len(ids) != len(params):
            raise ValueError(
                f"{owner}: the state dict holds {len(ids)} parameters without names and "
                f"{type(module).__name__}.parameters() has {len(params)}: they can only be matched by position "
                "when they are the same list. Save the optimizer with named_parameters() (torch >= 2.6) "
                "to match by name."
            )
        names = {id(p): n for n, p in reversed(list(by_name.items()))}  # the first name of each tensor
        for pid, p in zip(ids, params):
            if pid in state_dict["state"]:
                source[id(p)] = (names[id(p)], state_dict["state"][pid])

    target = optimizer.state_dict()
    converted: dict[int, dict[str, Any]] = {}
    index = 0
    for group in optimizer.param_groups:
        coupled = bool(group.get("coupled", False)) and getattr(optimizer, "couples", False)
        for p in group["params"]:
            found = source.get(id(p))
            if found is not None:
                converted[index] = _convert_entry(owner, *found, p, coupled)
            index += 1
    return {"state": converted, "param_groups": target["param_groups"]}


def _convert_entry(
    owner: str, name: str, entry: Mapping[str, Any], p: torch.Tensor, coupled: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if value.shape != p.shape and not (coupled and value.shape == (1, *p.shape[1:])):
                raise ValueError(
                    f"{owner}: parameter {name!r} has {key} of shape {list(value.shape)} in the state dict but "
                    f"the parameter has shape {list(p.shape)}: was it saved from another model?"
                )
            second_moment = key in ("exp_avg_sq", "max_exp_avg_sq")
            if coupled and second_moment and value.shape == p.shape and p.shape[0] != 1:
                value = value.mean(dim=0, keepdim=True)  # the coupled second moment (see the docstring)
        out[key] = value.clone() if isinstance(value, torch.Tensor) else value
    return out


def _close(name: str, names: Mapping[str, Any]) -> str:
    import difflib

    near = difflib.get_close_matches(name, list(names), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    module: nn.Module,
    optimizer: Any,
) -> dict:
    """Convert a Lightning ``.ckpt`` trained with a ``torch.optim`` optimizer for OptimizerCallback.

    ``module`` must hold the checkpoint's architecture (its weights are not read); ``optimizer``
    is the lightning_optim optimizer the resumed run will build: the ``optimizer`` mapping of
    the ``OptimizerCallback`` (``{"name": "coupled_adam", "lr": 3e-4}``; built here with
    :func:`~lightning_optim.create_optimizer`, which partitions with the default
    :func:`~lightning_optim.param_groups`), or an optimizer built on ``module`` when the callback
    has ``partition`` rules. The first optimizer state of ``src`` is converted with
    :func:`convert_optimizer_state`; its LR-scheduler states are dropped (the callback steps
    its own schedule, which starts at step 0 of the new run); weights, loop counters and
    other callbacks' states are kept. ``src`` is verified first; ``dst`` is written to a
    temporary file next to it and renamed, so it is never left half-written.

    Returns the converted checkpoint dict.
    """
    from .registry import create_optimizer

    verify_checkpoint(src)
    checkpoint = torch.load(os.fspath(src), map_location="cpu", weights_only=False)
    states = checkpoint.get("optimizer_states") or []
    if len(states) != 1:
        raise CheckpointError(
            f"checkpoint {os.fspath(src)!r} has {len(states)} optimizer states; convert_checkpoint converts "
            "exactly one (saved with weights_only=True, or a module with several optimizers?)"
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = create_optimizer(optimizer, module)
    checkpoint["optimizer_states"] = [convert_optimizer_state(states[0], module, optimizer)]
    checkpoint["lr_schedulers"] = []
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write(buffer.getvalue(), dst)
    return checkpoint
