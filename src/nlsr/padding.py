"""Padding feature maps up to a multiple of a block size, shared by cross-scale attention and
CSNLN (both cut their input into patches of a fixed size)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pad_to_multiple(
    x: torch.Tensor, multiple: int, min_size: int = 1
) -> tuple[torch.Tensor, int, int]:
    """Reflect-pad (replicate where too small) the bottom/right so H, W are multiples of
    ``multiple`` and at least ``min_size``; returns the padded tensor and the original H, W."""
    h, w = x.shape[-2:]
    th = max(math.ceil(h / multiple) * multiple, math.ceil(min_size / multiple) * multiple)
    tw = max(math.ceil(w / multiple) * multiple, math.ceil(min_size / multiple) * multiple)
    ph, pw = th - h, tw - w
    if ph == 0 and pw == 0:
        return x, h, w
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), h, w
