"""Non-local attention blocks. Each maps ``(N, C, H, W) -> (N, C, H, W)`` for any H, W >= 1.

``create_attention(name, channels, **options)`` builds one by name, so backbones accept any.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

_F = TypeVar("_F", bound=Callable[..., Any])
_LOW = (torch.float16, torch.bfloat16)

_BLOCKS: dict[str, Callable[..., nn.Module]] = {}


def register_attention(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make ``create_attention(name, channels, **options)`` build this block."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BLOCKS:
            raise ValueError(f"attention {name!r} is registered twice")
        _BLOCKS[name] = factory
        return factory

    return wrap


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


def _load_all() -> None:
    # Importing the modules registers their blocks.
    from nlsr.attention import (  # noqa: F401
        cross_scale,
        gla,
        hspa,
        lcoa,
        nla,
        nlsa,
    )


def available_attention() -> list[str]:
    """Names accepted by :func:`create_attention`, sorted."""
    _load_all()
    return sorted(_BLOCKS)


def create_attention(name: str, channels: int, **options: Any) -> nn.Module:
    """Build attention block ``name`` over ``channels`` feature channels."""
    _load_all()
    if name not in _BLOCKS:
        raise KeyError(f"unknown attention {name!r}; available: {', '.join(sorted(_BLOCKS))}")
    return _BLOCKS[name](channels, **options)
