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
    if torch.compiler.is_exporting():
        return _traceable_pad(x, multiple, min_size), h, w
    th = max(math.ceil(h / multiple) * multiple, math.ceil(min_size / multiple) * multiple)
    tw = max(math.ceil(w / multiple) * multiple, math.ceil(min_size / multiple) * multiple)
    ph, pw = th - h, tw - w
    if ph == 0 and pw == 0:
        return x, h, w
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), h, w


def _traceable_pad(x: torch.Tensor, multiple: int, min_size: int) -> torch.Tensor:
    """:func:`pad_to_multiple`'s padded tensor by index gathers, with no branch on the size (the
    ONNX export traces H and W symbolically): reflected or replicated rows and columns."""
    h, w = x.shape[-2:]
    # (h + m - 1) // m, not -(-h // m): ONNX divides integers toward zero, not down
    th, tw = (h + multiple - 1) // multiple * multiple, (w + multiple - 1) // multiple * multiple
    if min_size > multiple:  # else a multiple of at least 1 row is already large enough
        least = (min_size + multiple - 1) // multiple * multiple
        th, tw = torch.sym_max(th, least), torch.sym_max(tw, least)
    rows, cols = torch.arange(th, device=x.device), torch.arange(tw, device=x.device)
    # reflect when both paddings are shorter than their side, else replicate
    reflect = (rows[:1] * 0 + (h - (th - h)) > 0) & (cols[:1] * 0 + (w - (tw - w)) > 0)

    def index(i: torch.Tensor, size: int) -> torch.Tensor:
        outside = torch.where(reflect, 2 * size - 2 - i, torch.full_like(i, size - 1))
        return torch.where(i < size, i, outside)

    return x.index_select(-2, index(rows, h)).index_select(-1, index(cols, w))
