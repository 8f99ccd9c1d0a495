"""The registry: optimizer names, as used by Hydra's ``optimizer=<name>`` and the tests.

A name is a class plus preset hyperparameters (``momentum`` is SGD with momentum=0.9).
:func:`create_optimizer` turns a name or a config mapping into an optimizer, splitting a
module's parameters with :func:`~lightning_optim.partition.param_groups` when given one.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any, NamedTuple

from torch import nn

from .backends import TORCH_KEYWORDS
from .optim import SGD, Adagrad, Adam, AdamW, CoupledAdam, Lion, NAdam, RAdam, RMSprop, Yogi
from .optim.base import Optimizer
from .partition import param_groups
from .validation import invalid, suggest


class Entry(NamedTuple):
    cls: type[Optimizer]
    preset: dict[str, Any]
    summary: str


REGISTRY: dict[str, Entry] = {
    "sgd": Entry(SGD, {}, "plain SGD"),
    "momentum": Entry(SGD, {"momentum": 0.9}, "SGD with heavy-ball momentum 0.9"),
    "nesterov": Entry(SGD, {"momentum": 0.9, "nesterov": True}, "SGD with Nesterov momentum 0.9"),
    "adagrad": Entry(Adagrad, {}, "AdaGrad (Duchi et al. 2011)"),
    "rmsprop": Entry(RMSprop, {}, "RMSProp (Hinton 2012)"),
    "adam": Entry(Adam, {}, "Adam with L2 decay (Kingma & Ba 2015)"),
    "amsgrad": Entry(Adam, {"amsgrad": True}, "Adam with the running-max second moment (Reddi et al. 2018)"),
    "adamw": Entry(AdamW, {}, "Adam with decoupled weight decay (Loshchilov & Hutter 2019)"),
    "nadam": Entry(NAdam, {}, "Adam with Nesterov momentum (Dozat 2016)"),
    "radam": Entry(RAdam, {}, "Adam with a rectified adaptive rate (Liu et al. 2020)"),
    "lion": Entry(Lion, {}, "sign of interpolated momentum (Chen et al. 2023)"),
    "yogi": Entry(Yogi, {}, "Adam with an additive second moment (Zaheer et al. 2018)"),
    "coupled_adam": Entry(CoupledAdam, {}, "AdamW with the embedding second moment shared across rows (Stollenwerk & Stollenwerk 2025)"),
}


def optimizers() -> list[str]:
    """The registry names, in the order of the registry table above."""
    return list(REGISTRY)


def options(name: str) -> dict[str, Any]:
    """Every hyperparameter of ``name`` with its default (preset applied), ``backend`` included.
    torch's ``foreach``/``fused``/``capturable``/``differentiable`` are not among them: the
    constructors take them for code written for torch; a config picks ``backend``."""
    entry = _entry(name)
    sig = inspect.signature(entry.cls.__init__)
    defaults = {k: p.default for k, p in sig.parameters.items()
                if k not in ("self", "params", *TORCH_KEYWORDS)}
    return {**defaults, **entry.preset}


def create_optimizer(name_or_mapping: Any, params_or_module: Any, **overrides: Any) -> Optimizer:
    """Build an optimizer from a registry name or a config mapping.

    Args:
        name_or_mapping: ``"adamw"``, or ``{"name": "coupled_adam", "lr": 3e-4, "betas": [0.9, 0.95]}``
            (the Hydra ``optimizer`` node; ``None`` values mean the rule's default), or a
            dataclass with the same fields.
        params_or_module: an ``nn.Module`` (its parameters are split by
            :func:`param_groups`, coupling the output embedding only for CoupledAdam), or anything
            a ``torch.optim.Optimizer`` takes.
        overrides: hyperparameters that win over the mapping.

    Raises:
        ValueError: unknown name or option, or a bad hyperparameter value.
    """
    if dataclasses.is_dataclass(name_or_mapping) and not isinstance(name_or_mapping, type):
        name_or_mapping = dataclasses.asdict(name_or_mapping)
    if isinstance(name_or_mapping, str):
        config: dict[str, Any] = {"name": name_or_mapping}
    elif isinstance(name_or_mapping, Mapping) or hasattr(name_or_mapping, "items"):  # dict, DictConfig
        # None means "the rule's default", as in the config schema where unset fields are None.
        config = {str(k): v for k, v in name_or_mapping.items() if v is not None}
    else:
        raise invalid("create_optimizer", "optimizer", name_or_mapping, "must be a registry name or a mapping with 'name'")
    if "name" not in config:
        raise invalid("create_optimizer", "optimizer", name_or_mapping, f"has no 'name' (one of {', '.join(REGISTRY)})")
    name = config.pop("name")
    allowed = options(name)
    kwargs = {**_entry(name).preset, **config, **overrides}
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        k = unknown[0]
        raise invalid(
            "create_optimizer", k, kwargs[k],
            f"{name} has no option {k!r}{suggest(k, allowed)}; its options are {', '.join(allowed)}",
        )
    cls = _entry(name).cls
    params = params_or_module
    if isinstance(params_or_module, nn.Module):
        params = param_groups(params_or_module, coupled=cls.couples)
    return cls(params, **kwargs)


def _entry(name: Any) -> Entry:
    if not isinstance(name, str) or name not in REGISTRY:  # a list or dict name is unhashable
        raise invalid("optimizer", "name", name, f"must be one of {', '.join(REGISTRY)}{suggest(name, REGISTRY)}")
    return REGISTRY[name]


def markdown_table() -> str:
    """The README's table of registry names and their options with defaults (a test keeps
    the README in step with this)."""
    rows = ["| name | class | options (defaults) | rule |", "|---|---|---|---|"]
    for name, entry in REGISTRY.items():
        opts = ", ".join(f"`{k}={v!r}`" for k, v in options(name).items() if k != "backend")
        rows.append(f"| `{name}` | `{entry.cls.__name__}` | {opts} | {entry.summary} |")
    return "\n".join(rows)
