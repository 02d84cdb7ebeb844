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
        batch = x.detach().to("cpu", torch.float64).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        out = np.stack([self._resize(image) for image in batch])
        return torch.from_numpy(out).permute(0, 3, 1, 2).to(x.device, x.dtype)


ARCH = ArchSpec(
    name="bicubic",
    network=Bicubic,
    description="bicubic interpolation, MATLAB-exact (the baseline; no parameters)",
)
