"""MATLAB-exact bicubic upscaling as a parameter-free model: the baseline row of every table."""

from __future__ import annotations

import torch
from torch import nn

from nlsr.models.registry import register
from nlsr.resize import contributions


def _round_half_up(v: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, halves upwards (as :func:`nlsr.resize.round_half_up`)."""
    r = torch.floor(v)
    return r + (v - r >= 0.5).to(v.dtype)


@register("bicubic")
class Bicubic(nn.Module):
    """MATLAB ``imresize(lr, scale, 'bicubic')`` on the 8-bit image, in torch.

    The input in [0, 1] is quantised to 8 bits (``x * 255`` rounded), resized height first then
    width with rounding after each pass, and returned divided by 255: on inputs from 8-bit
    images the quantised output equals :func:`nlsr.resize.imresize` on the ``uint8`` array.
    """

    def __init__(self, scale: int = 2):
        super().__init__()
        if int(scale) != scale or scale < 1:
            raise ValueError(f"bicubic: scale must be a positive integer, got {scale}")
        self.scale = int(scale)
        self.rgb_range = 1.0
        self.chop_min_size = 160000

    def _pass(self, v: torch.Tensor, dim: int) -> torch.Tensor:
        """Resize ``v`` along ``dim`` (2 = height, 3 = width), accumulating taps in order."""
        n = v.shape[dim]
        weights, indices = contributions(n, n * self.scale, float(self.scale))
        w = torch.tensor(weights, device=v.device, dtype=v.dtype)
        idx = torch.tensor(indices, device=v.device)
        shape = [1, 1, 1, 1]
        shape[dim] = -1
        out = v.index_select(dim, idx[:, 0]) * w[:, 0].view(shape)
        for k in range(1, w.shape[1]):
            out += v.index_select(dim, idx[:, k]) * w[:, k].view(shape)
        return _round_half_up(out.clamp_(0, 255))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float64 keeps MATLAB's double arithmetic; MPS has no float64.
        dtype = torch.float32 if x.device.type == "mps" else torch.float64
        v = _round_half_up((x.to(dtype) * 255).clamp(0, 255))
        v = self._pass(self._pass(v, 2), 3)
        return (v / 255).to(x.dtype)
