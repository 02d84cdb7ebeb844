"""Building blocks shared by the EDSR-family networks (names match the authors' state dicts)."""

from __future__ import annotations

import math

import torch
from torch import nn

#: DIV2K RGB mean used by every released model of the family.
RGB_MEAN = (0.4488, 0.4371, 0.4040)


def default_conv(
    in_channels: int, out_channels: int, kernel_size: int, bias: bool = True
) -> nn.Conv2d:
    """'Same' convolution as used throughout EDSR-PyTorch."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


class MeanShift(nn.Conv2d):
    """Frozen 1x1 conv adding ``sign * rgb_range * mean`` (identity weight), as released."""

    def __init__(self, rgb_range: float = 1.0, sign: int = -1, mean: tuple[float, ...] = RGB_MEAN):
        super().__init__(3, 3, kernel_size=1)
        with torch.no_grad():
            self.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.bias.copy_(sign * rgb_range * torch.tensor(mean))
        for p in self.parameters():
            p.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """In the weights' dtype under autocast: bfloat16 pixels near 1.0 are a grey level apart."""
        kind = x.device.type
        if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
            with torch.autocast(kind, enabled=False):
                return super().forward(x.to(self.weight.dtype))
        return super().forward(x)


class ResBlock(nn.Module):
    """conv-ReLU-conv, scaled by ``res_scale``, plus the input."""

    def __init__(
        self, n_feats: int, kernel_size: int = 3, res_scale: float = 1.0, bias: bool = True
    ):
        super().__init__()
        self.body = nn.Sequential(
            default_conv(n_feats, n_feats, kernel_size, bias),
            nn.ReLU(inplace=True),
            default_conv(n_feats, n_feats, kernel_size, bias),
        )
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mul(self.res_scale) + x


class Upsampler(nn.Sequential):
    """Sub-pixel upsampler: log2(s) x [conv C->4C, shuffle 2] for powers of 2; conv C->9C,
    shuffle 3 for x3."""

    def __init__(self, scale: int, n_feats: int, bias: bool = True):
        layers: list[nn.Module] = []
        if scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                layers += [default_conv(n_feats, 4 * n_feats, 3, bias), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [default_conv(n_feats, 9 * n_feats, 3, bias), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"scale must be 1, 2, 3, 4 or 8, got {scale}")
        super().__init__(*layers)


def attention_positions(count: int, attention: str | None, every: int | None) -> set[int]:
    """Indices of the body units (blocks or groups) that an optional attention block precedes:
    every ``every``-th unit from the first, or one in the middle when ``every`` is None."""
    if attention is None:
        return set()
    if attention == "csna":
        raise ValueError(
            "attention 'csna' upsamples its input (cross-scale), so it cannot sit inside a "
            "backbone's body; use the csnln network"
        )
    if every is not None:
        if every < 1:
            raise ValueError(f"attention_every must be >= 1, got {every}")
        return set(range(0, count, every))
    return {count // 2}


class ResidualSR(nn.Module):
    """The EDSR-family scaffold: mean shift, head conv, ``body`` units + conv with a global skip,
    and a sub-pixel tail. Networks differ only in their body units; key names are the authors'."""

    def __init__(
        self,
        scale: int,
        n_feats: int,
        units: list[nn.Module],
        *,
        rgb_range: float = 1.0,
        n_colors: int = 3,
        chop_min_size: int = 120000,
    ):
        super().__init__()
        if n_colors != 3:
            raise ValueError(f"n_colors must be 3 (the RGB mean shift), got {n_colors}")
        self.scale = scale
        self.rgb_range = rgb_range
        #: The authors' chop threshold (LR pixels) for whole-image reproduction.
        self.chop_min_size = chop_min_size
        self.sub_mean = MeanShift(rgb_range, -1)
        self.add_mean = MeanShift(rgb_range, +1)
        self.head = nn.Sequential(default_conv(n_colors, n_feats, 3))
        self.body = nn.Sequential(*units, default_conv(n_feats, n_feats, 3))
        self.tail = nn.Sequential(Upsampler(scale, n_feats), default_conv(n_feats, n_colors, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The residual stream in the weights' dtype: under bf16 autocast a bfloat16 stream
        # would round every block's sum (RCAN's 200 blocks: up to 6 grey levels off, not 3).
        x = self.head(self.sub_mean(x)).to(self.sub_mean.weight.dtype)
        x = self.body(x) + x
        return self.add_mean(self.tail(x))
