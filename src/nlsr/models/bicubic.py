"""MATLAB-exact bicubic upscaling as a parameter-free model: the baseline row of every table."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from nlsr.models.spec import ArchSpec
from nlsr.resize import imresize, round_half_up

#: Largest distance of ``x * 255`` from an integer for ``x`` to count as an 8-bit image
#: (float32 images made as ``k / 255`` are within 2e-5).
_GRID_TOLERANCE = 1e-3


class Bicubic(nn.Module):
    """MATLAB ``imresize(lr, scale, 'bicubic')``, computed by :func:`nlsr.resize.imresize`.

    An input on the 8-bit grid (``x * 255`` integral, as every benchmark image) is resized as the
    ``uint8`` image, with MATLAB's rounding between the two passes, so the quantised output is
    bit-exact. Any other input (e.g. from a 16-bit image) is resized in float64 without rounding.
    """

    def __init__(self, scale: int = 2):
        super().__init__()
        if int(scale) != scale or scale < 1:
            raise ValueError(f"bicubic: scale must be a positive integer, got {scale}")
        self.scale = int(scale)
        self.rgb_range = 1.0
        self.chop_min_size = 160000

    def _resize(self, image: np.ndarray) -> np.ndarray:
        """One HxWxC float64 image in [0, 1] -> the upscaled image in [0, 1]."""
        levels = image * 255
        rounded = round_half_up(levels)
        if np.abs(levels - rounded).max() <= _GRID_TOLERANCE:
            return imresize(rounded.astype(np.uint8), self.scale) / 255
        return np.clip(imresize(image, self.scale), 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():  # ONNX export: the same resize in tensor operations
            return traceable_imresize(x, self.scale).to(x.dtype)
        batch = x.detach().to("cpu", torch.float64).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        out = np.stack([self._resize(image) for image in batch])
        return torch.from_numpy(out).permute(0, 3, 1, 2).to(x.device, x.dtype)


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """MATLAB's ``cubic`` kernel (as :func:`nlsr.resize.contributions` uses it)."""
    a = x.abs()
    inner = (1.5 * a**3 - 2.5 * a**2 + 1) * (a <= 1)
    return inner + (-0.5 * a**3 + 2.5 * a**2 - 4 * a + 2) * ((a > 1) & (a <= 2))


def _upscale_axis(a: torch.Tensor, dim: int, scale: int, rounded: torch.Tensor) -> torch.Tensor:
    """One pass of :func:`nlsr.resize.imresize` by integer ``scale`` along ``dim`` of float64
    ``a`` (MATLAB's weights, mirrored indices), clipped and rounded half up where ``rounded``."""
    size = a.shape[dim]
    u = torch.arange(1, size * scale + 1, dtype=torch.float64) / scale + 0.5 * (1 - 1 / scale)
    taps = torch.floor(u - 2).unsqueeze(1) + torch.arange(6, dtype=torch.float64)
    weights = _cubic(u.unsqueeze(1) - taps)
    weights = weights / weights.sum(dim=1, keepdim=True)
    index = taps.long() - 1  # 0-based, at most 3 outside the image: mirror once, then clamp
    index = torch.where(index < 0, -index - 1, index)
    index = torch.where(index >= size, 2 * size - 1 - index, index).clamp(0, size - 1)
    shape = [1] * a.dim()
    shape[dim] = -1
    out = a.index_select(dim, index[:, 0]) * weights[:, 0].view(shape)
    for k in range(1, 6):
        out = out + a.index_select(dim, index[:, k]) * weights[:, k].view(shape)
    return torch.where(rounded, round_half_up_tensor(out.clamp(0, 255)), out)


def round_half_up_tensor(x: torch.Tensor) -> torch.Tensor:
    """:func:`nlsr.resize.round_half_up` on a tensor."""
    low = torch.floor(x)
    return low + (x - low >= 0.5).to(x.dtype)


def traceable_imresize(x: torch.Tensor, scale: int) -> torch.Tensor:
    """:class:`Bicubic`'s output in float64 tensor operations only (no NumPy, no branch on the
    data), so that it can be exported: both the 8-bit path and the float path are computed and
    each image takes the one :meth:`Bicubic._resize` would."""
    x = x.to(torch.float64).clamp(0, 1)
    levels = x * 255
    rounded = round_half_up_tensor(levels)
    grid = (levels - rounded).abs().amax(dim=(1, 2, 3), keepdim=True) <= _GRID_TOLERANCE
    out = torch.where(grid, rounded, x)
    for dim in (2, 3):  # height first, as MATLAB for equal scales
        out = _upscale_axis(out, dim, scale, grid)
    return torch.where(grid, out / 255, out.clamp(0, 1))


ARCH = ArchSpec(
    name="bicubic",
    network=Bicubic,
    description="bicubic interpolation, MATLAB-exact (the baseline; no parameters)",
)
