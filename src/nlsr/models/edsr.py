"""EDSR (Lim et al., 2017): a plain deep residual network, optionally with an attention block."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nlsr.attention import create_attention
from nlsr.models.common import MeanShift, ResBlock, Upsampler, default_conv
from nlsr.models.registry import register


@register("edsr", "EDSR: deep residual network; accepts any attention block")
class EDSR(nn.Module):
    """EDSR; ``attention`` names a block from ``nlsr.attention`` placed before every
    ``attention_every``-th residual block (default: once, in the middle), as in the DLSN and
    HSPAN papers' backbone experiments."""

    def __init__(
        self,
        scale: int = 2,
        n_resblocks: int = 32,
        n_feats: int = 256,
        res_scale: float = 0.1,
        rgb_range: float = 1.0,
        n_colors: int = 3,
        attention: str | None = None,
        attention_every: int | None = None,
        attention_options: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.scale = scale
        self.rgb_range = rgb_range
        self.chop_min_size = 160000
        self.sub_mean = MeanShift(rgb_range, -1)
        self.add_mean = MeanShift(rgb_range, +1)
        self.head = nn.Sequential(default_conv(n_colors, n_feats, 3))
        if attention is None:
            at: set[int] = set()
        elif attention_every:
            at = set(range(0, n_resblocks, attention_every))
        else:
            at = {n_resblocks // 2}
        body: list[nn.Module] = []
        for i in range(n_resblocks):
            if i in at:
                body.append(create_attention(attention, n_feats, **(attention_options or {})))
            body.append(ResBlock(n_feats, 3, res_scale))
        body.append(default_conv(n_feats, n_feats, 3))
        self.body = nn.Sequential(*body)
        self.tail = nn.Sequential(Upsampler(scale, n_feats), default_conv(n_feats, n_colors, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.sub_mean(x))
        x = self.body(x) + x
        return self.add_mean(self.tail(x))
