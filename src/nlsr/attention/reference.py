"""Reference implementations of the attention blocks, kept apart from nlsr's fast kernels.

Two families, both independent of the kernels they are compared with:

* **The released approach** (``Released*``, :func:`released_baseline`): the blocks computed the
  way the authors' released NLSN, DLSN, HSPAN and CSNLN code computes them, measured by
  ``nlsr bench --baseline released`` and checked by the tests against the official outputs.
* **The naive dense forms** (``naive_*``): the plain definitions (full score matrices, explicit
  loops) that the tests compare nlsr's blocks and kernels against.

nlsr's blocks never call this module.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nlsr.attention.buckets import KEY_EPS, bucket_count, effective_chunk
from nlsr.attention.cross_scale import ASSEMBLY_DIVISOR, CrossScaleAttention, same_pad
from nlsr.attention.gla import GlobalLearnableAttention
from nlsr.attention.hspa import HSPA, doubling_threshold
from nlsr.attention.nla import NonLocalAttention
from nlsr.attention.nlsa import NonLocalSparseAttention
from nlsr.padding import pad_to_multiple


class ReleasedFormError(ValueError):
    """A block or network asked for in its released form that has none (or whose random
    projections do not fit): the benchmark cannot measure it."""


# --------------------------------------------------------------------------------------------
# The released approach (nlsr bench --baseline released)
#
# A re-implementation, from the description in the shared models spec, of how the released NLSN
# and DLSN code computes the bucketed attention: all rounds sorted at once (default sort of the
# offset codes), the sorted sequences gathered and tail-padded by copying, the neighbour chunks
# concatenated by copying (three copies of keys, values and GLA's score term), every score of
# every round materialised in float32 at once, log-sum-exp and softmax over the concatenation,
# the result unsorted by gathering and the rounds merged with softmax_r(lse_r). For HSPAN: the
# whole [N, L, L] score matrix at once and sparsemax over it (ReleasedHSPA).
# --------------------------------------------------------------------------------------------


def _released_hash(block: nn.Module, x: Tensor, n_buckets: int, signed: bool) -> Tensor:
    """Codes ``[N, R, L]`` as released: an einsum of the embeddings with the rounds' random
    projections, ``[xR, -xR]`` for NLSA (``signed``), and an argmax over the concatenation."""
    width = n_buckets // 2 if signed else n_buckets
    proj = block.projections
    if proj is None:
        proj = block.draw_projections(n_buckets, x.device, x.dtype)
    proj = proj.to(device=x.device, dtype=x.dtype)
    if tuple(proj.shape[1:]) != (block.n_hashes, width):
        raise ReleasedFormError(f"baseline: projections {tuple(proj.shape)} do not fit {n_buckets}")
    rotated = torch.einsum("btf,bfhi->bhti", x, proj.unsqueeze(0).expand(x.shape[0], -1, -1, -1))
    if signed:
        rotated = torch.cat([rotated, -rotated], dim=-1)
    return rotated.argmax(dim=-1)


def _with_neighbours(chunks: Tensor) -> Tensor:
    """``[N, R, nc, c, F]`` -> ``[N, R, nc, 3c, F]``: each chunk followed by copies of its
    previous and next chunk (cyclic), concatenated, as released."""
    back = torch.cat([chunks[:, :, -1:], chunks[:, :, :-1]], dim=2)
    forward = torch.cat([chunks[:, :, 1:], chunks[:, :, :1]], dim=2)
    return torch.cat([chunks, back, forward], dim=3)


class ReleasedBucketAttention(nn.Module):
    """An NLSA or GLA block (its parameters, projections and generator, shared) whose attention
    is computed the released way (section comment above). For benchmarks only.

    ``stable_sort=True`` sorts ties in position order, as nlsr does, so that the output can be
    checked against the block's own; the release's default sort is unstable.
    """

    def __init__(self, block: nn.Module, stable_sort: bool = False):
        super().__init__()
        if not isinstance(block, (NonLocalSparseAttention, GlobalLearnableAttention)):
            raise ReleasedFormError(
                f"--baseline released: no released form of {type(block).__name__}"
            )
        self.block = block
        self.stable_sort = stable_sort

    def forward(self, input: Tensor) -> Tensor:
        """``res_scale * attention(input) + input``, computed as released."""
        b = self.block
        n, _, h, w = input.shape
        length = h * w
        x = b.conv_match(input).view(n, -1, length).permute(0, 2, 1)  # [N, L, d]
        y = b.conv_assembly(input).view(n, -1, length).permute(0, 2, 1)  # [N, L, C]
        signed = not isinstance(b, GlobalLearnableAttention)  # NLSA: spherical LSH
        learnable = not signed and b.learnable
        n_buckets = bucket_count(length, b.chunk_size, minimum=2 if signed else 1)
        codes = _released_hash(b, x.detach(), n_buckets, signed)  # [N, R, L]
        rounds = codes.shape[1]
        offsets = (torch.arange(rounds, device=codes.device) * n_buckets).view(1, -1, 1)
        codes = (codes + offsets).reshape(n, -1)  # flat [N, R*L], as released
        indices = codes.sort(dim=-1, stable=self.stable_sort).indices
        undo = indices.sort(dim=-1).indices
        positions = indices % length

        def gather(t: Tensor) -> Tensor:  # [N, L, F] -> [N, R*L, F] in sorted order
            return t.gather(1, positions.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

        chunk = effective_chunk(length, b.chunk_size)
        padding = (-length) % chunk

        def chunked(t: Tensor) -> Tensor:  # tail-padded [N, R, nc, c, F]
            t = t.reshape(n, rounds, length, -1)
            if padding:
                t = torch.cat([t, t[:, :, length - padding :].clone()], dim=2)
            return t.reshape(n, rounds, -1, chunk, t.shape[-1])

        queries = chunked(gather(x))
        keys = _with_neighbours(F.normalize(queries, p=2, dim=-1, eps=KEY_EPS))
        values = _with_neighbours(chunked(gather(y)))
        scores = torch.einsum("bhkie,bhkje->bhkij", queries, keys)  # [N, R, nc, c, 3c]
        if learnable:
            fc = b.fc(b.conv_assembly_fc(input).view(n, -1, length).permute(0, 2, 1))
            term = _with_neighbours(chunked(gather(fc[..., :chunk])))  # [N, R, nc, 3c, c]
            scores = scores + term.transpose(-1, -2)
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = torch.exp(scores - lse)
        out = torch.einsum("bukij,bukje->bukie", probs, values).reshape(n, rounds, -1, y.shape[-1])
        out = out[:, :, :length].reshape(n, rounds * length, -1)
        lse = lse.reshape(n, rounds, -1)[:, :, :length].reshape(n, rounds * length)
        out = out.gather(1, undo.unsqueeze(-1).expand(-1, -1, out.shape[-1]))
        lse = lse.gather(1, undo)
        weights = torch.softmax(lse.view(n, rounds, length, 1), dim=1)
        out = (out.view(n, rounds, length, -1) * weights).sum(dim=1)
        return out.permute(0, 2, 1).reshape(n, -1, h, w) * b.res_scale + input


def released_sparsemax_threshold(z: Tensor, topk: int | None) -> tuple[Tensor, Tensor]:
    """tau and support size of every row of ``z`` ``[B, L]`` (row maxima already subtracted) as
    released: the doubling search over whole rows from ``topk`` sorted entries (None: a full
    sort), without nlsr's pruning of the rows."""
    return doubling_threshold(z, z.shape[-1] if topk is None else topk)


