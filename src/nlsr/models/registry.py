"""Registry of networks: create any model by name, as timm's ``create_model`` does."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

Factory = Callable[..., nn.Module]

_MODELS: dict[str, Factory] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register(name: str, description: str = "") -> Callable[[Factory], Factory]:
    """Class or factory decorator: make ``create(name, scale, **options)`` build it."""

    def wrap(factory: Factory) -> Factory:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = factory
        summary = (factory.__doc__ or "").strip().split("\n\n")[0]
        _DESCRIPTIONS[name] = description or " ".join(summary.split())
        return factory

    return wrap


#: Modules under ``nlsr.models`` whose import registers the networks.
_MODULES = ("bicubic", "csnln", "dlsn", "edsr", "hspan", "lcoan", "nlsn", "rcan")


def _load_all() -> None:
    # Imported on first use (not at package import) so that attention modules can import
    # ``nlsr.models.common`` without a cycle through the networks that use them.
    for module in _MODULES:
        importlib.import_module(f"nlsr.models.{module}")


def available() -> list[str]:
    """Names accepted by :func:`create`, sorted."""
    _load_all()
    return sorted(_MODELS)


def describe(name: str) -> str:
    """One-line description of a registered model."""
    return _DESCRIPTIONS[_check(name)]


def options(name: str) -> dict[str, Any]:
    """Keyword options of model ``name`` (besides ``scale``) with their default values."""
    params = inspect.signature(_MODELS[_check(name)]).parameters
    return {
        p.name: p.default
        for p in params.values()
        if p.name != "scale" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _check(name: str) -> str:
    _load_all()
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(available())}")
    return name


def create(name: str, scale: int = 2, *, pretrained: bool = False, **options: Any) -> nn.Module:
    """Build model ``name`` for upscaling factor ``scale``; ``options`` override its defaults.

    The returned module carries ``nlsr_config = {"arch", "scale", "options"}`` so that it can be
    saved in nlsr's own format and rebuilt identically. ``pretrained=True`` returns the weights
    shipped with nlsr instead (eval mode): ``name`` is a shipped model (``nlsr models``) or an
    architecture, meaning its best shipped model for ``scale``; the shipped model fixes the options.
    """
    if pretrained:
        if options:
            raise ValueError(
                f"create({name!r}, pretrained=True): options ({', '.join(sorted(options))}) "
                "cannot be changed on shipped weights; build without pretrained=True"
            )
        from nlsr.pretrained import load_pretrained

        return load_pretrained(name, scale)
    if name not in available():
        from nlsr.pretrained import available_pretrained

        if name in available_pretrained():
            raise KeyError(
                f"{name!r} is a pretrained model: use create({name!r}, scale, pretrained=True)"
            )
    model = _MODELS[_check(name)](scale=scale, **options)
    model.nlsr_config = {"arch": name, "scale": scale, "options": dict(options)}
    return model
