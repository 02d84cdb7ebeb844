"""Non-local attention blocks. Each maps ``(N, C, H, W) -> (N, C, H, W)`` for any H, W >= 1.

``create_attention(name, channels, **options)`` builds one by name, so backbones accept any.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

_BLOCKS: dict[str, Callable[..., nn.Module]] = {}


def register_attention(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make ``create_attention(name, channels, **options)`` build this block."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BLOCKS:
            raise ValueError(f"attention {name!r} is registered twice")
        _BLOCKS[name] = factory
        return factory

    return wrap


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