class _ReleasedSparsemax(torch.autograd.Function):
    """Sparsemax over the last axis of a whole score tensor, as released: the output is saved and
    the backward is ``(g - mean of g over the support)`` on the support, zero elsewhere."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor, topk: int) -> Tensor:
        shape = scores.shape
        z = scores.reshape(-1, shape[-1])
        z = z - z.amax(dim=-1, keepdim=True)
        tau, _ = released_sparsemax_threshold(z, topk)
        out = torch.clamp(z - tau, min=0).view(shape)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (out,) = ctx.saved_tensors
        support = out > 0
        mean = (grad * support).sum(-1, keepdim=True) / support.sum(-1, keepdim=True)
        return torch.where(support, grad - mean, torch.zeros_like(grad)), None


class ReleasedHSPA(nn.Module):
    """An HSPA block (its parameters, shared) computed as released: the whole ``[N, L, L]``
    float32 score matrix at once, sparsemax over it (topk-started search), ``P g``. For
    benchmarks only."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        """``res_scale * sparsemax(theta^T phi) g + x`` in one piece."""
        b = self.block
        n, c, h, w = x.shape
        theta = b.conv_match1(x).flatten(2).transpose(1, 2)  # [N, L, d]
        phi = b.conv_match2(x).flatten(2)  # [N, d, L]
        g = b.conv_assembly(x).flatten(2).transpose(1, 2)  # [N, L, C]
        weights = _ReleasedSparsemax.apply(torch.bmm(theta, phi), b.topk or 128)
        y = torch.bmm(weights, g)
        return b.res_scale * y.transpose(1, 2).reshape(n, c, h, w) + x


class ReleasedCrossScaleAttention(nn.Module):
    """A cross-scale attention block (its parameters, shared) computed as CSNLN's released code
    does, image by image: the normalised key patches as conv2d filters over the query map (an
    ``[1, K, H, W]`` score map), softmax over the keys, and a transposed convolution (stride
    ``s``) pasting the value patches, divided by 6. For benchmarks and tests."""

    def __init__(self, block: nn.Module):
        super().__init__()
        if not isinstance(block, CrossScaleAttention) or block.stride != 1:
            raise ReleasedFormError(
                "--baseline released: CSNA has a released form at stride 1 only"
            )
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, H, W) -> (N, C, s*H, s*W)`` (padded to multiples of ``s`` and cropped back
        as the block does)."""
        b = self.block
        s, k = b.scale, b.ksize
        h0, w0 = x.shape[-2:]
        x, _, _ = pad_to_multiple(x, s)
        n, c = x.shape[:2]
        embed = b.conv_assembly(x)
        match = b.conv_match_1(x)
        raw = F.unfold(same_pad(embed, k * s, s), k * s, stride=s)
        raw = raw.view(n, c, k * s, k * s, -1).permute(0, 4, 1, 2, 3)  # [N, K, C, ks, ks]
        ref = b.conv_match_2(F.interpolate(x, scale_factor=1.0 / s, mode="bilinear"))
        keys = F.unfold(same_pad(ref, k, 1), k).view(n, -1, k, k, raw.shape[1])
        keys = keys.permute(0, 4, 1, 2, 3)  # [N, K, C', k, k]
        out = []
        for xi, wi, raw_wi in zip(match.split(1), keys, raw, strict=True):
            norm = torch.max(wi.pow(2).sum(dim=(1, 2, 3), keepdim=True).sqrt(), b.escape_NaN)
            yi = F.conv2d(same_pad(xi, k, 1), wi / norm)  # [1, K, H, W]
            yi = F.softmax(yi * b.softmax_scale, dim=1)
            if not b.average:
                yi = (yi == yi.max(dim=1, keepdim=True)[0]).to(yi.dtype)
            yi = F.conv_transpose2d(yi, raw_wi, stride=s, padding=(k - 1) * s // 2)
            out.append(yi / ASSEMBLY_DIVISOR)
        return torch.cat(out)[..., : s * h0, : s * w0]


def released_baseline(model: nn.Module) -> nn.Module:
    """``model`` (a block or a network) with every NLSA, GLA, HSPA and cross-scale (CSNA) block
    computed the released way; the parameters are shared, not copied."""

    def released(block: nn.Module) -> nn.Module:
        if isinstance(block, CrossScaleAttention):
            return ReleasedCrossScaleAttention(block)
        return ReleasedHSPA(block) if isinstance(block, HSPA) else ReleasedBucketAttention(block)

    kinds = (NonLocalSparseAttention, GlobalLearnableAttention, HSPA, CrossScaleAttention)
    if isinstance(model, kinds):
        return released(model)
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, kinds)
    ]
    if not targets:
        raise ReleasedFormError(
            f"--baseline released: {type(model).__name__} has no NLSA/GLA/HSPA/CSNA block"
        )
    for parent, name, child in targets:
        setattr(parent, name, released(child))
    return model


