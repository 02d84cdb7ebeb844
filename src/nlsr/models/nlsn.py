"""NLSN (Mei et al., CVPR 2021): EDSR with non-local sparse attention every 8 residual blocks."""

from __future__ import annotations

import torch
from torch import nn

from nlsr.attention.nlsa import NonLocalSparseAttention
from nlsr.models.common import MeanShift, ResBlock, Upsampler, default_conv
from nlsr.models.registry import register


@register("nlsn", "NLSN: non-local sparse attention (spherical LSH)")
class NLSN(nn.Module):
    """NLSN: NLSA, then ``n_resblocks`` residual blocks with another NLSA after every 8th, a conv,
    and a sub-pixel tail; key names equal the released state dict."""

    def __init__(
        self,
        scale: int = 2,
        n_resblocks: int = 32,
        n_feats: int = 256,
        chunk_size: int = 144,
        n_hashes: int = 4,
        res_scale: float = 0.1,
        reduction: int = 4,
        rgb_range: float = 1.0,
        n_colors: int = 3,
    ):
        super().__init__()
        self.scale = scale
        self.rgb_range = rgb_range
        self.chop_min_size = 120000

        def attention() -> NonLocalSparseAttention:
            return NonLocalSparseAttention(
                n_feats,
                n_hashes=n_hashes,
                reduction=reduction,
                chunk_size=chunk_size,
                res_scale=res_scale,
            )

        self.sub_mean = MeanShift(rgb_range, -1)
        self.add_mean = MeanShift(rgb_range, +1)
        self.head = nn.Sequential(default_conv(n_colors, n_feats, 3))
        body: list[nn.Module] = [attention()]
        for i in range(n_resblocks):
            body.append(ResBlock(n_feats, 3, res_scale))
            if (i + 1) % 8 == 0:
                body.append(attention())
        body.append(default_conv(n_feats, n_feats, 3))
        self.body = nn.Sequential(*body)
        self.tail = nn.Sequential(Upsampler(scale, n_feats), default_conv(n_feats, n_colors, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.sub_mean(x))
        x = self.body(x) + x
        return self.add_mean(self.tail(x))
