"""CSNLN (Mei et al., 2020): cross-scale non-local attention with self-exemplar mining.

One self-exemplar-mining (SEM) cell with shared weights runs ``depth`` times recurrently; the HR
estimates of all steps are concatenated and fused to RGB by one conv (no pixel shuffle).
Parameter names equal the released state-dict keys (SHI-Labs/Cross-Scale-Non-Local-Attention).

Differences from the released code, none of which changes what a loaded checkpoint computes:
- the attention width is ``n_feats`` (the release hard-codes 128, so it only runs at
  ``n_feats=128``, the paper model);
- any ``H, W >= 1`` is accepted: the input is padded (reflect, replicate where too small) to a
  multiple of the cross-scale factor (3 at x3, else 2, the only divisibility the network needs)
  and the output cropped back to ``scale * H, scale * W``.
- ``chop_min_size`` is the release's ``forward_chop`` threshold, 3600 LR pixels, chosen there to
  fit GPU memory: the release's attentions are dense (memory ~ ``(H*W)**2``); nlsr's in-scale
  attention still is, its cross-scale attention runs in blocks of query rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from nlsr.attention.cross_scale import CrossScaleAttention, InScaleNonLocalAttention
from nlsr.checkpoint import CheckpointError
from nlsr.models.common import MeanShift, default_conv
from nlsr.models.readers import common, need
from nlsr.models.spec import ArchSpec, PaperPreset
from nlsr.padding import pad_to_multiple

#: (kernel, stride, padding) of the strided convs / deconvs of the first projection stage, and the
#: cross-scale factor of each attention, per scale. x4 stacks two x2 stages.
_STAGE = {2: (6, 2, 2), 3: (9, 3, 3), 4: (6, 2, 2)}
_UP_FACTOR = {2: 2, 3: 3, 4: 2}
#: x4 only: the convs / deconv between the x4 estimate and the LR features.
_X4_LR = (8, 4, 2)


def _conv_prelu(channels: int, kernel: int, stride: int, padding: int) -> nn.Sequential:
    """Strided conv + PReLU (keys ``.0``, ``.1``): HR features down to LR."""
    return nn.Sequential(nn.Conv2d(channels, channels, kernel, stride, padding), nn.PReLU())


def _deconv_prelu(channels: int, kernel: int, stride: int, padding: int) -> nn.Sequential:
    """Transposed conv + PReLU (keys ``.0``, ``.1``): LR features up to HR."""
    return nn.Sequential(
        nn.ConvTranspose2d(channels, channels, kernel, stride, padding), nn.PReLU()
    )


class _PReLUResBlock(nn.Module):
    """conv3x3-PReLU-conv3x3 plus the input (``body.{0,1,2}``), res_scale 1 as released."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            default_conv(channels, channels, 3), nn.PReLU(), default_conv(channels, channels, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x


