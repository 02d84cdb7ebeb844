"""RCAN (Zhang et al., 2018): residual groups of residual channel-attention blocks.

Parameter names equal the released ``RCAN_TrainCode`` state dicts, so the authors' checkpoints
load strictly. Released RCAN weights were trained with ``rgb_range=255``; ``nlsr.load`` reads the
value from ``sub_mean.bias``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from nlsr.attention import create_attention
from nlsr.models.common import ResidualSR, attention_positions, default_conv
from nlsr.models.readers import check_body, common, has_key, indices, need, tail_scale
from nlsr.models.spec import ArchSpec, PaperPreset


class CALayer(nn.Module):
    """Channel attention (squeeze-and-excitation): global average pool, 1x1 conv bottleneck,
    sigmoid gate multiplied onto the input."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        if channels // reduction < 1:
            raise ValueError(
                f"rcan: reduction={reduction} leaves no channels in the attention bottleneck "
                f"for n_feats={channels}"
            )
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_du = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv_du(self.avg_pool(x))


class RCAB(nn.Module):
    """Residual channel-attention block: conv-ReLU-conv-CA plus the input (no residual scaling,
    as in the released code)."""

    def __init__(self, n_feats: int, reduction: int, kernel_size: int = 3):
        super().__init__()
        self.body = nn.Sequential(
            default_conv(n_feats, n_feats, kernel_size),
            nn.ReLU(inplace=True),
            default_conv(n_feats, n_feats, kernel_size),
            CALayer(n_feats, reduction),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x


class ResidualGroup(nn.Module):
    """``n_resblocks`` RCABs and a conv, with a skip connection around them."""

    def __init__(self, n_feats: int, reduction: int, n_resblocks: int, kernel_size: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [
            RCAB(n_feats, reduction, kernel_size) for _ in range(n_resblocks)
        ]
        blocks.append(default_conv(n_feats, n_feats, kernel_size))
        self.body = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x


class RCAN(ResidualSR):
    """RCAN; ``attention`` names a block from ``nlsr.attention`` placed before every
    ``attention_every``-th residual group (default: once, before the middle group)."""

    def __init__(
        self,
        scale: int = 2,
        n_resgroups: int = 10,
        n_resblocks: int = 20,
        n_feats: int = 64,
        reduction: int = 16,
        rgb_range: float = 1.0,
        n_colors: int = 3,
        attention: str | None = None,
        attention_every: int | None = None,
        attention_options: dict[str, Any] | None = None,
    ):
        if n_resgroups < 1 or n_resblocks < 0 or n_feats < 1:
            raise ValueError(
                f"rcan: need n_resgroups >= 1, n_resblocks >= 0 and n_feats >= 1, got "
                f"{n_resgroups}, {n_resblocks}, {n_feats}"
            )
        at = attention_positions(n_resgroups, attention, attention_every)
        units: list[nn.Module] = []
        for g in range(n_resgroups):
            if g in at:
                units.append(create_attention(attention, n_feats, **(attention_options or {})))
            units.append(ResidualGroup(n_feats, reduction, n_resblocks))
        super().__init__(
            scale, n_feats, units, rgb_range=rgb_range, n_colors=n_colors, chop_min_size=160000
        )


def _matches(sd: Mapping[str, Tensor]) -> bool:
    """Channel-attention keys (``...body.3.conv_du.0.weight``) inside groups."""
    return has_key(sd, r"body\.\d+\.body\.\d+\.body\.3\.conv_du\.0\.weight$")


def _read(sd: Mapping[str, Tensor]) -> tuple[int, dict[str, Any]]:
    options = common(sd, "head.0.weight", "rcan")
    groups = indices(sd, r"body\.(\d+)\.body\.\d+\.body\.0\.weight$")
    check_body(sd, "rcan", groups, len(groups), r"body\.(\d+)\.")
    blocks = indices(sd, r"body\.0\.body\.(\d+)\.body\.0\.weight$")
    options["n_resgroups"] = len(groups)
    options["n_resblocks"] = len(blocks)
    squeeze = need(sd, "body.0.body.0.body.3.conv_du.0.weight", "rcan")
    options["reduction"] = options["n_feats"] // int(squeeze.shape[0])
    return tail_scale(sd, options["n_feats"]), options


ARCH = ArchSpec(
    name="rcan",
    network=RCAN,
    description="RCAN: residual groups of channel-attention blocks (optionally with an "
    "attention block)",
    matches=_matches,
    read=_read,
    priority=20,
    preset=PaperPreset(
        "yulunzhang/RCAN",
        {"n_resgroups": 10, "n_resblocks": 20, "n_feats": 64, "reduction": 16},
        "15.4M",
    ),
    small={"n_resgroups": 2, "n_resblocks": 4, "n_feats": 64},
)
