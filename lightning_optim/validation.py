"""Input checks shared by the optimizers, the partition and the config schema.

Every check raises :class:`ValueError` whose message names the field and quotes the
value, e.g. ``AdamW: lr=-0.001 is invalid: must be >= 0``. Tests match on that shape,
so keep it when adding checks.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch


class LightningOptimWarning(UserWarning):
    """Warnings about a configuration that runs, but maybe not as the user expects."""


class ConfigurationError(ValueError):
    """A bad value in a config or a constructor argument. A ``ValueError``, so callers can
    catch either; ``python -m lightning_optim.train`` reports it as one paragraph."""


class ConflictingOptions(ConfigurationError, RuntimeError):
    """Two arguments that ask for different things (``backend="reference"`` with
    ``foreach=True``, or torch's ``foreach=True`` with ``fused=True``). Also a
    ``RuntimeError``: the type ``torch.optim`` raises for ``foreach=True, fused=True``, so code
    written against torch catches it as before."""


def invalid(owner: str, field: str, value: Any, requirement: str) -> ConfigurationError:
    """Build the one error shape used everywhere: owner, field, quoted value, requirement."""
    return ConfigurationError(f"{owner}: {field}={value!r} is invalid: {requirement}")


def number(owner: str, field: str, value: Any) -> float:
    """Return ``value`` as a float, or raise if it is not a real number (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise invalid(owner, field, value, "must be a number")
    try:
        return float(value)
    except OverflowError:  # an int too large for a float, e.g. 10**400
        raise invalid(owner, field, value, "must be a finite number") from None


def at_least(owner: str, field: str, value: Any, low: float = 0.0) -> float:
    v = number(owner, field, value)
    if not v >= low:  # also rejects NaN
        raise invalid(owner, field, value, f"must be >= {low:g}")
    if math.isinf(v):  # an infinite lr, decay or eps turns every parameter into inf or NaN
        raise invalid(owner, field, value, "must be finite")
    return v


def finite(owner: str, field: str, value: Any) -> float:
    """Any finite real number (e.g. SGD's dampening, which torch does not bound)."""
    v = number(owner, field, value)
    if not math.isfinite(v):
        raise invalid(owner, field, value, "must be finite")
    return v


def learning_rate(owner: str, value: Any) -> Any:
    """A learning rate: a finite number >= 0, returned as a float, or a one-element
    floating-point tensor with such a value, returned as that same tensor (its identity is
    what a scheduler's in-place ``fill_`` and a captured CUDA graph rely on). Reading the
    tensor's value here is a host read, once, at construction or load time."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or value.numel() != 1:
            raise invalid(owner, "lr", f"a {value.dtype} tensor of shape {list(value.shape)}",
                          "a tensor lr must be a floating-point tensor with one element")
        at_least(owner, "lr", float(value))
        return value
    return at_least(owner, "lr", value)


def positive(owner: str, field: str, value: Any, *, allow_inf: bool = False) -> float:
    v = number(owner, field, value)
    if not v > 0:
        raise invalid(owner, field, value, "must be > 0")
    if math.isinf(v) and not allow_inf:
        raise invalid(owner, field, value, "must be finite")
    return v


def unit_interval(owner: str, field: str, value: Any, *, closed: bool = False) -> float:
    """``value`` in [0, 1), or [0, 1] when ``closed``."""
    v = number(owner, field, value)
    ok = 0.0 <= v <= 1.0 if closed else 0.0 <= v < 1.0
    if not ok:
        raise invalid(owner, field, value, "must be in [0, 1]" if closed else "must be in [0, 1)")
    return v


def betas(owner: str, value: Any) -> tuple[float, float]:
    """A pair ``(beta1, beta2)``, each in [0, 1). Lists (from YAML) become tuples."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise invalid(owner, "betas", value, "must be a pair (beta1, beta2)")
    pair = tuple(value)
    if len(pair) != 2:
        raise invalid(owner, "betas", value, "must be a pair (beta1, beta2)")
    if any(isinstance(b, torch.Tensor) for b in pair):
        # torch keeps tensor betas to read them on the device (capturable=True); our kernels
        # take betas as numbers, so a tensor's later in-place change would be silently lost.
        raise invalid(owner, "betas", value, "must be a pair of numbers: tensor betas (torch's form for "
                      "capturable=True) are not supported; pass floats, e.g. (0.9, 0.999)")
    return (unit_interval(owner, "betas[0]", pair[0]), unit_interval(owner, "betas[1]", pair[1]))


def boolean(owner: str, field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise invalid(owner, field, value, "must be true or false")
    return value


def optional_boolean(owner: str, field: str, value: Any) -> bool | None:
    """True, False or None (torch's "not set", e.g. ``foreach=None``)."""
    if value is not None and not isinstance(value, bool):
        raise invalid(owner, field, value, "must be true, false or None")
    return value


def choice(owner: str, field: str, value: Any, options: Iterable[str]) -> str:
    """``value`` must be one of ``options``; the message suggests the closest ones."""
    options = list(options)
    if value in options:
        return value
    raise invalid(owner, field, value, f"must be one of {', '.join(options)}{suggest(value, options)}")


def suggest(value: Any, options: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when something in ``options`` is close to ``value``."""
    # difflib.get_close_matches breaks ties in reverse alphabetical order; keep the
    # options' own order instead, so 'adamx' suggests 'adam' and 'adamw' before 'radam'.
    scored = [(difflib.SequenceMatcher(None, str(value), o).ratio(), i, o) for i, o in enumerate(options)]
    close = [o for r, _, o in sorted(scored, key=lambda x: (-x[0], x[1])) if r >= 0.6][:3]
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
