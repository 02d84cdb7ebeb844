"""The sorted-chunk attention kernel shared by NLSA (NLSN), GLA (DLSN) and LCoA (LCoAN).

All three mechanisms give every position an integer code per round (LSH bucket or k-means
cluster; :mod:`nlsr.attention.hashing`), sort the positions by code, cut the sorted sequence into
chunks and let each chunk attend to itself and its two cyclic neighbour chunks. This module does
everything after the codes, with the released arithmetic:

1. stable sort of the positions by code, per round (ties keep position order) -- identical to
   the released flat sort of ``code + r * n_buckets`` with ``stable=True``. (The release calls
   the default, unstable ``sort``, whose tie order is implementation-defined; the official
   fixtures' ``output_stable_sort.pt`` is the reference this reproduces);
2. pad each round's sorted sequence to a multiple of the chunk size by repeating its tail
   (``sorted[L - pad:]``), as released;
3. chunks of ``chunk_size``; chunk ``k`` attends to chunks ``k``, ``k - 1`` and ``k + 1``
   (cyclic, so with one or two chunks a key is counted several times, as released);
4. score ``q_i . normalize(k_j)`` (keys L2-normalised with eps 5e-5, queries not), plus an
   optional per-key, per-query-slot additive term (GLA's learnable ``fc(f_j)[i]``);
5. per-query log-sum-exp, softmax, weighted sum of the values;
6. drop the padding, undo the sort, and merge the rounds with weights
   ``softmax_r(lse_r)``.

How it is computed (the result is the above up to float rounding):

* **Layout.** Each (batch, round) sequence of padded sorted rows gets one cyclic neighbour chunk
  on each side (:class:`BucketLayout`). A block of ``g`` consecutive chunks gathers its ``g``
  query chunks and ``g + 2`` key/value chunks once; ``unfold(0, 3 * chunk, chunk)`` then views
  the gathered keys as ``g`` overlapping windows (previous, own, next chunk) without copying, so
  a block's scores are one batched matmul ``[g, chunk, 3 * chunk]``.
* **Blocks.** A block holds at most :data:`BLOCK_ELEMENTS` scores, computed into buffers that
  every block reuses (no fresh multi-MiB allocation, hence no page faults, per block), so the
  temporaries stay small and memory is O(L).
* **Fused softmax.** Without a key bias the shift ``|q_i|`` bounds every score ``q_i . k_j``
  (keys have norm <= 1) and the query's own key (always in its own chunk) reaches it, so
  ``exp(s - |q_i|)`` can neither overflow nor underflow; the shift is folded into the matmul as
  an extra column, ``(q, -|q|) . (k, 1)``, and a column of ones appended to the gathered values
  makes the second matmul return the row sums, so ``exp_`` is the only element-wise pass over
  the scores. With a key bias the shift becomes ``|q_i| + max(bias)``, which is as safe as long
  as the bias spreads over less than :func:`_max_spread` (60 in float32); beyond that the exact
  row maximum is used.
* **Round merge.** ``sum_r softmax_r(lse_r) o_r`` equals one softmax over the keys of all rounds,
  so each block adds its unnormalised ``[sum_j e_ij v_j, sum_j e_ij]`` to the position's
  accumulator (rescaled online when the shifts differ between rounds) and the output is the
  ratio at the end.
* **Training.** :func:`blocked_attention` is one autograd function that keeps the query rows,
  the value rows, its output and the per-position log-sum-exp, and recomputes each block's keys
  and probabilities in the backward pass (FlashAttention style), so training memory is O(L).
  A key bias given by a network (:class:`KeyBiasNetwork`) is recomputed block by block too.
* **Output layout.** Results are stored channel-major (their ``transpose(1, 2)`` is a contiguous
  feature map) and row-major copies are made with ``copy_``'s blocked 2-D transposes.

The block helpers (:func:`block_keys`, :func:`block_exp`, :func:`score_grads`, the row and window
views) are public because LCoA's shared pattern (:mod:`nlsr.attention.lcoa_pattern`) scores the
same layout with them; :mod:`nlsr.attention.backends` chooses between this kernel and SDPA.

Small inputs: the released code needs ``pad <= L`` (the tail it repeats must exist). When the
padding would exceed ``L`` the chunk shrinks to ``L`` (one chunk holding every position once), so
each query attends densely to all positions; see :func:`effective_chunk`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from nlsr.attention.precision import in_float32

#: Key normalisation epsilon of the released code (``F.normalize(..., eps=5e-5)``).
KEY_EPS = 5e-5
#: Scores computed at once (one block of chunks): 2**20 float32 values are 4 MiB per buffer.
BLOCK_ELEMENTS = 2**20
#: The released cap on the number of hash buckets.
MAX_BUCKETS = 128


def bucket_count(length: int, chunk_size: int, cap: int = MAX_BUCKETS, minimum: int = 1) -> int:
    """Released number of hash buckets ``min(L//c + (L//c) % 2, cap)``, raised to ``minimum``.

    The release gets 0 buckets (and crashes) for ``L < chunk_size``; ``minimum`` keeps hashing
    defined there (with a single chunk the codes do not change the result).
    """
    n = length // chunk_size
    # torch's sym_min / sym_max: a traced (symbolic) length stays symbolic (export)
    return torch.sym_max(torch.sym_min(n + n % 2, cap), minimum)


def effective_chunk(length: int, chunk_size: int) -> int:
    """Chunk size actually used for ``length`` positions.

    The released ``chunk_size`` wherever the released tail padding is defined
    (``(-L) % chunk_size <= L``); otherwise ``L``: one chunk, i.e. dense attention, for inputs too
    small for the released code.
    """
    if length < 1 or chunk_size < 1:
        raise ValueError(
            f"bucketed attention needs length >= 1 and chunk_size >= 1, got {length}, {chunk_size}"
        )
    return chunk_size if (-length) % chunk_size <= length else length


def stable_sort(codes: Tensor) -> Tensor:
    """Sorted order of the positions by code along the last axis, ties in position order.

    ``codes``: integer ``[..., L]``; ``order[..., s]`` is the position at sorted slot ``s``.
    """
    return torch.sort(codes, dim=-1, stable=True).indices


def pad_order(order: Tensor, chunk_size: int) -> Tensor:
    """Pad sorted orders ``[..., L]`` to a multiple of ``chunk_size`` by repeating the tail.

    As released: the last ``pad`` sorted positions are appended once (requires ``pad <= L``,
    which :func:`effective_chunk` guarantees).
    """
    length = order.shape[-1]
    pad = (-length) % chunk_size
    if pad > length:
        raise ValueError(
            f"cannot pad {length} positions to a multiple of {chunk_size} by repeating the tail"
        )
    return torch.cat([order, order[..., length - pad :]], dim=-1) if pad else order


class ChunkBlock(NamedTuple):
    """Chunks ``first .. first + count - 1`` of sequence ``seq``; rows are flat ``b*L + p``."""

    seq: int
    first: int
    count: int
    query_rows: Tensor  # [count * chunk]
    key_rows: Tensor  # [(count + 2) * chunk]: previous chunk, the block's chunks, next chunk
    valid: int  # leading query slots that are not tail padding


@dataclass(frozen=True)
class BucketLayout:
    """Which positions each chunk holds: ``rows`` ``[N*R, (n_chunks + 2) * chunk]`` are the flat
    rows ``b*L + position`` of every (batch, round) sequence -- sorted, tail-padded, with the
    last chunk prepended and the first appended (the cyclic neighbours)."""

    rows: Tensor
    batch: int
    rounds: int
    length: int
    chunk: int

    @property
    def n_chunks(self) -> int:
        """Chunks per sequence after padding."""
        return self.rows.shape[1] // self.chunk - 2

    def chunks_per_block(self) -> int:
        """Chunks scored at once: as many as fit in :data:`BLOCK_ELEMENTS` scores (at least 1)."""
        return max(1, min(self.n_chunks, BLOCK_ELEMENTS // (3 * self.chunk * self.chunk)))

    def blocks(self) -> Iterator[ChunkBlock]:
        """Every block of every sequence, in order."""
        c, nc, step = self.chunk, self.n_chunks, self.chunks_per_block()
        for seq in range(self.batch * self.rounds):
            row = self.rows[seq]
            for first in range(0, nc, step):
                count = min(step, nc - first)
                yield ChunkBlock(
                    seq,
                    first,
                    count,
                    row[(first + 1) * c : (first + 1 + count) * c],
                    row[first * c : (first + count + 2) * c],
                    min(count * c, self.length - first * c),
                )


def bucket_layout(codes: Tensor, chunk_size: int) -> BucketLayout:
    """Sort positions by ``codes`` ``[N, R, L]`` (stable), pad and chunk them (see module doc)."""
    if codes.dim() != 3 or codes.shape[1] < 1:
        raise ValueError(f"codes must be [N, R, L] with R >= 1, got {tuple(codes.shape)}")
    n, rounds, length = codes.shape
    chunk = effective_chunk(length, chunk_size)
    offsets = (torch.arange(n, device=codes.device) * length).view(n, 1, 1)
    rows = (pad_order(stable_sort(codes), chunk) + offsets).reshape(n * rounds, -1)
    rows = torch.cat([rows[:, -chunk:], rows, rows[:, :chunk]], dim=1)
    return BucketLayout(rows, n, rounds, length, chunk)


def chunk_windows(rows: Tensor, chunk: int) -> Tensor:
    """Gathered ``[(g + 2) * chunk, F]`` rows as ``g`` overlapping windows ``[g, F, 3 * chunk]``
    (previous, own and next chunk of each of the block's chunks); a view, nothing is copied."""
    return rows.unfold(0, 3 * chunk, chunk)


def block_exp(
    queries: Tensor,
    keys: Tensor,
    bias: Tensor | None,
    exact_max: bool,
    out: Tensor,
) -> tuple[Tensor, Tensor | None]:
    """``exp(q . k + bias - shift)`` ``[g, chunk, 3 * chunk]`` of one block, written into ``out``.

    ``queries`` ``[g, chunk, d']``, ``keys`` ``[(g + 2) * chunk, d']``, ``bias`` (gathered like the
    keys) ``[(g + 2) * chunk, chunk]``. The shift is either folded into the columns of
    ``queries``/``keys`` (returns None) or, with ``exact_max``, the row maximum (returned).
    ``out`` is a reused workspace: no fresh score-sized allocation (and page faults) per block.
    """
    chunk = queries.shape[1]
    key_windows = chunk_windows(keys, chunk)
    if bias is None:
        scores = torch.bmm(queries, key_windows, out=out)
    else:
        scores = torch.baddbmm(_bias_windows(bias, chunk), queries, key_windows, out=out)
    shift = None
    if exact_max:
        shift = scores.amax(dim=-1, keepdim=True)
        scores.sub_(shift)
    return scores.exp_(), shift


def score_workspace(like: Tensor, layout: BucketLayout) -> Tensor:
    """A score buffer ``[chunks per block, chunk, 3 * chunk]`` reused by every block."""
    c = layout.chunk
    return like.new_empty(layout.chunks_per_block(), c, 3 * c)


def _bias_windows(bias: Tensor, chunk: int) -> Tensor:
    """Gathered key-bias rows ``[(g + 2) * chunk, chunk]`` (key, query slot) as the score term
    ``[g, chunk, 3 * chunk]`` (window, query slot, key), stored key-contiguous: transposed once
    by ``copy_``'s blocked 2-D path, then viewed as overlapping windows."""
    by_slot = bias.t().contiguous()  # [chunk, (g + 2) * chunk]
    return by_slot.unfold(1, 3 * chunk, chunk).permute(1, 0, 2)


def _fold_bias(ds: Tensor, chunk: int) -> Tensor:
    """Adjoint of :func:`_bias_windows`: score gradients ``[g, chunk, 3 * chunk]`` summed onto
    the gathered key-bias rows ``[(g + 2) * chunk, chunk]``."""
    g = ds.shape[0]
    by_slot = ds.new_zeros(chunk, g + 2, chunk)  # [query slot, chunk, key slot]
    for k in range(3):
        by_slot[:, k : k + g] += ds[:, :, k * chunk : (k + 1) * chunk].transpose(0, 1)
    return by_slot.view(chunk, -1).t().contiguous()


def fold_windows(parts: Tensor, chunk: int) -> Tensor:
    """Sum window results ``[g, 3 * chunk, F]`` back onto the gathered rows ``[(g + 2) * chunk, F]``
    they came from (the adjoint of :func:`chunk_windows`)."""
    g, _, width = parts.shape
    rows = parts.new_zeros(g + 2, chunk, width)
    for k in range(3):
        rows[k : k + g] += parts[:, k * chunk : (k + 1) * chunk]
    return rows.view(-1, width)


def as_rows(x: Tensor, ones: bool = False) -> Tensor:
    """``[N, L, F]`` as row-major ``[N*L, F]``, or ``[N*L, F + 1]`` with a column of ones
    appended (``ones``: value rows ``(v, 1)``, so every block's gathered rows give
    ``p @ (v, 1)``, the weighted values and the row sums, without a per-block copy). A
    channel-major ``x`` (the transposed view of a convolution output) is transposed one batch
    item at a time: ``copy_`` takes its blocked 2-D transpose path there, several times faster
    than a strided 3-D copy."""
    n, length, width = x.shape
    by_channel = not x.is_contiguous() and x.stride(1) == 1 and x.stride(2) == length
    if not ones and not by_channel:
        return x.reshape(n * length, width)
    rows = x.new_empty(n * length, width + ones)
    if ones:
        rows[:, width] = 1.0
    for b in range(n):
        rows[b * length : (b + 1) * length, :width].copy_(x[b])
    return rows


def channel_major(rows: Tensor, n: int) -> Tensor:
    """Row-major ``[N*L, F]`` -> ``[N, L, F]`` stored channel-major (strides ``(F*L, 1, L)``), so
    that ``.transpose(1, 2)`` is a contiguous ``[N, F, L]`` feature map without another copy."""
    length, width = rows.shape[0] // n, rows.shape[1]
    out = rows.new_empty_strided((n, length, width), (width * length, 1, length))
    for b in range(n):
        out[b].t().copy_(rows[b * length : (b + 1) * length].t())
    return out


def _max_spread(dtype: torch.dtype) -> float:
    """Largest key-bias spread (max - min) for which ``exp(score - |q| - max bias)`` keeps every
    row sum far above the smallest normal number of ``dtype`` (60 for float32)."""
    return -0.69 * math.log(torch.finfo(dtype).tiny)


def folded_query_rows(queries: Tensor) -> tuple[Tensor, Tensor]:
    """Rows ``(q, -|q|)`` ``[N*L, d + 1]`` (the folded softmax shift, module doc) and the norms
    ``|q|`` ``[N*L, 1]``; the keys are made from them block by block (:func:`block_keys`)."""
    rows = as_rows(queries)
    norm = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
    return torch.cat([rows, norm.neg()], dim=1), norm


def block_keys(queries: Tensor, norm: Tensor, rows: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Keys ``(q_j / max(|q_j|, eps), 1)`` ``[len(rows), d + 1]`` of the query ``rows`` (computed
    as ``F.normalize`` computes them) and their norms ``|q_j|`` ``[len(rows), 1]``."""
    keys = queries.index_select(0, rows)
    key_norm = norm.index_select(0, rows)
    keys[:, :-1].div_(key_norm.clamp_min(eps))
    keys[:, -1] = 1.0
    return keys, key_norm


def _normalize_backward(grad_keys: Tensor, keys: Tensor, norm: Tensor, eps: float) -> Tensor:
    """Gradient w.r.t. ``q`` of ``keys = q / max(|q|, eps)`` (``F.normalize``), rows ``[M, d]``:
    ``(g - k (k . g)) / |q|`` where ``|q| >= eps``, ``g / eps`` elsewhere (in place on ``g``)."""
    dot = (grad_keys * keys).sum(dim=-1, keepdim=True).mul_(norm >= eps)
    return grad_keys.addcmul_(keys, dot, value=-1.0).div_(norm.clamp_min(eps))


def _merge(
    acc: Tensor, total: Tensor, top: Tensor, rows: Tensor, part: Tensor, sums: Tensor, shift: Tensor
) -> None:
    """Add a block's ``part`` and row ``sums`` (both relative to ``exp(shift)``) to ``acc`` and
    ``total`` (relative to ``exp(top)``) at ``rows``, keeping the larger shift: the online
    log-sum-exp merge of blocks whose shifts differ."""
    old = top.index_select(0, rows)
    new = torch.maximum(old, shift)
    keep, add = (old - new).exp_(), (shift - new).exp_()
    acc.index_copy_(0, rows, acc.index_select(0, rows).mul_(keep).add_(part.mul_(add)))
    total.index_copy_(0, rows, total.index_select(0, rows).mul_(keep).add_(sums.mul_(add)))
    top.index_copy_(0, rows, new)


def score_grads(
    ds: Tensor,
    block: ChunkBlock,
    queries: Tensor,
    keys: tuple[Tensor, Tensor],
    eps: float,
    grad_q: Tensor,
) -> None:
    """Accumulate into the flat query rows ``grad_q`` the gradient from the score gradient
    ``ds`` ``[g, chunk, 3 * chunk]`` of one block, whose queries are ``[g, chunk, d]`` and
    gathered keys and key norms ``([(g + 2) * chunk, d], [(g + 2) * chunk, 1])``; the key
    gradient goes through the key normalisation."""
    chunk, d = ds.shape[1], queries.shape[-1]
    key_vectors, key_norm = keys
    part = torch.bmm(ds, chunk_windows(key_vectors, chunk).transpose(1, 2))
    grad_q.index_add_(0, block.query_rows, part.view(-1, d))
    grad_keys = fold_windows(torch.bmm(ds.transpose(1, 2), queries), chunk)
    part = _normalize_backward(grad_keys, key_vectors, key_norm, eps)
    grad_q.index_add_(0, block.key_rows, part)


class KeyBiasNetwork(Protocol):
    """A key bias ``[N, L, chunk]`` given by a network of per-key features instead of as a
    tensor (GLA's learnable term, :class:`nlsr.attention.gla.KeyBiasMLP`), so that the kernel
    never stores the bias or its gradient (training memory).

    It is a NamedTuple of tensors, the key features ``[N, L, C]`` first: the kernel hands the
    tensors to autograd one by one and rebuilds the network with ``type(net)(*tensors)``; the
    gradient of each tensor is accumulated by :meth:`on_rows_backward`.
    """

    @property
    def features(self) -> Tensor:
        """Key features ``[N, L, C]``."""
        ...

    def __iter__(self) -> Iterator[Tensor]:
        """The network's tensors, features first."""
        ...

    def evaluate(self) -> Tensor:
        """The whole bias ``[N, L, chunk]``, differentiable by plain autograd."""
        ...

    def sliced(self) -> Tensor:
        """The whole bias ``[N, L, chunk]`` without autograd, in bounded memory."""
        ...

    def on_rows(self, rows: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Saved intermediate and bias ``[M, chunk]`` of feature ``rows`` ``[M, C]`` (no
        autograd; the bias is written into ``out`` when given)."""
        ...

    def on_rows_backward(
        self, grad_bias: Tensor, rows: Tensor, hidden: Tensor, grads: list[Tensor]
    ) -> Tensor:
        """Accumulate the gradients of the tensors after the features into ``grads[1:]`` from
        the bias gradient ``[M, chunk]`` of feature ``rows`` (``hidden``: :meth:`on_rows`'s
        intermediate) and return the gradient of the ``rows``."""
        ...

    def truncated(self, width: int) -> KeyBiasNetwork:
        """The network giving the first ``width`` bias columns (query slots)."""
        ...


class _BucketAttention(torch.autograd.Function):
    """Fused bucketed attention (module doc): forward blocks, merged rounds, recomputing backward.

    Keeps the query and value rows, the per-position log-sum-exp and the output for the
    backward pass; no score-sized tensor outlives a block. The key bias is a tensor ``bias``
    or, when ``network`` (a :class:`KeyBiasNetwork` type) and its tensors ``parts`` are given,
    recomputed from the network block by block in the backward pass instead of kept.
    """

    @staticmethod
    def forward(
        ctx: Any,
        queries: Tensor,
        values: Tensor,
        bias: Tensor | None,
        layout: BucketLayout,
        eps: float,
        network: Callable[..., KeyBiasNetwork] | None,
        *parts: Tensor,
    ) -> Tensor:
        n, length, d = queries.shape
        channels, c = values.shape[-1], layout.chunk
        q, norm = folded_query_rows(queries)
        b = None if bias is None else as_rows(bias)
        if network is not None:
            b = as_rows(network(*parts).sliced())
        shift, folded = norm, True  # the folded shift (q, -shift) . (k, 1), module doc
        if b is not None:
            high = b.amax()
            folded = float(high - b.amin()) <= _max_spread(b.dtype)
            if folded:
                shift = norm + high
                q[:, d:] -= high
        width = d + 1 if folded else d  # else: exact row maxima, merged online
        v = as_rows(values, ones=True)
        acc = values.new_zeros(n * length, channels)
        total = values.new_zeros(n * length, 1)
        top = None if folded else values.new_full((n * length, 1), float("-inf"))
        scores = score_workspace(q, layout)
        for blk in layout.blocks():
            qb = q.index_select(0, blk.query_rows).view(blk.count, c, d + 1)[..., :width]
            kb = block_keys(q, norm, blk.key_rows, eps)[0][:, :width]
            bb = None if b is None else b.index_select(0, blk.key_rows)
            e, row_max = block_exp(qb, kb, bb, not folded, scores[: blk.count])
            vb = chunk_windows(v.index_select(0, blk.key_rows), c).transpose(1, 2)
            part = torch.bmm(e, vb).view(-1, channels + 1)[: blk.valid]
            rows = blk.query_rows[: blk.valid]
            weighted, sums = part[:, :channels].contiguous(), part[:, channels:].contiguous()
            if row_max is None:
                acc.index_add_(0, rows, weighted)
                total.index_add_(0, rows, sums)
            else:
                _merge(acc, total, top, rows, weighted, sums, row_max.view(-1, 1)[: blk.valid])
        del b
        keep = any(ctx.needs_input_grad)
        if not keep:  # inference: nothing to keep; free the rows before the output copy
            del q, norm, v
        out = channel_major(acc.div_(total), n)
        del acc
        if not keep:
            return out
        # The value rows (v, 1) are kept instead of `values` (the backward needs rows).
        ctx.rows = (q, norm, total.log_().add_(shift if folded else top), v)  # lse per position
        ctx.save_for_backward(bias, out, *parts)
        ctx.layout, ctx.eps, ctx.network = layout, eps, network
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        bias, out, *parts = ctx.saved_tensors
        q, norm, lse, v = ctx.rows
        layout: BucketLayout = ctx.layout
        channels, c = v.shape[-1] - 1, layout.chunk
        n, length, _ = out.shape
        d = q.shape[1] - 1
        torch.neg(lse, out=q[:, d:])  # (q, -lse) . (k, 1) = score - lse: merged probabilities
        delta = (grad_out * out).sum(dim=-1).view(-1, 1)  # dO_i . O_i
        go = as_rows(grad_out)
        net = ctx.network(*parts) if parts else None
        b = None if bias is None else as_rows(bias)
        features = None if net is None else as_rows(net.features)
        need_q, need_v, need_b = ctx.needs_input_grad[:3]
        grad_q = q.new_zeros(n * length, d) if need_q else None
        grad_v = v.new_zeros(n * length, channels) if need_v else None
        grad_b = b.new_zeros(n * length, c) if need_b and b is not None else None
        grad_net = None
        if net is not None and any(ctx.needs_input_grad[6:]):
            grad_net = [torch.zeros_like(t) for t in (features, *parts[1:])]
        probs, grad_scores = score_workspace(q, layout), score_workspace(q, layout)
        for blk in layout.blocks():
            qb = q.index_select(0, blk.query_rows).view(blk.count, c, d + 1)
            kb, key_norm = block_keys(q, norm, blk.key_rows, ctx.eps)
            bb = None if b is None else b.index_select(0, blk.key_rows)
            if net is not None:
                fb = features.index_select(0, blk.key_rows)
                hidden, bb = net.on_rows(fb)
            p, _ = block_exp(qb, kb, bb, False, probs[: blk.count])
            p.view(-1, 3 * c)[blk.valid :] = 0  # padded query copies are dropped
            gob = go.index_select(0, blk.query_rows)
            if grad_v is not None:
                dv = torch.bmm(p.transpose(1, 2), gob.view(blk.count, c, channels))
                grad_v.index_add_(0, blk.key_rows, fold_windows(dv, c))
            # (dO, -delta) . (v, 1) = dO . v - delta
            gob = torch.cat([gob, delta.index_select(0, blk.query_rows).neg_()], dim=1)
            vb = chunk_windows(v.index_select(0, blk.key_rows), c)
            ds = torch.bmm(gob.view(blk.count, c, -1), vb, out=grad_scores[: blk.count]).mul_(p)
            if grad_q is not None:
                score_grads(ds, blk, qb[..., :d], (kb[:, :d], key_norm), ctx.eps, grad_q)
            if grad_b is not None:
                grad_b.index_add_(0, blk.key_rows, _fold_bias(ds, c))
            if grad_net is not None:
                part = net.on_rows_backward(_fold_bias(ds, c), fb, hidden, grad_net)
                grad_net[0].index_add_(0, blk.key_rows, part)
        del go, b, features, probs, grad_scores
        if grad_net is not None:
            grad_net[0] = channel_major(grad_net[0], n)
        return (
            None if grad_q is None else grad_q.view(n, length, d),
            None if grad_v is None else channel_major(grad_v, n),
            None if grad_b is None else grad_b.view(n, length, c),
            None,
            None,
            None,
            *(grad_net if grad_net is not None else [None] * len(parts)),
        )


def residual(input: Tensor, out: Tensor, scale: float) -> Tensor:
    """``input + scale * out`` in ``input``'s (N, C, H, W) layout for an attention output ``out``
    ``[N, H*W, C]`` (no copy for the channel-major outputs of this module; in place on ``out``
    when no gradient is recorded)."""
    maps = out.transpose(1, 2).contiguous().view_as(input)
    if torch.is_grad_enabled() and (out.requires_grad or input.requires_grad):
        return torch.add(input, maps, alpha=scale)
    return maps.mul_(scale).add_(input)


def check_inputs(queries: Tensor, codes: Tensor) -> None:
    """ValueError unless ``queries`` is ``[N, L, d]`` and ``codes`` ``[N, R, L]`` for the same
    N and L (the inputs of every bucketed computation)."""
    if queries.dim() != 3 or codes.dim() != 3:
        raise ValueError(
            "queries must be [N, L, d] and codes [N, R, L], "
            f"got {tuple(queries.shape)}, {tuple(codes.shape)}"
        )
    n, length, _ = queries.shape
    if codes.shape[0] != n or codes.shape[2] != length:
        raise ValueError(f"codes {tuple(codes.shape)} do not match queries {tuple(queries.shape)}")


@in_float32
def blocked_attention(
    queries: Tensor,
    values: Tensor,
    bias: Tensor | None,
    layout: BucketLayout,
    eps: float,
    network: KeyBiasNetwork | None = None,
) -> Tensor:
    """Bucketed attention ``[N, L, C]`` over ``layout`` by the blocked autograd function (module
    doc), in float32 under autocast; stored channel-major. The key bias is the tensor ``bias``
    ``[N, L, chunk]``, or given by ``network``, or neither."""
    parts = () if network is None else tuple(network)
    net_type = None if network is None else type(network)
    return _BucketAttention.apply(queries, values, bias, layout, eps, net_type, *parts)
