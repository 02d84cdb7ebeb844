"""EDSR (Lim et al., 2017): a plain deep residual network, optionally with an attention block."""

from __future__ import annotations

from typing import Any

from torch import nn

from nlsr.attention import create_attention
from nlsr.models.common import ResBlock, ResidualSR, attention_positions
from nlsr.models.registry import register


@register("edsr", "EDSR: deep residual network; accepts any attention block")
class EDSR(ResidualSR):
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
        at = attention_positions(n_resblocks, attention, attention_every)
        units: list[nn.Module] = []
        for i in range(n_resblocks):
            if i in at:
                units.append(create_attention(attention, n_feats, **(attention_options or {})))
            units.append(ResBlock(n_feats, 3, res_scale))
        super().__init__(
            scale, n_feats, units, rgb_range=rgb_range, n_colors=n_colors, chop_min_size=160000
        )
