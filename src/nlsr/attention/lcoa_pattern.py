"""LCoA's collaborative attention: one bucketed attention pattern shared by several layers.

LCoAN's first block computes a :class:`BucketPattern` -- the merged probabilities of the
sorted-chunk attention (:mod:`nlsr.attention.buckets`), materialised once -- with
:func:`attention_pattern`, and every block applies it to its own values with
:func:`apply_pattern`; gradients flow back into the pattern's probabilities and on to the first
block's queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from nlsr.attention.backends import (
    ExportedPattern,
    exported_apply,
    exported_pattern,
    exporting,
)
from nlsr.attention.buckets import (
    KEY_EPS,
    BucketLayout,
    as_rows,
    block_exp,
    block_keys,
    bucket_layout,
    channel_major,
    check_inputs,
    chunk_windows,
    fold_windows,
    folded_query_rows,
    score_grads,
    score_workspace,
)
from nlsr.attention.precision import in_float32


class _PatternProbabilities(torch.autograd.Function):
    """Merged probabilities ``[N*R, n_chunks, chunk, 3 * chunk]`` of a layout (zero rows for the
    padded query copies) and the per-position log-sum-exp ``[N, L]`` (not differentiable);
    the backward pass goes through the softmax and the key normalisation."""

    @staticmethod
    def forward(
        ctx: Any, queries: Tensor, layout: BucketLayout, eps: float
    ) -> tuple[Tensor, Tensor]:
        n, length, _ = queries.shape
        c = layout.chunk
        q, norm = folded_query_rows(queries)
        probs = q.new_empty(n * layout.rounds, layout.n_chunks, c, 3 * c)
        total = q.new_zeros(n * length, 1)
        for blk in layout.blocks():
            qb = q.index_select(0, blk.query_rows).view(blk.count, c, -1)
            kb = block_keys(q, norm, blk.key_rows, eps)[0]
            span = probs[blk.seq, blk.first : blk.first + blk.count]
            e, _ = block_exp(qb, kb, None, False, span)
            row_sums = e.sum(dim=-1).view(-1, 1)
            total.index_add_(0, blk.query_rows[: blk.valid], row_sums[: blk.valid])
        inverse = total.reciprocal()
        for blk in layout.blocks():
            part = probs[blk.seq, blk.first : blk.first + blk.count].view(-1, 3 * c)
            part[: blk.valid] *= inverse.index_select(0, blk.query_rows[: blk.valid])
            part[blk.valid :] = 0
        lse = total.log_().add_(norm).view(n, length)
        ctx.rows = (q, norm)
        ctx.save_for_backward(probs)
        ctx.mark_non_differentiable(lse)
        ctx.layout, ctx.eps, ctx.shape = layout, eps, queries.shape
        return probs, lse

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_probs: Tensor, _grad_lse: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        (probs,) = ctx.saved_tensors
        q, norm = ctx.rows
        layout: BucketLayout = ctx.layout
        n, length, d = ctx.shape
        c = layout.chunk
        grad_probs = grad_probs.contiguous()
        delta = q.new_zeros(n * length, 1)  # sum over rounds and keys of p * dp
        for blk in layout.blocks():
            span = slice(blk.first, blk.first + blk.count)
            dot = (probs[blk.seq, span] * grad_probs[blk.seq, span]).sum(dim=-1)
            delta.index_add_(0, blk.query_rows, dot.view(-1, 1))
        grad_q = q.new_zeros(n * length, d)
        grad_scores = score_workspace(q, layout)
        for blk in layout.blocks():
            span = slice(blk.first, blk.first + blk.count)
            rows_delta = delta.index_select(0, blk.query_rows).view(blk.count, c, 1)
            ds = torch.sub(grad_probs[blk.seq, span], rows_delta, out=grad_scores[: blk.count])
            ds.mul_(probs[blk.seq, span])
            qb = q.index_select(0, blk.query_rows).view(blk.count, c, d + 1)[..., :d]
            kb, key_norm = block_keys(q, norm, blk.key_rows, ctx.eps)
            score_grads(ds, blk, qb, (kb[:, :d], key_norm), ctx.eps, grad_q)
        return grad_q.view(n, length, d), None, None


class _ApplyPattern(torch.autograd.Function):
    """``out[p] = sum over rounds and keys of probs * values``: a pattern applied to values."""

    @staticmethod
    def forward(ctx: Any, probs: Tensor, values: Tensor, layout: BucketLayout) -> Tensor:
        n, length, channels = values.shape
        c = layout.chunk
        v = as_rows(values)
        out = values.new_zeros(n * length, channels)
        for blk in layout.blocks():
            vb = chunk_windows(v.index_select(0, blk.key_rows), c).transpose(1, 2)
            part = torch.bmm(probs[blk.seq, blk.first : blk.first + blk.count], vb)
            out.index_add_(0, blk.query_rows[: blk.valid], part.view(-1, channels)[: blk.valid])
        ctx.save_for_backward(probs, values)
        ctx.layout = layout
        return channel_major(out, n)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        probs, values = ctx.saved_tensors
        layout: BucketLayout = ctx.layout
        n, length, channels = values.shape
        c = layout.chunk
        go, v = as_rows(grad_out), as_rows(values)
        need_p, need_v = ctx.needs_input_grad[:2]
        grad_p = torch.empty_like(probs) if need_p else None
        grad_v = values.new_zeros(n * length, channels) if need_v else None
        for blk in layout.blocks():
            span = slice(blk.first, blk.first + blk.count)
            gob = go.index_select(0, blk.query_rows).view(blk.count, c, channels)
            if grad_p is not None:
                vb = chunk_windows(v.index_select(0, blk.key_rows), c)
                torch.bmm(gob, vb, out=grad_p[blk.seq, span])
            if grad_v is not None:
                part = torch.bmm(probs[blk.seq, span].transpose(1, 2), gob)
                grad_v.index_add_(0, blk.key_rows, fold_windows(part, c))
        return grad_p, None if grad_v is None else channel_major(grad_v, n), None


@dataclass
class BucketPattern:
    """The attention of one bucketed call, reusable on other values (collaborative attention).

    ``probs`` ``[N*R, n_chunks, chunk, 3 * chunk]``: for every (batch, round) sequence, chunk and
    query slot, the merged probabilities (``softmax_r(lse_r) * softmax`` of the round) over the
    keys of the previous, own and next chunk, in that order; rows of padded query copies are 0.
    ``layout`` says which positions the slots hold; ``lse`` ``[N, L]`` is the log-sum-exp of each
    position's scores over all rounds.
    """

    probs: Tensor
    layout: BucketLayout
    lse: Tensor

    @property
    def batch(self) -> int:
        """Batch size N the pattern was computed for."""
        return self.layout.batch

    @property
    def n_rounds(self) -> int:
        """Number of hashing / clustering rounds R."""
        return self.layout.rounds

    @property
    def length(self) -> int:
        """Number of positions L."""
        return self.layout.length

    @property
    def n_chunks(self) -> int:
        """Chunks per round after padding."""
        return self.layout.n_chunks

    @property
    def chunk_size(self) -> int:
        """Chunk size actually used (see :func:`effective_chunk`)."""
        return self.layout.chunk


@in_float32
def attention_pattern(
    queries: Tensor, codes: Tensor, chunk_size: int, *, eps: float = KEY_EPS
) -> BucketPattern | ExportedPattern:
    """Sort, chunk and score once: the merged attention probabilities of every query.

    ``queries`` ``[N, L, d]`` (keys are ``normalize(queries)``, eps ``eps``), ``codes`` integer
    ``[N, R, L]``. Gradients reach ``queries`` through every :func:`apply_pattern` of the result.
    """
    if exporting():
        return exported_pattern(queries, codes, chunk_size, eps=eps)
    check_inputs(queries, codes)
    layout = bucket_layout(codes, chunk_size)
    probs, lse = _PatternProbabilities.apply(queries, layout, eps)
    return BucketPattern(probs=probs, layout=layout, lse=lse)


@in_float32
def apply_pattern(pattern: BucketPattern | ExportedPattern, values: Tensor) -> Tensor:
    """Attend ``values`` ``[N, L, C]`` with a computed pattern: ``[N, L, C]``, rounds merged.

    Used directly for the pattern's own layer and, in LCoAN, for later layers' values; while
    exporting the pattern is an :class:`~nlsr.attention.backends.ExportedPattern`.
    """
    if isinstance(pattern, ExportedPattern):
        return exported_apply(pattern, values)
    n, length = pattern.batch, pattern.length
    if values.dim() != 3 or values.shape[:2] != (n, length):
        raise ValueError(
            f"values {tuple(values.shape)} do not match the pattern's [N={n}, L={length}, C]"
        )
    return _ApplyPattern.apply(pattern.probs, values, pattern.layout)