# --------------------------------------------------------------------------------------------
# The naive dense forms (what the tests compare nlsr's blocks and kernels against)
# --------------------------------------------------------------------------------------------


def naive_nla(module: NonLocalAttention, x: Tensor) -> Tensor:
    """Full L x L embedded-Gaussian attention, softmax over keys, res_scale, skip."""
    n, c, h, w = x.shape
    theta = module.conv_match1(x).flatten(2).transpose(1, 2)
    phi = module.conv_match2(x).flatten(2)
    g = module.conv_assembly(x).flatten(2).transpose(1, 2)
    weights = torch.softmax(theta @ phi, dim=-1)
    return module.res_scale * (weights @ g).transpose(1, 2).reshape(n, c, h, w) + x


def naive_sparsemax(s: Tensor) -> Tensor:
    """Differentiable dense sparsemax over the last axis (full sort, largest valid k)."""
    z = s - s.max(dim=-1, keepdim=True).values
    srt = z.sort(dim=-1, descending=True).values
    cumsum = srt.cumsum(dim=-1)
    m = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    k = ((1 + m * srt > cumsum) * m).amax(dim=-1, keepdim=True).long()
    tau = (cumsum.gather(-1, k - 1) - 1) / k.to(z.dtype)
    return torch.clamp(z - tau, min=0)


