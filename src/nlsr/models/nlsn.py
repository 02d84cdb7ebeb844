"""NLSN (Mei et al., CVPR 2021): EDSR with non-local sparse attention every 8 residual blocks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from nlsr.attention.nlsa import NonLocalSparseAttention
from nlsr.models.common import ResBlock, ResidualSR
from nlsr.models.readers import common, indices, need, tail_scale
from nlsr.models.spec import ArchSpec, PaperPreset


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


def _matches(sd: Mapping[str, Tensor]) -> bool:
    """The leading attention's ``body.0.conv_match``."""
    return "body.0.conv_match.0.weight" in sd


def _read(sd: Mapping[str, Tensor]) -> tuple[int, dict[str, Any]]:
    options = common(sd, "head.0.weight", "nlsn")
    options["n_resblocks"] = len(indices(sd, r"body\.(\d+)\.body\.0\.weight$"))
    match = need(sd, "body.0.conv_match.0.weight", "nlsn")
    options["reduction"] = options["n_feats"] // int(match.shape[0])
    return tail_scale(sd, options["n_feats"]), options


ARCH = ArchSpec(
    name="nlsn",
    network=NLSN,
    description="NLSN: non-local sparse attention (spherical LSH)",
    matches=_matches,
    read=_read,
    priority=30,
    preset=PaperPreset(
        "HarukiYqM/Non-Local-Sparse-Attention",
        {
            "n_resblocks": 32,
            "n_feats": 256,
            "chunk_size": 144,
            "n_hashes": 4,
            "res_scale": 0.1,
        },
        "41.80M",
    ),
    small={"n_resblocks": 8, "n_feats": 64},
)