class MultisourceProjection(nn.Module):
    """Mutual projection of the two attentions: ``down = PReLU(deconv(NL(x)))``,
    ``up = CS-NL(x)``, output ``down + ResBlock(up - down)``, ``f`` times larger than ``x``."""

    def __init__(self, channels: int, scale: int, **attention_options: Any):
        super().__init__()
        kernel, stride, padding = _STAGE[scale]
        self.up_attention = CrossScaleAttention(
            channels, scale=_UP_FACTOR[scale], **attention_options
        )
        self.down_attention = InScaleNonLocalAttention(channels)
        self.upsample = _deconv_prelu(channels, kernel, stride, padding)
        self.encoder = _PReLUResBlock(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = self.upsample(self.down_attention(x))
        up = self.up_attention(x)
        return down + self.encoder(up - down)


class RecurrentProjection(nn.Module):
    """The SEM cell: projection to HR, back-projection of the LR error, and the next LR state.

    Returns ``(lr_features, hr_estimate)``.
    """

    def __init__(self, channels: int, scale: int, **attention_options: Any):
        super().__init__()
        self.scale = scale
        kernel, stride, padding = _STAGE[scale]
        self.multi_source_projection = MultisourceProjection(channels, scale, **attention_options)
        self.down_sample_1 = _conv_prelu(channels, kernel, stride, padding)
        if scale != 4:
            self.down_sample_2 = _conv_prelu(channels, kernel, stride, padding)
        self.error_encode = _deconv_prelu(channels, kernel, stride, padding)
        self.post_conv = nn.Sequential(default_conv(channels, channels, 3), nn.PReLU())
        if scale == 4:
            self.multi_source_projection_2 = MultisourceProjection(
                channels, scale, **attention_options
            )
            self.down_sample_3 = _conv_prelu(channels, *_X4_LR)
            self.down_sample_4 = _conv_prelu(channels, *_X4_LR)
            self.error_encode_2 = _deconv_prelu(channels, *_X4_LR)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        up = self.multi_source_projection(x)
        hr = up + self.error_encode(x - self.down_sample_1(up))
        if self.scale == 4:
            up = self.multi_source_projection_2(hr)
            hr = up + self.error_encode_2(x - self.down_sample_3(up))
            return self.post_conv(self.down_sample_4(hr)), hr
        return self.post_conv(self.down_sample_2(hr)), hr


class CSNLN(nn.Module):
    """CSNLN: recurrent self-exemplar mining with cross-scale and in-scale non-local attention.

    Defaults are the paper model (128 features, 12 recurrences; 3.06M parameters at x2). The
    ``csnla_*`` options are the cross-scale attention's constants, hard-coded in the release.
    """

    def __init__(
        self,
        scale: int = 2,
        n_feats: int = 128,
        depth: int = 12,
        rgb_range: float = 1.0,
        n_colors: int = 3,
        csnla_ksize: int = 3,
        csnla_stride: int = 1,
        csnla_softmax_scale: float = 10.0,
        csnla_average: bool = True,
    ):
        super().__init__()
        if scale not in _STAGE:
            raise ValueError(f"csnln option 'scale' must be 2, 3 or 4, got {scale!r}")
        for name, value in (("n_feats", n_feats), ("depth", depth)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"csnln option {name!r} must be an integer >= 1, got {value!r}")
        if n_feats < 2:
            raise ValueError(
                f"csnln option 'n_feats' must be >= 2 (attention halves it), got {n_feats}"
            )
        if n_colors != 3:
            raise ValueError(
                f"csnln option 'n_colors' must be 3 (RGB mean shift), got {n_colors!r}"
            )
        self.scale = scale
        self.rgb_range = rgb_range
        self.depth = depth
        self.chop_min_size = 3600
        self.sub_mean = MeanShift(rgb_range, -1)
        self.SEM = RecurrentProjection(
            n_feats,
            scale,
            ksize=csnla_ksize,
            stride=csnla_stride,
            softmax_scale=csnla_softmax_scale,
            average=csnla_average,
        )
        self.add_mean = MeanShift(rgb_range, +1)
        self.head = nn.Sequential(
            nn.Sequential(default_conv(n_colors, n_feats, 3), nn.PReLU()),
            nn.Sequential(default_conv(n_feats, n_feats, 3), nn.PReLU()),
        )
        self.tail = nn.Sequential(default_conv(n_feats * depth, n_colors, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = pad_to_multiple(x, _UP_FACTOR[self.scale])
        x = self.head(self.sub_mean(x))
        estimates = []
        for _ in range(self.depth):
            x, hr = self.SEM(x)
            estimates.append(hr)
        out = self.add_mean(self.tail(torch.cat(estimates, dim=1)))
        return out[..., : self.scale * h, : self.scale * w]


def _matches(sd: Mapping[str, Tensor]) -> bool:
    """The recurrent cell's ``SEM.*`` keys."""
    return any(k.startswith("SEM.") for k in sd)


def _read(sd: Mapping[str, Tensor]) -> tuple[int, dict[str, Any]]:
    options = common(sd, "head.0.0.weight", "csnln")
    n_feats = options["n_feats"]
    options["depth"] = int(need(sd, "tail.0.weight", "csnln").shape[1]) // n_feats
    kernel = int(need(sd, "SEM.down_sample_1.0.weight", "csnln").shape[-1])
    two_stage = any(k.startswith("SEM.multi_source_projection_2.") for k in sd)
    scales = {(6, False): 2, (9, False): 3, (6, True): 4}
    if (kernel, two_stage) not in scales:
        raise CheckpointError(f"csnln down-sampling kernel {kernel} fits no scale (2, 3 or 4)")
    width_key = "SEM.multi_source_projection.up_attention.conv_assembly.0.weight"
    width = int(need(sd, width_key, "csnln").shape[0])
    if width != n_feats:
        # The released code hard-codes 128 attention channels, so only n_feats = 128 models run.
        raise CheckpointError(
            f"csnln attention width {width} differs from n_feats {n_feats}; no CSNLN (released or "
            "nlsr) computes with such weights"
        )
    return scales[(kernel, two_stage)], options


def _scale_keys(key: str) -> bool:
    """The tail, and the strided (de)convolutions of the recurrent cell."""
    if key.startswith("tail."):
        return True
    return key.startswith("SEM.") and any(
        p in key for p in ("upsample", "down_sample", "error_encode")
    )


ARCH = ArchSpec(
    name="csnln",
    network=CSNLN,
    description="CSNLN: cross-scale non-local attention with recurrent self-exemplar mining",
    matches=_matches,
    read=_read,
    priority=70,
    preset=PaperPreset(
        "SHI-Labs/Cross-Scale-Non-Local-Attention", {"n_feats": 128, "depth": 12}, "3.06M"
    ),
    small={"n_feats": 32, "depth": 4},
    scale_keys=_scale_keys,
    tile_above=3600,
)
