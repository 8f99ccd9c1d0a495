"""The registry: optimizer names, as used by Hydra's ``optimizer=<name>`` and the tests.

A name is a class plus preset hyperparameters (``momentum`` is SGD with momentum=0.9), read
from the rule table: each class's spec declares its names (:class:`lightning_optim.rules.RuleSpec`).
:func:`create_optimizer` turns a name or a config mapping into an optimizer, splitting a
module's parameters with :func:`~lightning_optim.partition.param_groups` when given one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

from torch import nn

from . import optim, rules  # noqa: F401  (importing optim registers every optimizer class)
from .optim.base import Optimizer
from .partition import param_groups
from .validation import invalid, suggest


class Entry(NamedTuple):
    cls: type[Optimizer]
    preset: dict[str, Any]
    summary: str


# Every name the optimizer classes declare in their rule specs (``spec.names``), in the order
# the classes are defined (lightning_optim.optim imports them in this order).
REGISTRY: dict[str, Entry] = {
    name: Entry(cls, dict(preset.options), preset.summary) for name, (cls, preset) in rules.optimizers().items()
}


def optimizers() -> list[str]:
    """The registry names, in the order of the registry table above."""
    return list(REGISTRY)


def options(name: str) -> dict[str, Any]:
    """Every hyperparameter of ``name`` with its default (preset applied), ``backend`` included,
    from the class's rule spec (:class:`lightning_optim.rules.RuleSpec`). torch's
    ``foreach``/``fused``/``capturable``/``differentiable`` are not among them: the
    constructors take them for code written for torch; a config picks ``backend``."""
    entry = _entry(name)
    return {**entry.cls.spec.options, **entry.preset}


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
