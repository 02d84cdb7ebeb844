"""The attention blocks by name: ``register_attention`` adds a factory, ``create_attention``
builds one, so backbones accept any block."""

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


def available_attention() -> list[str]:
    """Names accepted by :func:`create_attention`, sorted."""
    return sorted(_BLOCKS)


def create_attention(name: str, channels: int, **options: Any) -> nn.Module:
    """Build attention block ``name`` over ``channels`` feature channels."""
    if name not in _BLOCKS:
        raise KeyError(f"unknown attention {name!r}; available: {', '.join(sorted(_BLOCKS))}")
    return _BLOCKS[name](channels, **options)
