"""The architectures nlsr knows: one :class:`ArchSpec` per network module, registered once.

An architecture is one module under ``nlsr.models`` holding the network, how its checkpoints are
recognised and read (:mod:`nlsr.models.detection`), its paper preset and its small benchmark
configuration, declared as one ``ARCH = ArchSpec(...)`` (:mod:`nlsr.models.spec`). Adding one
is that file plus its name in :data:`_MODULES`; everything else (``create``, detection,
``nlsr models``, ``nlsr convert``, ``nlsr eval --weights``, ``nlsr bench``) finds it here.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from torch import nn

from nlsr.models.spec import ArchSpec

__all__ = [
    "architectures",
    "available",
    "build",
    "describe",
    "options",
    "register",
    "small_config",
    "spec",
    "unregister",
]

#: Modules under ``nlsr.models`` that hold the built-in architectures (each named after its
#: architecture and declaring its :class:`ArchSpec` as ``ARCH``), in the order ``nlsr models``
#: lists their paper presets: the one place the architectures are listed.
_MODULES = ("edsr", "rcan", "nlsn", "dlsn", "hspan", "lcoan", "csnln", "bicubic")

_SPECS: dict[str, ArchSpec] = {}


def register(arch: ArchSpec) -> ArchSpec:
    """Make ``arch`` known to ``create``, detection and the commands; returns it."""
    if arch.name in _SPECS:
        raise ValueError(f"architecture {arch.name!r} is registered twice")
    _SPECS[arch.name] = arch
    return arch


def unregister(name: str) -> None:
    """Forget architecture ``name`` (one registered from outside nlsr, e.g. in a test)."""
    del _SPECS[_check(name)]


def _load_all() -> None:
    # The networks are imported on first use, not with the registry: importing a network
    # module (and its attention blocks) is only needed once a network is asked for. They do
    # not import the registry, so this is the only direction of the dependency.
    for module in _MODULES:
        if module not in _SPECS:
            _SPECS[module] = importlib.import_module(f"nlsr.models.{module}").ARCH


def architectures() -> list[ArchSpec]:
    """Every registered architecture: the built-in ones in :data:`_MODULES` order, then the
    others in registration order."""
    _load_all()
    order = {name: i for i, name in enumerate(_MODULES)}
    return sorted(_SPECS.values(), key=lambda arch: order.get(arch.name, len(order)))


def available() -> list[str]:
    """Names accepted by ``create``, sorted."""
    _load_all()
    return sorted(_SPECS)


def spec(name: str) -> ArchSpec:
    """The registered architecture ``name``; KeyError listing the available ones."""
    return _SPECS[_check(name)]


def describe(name: str) -> str:
    """One-line description of a registered model."""
    return spec(name).description


def options(name: str) -> dict[str, Any]:
    """Keyword options of model ``name`` (besides ``scale``) with their default values."""
    params = inspect.signature(spec(name).network).parameters
    return {
        p.name: p.default
        for p in params.values()
        if p.name != "scale" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def small_config(name: str) -> dict[str, Any]:
    """The reduced options of ``name`` for quick measurements ({} : the defaults)."""
    return dict(spec(name).small)


def build(name: str, scale: int = 2, **options: Any) -> nn.Module:
    """A new, untrained network ``name`` for ``scale`` (in training mode), nothing recorded:
    ``nlsr.models.create`` is the public entry."""
    return spec(name).network(scale=scale, **options)


def _check(name: str) -> str:
    _load_all()
    if name not in _SPECS:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(available())}")
    return name
