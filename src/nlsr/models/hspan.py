"""HSPAN (Su et al.): EDSR-style residual groups, each closed by high-similarity-pass
attention (sparsemax non-local attention). Key names equal the released checkpoints'."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from nlsr.attention.hspa import HSPA
from nlsr.models.common import ResBlock, ResidualSR, default_conv
from nlsr.models.readers import has_key, read_grouped, tail_scale
from nlsr.models.spec import ArchSpec, PaperPreset


class HSPAM(nn.Module):
    """High-similarity-pass attention module: ``n_resblocks`` residual blocks -> HSPA -> conv3x3,
    scaled by ``res_scale`` and added to the input (``body.{0..n-1}``, ``body.n``, ``body.n+1``)."""

    def __init__(
        self,
        n_feats: int,
        n_resblocks: int,
        reduction: int,
        topk: int | None,
        res_scale: float,
        block_size: int | None = None,
    ):
        super().__init__()
        # As released, the local residual blocks are not scaled (res_scale 1); only the HSPA
        # branch and the module's body are.
        blocks: list[nn.Module] = [ResBlock(n_feats, 3, 1.0) for _ in range(n_resblocks)]
        blocks.append(HSPA(n_feats, reduction, topk, res_scale, block_size))
        blocks.append(default_conv(n_feats, n_feats, 3))
        self.body = nn.Sequential(*blocks)
        self.res_scale = res_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).mul(self.res_scale) + x


class HSPAN(ResidualSR):
    """HSPAN: head conv, ``n_resgroups`` HSPAMs and a conv (global skip), sub-pixel tail.

    Paper defaults (10 x 4 blocks, 192 channels) give 32.29M parameters at x2. ``topk`` only
    speeds up the sparsemax search; ``block_size`` (queries per attention block, automatic when
    None) bounds memory. Any H, W >= 1 works; no padding is needed.
    """

    def __init__(
        self,
        scale: int = 2,
        n_resgroups: int = 10,
        n_resblocks: int = 4,
        n_feats: int = 192,
        reduction: int = 2,
        topk: int | None = 128,
        res_scale: float = 0.1,
        rgb_range: float = 1.0,
        n_colors: int = 3,
        block_size: int | None = None,
    ):
        units: list[nn.Module] = [
            HSPAM(n_feats, n_resblocks, reduction, topk, res_scale, block_size)
            for _ in range(n_resgroups)
        ]
        super().__init__(scale, n_feats, units, rgb_range=rgb_range, n_colors=n_colors)
        # Unused scalar parameter present in the released checkpoints.
        self.a = nn.Parameter(torch.zeros(1))


def _matches(sd: Mapping[str, Tensor]) -> bool:
    """HSPA's ``conv_match1`` inside a group."""
    return has_key(sd, r"body\.\d+\.body\.\d+\.conv_match1\.")


def _read(sd: Mapping[str, Tensor]) -> tuple[int, dict[str, Any]]:
    options, _ = read_grouped(sd, "hspan", "conv_match1")
    return tail_scale(sd, options["n_feats"]), options


ARCH = ArchSpec(
    name="hspan",
    network=HSPAN,
    description="HSPAN: high-similarity-pass attention (sparsemax)",
    matches=_matches,
    read=_read,
    priority=40,
    preset=PaperPreset(
        "laoyangui/HSPAN",
        {"n_resgroups": 10, "n_resblocks": 4, "n_feats": 192, "reduction": 2, "topk": 128},
        "32.29M",
    ),
    small={"n_resgroups": 4, "n_resblocks": 2, "n_feats": 64},
)
