"""Bucketed (sorted-chunk) attention shared by NLSA (NLSN), GLA (DLSN) and LCoA (LCoAN).

All three mechanisms give every position an integer code per round (LSH bucket or k-means
cluster), sort the positions by code, cut the sorted sequence into chunks and let each chunk
attend to itself and its two cyclic neighbour chunks. This module does everything after the
codes, with the released arithmetic:

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

Layout: the gathered sequence is stored chunk-major, ``[n_chunks + 2, batch * rounds, chunk, C]``,
with one cyclic neighbour chunk added on each side, so "previous", "own" and "next" chunks are
contiguous slices ``[0:n]``, ``[1:n + 1]`` and ``[2:n + 2]`` of one tensor: nothing is copied
three times and no all-positions score matrix is ever built (scores are
``3 * chunk`` per query per round).

Collaborative attention (LCoAN) computes a :class:`BucketPattern` once with
:func:`attention_pattern` and applies it to the values of several layers with
:func:`apply_pattern`; gradients flow back into the pattern's probabilities.

Small inputs: the released code needs ``pad <= L`` (the tail it repeats must exist). When the
padding would exceed ``L`` the chunk shrinks to ``L`` (one chunk holding every position once), so
each query attends densely to all positions; see :func:`effective_chunk`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

#: Key normalisation epsilon of the released code (``F.normalize(..., eps=5e-5)``).
KEY_EPS = 5e-5


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


def stable_sort(codes: Tensor) -> tuple[Tensor, Tensor]:
    """Sort positions by code along the last axis, ties in position order.

    ``codes``: integer ``[..., L]``. Returns ``(order, undo)``: ``order[..., s]`` is the position at
    sorted slot ``s`` and ``undo`` its inverse (``undo[..., order[..., s]] == s``).
    """
    order = torch.sort(codes, dim=-1, stable=True).indices
    positions = torch.arange(codes.shape[-1], device=codes.device).expand_as(order)
    undo = torch.empty_like(order).scatter_(-1, order, positions)
    return order, undo


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


def _gather(source: Tensor, rows: Tensor) -> Tensor:
    """Rows ``rows`` of ``source`` ``[B, L, C]`` seen as ``[B*L, C]``: ``rows.shape + (C,)``."""
    flat = source.reshape(-1, source.shape[-1])
    return flat.index_select(0, rows.reshape(-1)).view(*rows.shape, source.shape[-1])


def _exp_shifted(scores: Tensor, lse: Tensor) -> Tensor:
    """``exp(scores - lse)``; in place when no gradient is needed (saves one score-sized buffer)."""
    if scores.requires_grad:
        return torch.exp(scores - lse)
    return scores.sub_(lse).exp_()


@dataclass
class BucketPattern:
    """The attention of one bucketed call, reusable on other values (collaborative attention).

    ``probs`` are the softmax probabilities of each query over its own, previous and next chunk,
    each ``[n_chunks, B*R, chunk, chunk]`` (query slot, key slot; batch-round index ``b*R + r``).
    ``gather_rows`` ``[n_chunks + 2, B*R, chunk]`` are flat ``b*L + position`` rows of the padded
    sorted sequence with one cyclic neighbour chunk on each side; ``output_rows`` ``[B, R, L]``
    locate each position's result in the chunk-major output; ``round_weights`` ``[B, R, L]`` are
    ``softmax_r`` of the per-round log-sum-exp; ``order``/``undo`` ``[B, R, L]`` the stable sort.
    """

    probs: tuple[Tensor, Tensor, Tensor]
    gather_rows: Tensor
    output_rows: Tensor
    round_weights: Tensor
    lse: Tensor
    order: Tensor
    undo: Tensor
    chunk_size: int

    @property
    def batch(self) -> int:
        """Batch size N the pattern was computed for."""
        return self.order.shape[0]

    @property
    def n_rounds(self) -> int:
        """Number of hashing / clustering rounds R."""
        return self.order.shape[1]

    @property
    def length(self) -> int:
        """Number of positions L."""
        return self.order.shape[2]

    @property
    def n_chunks(self) -> int:
        """Chunks per round after padding."""
        return self.gather_rows.shape[0] - 2


def attention_pattern(
    queries: Tensor,
    codes: Tensor,
    chunk_size: int,
    *,
    keys: Tensor | None = None,
    key_bias: Tensor | None = None,
    eps: float = KEY_EPS,
) -> BucketPattern:
    """Sort, chunk and score: the attention probabilities of every query over its neighbourhood.

    ``queries`` ``[N, L, d]`` (un-normalised); ``keys`` ``[N, L, d]`` default to ``queries`` and are
    L2-normalised (eps ``eps``); ``codes`` integer ``[N, R, L]`` (one row per round, no offsets
    needed). ``key_bias`` ``[N, L, >= chunk]``: additive score ``key_bias[j, i]`` for key position
    ``j`` seen by a query in chunk slot ``i`` (GLA's learnable term); only the first
    ``effective_chunk`` slots are used.
    """
    if queries.dim() != 3 or codes.dim() != 3:
        raise ValueError(
            "queries must be [N, L, d] and codes [N, R, L], "
            f"got {tuple(queries.shape)}, {tuple(codes.shape)}"
        )
    n, length, _ = queries.shape
    if codes.shape[0] != n or codes.shape[2] != length:
        raise ValueError(f"codes {tuple(codes.shape)} do not match queries {tuple(queries.shape)}")
    rounds = codes.shape[1]
    if rounds < 1:
        raise ValueError("codes need at least one round")
    chunk = effective_chunk(length, chunk_size)
    device = queries.device

    order, undo = stable_sort(codes)
    offsets = (torch.arange(n, device=device) * length).view(n, 1, 1)
    rows = pad_order(order, chunk) + offsets  # [N, R, Lp] flat rows
    n_chunks = rows.shape[-1] // chunk
    rows = rows.reshape(n * rounds, n_chunks, chunk).transpose(0, 1)  # [nc, NR, c]
    gather_rows = torch.cat([rows[-1:], rows, rows[:1]], dim=0).contiguous()

    keys_n = F.normalize(queries if keys is None else keys, p=2, dim=-1, eps=eps)
    k = _gather(keys_n, gather_rows)  # [nc+2, NR, c, d]
    q = _gather(queries, gather_rows[1 : n_chunks + 1])  # [nc, NR, c, d]
    bias = None if key_bias is None else _gather(key_bias[..., :chunk], gather_rows)

    scores = []
    for start in (1, 0, 2):  # own, previous, next chunk (the released key order)
        s = torch.matmul(q, k[start : start + n_chunks].transpose(-1, -2))
        if bias is not None:
            s = s + bias[start : start + n_chunks].transpose(-1, -2)
        scores.append(s)
    lse = torch.logsumexp(torch.stack([torch.logsumexp(s, dim=-1) for s in scores]), dim=0)
    lse_k = lse.unsqueeze(-1)
    probs = tuple(_exp_shifted(s, lse_k) for s in scores)

    # Position (b, r, p) sits at sorted slot u = undo[b, r, p]: chunk u // c, slot u % c.
    br = torch.arange(n * rounds, device=device).view(n, rounds, 1)
    output_rows = ((undo // chunk) * (n * rounds) + br) * chunk + undo % chunk
    lse_pos = lse.reshape(-1).index_select(0, output_rows.reshape(-1)).view(n, rounds, length)
    round_weights = torch.softmax(lse_pos, dim=1)
    return BucketPattern(
        probs=probs,  # type: ignore[arg-type]
        gather_rows=gather_rows,
        output_rows=output_rows,
        round_weights=round_weights,
        lse=lse_pos,
        order=order,
        undo=undo,
        chunk_size=chunk,
    )


def apply_pattern(pattern: BucketPattern, values: Tensor) -> Tensor:
    """Attend ``values`` ``[N, L, C]`` with a computed pattern: ``[N, L, C]``, rounds merged.

    Used directly for the pattern's own layer and, in LCoAN, for later layers' values.
    """
    n, rounds, length = pattern.order.shape
    if values.dim() != 3 or values.shape[:2] != (n, length):
        raise ValueError(
            f"values {tuple(values.shape)} do not match the pattern's [N={n}, L={length}, C]"
        )
    channels = values.shape[-1]
    nc, c = pattern.n_chunks, pattern.chunk_size
    v = _gather(values, pattern.gather_rows)  # [nc+2, NR, c, C]
    batch = nc * n * rounds
    p_own, p_prev, p_next = (p.reshape(batch, c, c) for p in pattern.probs)
    out = torch.bmm(p_own, v[1 : nc + 1].reshape(batch, c, channels))
    out = out.baddbmm_(p_prev, v[0:nc].reshape(batch, c, channels))
    out = out.baddbmm_(p_next, v[2 : nc + 2].reshape(batch, c, channels))
    out = out.view(-1, channels)
    merged = None
    for r in range(rounds):
        part = out.index_select(0, pattern.output_rows[:, r].reshape(-1)).view(n, length, channels)
        part = part * pattern.round_weights[:, r].unsqueeze(-1)
        merged = part if merged is None else merged + part
    return merged  # type: ignore[return-value]


def bucket_attention(
    queries: Tensor,
    values: Tensor,
    codes: Tensor,
    chunk_size: int,
    *,
    keys: Tensor | None = None,
    key_bias: Tensor | None = None,
    eps: float = KEY_EPS,
) -> Tensor:
    """One-shot bucketed attention: :func:`attention_pattern` then :func:`apply_pattern`."""
    pattern = attention_pattern(queries, codes, chunk_size, keys=keys, key_bias=key_bias, eps=eps)
    return apply_pattern(pattern, values)
