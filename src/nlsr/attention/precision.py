"""Float32 islands for the attention kernels under autocast or half-precision inputs.

Scores feed ``exp`` and long sums, where bfloat16's 8-bit mantissa would cost far more than the
convolutions around them gain (bf16 "where safe"), so the kernels are wrapped by
:func:`in_float32`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

_F = TypeVar("_F", bound=Callable[..., Any])
_LOW = (torch.float16, torch.bfloat16)


def in_float32(fn: _F) -> _F:
    """Decorator for the attention kernels: under autocast or with half/bfloat16 inputs, run
    ``fn`` in float32 with autocast off. Scores feed ``exp`` and long sums, where bfloat16's
    8-bit mantissa would cost far more than the convolutions around them gain (bf16 "where
    safe")."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = (*args, *kwargs.values())
        nested = [t for a in values if isinstance(a, tuple) and hasattr(a, "_fields") for t in a]
        tensors = [a for a in (*values, *nested) if isinstance(a, Tensor)]
        device = tensors[0].device.type if tensors else "cpu"
        low = any(t.dtype in _LOW for t in tensors)
        if not low and not torch.is_autocast_enabled(device):
            return fn(*args, **kwargs)

        def cast(a: Any) -> Any:
            if isinstance(a, tuple) and hasattr(a, "_fields"):  # a NamedTuple of tensors
                return type(a)(*map(cast, a))
            return a.float() if isinstance(a, Tensor) and a.dtype in _LOW else a

        with torch.autocast(device, enabled=False):
            return fn(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]
