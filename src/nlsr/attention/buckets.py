"""Bucketed (sorted-chunk) attention shared by NLSA (NLSN), GLA (DLSN) and LCoA (LCoAN).

All three mechanisms give every position an integer code per round (LSH bucket or k-means
cluster), sort the positions by code, cut the sorted sequence into chunks and let each chunk
attend to itself and its two cyclic neighbour chunks. This module computes the codes of the
hashing blocks (:func:`hash_codes`) and everything after the codes, with the released arithmetic:

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
* **Training.** :func:`bucket_attention` is one autograd function that keeps the query rows,
  the value rows, its output and the per-position log-sum-exp, and recomputes each block's keys
  and probabilities in the backward pass (FlashAttention style), so training memory is O(L).
* **Output layout.** Results are stored channel-major (their ``transpose(1, 2)`` is a contiguous
  feature map) and row-major copies are made with ``copy_``'s blocked 2-D transposes.
* **SDPA (one round).** ``bucket_attention(..., backend="sdpa")`` instead gathers every chunk's
  queries and its window of ``3 * chunk`` keys and values (one ``index_select`` each, same
  layout and padding), passes the key bias as a float mask and calls
  ``F.scaled_dot_product_attention`` with ``scale=1``, whose fused CUDA kernels and backward do
  the rest. It returns no log-sum-exp, so it cannot merge rounds; ``backend="auto"`` takes it
  only for one round on CUDA and keeps the blocked path everywhere else
  (:func:`choose_backend`).

Collaborative attention (LCoAN) computes a :class:`BucketPattern` -- the merged probabilities,
materialised once -- with :func:`attention_pattern` and applies it to the values of several
layers with :func:`apply_pattern`; gradients flow back into the pattern's probabilities.

Small inputs: the released code needs ``pad <= L`` (the tail it repeats must exist). When the
padding would exceed ``L`` the chunk shrinks to ``L`` (one chunk holding every position once), so
each query attends densely to all positions; see :func:`effective_chunk`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from nlsr.attention import in_float32

#: Key normalisation epsilon of the released code (``F.normalize(..., eps=5e-5)``).
KEY_EPS = 5e-5
#: Scores computed at once (one block of chunks): 2**20 float32 values are 4 MiB per buffer.
BLOCK_ELEMENTS = 2**20
#: Computations of :func:`bucket_attention`: choose automatically, the blocked autograd
#: function, or ``torch.nn.functional.scaled_dot_product_attention`` (one round only).
BACKENDS = ("auto", "blocked", "sdpa")


def bucket_count(length: int, chunk_size: int, cap: int = 128, minimum: int = 1) -> int:
    """Released number of hash buckets ``min(L//c + (L//c) % 2, cap)``, raised to ``minimum``.

    The release gets 0 buckets (and crashes) for ``L < chunk_size``; ``minimum`` keeps hashing
    defined there (with a single chunk the codes do not change the result).
    """
    n = length // chunk_size
    return max(min(n + n % 2, cap), minimum)


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


def hash_codes(x: Tensor, projections: Tensor, signed: bool) -> Tensor:
    """LSH codes ``[N, R, L]`` of embeddings ``x`` ``[N, L, d]`` with ``projections`` ``[d, R, I]``.

    Round ``r`` gives ``argmax_i (x W_r)_i``, or with ``signed`` (spherical LSH, NLSN)
    ``argmax`` over ``[x W_r, -x W_r]``; ties go to the first index, as ``torch.argmax``. The
    projections are computed in blocks of positions, so memory stays bounded, and the index of
    the first maximum is found with vectorised reductions (``torch.argmax`` over a short last
    axis is several times slower).
    """
    n, length, d = x.shape
    rounds, width = projections.shape[1], projections.shape[2]
    weights = projections.reshape(d, rounds * width).t()  # [R*I, d]
    rank = torch.arange(width, 0, -1, dtype=x.dtype, device=x.device).view(width, 1)
    codes = torch.empty(n, rounds, length, dtype=torch.long, device=x.device)
    step = max(1, BLOCK_ELEMENTS // (rounds * width))
    for b in range(n):
        for start in range(0, length, step):
            # [R, I, positions]: the reductions over I run along rows, vectorised
            part = torch.mm(weights, x[b, start : start + step].t()).view(rounds, width, -1)
            target = part.amax(dim=1, keepdim=True)
            if signed:
                low = part.amin(dim=1, keepdim=True)
                positive = target >= -low
                target = torch.where(positive, target, low)
            first = width - part.sub_(target).eq_(0).mul_(rank).amax(dim=1).long()
            if signed:
                first += width * (~positive).squeeze(1)
            codes[b, :, start : start + step] = first
    return codes


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


class _Block(NamedTuple):
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

    def blocks(self) -> Iterator[_Block]:
        """Every block of every sequence, in order."""
        c, nc, step = self.chunk, self.n_chunks, self.chunks_per_block()
        for seq in range(self.batch * self.rounds):
            row = self.rows[seq]
            for first in range(0, nc, step):
                count = min(step, nc - first)
                yield _Block(
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


def _windows(rows: Tensor, chunk: int) -> Tensor:
    """Gathered ``[(g + 2) * chunk, F]`` rows as ``g`` overlapping windows ``[g, F, 3 * chunk]``
    (previous, own and next chunk of each of the block's chunks); a view, nothing is copied."""
    return rows.unfold(0, 3 * chunk, chunk)


def _block_exp(
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
    key_windows = _windows(keys, chunk)
    if bias is None:
        scores = torch.bmm(queries, key_windows, out=out)
    else:
        scores = torch.baddbmm(_bias_windows(bias, chunk), queries, key_windows, out=out)
    shift = None
    if exact_max:
        shift = scores.amax(dim=-1, keepdim=True)
        scores.sub_(shift)
    return scores.exp_(), shift


def _workspace(like: Tensor, layout: BucketLayout) -> Tensor:
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


def _fold(parts: Tensor, chunk: int) -> Tensor:
    """Sum window results ``[g, 3 * chunk, F]`` back onto the gathered rows ``[(g + 2) * chunk, F]``
    they came from (the adjoint of :func:`_windows`)."""
    g, _, width = parts.shape
    rows = parts.new_zeros(g + 2, chunk, width)
    for k in range(3):
        rows[k : k + g] += parts[:, k * chunk : (k + 1) * chunk]
    return rows.view(-1, width)


def _rows(x: Tensor, ones: bool = False) -> Tensor:
    """``[N, L, F]`` as row-major ``[N*L, F]``, or ``[N*L, F + 1]`` with a column of ones
    appended (``ones``: value rows ``(v, 1)``, so every block's gathered rows give
    ``p @ (v, 1)``, the weighted values and the row sums, without a per-block copy). A
    channel-major ``x`` (the transposed view of a convolution output) is transposed one batch
    item at a time: ``copy_`` takes its blocked 2-D transpose path there, several times faster
    than a strided 3-D copy."""
    n, length, width = x.shape
    channel_major = not x.is_contiguous() and x.stride(1) == 1 and x.stride(2) == length
    if not ones and not channel_major:
        return x.reshape(n * length, width)
    rows = x.new_empty(n * length, width + ones)
    if ones:
        rows[:, width] = 1.0
    for b in range(n):
        rows[b * length : (b + 1) * length, :width].copy_(x[b])
    return rows


def _channel_major(rows: Tensor, n: int) -> Tensor:
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


def _query_rows(queries: Tensor) -> tuple[Tensor, Tensor]:
    """Rows ``(q, -|q|)`` ``[N*L, d + 1]`` (the folded softmax shift, module doc) and the norms
    ``|q|`` ``[N*L, 1]``; the keys are made from them block by block (:func:`_block_keys`)."""
    rows = _rows(queries)
    norm = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
    return torch.cat([rows, norm.neg()], dim=1), norm


def _block_keys(queries: Tensor, norm: Tensor, rows: Tensor, eps: float) -> tuple[Tensor, Tensor]:
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


def _score_grads(
    ds: Tensor,
    block: _Block,
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
    part = torch.bmm(ds, _windows(key_vectors, chunk).transpose(1, 2))
    grad_q.index_add_(0, block.query_rows, part.view(-1, d))
    grad_keys = _fold(torch.bmm(ds.transpose(1, 2), queries), chunk)
    part = _normalize_backward(grad_keys, key_vectors, key_norm, eps)
    grad_q.index_add_(0, block.key_rows, part)


#: Positions per slice when :meth:`KeyBiasMLP.sliced` evaluates the bias.
MLP_SLICE = 2**16


class KeyBiasMLP(NamedTuple):
    """A key bias given by its parts: ``W2 relu(W1 f_j + b1) + b2`` of the key features
    ``features`` ``[N, L, C]`` (GLA's learnable term ``fc(f_j)``). The blocked computation
    evaluates it in slices of positions and recomputes it block by block in the backward pass,
    so neither the ``[N, L, chunk]`` bias nor its gradient is ever stored (training memory)."""

    features: Tensor
    weight1: Tensor
    bias1: Tensor
    weight2: Tensor
    bias2: Tensor

    def evaluate(self) -> Tensor:
        """The whole bias ``[N, L, chunk]``, differentiable by plain autograd."""
        hidden = torch.nn.functional.linear(self.features, self.weight1, self.bias1).relu()
        return torch.nn.functional.linear(hidden, self.weight2, self.bias2)

    @torch.no_grad()
    def sliced(self) -> Tensor:
        """The whole bias ``[N, L, chunk]`` without autograd, evaluated on slices of positions
        so that the row-major copy of the features never covers the whole map; in the weights'
        dtype, also under autocast (the bias is added to float32 scores)."""
        n, length, _ = self.features.shape
        out = self.features.new_empty(n, length, self.weight2.shape[0], dtype=self.weight2.dtype)
        with torch.autocast(self.features.device.type, enabled=False):
            for b in range(n):
                for start in range(0, length, MLP_SLICE):
                    stop = min(length, start + MLP_SLICE)
                    self.on_rows(self.features[b, start:stop], out=out[b, start:stop])
        return out

    def on_rows(self, rows: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Hidden layer and bias ``([M, hidden], [M, chunk])`` of feature ``rows`` ``[M, C]``
        in the weights' dtype (no autograd; the bias is written into ``out`` when given)."""
        rows = rows.to(self.weight1.dtype)
        hidden = torch.addmm(self.bias1, rows, self.weight1.t()).relu_()
        return hidden, torch.addmm(self.bias2, hidden, self.weight2.t(), out=out)

    def truncated(self, width: int) -> KeyBiasMLP:
        """The MLP giving the first ``width`` bias columns (query slots)."""
        return self._replace(weight2=self.weight2[:width], bias2=self.bias2[:width])


def _mlp_backward(
    grad_bias: Tensor, rows: Tensor, hidden: Tensor, mlp: KeyBiasMLP, grads: list[Tensor]
) -> Tensor:
    """Accumulate the MLP's parameter gradients ``grads`` ``[_, dW1, db1, dW2, db2]`` from a
    block's bias gradient ``[M, chunk]`` and return the gradient of its feature ``rows``."""
    grads[3].addmm_(grad_bias.t(), hidden)
    grads[4].add_(grad_bias.sum(dim=0))
    grad_hidden = torch.ops.aten.threshold_backward(torch.mm(grad_bias, mlp.weight2), hidden, 0)
    grads[1].addmm_(grad_hidden.t(), rows)
    grads[2].add_(grad_hidden.sum(dim=0))
    return torch.mm(grad_hidden, mlp.weight1)


class _BucketAttention(torch.autograd.Function):
    """Fused bucketed attention (module doc): forward blocks, merged rounds, recomputing backward.

    Keeps the query and value rows, the per-position log-sum-exp and the output for the
    backward pass; no score-sized tensor outlives a block. The key bias is a tensor ``bias``
    or, when ``mlp`` (the five tensors of a :class:`KeyBiasMLP`) is given, recomputed from the
    MLP block by block in the backward pass instead of kept.
    """

    @staticmethod
    def forward(
        ctx: Any,
        queries: Tensor,
        values: Tensor,
        bias: Tensor | None,
        layout: BucketLayout,
        eps: float,
        *mlp: Tensor,
    ) -> Tensor:
        n, length, d = queries.shape
        channels, c = values.shape[-1], layout.chunk
        q, norm = _query_rows(queries)
        b = _rows(KeyBiasMLP(*mlp).sliced()) if mlp else None if bias is None else _rows(bias)
        shift, folded = norm, True  # the folded shift (q, -shift) . (k, 1), module doc
        if b is not None:
            high = b.amax()
            folded = float(high - b.amin()) <= _max_spread(b.dtype)
            if folded:
                shift = norm + high
                q[:, d:] -= high
        width = d + 1 if folded else d  # else: exact row maxima, merged online
        v = _rows(values, ones=True)
        acc = values.new_zeros(n * length, channels)
        total = values.new_zeros(n * length, 1)
        top = None if folded else values.new_full((n * length, 1), float("-inf"))
        scores = _workspace(q, layout)
        for blk in layout.blocks():
            qb = q.index_select(0, blk.query_rows).view(blk.count, c, d + 1)[..., :width]
            kb = _block_keys(q, norm, blk.key_rows, eps)[0][:, :width]
            bb = None if b is None else b.index_select(0, blk.key_rows)
            e, row_max = _block_exp(qb, kb, bb, not folded, scores[: blk.count])
            vb = _windows(v.index_select(0, blk.key_rows), c).transpose(1, 2)
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
        out = _channel_major(acc.div_(total), n)
        del acc
        if not keep:
            return out
        # The value rows (v, 1) are kept instead of `values` (the backward needs rows).
        ctx.rows = (q, norm, total.log_().add_(shift if folded else top), v)  # lse per position
        ctx.save_for_backward(bias, out, *mlp)
        ctx.layout, ctx.eps = layout, eps
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
        go = _rows(grad_out)
        mlp = KeyBiasMLP(*parts) if parts else None
        b = None if bias is None else _rows(bias)
        features = None if mlp is None else _rows(mlp.features)
        need_q, need_v, need_b = ctx.needs_input_grad[:3]
        grad_q = q.new_zeros(n * length, d) if need_q else None
        grad_v = v.new_zeros(n * length, channels) if need_v else None
        grad_b = b.new_zeros(n * length, c) if need_b and b is not None else None
        grad_mlp = None
        if mlp is not None and any(ctx.needs_input_grad[5:]):
            grad_mlp = [torch.zeros_like(t) for t in (features, *parts[1:])]
        probs, grad_scores = _workspace(q, layout), _workspace(q, layout)
        for blk in layout.blocks():
            qb = q.index_select(0, blk.query_rows).view(blk.count, c, d + 1)
            kb, key_norm = _block_keys(q, norm, blk.key_rows, ctx.eps)
            bb = None if b is None else b.index_select(0, blk.key_rows)
            if mlp is not None:
                fb = features.index_select(0, blk.key_rows)
                hidden, bb = mlp.on_rows(fb)
            p, _ = _block_exp(qb, kb, bb, False, probs[: blk.count])
            p.view(-1, 3 * c)[blk.valid :] = 0  # padded query copies are dropped
            gob = go.index_select(0, blk.query_rows)
            if grad_v is not None:
                dv = torch.bmm(p.transpose(1, 2), gob.view(blk.count, c, channels))
                grad_v.index_add_(0, blk.key_rows, _fold(dv, c))
            # (dO, -delta) . (v, 1) = dO . v - delta
            gob = torch.cat([gob, delta.index_select(0, blk.query_rows).neg_()], dim=1)
            vb = _windows(v.index_select(0, blk.key_rows), c)
            ds = torch.bmm(gob.view(blk.count, c, -1), vb, out=grad_scores[: blk.count]).mul_(p)
            if grad_q is not None:
                _score_grads(ds, blk, qb[..., :d], (kb[:, :d], key_norm), ctx.eps, grad_q)
            if grad_b is not None:
                grad_b.index_add_(0, blk.key_rows, _fold_bias(ds, c))
            if grad_mlp is not None:
                part = _mlp_backward(_fold_bias(ds, c), fb, hidden, mlp, grad_mlp)
                grad_mlp[0].index_add_(0, blk.key_rows, part)
        del go, b, features, probs, grad_scores
        if grad_mlp is not None:
            grad_mlp[0] = _channel_major(grad_mlp[0], n)
        return (
            None if grad_q is None else grad_q.view(n, length, d),
            None if grad_v is None else _channel_major(grad_v, n),
            None if grad_b is None else grad_b.view(n, length, c),
            None,
            None,
            *(grad_mlp if grad_mlp is not None else [None] * len(parts)),
        )


def residual(input: Tensor, out: Tensor, scale: float) -> Tensor:
    """``input + scale * out`` in ``input``'s (N, C, H, W) layout for an attention output ``out``
    ``[N, H*W, C]`` (no copy for the channel-major outputs of this module; in place on ``out``
    when no gradient is recorded)."""
    maps = out.transpose(1, 2).contiguous().view_as(input)
    if torch.is_grad_enabled() and (out.requires_grad or input.requires_grad):
        return torch.add(input, maps, alpha=scale)
    return maps.mul_(scale).add_(input)


def check_hashing_options(
    kind: str, channels: int, reduction: int, n_hashes: int, chunk_size: int
) -> None:
    """The constructor checks shared by the hashing blocks (NLSA, GLA); ``kind`` names the block
    in the message."""
    if channels % reduction or channels < reduction:
        raise ValueError(
            f"{kind}: channels ({channels}) must be a multiple of reduction ({reduction})"
        )
    if n_hashes < 1 or chunk_size < 1:
        raise ValueError(
            f"{kind}: n_hashes and chunk_size must be >= 1, got {n_hashes}, {chunk_size}"
        )


def check_backend(backend: str) -> str:
    """``backend`` if it names a computation of :func:`bucket_attention`, else a ValueError (so
    that a misspelt option fails when a block is built, not at its first forward)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def choose_backend(backend: str, queries: Tensor, rounds: int) -> str:
    """The computation (``"blocked"`` or ``"sdpa"``) that ``backend`` means for ``rounds`` rounds
    of ``queries``: ``"auto"`` takes SDPA only for one round on CUDA, where fused kernels exist.

    SDPA returns no log-sum-exp, which the merge of several rounds needs, so an explicit
    ``"sdpa"`` with ``rounds > 1`` is a ValueError.
    """
    if check_backend(backend) == "auto":
        return "sdpa" if rounds == 1 and queries.is_cuda else "blocked"
    if backend == "sdpa" and rounds > 1:
        raise ValueError(
            f"attention backend 'sdpa' handles a single hash round, got {rounds} rounds "
            "(merging rounds needs their log-sum-exp): use 'blocked' or 'auto'"
        )
    return backend


@in_float32
def _sdpa_attention(
    queries: Tensor, values: Tensor, bias: Tensor | None, layout: BucketLayout, eps: float
) -> Tensor:
    """One-round bucketed attention ``[N, L, C]`` (row-major) with
    ``F.scaled_dot_product_attention`` over the chunks, differentiable through its autograd.

    Every chunk is one "head" ``[chunk, d]`` attending to its window of ``3 * chunk`` keys
    (previous, own, next chunk), gathered with one ``index_select`` each; the key bias is a
    float mask viewing the gathered rows as overlapping windows, as :func:`_bias_windows` does.
    Padded query copies are computed and dropped by the final un-sorting gather.
    """
    n, length, d = queries.shape
    c, nc = layout.chunk, layout.n_chunks
    q = _rows(queries)
    v = _rows(values)
    keys = torch.nn.functional.normalize(q, dim=-1, eps=eps)
    windows = layout.rows.unfold(1, 3 * c, c).reshape(-1)  # [N * nc * 3c] key rows
    slots = layout.rows[:, c:-c]  # [N, nc * c] query rows in sorted order
    mask = None
    if bias is not None:
        by_slot = _rows(bias).index_select(0, layout.rows.reshape(-1))
        by_slot = by_slot.view(n, -1, c).transpose(1, 2).contiguous()  # [N, c, (nc + 2) * c]
        mask = by_slot.unfold(2, 3 * c, c).transpose(1, 2)  # [N, nc, c (query), 3c (key)]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.index_select(0, slots.reshape(-1)).view(n, nc, c, d),
        keys.index_select(0, windows).view(n, nc, 3 * c, d),
        v.index_select(0, windows).view(n, nc, 3 * c, -1),
        attn_mask=mask,
        scale=1.0,
    )
    # Un-sort: the first L sorted slots of each sequence hold every position once.
    flat_slots = torch.arange(n * nc * c, device=slots.device).view(n, -1)[:, :length]
    positions = slots[:, :length].reshape(-1)
    where = torch.empty_like(positions).index_copy_(0, positions, flat_slots.reshape(-1))
    return out.reshape(n * nc * c, -1).index_select(0, where).view(n, length, -1)


def _check(queries: Tensor, codes: Tensor) -> None:
    if queries.dim() != 3 or codes.dim() != 3:
        raise ValueError(
            "queries must be [N, L, d] and codes [N, R, L], "
            f"got {tuple(queries.shape)}, {tuple(codes.shape)}"
        )
    n, length, _ = queries.shape
    if codes.shape[0] != n or codes.shape[2] != length:
        raise ValueError(f"codes {tuple(codes.shape)} do not match queries {tuple(queries.shape)}")


def bucket_attention(
    queries: Tensor,
    values: Tensor,
    codes: Tensor,
    chunk_size: int,
    *,
    key_bias: Tensor | KeyBiasMLP | None = None,
    eps: float = KEY_EPS,
    backend: str = "auto",
) -> Tensor:
    """Bucketed attention ``[N, L, C]`` with rounds merged (module doc), differentiable.

    ``queries`` ``[N, L, d]`` (un-normalised; the keys are ``normalize(queries)``, eps ``eps``),
    ``values`` ``[N, L, C]``, ``codes`` integer ``[N, R, L]`` (one row per round, no offsets
    needed). ``key_bias`` ``[N, L, >= chunk]``: additive score ``key_bias[j, i]`` for key position
    ``j`` seen by a query in chunk slot ``i`` (GLA's learnable term); only the first
    ``effective_chunk`` slots are used. A :class:`KeyBiasMLP` instead gives the bias by its
    parts (the blocked computation then never stores it; the SDPA one evaluates it whole).
    ``backend`` (:data:`BACKENDS`) picks the computation
    (:func:`choose_backend`). The blocked result is stored channel-major (its
    ``transpose(1, 2)`` is contiguous), the SDPA result row-major; :func:`residual` takes both.
    """
    _check(queries, codes)
    if values.dim() != 3 or values.shape[:2] != queries.shape[:2]:
        raise ValueError(
            f"values {tuple(values.shape)} do not match queries {tuple(queries.shape)}"
        )
    use_sdpa = choose_backend(backend, queries, codes.shape[1]) == "sdpa"
    layout = bucket_layout(codes, chunk_size)
    mlp = key_bias.truncated(layout.chunk) if isinstance(key_bias, KeyBiasMLP) else None
    bias = None if key_bias is None or mlp is not None else key_bias[..., : layout.chunk]
    if use_sdpa:
        bias = mlp.evaluate() if mlp is not None else bias
        return _sdpa_attention(queries, values, bias, layout, eps)
    return _blocked_attention(queries, values, bias, layout, eps, *(mlp or ()))


@in_float32
def _blocked_attention(
    queries: Tensor,
    values: Tensor,
    bias: Tensor | None,
    layout: BucketLayout,
    eps: float,
    *mlp: Tensor,
) -> Tensor:
    """The blocked computation (module doc), in float32 under autocast; ``mlp``: the tensors
    of a :class:`KeyBiasMLP`, or none."""
    return _BucketAttention.apply(queries, values, bias, layout, eps, *mlp)


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
        q, norm = _query_rows(queries)
        probs = q.new_empty(n * layout.rounds, layout.n_chunks, c, 3 * c)
        total = q.new_zeros(n * length, 1)
        for blk in layout.blocks():
            qb = q.index_select(0, blk.query_rows).view(blk.count, c, -1)
            kb = _block_keys(q, norm, blk.key_rows, eps)[0]
            span = probs[blk.seq, blk.first : blk.first + blk.count]
            e, _ = _block_exp(qb, kb, None, False, span)
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
        grad_scores = _workspace(q, layout)
        for blk in layout.blocks():
            span = slice(blk.first, blk.first + blk.count)
            rows_delta = delta.index_select(0, blk.query_rows).view(blk.count, c, 1)
            ds = torch.sub(grad_probs[blk.seq, span], rows_delta, out=grad_scores[: blk.count])
            ds.mul_(probs[blk.seq, span])
            qb = q.index_select(0, blk.query_rows).view(blk.count, c, d + 1)[..., :d]
            kb, key_norm = _block_keys(q, norm, blk.key_rows, ctx.eps)
            _score_grads(ds, blk, qb, (kb[:, :d], key_norm), ctx.eps, grad_q)
        return grad_q.view(n, length, d), None, None


class _ApplyPattern(torch.autograd.Function):
    """``out[p] = sum over rounds and keys of probs * values``: a pattern applied to values."""

    @staticmethod
    def forward(ctx: Any, probs: Tensor, values: Tensor, layout: BucketLayout) -> Tensor:
        n, length, channels = values.shape
        c = layout.chunk
        v = _rows(values)
        out = values.new_zeros(n * length, channels)
        for blk in layout.blocks():
            vb = _windows(v.index_select(0, blk.key_rows), c).transpose(1, 2)
            part = torch.bmm(probs[blk.seq, blk.first : blk.first + blk.count], vb)
            out.index_add_(0, blk.query_rows[: blk.valid], part.view(-1, channels)[: blk.valid])
        ctx.save_for_backward(probs, values)
        ctx.layout = layout
        return _channel_major(out, n)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        probs, values = ctx.saved_tensors
        layout: BucketLayout = ctx.layout
        n, length, channels = values.shape
        c = layout.chunk
        go, v = _rows(grad_out), _rows(values)
        need_p, need_v = ctx.needs_input_grad[:2]
        grad_p = torch.empty_like(probs) if need_p else None
        grad_v = values.new_zeros(n * length, channels) if need_v else None
        for blk in layout.blocks():
            span = slice(blk.first, blk.first + blk.count)
            gob = go.index_select(0, blk.query_rows).view(blk.count, c, channels)
            if grad_p is not None:
                vb = _windows(v.index_select(0, blk.key_rows), c)
                torch.bmm(gob, vb, out=grad_p[blk.seq, span])
            if grad_v is not None:
                part = torch.bmm(probs[blk.seq, span].transpose(1, 2), gob)
                grad_v.index_add_(0, blk.key_rows, _fold(part, c))
        return grad_p, None if grad_v is None else _channel_major(grad_v, n), None


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
) -> BucketPattern:
    """Sort, chunk and score once: the merged attention probabilities of every query.

    ``queries`` ``[N, L, d]`` (keys are ``normalize(queries)``, eps ``eps``), ``codes`` integer
    ``[N, R, L]``. Gradients reach ``queries`` through every :func:`apply_pattern` of the result.
    """
    _check(queries, codes)
    layout = bucket_layout(codes, chunk_size)
    probs, lse = _PatternProbabilities.apply(queries, layout, eps)
    return BucketPattern(probs=probs, layout=layout, lse=lse)


@in_float32
def apply_pattern(pattern: BucketPattern, values: Tensor) -> Tensor:
    """Attend ``values`` ``[N, L, C]`` with a computed pattern: ``[N, L, C]``, rounds merged.

    Used directly for the pattern's own layer and, in LCoAN, for later layers' values.
    """
    n, length = pattern.batch, pattern.length
    if values.dim() != 3 or values.shape[:2] != (n, length):
        raise ValueError(
            f"values {tuple(values.shape)} do not match the pattern's [N={n}, L={length}, C]"
        )
    return _ApplyPattern.apply(pattern.probs, values, pattern.layout)
