"""NLSN (Mei et al., CVPR 2021): EDSR with non-local sparse attention every 8 residual blocks."""

from __future__ import annotations

from torch import nn

from nlsr.attention.nlsa import NonLocalSparseAttention
from nlsr.models.common import ResBlock, ResidualSR
from nlsr.models.registry import register


@register("nlsn", "NLSN: non-local sparse attention (spherical LSH)")
class NLSN(ResidualSR):
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
        def attention() -> NonLocalSparseAttention:
            return NonLocalSparseAttention(
                n_feats,
                n_hashes=n_hashes,
                reduction=reduction,
                chunk_size=chunk_size,
                res_scale=res_scale,
            )

        units: list[nn.Module] = [attention()]
        for i in range(n_resblocks):
            units.append(ResBlock(n_feats, 3, res_scale))
            if (i + 1) % 8 == 0:
                units.append(attention())
        super().__init__(scale, n_feats, units, rgb_range=rgb_range, n_colors=n_colors)