def naive_hspa(module: HSPA, x: Tensor) -> Tensor:
    """The released dense form: full L x L score matrix, sparsemax over keys, res_scale, skip."""
    n, c, h, w = x.shape
    theta = module.conv_match1(x).flatten(2).transpose(1, 2)
    phi = module.conv_match2(x).flatten(2)
    g = module.conv_assembly(x).flatten(2).transpose(1, 2)
    weights = naive_sparsemax(theta @ phi)
    return module.res_scale * (weights @ g).transpose(1, 2).reshape(n, c, h, w) + x


def naive_bucket_attention(
    q: Tensor,
    v: Tensor,
    codes: Tensor,
    chunk: int,
    bias: Tensor | None = None,
    eps: float = 5e-5,
) -> Tensor:
    """Explicit loops: Python-sorted rounds, tail padding, each chunk over [own, prev, next]."""
    n, length, _ = q.shape
    rounds = codes.shape[1]
    out = torch.zeros(n, rounds, length, v.shape[-1], dtype=q.dtype)
    lse = torch.zeros(n, rounds, length, dtype=q.dtype)
    for b in range(n):
        k = q[b] / q[b].norm(dim=-1, keepdim=True).clamp_min(eps)
        for r in range(rounds):
            order = sorted(range(length), key=lambda p: (int(codes[b, r, p]), p))
            pad = (-length) % chunk
            order = order + order[length - pad :]
            chunks = [order[i : i + chunk] for i in range(0, len(order), chunk)]
            nc = len(chunks)
            for c_idx, members in enumerate(chunks):
                keys = members + chunks[(c_idx - 1) % nc] + chunks[(c_idx + 1) % nc]
                for slot, p in enumerate(members):
                    if c_idx * chunk + slot >= length:  # padded copy of a query: dropped
                        continue
                    s = torch.stack([q[b, p] @ k[j] for j in keys])
                    if bias is not None:
                        s = s + torch.stack([bias[b, j, slot] for j in keys])
                    lse[b, r, p] = torch.logsumexp(s, 0)
                    w = torch.softmax(s, 0)
                    out[b, r, p] = sum(w[t] * v[b, j] for t, j in enumerate(keys))
    weights = torch.softmax(lse, dim=1).unsqueeze(-1)
    return (out * weights).sum(1)


def naive_lcoa(q: Tensor, v: Tensor, codes: list[int], window: int) -> Tensor:
    """Per-query loop: stable sort by code, windows (tail-padded, or one window when L < w/2),
    keys from the own/previous/next window, normalised keys, softmax."""
    length = q.shape[0]
    order = sorted(range(length), key=lambda i: (codes[i], i))
    if 2 * length < window:
        window = length
    pad = (-length) % window
    seq = order + order[length - pad :]
    n_windows = len(seq) // window
    out = torch.zeros_like(v)
    for slot in range(length):
        w = slot // window
        keys = []
        for ww in (w, (w - 1) % n_windows, (w + 1) % n_windows):
            keys += seq[ww * window : (ww + 1) * window]
        k = F.normalize(q[keys], dim=-1, eps=5e-5)
        p = torch.softmax(k @ q[order[slot]], dim=0)
        out[order[slot]] = p @ v[keys]
    return out
