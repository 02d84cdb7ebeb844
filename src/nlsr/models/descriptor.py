"""The typed description of a model ready to run: the module, what it is, where it came from and
what it supports (like spandrel's ``ModelDescriptor``).

:func:`nlsr.models.resolve_model` produces one from anything that names or holds a model. The
module itself declares its runtime contract: ``scale`` (int, required), ``rgb_range`` (the input
range, default 1) and ``chop_min_size`` (the authors' chop threshold in LR pixels, default
:data:`DEFAULT_CHOP_MIN_SIZE`), as every nlsr network does; :func:`describe_module` reads those
here, and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from nlsr.models.registry import available, spec

__all__ = ["DEFAULT_CHOP_MIN_SIZE", "ModelDescriptor", "ModelSource", "describe_module"]

#: Chop threshold (LR pixels) of a module that declares none (EDSR's).
DEFAULT_CHOP_MIN_SIZE = 160_000


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from."""

    #: "created" (``nlsr.models.create``), "file", "state dict", "shipped" (pretrained weights
    #: shipped with nlsr) or "module" (a module nlsr did not build or no longer knows).
    kind: str = "module"
    #: The checkpoint file it was loaded from.
    path: Path | None = None
    #: The shipped model it is (``nlsr models``).
    shipped: str | None = None
    #: The nlsr header's entries besides arch, scale and options: training provenance,
    #: ``converted_from``, ... ({} for other formats).
    metadata: Mapping[str, Any] = field(default_factory=dict)
    #: What loading noted, e.g. weights stored in half precision.
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelDescriptor:
    """A model ready to run and everything known about it."""

    #: The network.
    module: nn.Module
    #: Its architecture (``nlsr.models.available()``); None for a module nlsr did not build.
    arch: str | None
    #: Its upscaling factor.
    scale: int
    #: The constructor options it was built with (those given or read; the others are defaults).
    options: Mapping[str, Any]
    #: The input range it expects (``forward`` rescales [0, 1] inputs to it).
    rgb_range: float
    #: Where it came from.
    source: ModelSource
    #: The authors' chop threshold, LR pixels (``chop=True``).
    chop_min_size: int = DEFAULT_CHOP_MIN_SIZE
    #: Runs under bfloat16 autocast (``precision="bf16"``).
    bf16: bool = True
    #: Tiling advice: inputs above this many LR pixels are better tiled or chopped; None: none.
    tile_above: int | None = None

    @property
    def name(self) -> str:
        """The shipped model's name, else the architecture, else the class name in lower case."""
        return self.source.shipped or self.arch or type(self.module).__name__.lower()


def describe_module(
    module: nn.Module,
    *,
    arch: str | None = None,
    options: Mapping[str, Any] | None = None,
    source: ModelSource | None = None,
) -> ModelDescriptor:
    """The descriptor of ``module``: its declared scale, rgb_range and chop threshold, with what
    the caller knows of it (its architecture, options, source). ValueError when the module does
    not declare an integer ``scale``."""
    scale = getattr(module, "scale", None)
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise ValueError(
            f"model {type(module).__name__} has no 'scale' attribute (its upscaling factor, an "
            "int); nlsr's networks have one: build them with nlsr.models.create or nlsr.load"
        )
    known = spec(arch) if arch is not None and arch in available() else None
    return ModelDescriptor(
        module=module,
        arch=arch,
        scale=scale,
        options=dict(options or {}),
        rgb_range=float(getattr(module, "rgb_range", 1.0)),
        source=source or ModelSource(),
        chop_min_size=int(getattr(module, "chop_min_size", DEFAULT_CHOP_MIN_SIZE)),
        bf16=known.bf16 if known is not None else True,
        tile_above=known.tile_above if known is not None else None,
    )
