"""Which architecture a state dict holds, and the scale and options its tensors reveal.

Each architecture module brings its own ``matches`` predicate and ``read`` function
(:class:`nlsr.models.registry.ArchSpec`); the helpers they share (key patterns, the head, the
mean shift's ``rgb_range``, the sub-pixel tail's scale, EDSR-style bodies) live here, and so does
:func:`detect`, which asks the registered architectures in their priority order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from nlsr.checkpoint import CheckpointError, first_line, listing, normalise_state_dict
from nlsr.models.registry import architectures, spec

__all__ = ["detect", "read_options", "recognise"]


def detect(state_dict: Mapping[str, Any]) -> tuple[str, int, dict[str, Any]]:
    """Architecture, scale and the options the tensors reveal (sizes, counts, reduction,
    chunk size, clusters, rgb_range ...), read from key names and shapes."""
    sd = normalise_state_dict(state_dict, "state dict")
    arch = recognise(sd)
    scale, options = read_options(sd, arch)
    return arch, scale, options


def recognise(sd: Mapping[str, Tensor], name: str | None = None) -> str:
    """The first registered architecture, by descending priority (then name), whose
    ``matches`` accepts the keys of ``sd``; ``name`` (a file) starts the error message."""
    candidates = [a for a in architectures() if a.matches is not None]
    for arch in sorted(candidates, key=lambda a: (-a.priority, a.name)):
        if arch.matches is not None and arch.matches(sd):
            return arch.name
    names = ", ".join(a.name for a in candidates)
    raise CheckpointError(
        f"{_prefix(name)}cannot tell the architecture from the keys (first keys: "
        f"{listing(list(sd))}); pass arch= (one of {names})"
    )


def read_options(
    sd: Mapping[str, Tensor], arch: str, name: str | None = None
) -> tuple[int, dict[str, Any]]:
    """Scale and options that ``sd`` reveals as a checkpoint of ``arch``, with any failure on odd
    shapes (a scalar where a matrix belongs, a zero-sized dimension) a CheckpointError;
    ``name`` (a file) starts the error message."""
    read = spec(arch).read
    if read is None:
        raise CheckpointError(
            f"{_prefix(name)}{arch} checkpoints cannot be read without an nlsr header"
        )
    try:
        return read(sd)
    except CheckpointError as e:
        if name is None:
            raise
        raise CheckpointError(f"{name}: {e}") from e
    except (IndexError, KeyError, ValueError, TypeError, ZeroDivisionError, RuntimeError) as e:
        raise CheckpointError(
            f"{_prefix(name)}the tensors have the keys of a {arch} checkpoint but shapes no "
            f"{arch} has ({type(e).__name__}: {first_line(e)})"
        ) from e


def _prefix(name: str | None) -> str:
    return f"{name}: " if name is not None else ""
