"""Tile geometry of seamless tiled inference: where tiles start, how many, and the
raised-cosine weights that blend their overlaps (used by :func:`nlsr.inference.forward`)."""

from __future__ import annotations

import math

import torch


def tile_count(height: int, width: int, tile: int, overlap: int = 16) -> int:
    """How many tiles :func:`nlsr.inference.forward` runs a ``height`` x ``width`` input in."""
    return len(tile_starts(height, tile, overlap)) * len(tile_starts(width, tile, overlap))


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering ``length`` with at least ``overlap`` shared pixels between
    neighbours, spread evenly so that the first starts at 0 and the last ends at ``length``."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [i * (length - tile) // (n - 1) for i in range(n)]


def ramp_weights(starts: list[int], size: int, length: int, ramp: int) -> list[torch.Tensor]:
    """Per-tile 1-D weights along one axis (output pixels), normalised to sum to 1 everywhere.

    Each tile's weight falls off smoothly (raised cosine over ``ramp`` pixels) towards every edge
    that lies inside the image; the 2-D weight of a tile is the outer product of its row and
    column weights, so the 2-D normaliser is the product of the 1-D ones."""
    d = torch.arange(size, dtype=torch.float64)
    fade = 0.5 - 0.5 * torch.cos(math.pi * ((d + 0.5) / ramp).clamp(max=1.0)) if ramp else None
    weights = []
    total = torch.zeros(length, dtype=torch.float64)
    for s in starts:
        wgt = torch.ones(size, dtype=torch.float64)
        if fade is not None and s > 0:
            wgt = wgt * fade
        if fade is not None and s + size < length:
            wgt = wgt * fade.flip(0)
        total[s : s + size] += wgt
        weights.append(wgt)
    return [(wgt / total[s : s + size]).float() for s, wgt in zip(starts, weights, strict=True)]
