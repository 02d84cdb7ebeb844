"""CSNLN's attention blocks (Mei et al., 2020): cross-scale non-local attention and the dense
in-scale non-local attention used by its mutual projection.

Unlike the other blocks of :mod:`nlsr.attention`, the cross-scale block **upsamples**:
``create_attention("csna", C, scale=s)`` returns a module mapping ``(N, C, H, W)`` to
``(N, C, s*H, s*W)``. Parameter names equal the released state-dict keys.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from nlsr.attention.backends import exporting
from nlsr.attention.nla import conv1x1_prelu
from nlsr.attention.precision import in_float32
from nlsr.attention.registry import register_attention
from nlsr.padding import pad_to_multiple

#: The released code divides the assembled cross-scale output by this constant.
ASSEMBLY_DIVISOR = 6.0


def _check_int(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(
            f"attention option {name!r} must be an integer >= {minimum}, got {value!r}"
        )


def same_pad(x: torch.Tensor, ksize: int, stride: int) -> torch.Tensor:
    """Zero-pad as TensorFlow's 'SAME' so that ``ksize`` windows at ``stride`` cover every row and
    column (extra row/column at the bottom/right), as the released patch extraction does."""
    pads: list[int] = []
    for size in (x.shape[-1], x.shape[-2]):
        out = (size + stride - 1) // stride  # not -(-size // stride): ONNX divides toward 0
        total = torch.sym_max(0, (out - 1) * stride + ksize - size)  # symbolic in export
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


#: Score elements (rows of queries x keys, halo rows included) computed at once: 2**22 float32
#: values are 16 MiB per buffer, so the peak stays a few tens of MiB at any image size.
BLOCK_ELEMENTS = 2**22


def _diagonal_sum(x: Tensor, qdim: int, kdim: int, r: int, halo: int, out: Tensor) -> Tensor:
    """``out[i, k] = sum_{|e| <= r} x[i + halo + e, k + e]`` along the query axis ``qdim`` and
    the key axis ``kdim`` (terms outside ``x`` are zero), written into ``out`` (``2 * halo``
    fewer rows on ``qdim``; more where ``halo < 0``). The operator behind both correlations."""
    n_in, nk = x.shape[qdim], x.shape[kdim]
    n_out = out.shape[qdim]
    if halo < 0:  # the unshifted term leaves the new rows uncovered
        out.zero_()
    for e in sorted(range(-r, r + 1), key=abs):  # e = 0 first: a copy when it covers all
        q0, q1 = max(0, -halo - e), min(n_out, n_in - halo - e)
        k0, k1 = max(0, -e), min(nk, nk - e)
        if q1 <= q0 or k1 <= k0:
            continue
        src = x.narrow(qdim, q0 + halo + e, q1 - q0).narrow(kdim, k0 + e, k1 - k0)
        dst = out.narrow(qdim, q0, q1 - q0).narrow(kdim, k0, k1 - k0)
        if e == 0 and halo >= 0:
            dst.copy_(src)
        else:
            dst.add_(src)
    return out


class _Geometry(NamedTuple):
    """Sizes of one image: query map ``h x w`` (padded by ``2r`` zero rows above and below),
    key grid ``kh x kw``, patch radius ``r``, query rows per block."""

    h: int
    w: int
    kh: int
    kw: int
    r: int
    block: int

    def blocks(self) -> Iterator[tuple[int, int]]:
        """Output rows ``[y0, y1)`` of each block."""
        for y0 in range(0, self.h, self.block):
            yield y0, min(self.h, y0 + self.block)


class _Workspace:
    """Score-sized buffers reused by every block of a call (no allocation per block, so the
    allocator's heap does not fragment); :meth:`take` views ``rows`` query rows of one."""

    def __init__(self, g: _Geometry, like: Tensor, count: int):
        per_row = g.w * g.kh * g.kw
        self.g = g
        self.buffers = [like.new_empty((g.block + 4 * g.r) * per_row) for _ in range(count)]

    def take(self, index: int, rows: int) -> Tensor:
        """Buffer ``index`` as ``[rows, W, kh, kw]``."""
        g = self.g
        return self.buffers[index][: rows * g.w * g.kh * g.kw].view(rows, g.w, g.kh, g.kw)

    def patch_sum(self, x: Tensor, r: int, halo: int, middle: int, target: int) -> Tensor:
        """:func:`_diagonal_sum` over both image axes of ``x`` ``[rows, W, kh, kw]`` (the sum
        over the ``(2r+1)^2`` patch offsets), through buffer ``middle`` into buffer ``target``."""
        rows = x.shape[0] - 2 * halo
        if halo >= 0:  # shrinking: rows first, on the larger tensor
            mid = _diagonal_sum(x, 0, 2, r, halo, self.take(middle, rows))
            return _diagonal_sum(mid, 1, 3, r, 0, self.take(target, rows))
        mid = _diagonal_sum(x, 1, 3, r, 0, self.take(middle, x.shape[0]))
        return _diagonal_sum(mid, 0, 2, r, halo, self.take(target, rows))


def _softmax_(x: Tensor) -> Tensor:
    """Softmax over the last axis of ``x``, in place (bit-equal to ``torch.softmax``)."""
    return torch.ops.aten._softmax.out(x, -1, False, out=x)


def _weights(
    ws: _Workspace, q: Tensor, ref: Tensor, c: Tensor, y0: int, y1: int, hard: bool, keep: bool
) -> tuple[Tensor, Tensor]:
    """Patch scores without key scale (buffer 2, ``[y1-y0+2r, W, kh, kw]``; overwritten by the
    weights unless ``keep``) and attention weights (buffer 3 if ``keep``) of query rows
    ``y0 - r`` to ``y1 + r``, zero outside the image. ``q`` is the row-padded query map
    ``[C', (h + 4r) * w]``, ``ref`` the key map ``[C', K]``, ``c`` the key scales ``[K]``."""
    g, r, w = ws.g, ws.g.r, ws.g.w
    rows = y1 - y0 + 4 * r
    plain = ws.take(0, rows)
    torch.mm(q[:, y0 * w : (y0 + rows) * w].t(), ref, out=plain.view(rows * w, -1))
    scores = ws.patch_sum(plain, r, r, 1, 2)
    weights = torch.mul(
        scores, c.view(g.kh, g.kw), out=ws.take(3, rows - 2 * r) if keep else scores
    )
    _softmax_(weights.view(rows - 2 * r, w, -1))
    if hard:
        flat = weights.view(rows - 2 * r, w, -1)
        flat.copy_(flat == flat.amax(dim=-1, keepdim=True))
    if y0 - r < 0:
        weights[: r - y0].zero_()
    if y1 + r > g.h:
        weights[weights.shape[0] - (y1 + r - g.h) :].zero_()
    return scores, weights


class _CrossScaleKernel(torch.autograd.Function):
    """Cross-scale attention of stride 1 in blocks of query rows; the backward pass recomputes
    each block's weights, so only the inputs are kept (module docstring of the block)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: Tensor, ref: Tensor, c: Tensor, v: Tensor, geometry: _Geometry, hard: bool
    ) -> Tensor:
        g, w = geometry, geometry.w
        out = v.new_empty(v.shape[0], g.h * w, v.shape[-1])
        ws = _Workspace(g, q, 3)
        for n in range(q.shape[0]):
            for y0, y1 in g.blocks():
                _, weights = _weights(ws, q[n], ref[n], c[n], y0, y1, hard, keep=False)
                assembly = ws.patch_sum(weights, g.r, g.r, 1, 0).view((y1 - y0) * w, -1)
                torch.mm(assembly, v[n], out=out[n, y0 * w : y1 * w])
        ctx.save_for_backward(q, ref, c, v)
        ctx.geometry, ctx.hard = g, hard
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, ref, c, v = ctx.saved_tensors
        g, r, w, hard = ctx.geometry, ctx.geometry.r, ctx.geometry.w, ctx.hard
        grad = grad.contiguous()
        dq, dref, dc, dv = (torch.zeros_like(t) for t in (q, ref, c, v))
        ws = _Workspace(g, q, 4)
        for n in range(q.shape[0]):
            for y0, y1 in g.blocks():
                scores, weights = _weights(ws, q[n], ref[n], c[n], y0, y1, hard, keep=True)
                gb = grad[n, y0 * w : y1 * w]  # [rows * W, C*s*s]
                assembly = ws.patch_sum(weights, r, r, 1, 0).view((y1 - y0) * w, -1)
                dv[n].addmm_(assembly.t(), gb)
                if hard:  # one-hot weights: no gradient reaches the scores
                    continue
                dassembly = ws.take(1, y1 - y0)
                torch.mm(gb, v[n].t(), out=dassembly.view((y1 - y0) * w, -1))
                dw = ws.patch_sum(dassembly, r, -r, 0, 1).view(-1, 1, scores[0].numel() // w)
                dw -= dw @ weights.view(-1, dw.shape[-1], 1)
                dw *= weights.view_as(dw)  # the gradient of the softmax input
                dc[n] += scores.mul_(dw.view_as(scores)).sum(dim=(0, 1)).flatten()
                dw *= c[n]
                dplain = ws.patch_sum(dw.view_as(scores), r, -r, 2, 0).view(-1, dw.shape[-1])
                cols = slice(y0 * w, (y1 + 4 * r) * w)
                dq[n][:, cols].addmm_(ref[n], dplain.t())
                dref[n].addmm_(q[n][:, cols], dplain)
        if hard:
            return None, None, None, dv, None, None
        return dq, dref, dc, dv, None, None


@in_float32
def cross_scale_kernel(
    query: Tensor, ref: Tensor, scale: Tensor, values: Tensor, ksize: int, hard: bool
) -> Tensor:
    """Stride-1 cross-scale attention of ``query`` ``[N, C', h, w]`` over the keys of ``ref``
    ``[N, C', h/s, w/s]`` scaled by ``scale`` ``[N, K]``, assembling the value cells ``values``
    ``[N, C*s*s, K]``: ``[N, C*s*s, h*w]`` output cells (pixel-unshuffled, before the 1/6)."""
    n, cq, h, w = query.shape
    kh, kw = ref.shape[-2:]
    r = (ksize - 1) // 2
    block = max(1, BLOCK_ELEMENTS // max(1, w * kh * kw) - 4 * r)
    geometry = _Geometry(h, w, kh, kw, r, min(h, block))
    q = F.pad(query, (0, 0, 2 * r, 2 * r)).reshape(n, cq, -1)
    values = values.transpose(1, 2).contiguous()  # [N, K, C*s*s]
    cells = _CrossScaleKernel.apply(q, ref.reshape(n, cq, -1), scale, values, geometry, hard)
    return cells.transpose(1, 2)


@register_attention("csna")
class CrossScaleAttention(nn.Module):
    """Cross-scale non-local attention of CSNLN; maps ``(N, C, H, W) -> (N, C, s*H, s*W)``.

    Queries: ``ksize`` x ``ksize`` patches of ``conv_match_1(x)``. Keys: ``ksize`` x ``ksize``
    patches of ``conv_match_2(bilinear 1/s downscale of x)``, L2-normalised (norm floored at
    ``escape_NaN`` = 1e-4). Values: ``(ksize*s)``-square patches of ``conv_assembly(x)`` at step
    ``s``. Weights ``softmax(softmax_scale * q.k)`` over all keys (``average=False``: one-hot
    argmax instead); each query pastes its weighted value patch into the ``s``-times larger output
    (the released transposed convolution, stride ``s``) and the sum is divided by 6, as released.

    Computed (stride 1) without patches: a score is the sum over the ``ksize^2`` patch offsets of
    pixel products, so the scores are one ``[H*W, C'] x [C', K]`` product summed along the
    diagonals of the (query, key) grid (:func:`_diagonal_sum`), and the pasting is the same
    diagonal sum of the weights followed by one product with the value *cells* (the ``s x s``
    pixel blocks of the value map): ``ksize^2`` times fewer multiply-adds than the released
    convolutions, equal to float rounding. Queries run in blocks of rows (plus a halo of
    ``ksize - 1`` rows), so the score matrix is never whole, in buffers reused by every block;
    the backward pass recomputes each block's weights. Memory: O(block x keys).

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
        if exporting():  # the same size (h, w are multiples of s), without float arithmetic
            ref = F.interpolate(x, size=(h // s, w // s), mode="bilinear", align_corners=False)
        else:
            ref = F.interpolate(x, scale_factor=1.0 / s, mode="bilinear", align_corners=False)
        ref = self.conv_match_2(ref)
        # Keys [N, C'*k*k, K]: k x k patches of the downscaled map, one column per key,
        # L2-normalised (norm floored at escape_NaN); the softmax scale is folded in.
        keys = F.unfold(same_pad(ref, k, t), k, stride=t)
        norm = keys.pow(2).sum(dim=1, keepdim=True).sqrt()
        key_scale = self.softmax_scale / torch.maximum(norm, self.escape_NaN)
        if t == 1 and not exporting():  # export: the column form below (no autograd function)
            values = F.pixel_unshuffle(values_map, s).flatten(2)  # [N, C*s*s, K] value cells
            cells = cross_scale_kernel(
                query, ref, key_scale.flatten(1), values, k, not self.average
            )
            out = F.pixel_shuffle(cells.view(cells.shape[0], -1, h, w), s)
            return out[..., : s * h0, : s * w0] / ASSEMBLY_DIVISOR
        # Strided key grid (not in the release) or export: keys and value patches as columns,
        # all scores at once, the value patches pasted with one matrix product and F.fold.
        keys = keys * key_scale
        kv = k * s
        values = F.unfold(same_pad(values_map, kv, t * s), kv, stride=t * s)
        queries = F.unfold(same_pad(query, k, 1), k)  # [N, C'*k*k, H*W]
        attn = torch.softmax(torch.bmm(queries.transpose(1, 2), keys), dim=-1)
        if not self.average:
            attn = (attn == attn.amax(dim=-1, keepdim=True)).to(attn.dtype)
        patches = torch.bmm(values, attn.transpose(1, 2))  # [N, C*ks*ks, H*W]
        out = F.fold(patches, (s * h, s * w), kv, padding=(k - 1) * s // 2, stride=s)
        if exporting():  # a gather: the exporter cannot prove the slice bounds symbolically
            rows, cols = torch.arange(s * h0), torch.arange(s * w0)
            return out.index_select(2, rows).index_select(3, cols) / ASSEMBLY_DIVISOR
        return out[..., : s * h0, : s * w0] / ASSEMBLY_DIVISOR
