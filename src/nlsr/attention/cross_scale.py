"""CSNLN's attention blocks (Mei et al., 2020): cross-scale non-local attention and the dense
in-scale non-local attention used by its mutual projection.

Unlike the other blocks of :mod:`nlsr.attention`, the cross-scale block **upsamples**:
``create_attention("csna", C, scale=s)`` returns a module mapping ``(N, C, H, W)`` to
``(N, C, s*H, s*W)``. Parameter names equal the released state-dict keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nlsr.attention.nla import conv1x1_prelu
from nlsr.attention.registry import register_attention
from nlsr.padding import pad_to_multiple

#: The released code divides the assembled cross-scale output by this constant.
ASSEMBLY_DIVISOR = 6.0


def _check_int(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(
            f"attention option {name!r} must be an integer >= {minimum}, got {value!r}"
        )


def _same_pad(x: torch.Tensor, ksize: int, stride: int) -> torch.Tensor:
    """Zero-pad as TensorFlow's 'SAME' so that ``ksize`` windows at ``stride`` cover every row and
    column (extra row/column at the bottom/right), as the released patch extraction does."""
    pads: list[int] = []
    for size in (x.shape[-1], x.shape[-2]):
        out = -(-size // stride)
        total = max(0, (out - 1) * stride + ksize - size)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class InScaleNonLocalAttention(nn.Module):
    """Dense in-scale non-local attention of CSNLN: ``softmax(theta(x)^T phi(x)) g(x)``, no skip.

    theta, phi: 1x1 conv ``C -> C // reduction`` + PReLU; g: 1x1 conv ``C -> C`` + PReLU.
    Memory is quadratic in ``H * W`` (the full score matrix is built, as released).
    """

    def __init__(self, channels: int, reduction: int = 2):
        super().__init__()
        _check_int("channels", channels, 1)
        _check_int("reduction", reduction, 1)
        if channels // reduction < 1:
            raise ValueError(
                f"attention option 'reduction' ({reduction}) exceeds channels ({channels})"
            )
        self.conv_match1 = conv1x1_prelu(channels, channels // reduction)
        self.conv_match2 = conv1x1_prelu(channels, channels // reduction)
        self.conv_assembly = conv1x1_prelu(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        query = self.conv_match1(x).flatten(2).transpose(1, 2)  # N, HW, C'
        key = self.conv_match2(x).flatten(2)  # N, C', HW
        value = self.conv_assembly(x).flatten(2).transpose(1, 2)  # N, HW, C
        attn = torch.softmax(torch.bmm(query, key), dim=2)
        return torch.bmm(attn, value).transpose(1, 2).reshape(n, -1, h, w)


@register_attention("csna")
class CrossScaleAttention(nn.Module):
    """Cross-scale non-local attention of CSNLN; maps ``(N, C, H, W) -> (N, C, s*H, s*W)``.

    Queries: ``ksize`` x ``ksize`` patches of ``conv_match_1(x)``. Keys: ``ksize`` x ``ksize``
    patches of ``conv_match_2(bilinear 1/s downscale of x)``, L2-normalised (norm floored at
    ``escape_NaN`` = 1e-4). Values: ``(ksize*s)``-square patches of ``conv_assembly(x)`` at step
    ``s``. Weights ``softmax(softmax_scale * q.k)`` over all keys (``average=False``: one-hot
    argmax instead); each query pastes its weighted value patch into the ``s``-times larger output
    (the released transposed convolution, stride ``s``, computed as a matrix product and
    ``F.fold``) and the sum is divided by 6, all as released.

    ``stride`` samples the key grid (and the value patches, at ``stride * s``) more sparsely; it is
    1 in the release, whose code path for ``stride > 1`` would also stride the output, so here the
    output stays ``s`` times the input. Any ``H, W >= 1``: the input is padded (reflect, or
    replicate where too small) to multiples of ``s`` and the output cropped back to ``s*H, s*W``.
    """

    def __init__(
        self,
        channels: int,
        scale: int = 2,
        reduction: int = 2,
        ksize: int = 3,
        stride: int = 1,
        softmax_scale: float = 10.0,
        average: bool = True,
    ):
        super().__init__()
        _check_int("channels", channels, 1)
        _check_int("scale", scale, 1)
        _check_int("reduction", reduction, 1)
        _check_int("ksize", ksize, 1)
        _check_int("stride", stride, 1)
        if ksize % 2 == 0:
            raise ValueError(f"attention option 'ksize' must be odd, got {ksize}")
        if channels // reduction < 1:
            raise ValueError(
                f"attention option 'reduction' ({reduction}) exceeds channels ({channels})"
            )
        self.scale = scale
        self.ksize = ksize
        self.stride = stride
        self.softmax_scale = float(softmax_scale)
        self.average = bool(average)
        self.register_buffer("escape_NaN", torch.tensor([1e-4]))
        self.conv_match_1 = conv1x1_prelu(channels, channels // reduction)
        self.conv_match_2 = conv1x1_prelu(channels, channels // reduction)
        self.conv_assembly = conv1x1_prelu(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, k, t = self.scale, self.ksize, self.stride
        h0, w0 = x.shape[-2:]
        x, _, _ = pad_to_multiple(x, s)
        h, w = x.shape[-2:]
        values_map = self.conv_assembly(x)
        query = self.conv_match_1(x)
        ref = F.interpolate(x, scale_factor=1.0 / s, mode="bilinear", align_corners=False)
        ref = self.conv_match_2(ref)
        # Keys [N, C'*k*k, K]: k x k patches of the downscaled map, one column per key,
        # L2-normalised (norm floored at escape_NaN); the softmax scale is folded in.
        keys = F.unfold(_same_pad(ref, k, t), k, stride=t)
        norm = keys.pow(2).sum(dim=1, keepdim=True).sqrt()
        keys = keys * (self.softmax_scale / torch.maximum(norm, self.escape_NaN))
        # Values [N, C*ks*ks, K]: the HR-sized patches matching each key, one column per key.
        kv = k * s
        values = F.unfold(_same_pad(values_map, kv, t * s), kv, stride=t * s)

        # Scores [N, H*W, K]: correlation of every query patch (k x k around each position)
        # with every key patch, as one matrix product; softmax over the keys (last axis).
        queries = F.unfold(_same_pad(query, k, 1), k)  # [N, C'*k*k, H*W]
        attn = torch.softmax(torch.bmm(queries.transpose(1, 2), keys), dim=-1)
        if not self.average:
            attn = (attn == attn.amax(dim=-1, keepdim=True)).to(attn.dtype)

        # Paste each query's weighted value patch into the s-times larger output: the released
        # transposed convolution (stride s), computed as one matrix product (the weighted patch
        # of every query) and F.fold (the overlapping sum), far faster than conv_transpose2d's
        # CPU path and equal to float rounding.
        patches = torch.bmm(values, attn.transpose(1, 2))  # [N, C*ks*ks, H*W]
        out = F.fold(patches, (s * h, s * w), kv, padding=(k - 1) * s // 2, stride=s)
        out = out / ASSEMBLY_DIVISOR
        return out[..., : s * h0, : s * w0]
