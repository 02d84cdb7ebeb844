"""DLSN (Su et al., 2023): residual groups of local blocks + global learnable attention (GLA)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from nlsr.attention.gla import GlobalLearnableAttention
from nlsr.models.common import ResBlock, ResidualSR, default_conv
from nlsr.models.readers import has_key, need, read_grouped, tail_scale
from nlsr.models.spec import ArchSpec, PaperPreset


class GLAFFM(nn.Module):
    """One group: ``n_resblocks`` local blocks (LFFB, unscaled residual) -> GLA -> conv3x3,
    output ``res_scale * body(x) + x`` (the release applies ``res_scale`` only here)."""

    def __init__(
        self,
        n_feats: int,
        n_resblocks: int,
        reduction: int,
        chunk_size: int,
        n_hashes: int,
        res_scale: float,
        super_bit: bool = False,
    ):
        super().__init__()
        body: list[nn.Module] = [ResBlock(n_feats, 3, 1.0) for _ in range(n_resblocks)]
        body.append(
            GlobalLearnableAttention(
                n_feats,
                n_hashes=n_hashes,
                reduction=reduction,
                chunk_size=chunk_size,
                res_scale=1.0,
                super_bit=super_bit,
            )
        )
        body.append(default_conv(n_feats, n_feats, 3))
        self.body = nn.Sequential(*body)
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mul(self.res_scale) + x


class DLSN(ResidualSR):
    """DLSN: ``n_resgroups`` GLAFFM groups, a trunk conv and a sub-pixel tail; key names equal the
    released state dict, including the unused scalar parameter ``a``."""

    def __init__(
        self,
        scale: int = 2,
        n_resgroups: int = 10,
        n_resblocks: int = 4,
        n_feats: int = 256,
        reduction: int = 4,
        chunk_size: int = 128,
        n_hashes: int = 3,
        res_scale: float = 0.1,
        rgb_range: float = 1.0,
        n_colors: int = 3,
        super_bit: bool = False,
    ):
        units: list[nn.Module] = [
            GLAFFM(n_feats, n_resblocks, reduction, chunk_size, n_hashes, res_scale, super_bit)
            for _ in range(n_resgroups)
        ]
        super().__init__(scale, n_feats, units, rgb_range=rgb_range, n_colors=n_colors)
        # Unused scalar parameter present in the released checkpoints.
        self.a = nn.Parameter(torch.zeros(1))


def _matches(sd: Mapping[str, Tensor]) -> bool:
    """GLA's ``conv_assembly_fc`` inside a group."""
    return has_key(sd, r"body\.\d+\.body\.\d+\.conv_assembly_fc\.")


def _read(sd: Mapping[str, Tensor]) -> tuple[int, dict[str, Any]]:
    options, n = read_grouped(sd, "dlsn", "conv_match")
    options["chunk_size"] = int(need(sd, f"body.0.body.{n}.fc.0.weight", "dlsn").shape[0])
    return tail_scale(sd, options["n_feats"]), options


ARCH = ArchSpec(
    name="dlsn",
    network=DLSN,
    description="DLSN: global learnable attention (GLA) with super-bit LSH",
    matches=_matches,
    read=_read,
    priority=50,
    preset=PaperPreset(
        "laoyangui/DLSN",
        {
            "n_resgroups": 10,
            "n_resblocks": 4,
            "n_feats": 256,
            "reduction": 4,
            "chunk_size": 128,
            "n_hashes": 3,
            "res_scale": 0.1,
        },
        "69.84M",
    ),
    small={"n_resgroups": 4, "n_resblocks": 2, "n_feats": 64},
)
