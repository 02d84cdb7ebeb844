"""The typed record of one architecture (:class:`ArchSpec`) that each network module declares as
``ARCH``; :mod:`nlsr.models.registry` collects them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

__all__ = ["ArchSpec", "Matcher", "PaperPreset", "Reader", "tail_key"]

#: ``state dict -> (scale, options)``: what the tensors of a checkpoint reveal.
Reader = Callable[[Mapping[str, Tensor]], tuple[int, dict[str, Any]]]
#: ``state dict -> bool``: whether the keys are those of this architecture's checkpoints.
Matcher = Callable[[Mapping[str, Tensor]], bool]


def tail_key(key: str) -> bool:
    """Keys of the sub-pixel upsampler ``tail.*``, whose shapes depend on the scale."""
    return key.startswith("tail.")


@dataclass(frozen=True)
class PaperPreset:
    """The configuration of a paper's main model."""

    #: The official code (GitHub ``owner/name``).
    repository: str
    #: Constructor options of the paper model.
    options: Mapping[str, Any]
    #: The parameter count the paper reports at x2, as printed there (e.g. "41.80M").
    parameters: str


@dataclass(frozen=True)
class ArchSpec:
    """Everything nlsr knows about one architecture, in one typed record.

    Detection (:func:`nlsr.models.detection.detect`) asks the specs with a ``matches`` predicate
    in descending ``priority`` (ties by name) and takes the first that says yes, so an
    architecture whose keys also fit a plainer one's predicate needs the higher priority (EDSR's,
    plain residual blocks and a head, matches most of the family and comes last). ``read`` then
    gives the scale and the options the tensors reveal. An architecture without them can still
    be loaded from nlsr's own format or with ``arch=`` given.
    """

    #: The name of ``create(name, ...)``, ``--arch`` and the nlsr header.
    name: str
    #: The network class (or factory), called as ``network(scale=scale, **options)``.
    network: Callable[..., nn.Module]
    #: One line for ``nlsr models``.
    description: str
    #: Recognises a state dict of this architecture from its keys.
    matches: Matcher | None = None
    #: The scale and options a state dict of this architecture reveals.
    read: Reader | None = None
    #: Detection order: higher is asked first.
    priority: int = 0
    #: The paper's main model, listed by ``nlsr models``.
    preset: PaperPreset | None = None
    #: Reduced options for quick measurements (``nlsr bench --config small``).
    small: Mapping[str, Any] = field(default_factory=dict)
    #: Keys whose shapes depend on the scale (named when a checkpoint's scale is wrong).
    scale_keys: Callable[[str], bool] = tail_key
    #: Runs under bfloat16 autocast (``precision="bf16"``).
    bf16: bool = True
    #: Tiling advice: inputs above this many LR pixels are better run in tiles or chopped
    #: (dense attention: memory grows with the square of the pixel count); None: no advice.
    tile_above: int | None = None
