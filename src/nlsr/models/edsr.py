"""EDSR (Lim et al., 2017): a plain deep residual network, optionally with an attention block."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from nlsr.attention import create_attention
from nlsr.models.common import ResBlock, ResidualSR, attention_positions
from nlsr.models.readers import check_body, common, has_key, indices, tail_scale
from nlsr.models.spec import ArchSpec, PaperPreset


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


def _matches(sd: Mapping[str, Tensor]) -> bool:
    """Plain residual blocks and a head: most of the family has them, so EDSR is asked last."""
    return has_key(sd, r"body\.\d+\.body\.0\.weight$") and "head.0.weight" in sd


def _read(sd: Mapping[str, Tensor]) -> tuple[int, dict[str, Any]]:
    options = common(sd, "head.0.weight", "edsr")
    blocks = indices(sd, r"body\.(\d+)\.body\.0\.weight$")
    n = len(blocks)
    check_body(sd, "edsr", blocks, n, r"body\.(\d+)\.")
    options["n_resblocks"] = n
    if options["n_feats"] == 64 and n == 16:
        # The published EDSR-baseline models use no residual scaling (res_scale 1).
        options["res_scale"] = 1.0
    return tail_scale(sd, options["n_feats"]), options


ARCH = ArchSpec(
    name="edsr",
    network=EDSR,
    description="EDSR: deep residual network; accepts any attention block",
    matches=_matches,
    read=_read,
    priority=10,
    preset=PaperPreset(
        "sanghyun-son/EDSR-PyTorch",
        {"n_resblocks": 32, "n_feats": 256, "res_scale": 0.1},
        "40.7M",
    ),
    small={"n_resblocks": 8, "n_feats": 64},
)
