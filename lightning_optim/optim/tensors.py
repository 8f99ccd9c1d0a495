"""Small tensor helpers every optimizer file shares: state dtypes, fresh state, real views."""

from __future__ import annotations

import torch
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)
# Scalar state that stays a float32 0-d tensor whatever the param: torch's format (on the
# CPU, or on the param's device for a backend that counts steps there).
SCALAR_KEYS = ("step", "mu_product")


def state_dtype(p: Tensor) -> torch.dtype:
    """The dtype the moments of ``p`` are kept in: fp32 for bf16/fp16 params."""
    return torch.float32 if p.dtype in LOW_PRECISION else p.dtype


def zeros(p: Tensor, fill: float = 0.0) -> Tensor:
    """State like ``p``, every element ``fill``. A complex ``p``'s state is complex, and its
    real view (what the rule reads) is ``fill`` in both parts, as torch starts Adagrad's sum."""
    if p.is_complex() and fill != 0:
        fill = complex(fill, fill)
    return torch.full_like(p, fill, dtype=state_dtype(p), memory_format=torch.preserve_format)


def real(t: Tensor) -> Tensor:
    """The real view (``torch.view_as_real``: a trailing dim of 2) of a complex tensor, else
    ``t`` itself."""
    return torch.view_as_real(t) if t.is_complex() else t


def scalar(value: float = 0.0) -> Tensor:
    return torch.tensor(value, dtype=torch.float32)

