"""LCoAN (Zhao et al.): residual groups with k-means sparse attention shared across groups.

Only the first group's attention clusters and computes attention probabilities; every later
group reuses them (collaborative attention) with its own values. Key names follow the released
checkpoints, including the unused ``a`` and the idle k-means buffers of later groups.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from nlsr.attention.lcoa import LCoA
from nlsr.attention.lcoa_pattern import BucketPattern
from nlsr.checkpoint import CheckpointError
from nlsr.models.common import MeanShift, ResBlock, Upsampler, default_conv
from nlsr.models.readers import common, has_key, indices, need, tail_scale
from nlsr.models.spec import ArchSpec, PaperPreset


class LCoAGroup(nn.Module):
    """Local conv-ReLU-conv blocks -> LCoA -> conv, scaled by ``res_scale``, plus the input."""

    def __init__(self, n_feats: int, n_resblocks: int, res_scale: float, **attention: object):
        super().__init__()
        self.local_body = nn.Sequential(*(ResBlock(n_feats, 3, 1.0) for _ in range(n_resblocks)))
        self.attention = nn.Sequential(LCoA(n_feats, res_scale=res_scale, **attention))  # type: ignore[arg-type]
        self.m_conv = nn.Sequential(default_conv(n_feats, n_feats, 3))
        self.res_scale = res_scale

    def forward(
        self, x: torch.Tensor, pattern: BucketPattern | None = None
    ) -> tuple[torch.Tensor, BucketPattern]:
        """Run the group, computing the attention pattern when ``pattern`` is None."""
        res, pattern = self.attention[0].forward_shared(self.local_body(x), pattern)
        return self.m_conv(res).mul(self.res_scale) + x, pattern


class LCoAN(nn.Module):
    """LCoAN: learnable (k-means) sparse pattern + collaborative attention (15.67M at x2).

    ``centroid_update="none"`` keeps the released behaviour (centroids initialised from the
    first batch, then frozen); ``"ema"`` follows the paper (EMA of assigned features in training).
    """

    def __init__(
        self,
        scale: int = 2,
        n_resgroups: int = 10,
        n_resblocks: int = 4,
        n_feats: int = 128,
        reduction: int = 1,
        n_hashes: int = 1,
        n_clusters: int = 128,
        window_size: int = 384,
        ema_decay: float = 0.999,
        centroid_update: str = "none",
        res_scale: float = 0.1,
        rgb_range: float = 1.0,
        n_colors: int = 3,
    ):
        super().__init__()
        if n_resgroups < 1:
            raise ValueError(f"option n_resgroups: must be >= 1, got {n_resgroups}")
        self.scale = scale
        self.rgb_range = rgb_range
        self.chop_min_size = 120000
        #: Unused scalar parameter present in the released checkpoints.
        self.a = nn.Parameter(torch.zeros(1))
        self.sub_mean = MeanShift(rgb_range, -1)
        self.add_mean = MeanShift(rgb_range, +1)
        self.head = nn.Sequential(default_conv(n_colors, n_feats, 3))
        self.body = nn.Sequential(
            *(
                LCoAGroup(
                    n_feats,
                    n_resblocks,
                    res_scale,
                    reduction=reduction,
                    n_clusters=n_clusters,
                    window_size=window_size,
                    n_rounds=n_hashes,
                    ema_decay=ema_decay,
                    centroid_update=centroid_update,
                )
                for _ in range(n_resgroups)
            )
        )
        self.m_conv = nn.Sequential(default_conv(n_feats, n_feats, 3))
        self.tail = nn.Sequential(Upsampler(scale, n_feats), default_conv(n_feats, n_colors, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, rgb_range] -> (N, 3, scale*H, scale*W); any H, W >= 1."""
        x = self.head(self.sub_mean(x))
        res, pattern = x, None
        for group in self.body:
            res, pattern = group(res, pattern)
        res = self.m_conv(res) + x
        return self.add_mean(self.tail(res))


def _matches(sd: Mapping[str, Tensor]) -> bool:
    """K-means buffers (``body.<g>.attention.0.kmeans.means``) or ``body.<g>.local_body``."""
    return has_key(sd, r"body\.\d+\.attention\.0\.kmeans\.means$") or has_key(
        sd, r"body\.\d+\.local_body\."
    )


def _read(sd: Mapping[str, Tensor]) -> tuple[int, dict[str, Any]]:
    options = common(sd, "head.0.weight", "lcoan")
    options["n_resgroups"] = len(indices(sd, r"body\.(\d+)\.attention\.0\."))
    options["n_resblocks"] = len(indices(sd, r"body\.0\.local_body\.(\d+)\.body\.0\.weight$"))
    match = need(sd, "body.0.attention.0.conv_match.0.weight", "lcoan")
    options["reduction"] = options["n_feats"] // int(match.shape[0])
    means = need(sd, "body.0.attention.0.kmeans.means", "lcoan")
    if means.dim() != 3:
        raise CheckpointError(
            f"lcoan k-means means must be [rounds, clusters, d], got {list(means.shape)}"
        )
    options["n_hashes"] = int(means.shape[0])
    options["n_clusters"] = int(means.shape[1])
    return tail_scale(sd, options["n_feats"]), options


ARCH = ArchSpec(
    name="lcoan",
    network=LCoAN,
    description="LCoAN: k-means learnable sparse pattern + collaborative attention",
    matches=_matches,
    read=_read,
    priority=60,
    preset=PaperPreset(
        "YigangZhao/LCoAN",
        {
            "n_resgroups": 10,
            "n_resblocks": 4,
            "n_feats": 128,
            "reduction": 1,
            "n_hashes": 1,
            "n_clusters": 128,
            "window_size": 384,
        },
        "15.67M",
    ),
    small={"n_resgroups": 4, "n_resblocks": 2, "n_feats": 64},
)
