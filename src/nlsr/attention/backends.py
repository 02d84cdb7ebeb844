"""Which computation runs a bucketed attention: the blocked kernel or PyTorch's SDPA.

:func:`bucket_attention` is the entry point of NLSA, GLA and LCoA. It builds the sorted-chunk
layout (:mod:`nlsr.attention.buckets`) and runs either the kernel's blocked autograd function or,
for one round, ``F.scaled_dot_product_attention``: every chunk's queries and its window of
``3 * chunk`` keys and values are gathered (one ``index_select`` each, same layout and padding),
the key bias is passed as a float mask and SDPA runs with ``scale=1``, whose fused CUDA kernels
and backward do the rest. SDPA returns no log-sum-exp, so it cannot merge rounds;
``backend="auto"`` takes it only for one round on CUDA and keeps the blocked path everywhere else
(:func:`choose_backend`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from nlsr.attention.buckets import (
    KEY_EPS,
    BucketLayout,
    KeyBiasNetwork,
    as_rows,
    blocked_attention,
    bucket_layout,
    check_inputs,
)
from nlsr.attention.precision import in_float32

#: Computations of :func:`bucket_attention`: choose automatically, the blocked autograd
#: function, or ``torch.nn.functional.scaled_dot_product_attention`` (one round only).
BACKENDS = ("auto", "blocked", "sdpa")


def bucket_attention(
    queries: Tensor,
    values: Tensor,
    codes: Tensor,
    chunk_size: int,
    *,
    key_bias: Tensor | KeyBiasNetwork | None = None,
    eps: float = KEY_EPS,
    backend: str = "auto",
) -> Tensor:
    """Bucketed attention ``[N, L, C]`` with rounds merged (module doc), differentiable.

    ``queries`` ``[N, L, d]`` (un-normalised; the keys are ``normalize(queries)``, eps ``eps``),
    ``values`` ``[N, L, C]``, ``codes`` integer ``[N, R, L]`` (one row per round, no offsets
    needed). ``key_bias`` ``[N, L, >= chunk]``: additive score ``key_bias[j, i]`` for key position
    ``j`` seen by a query in chunk slot ``i`` (GLA's learnable term); only the first
    ``effective_chunk`` slots are used. A :class:`~nlsr.attention.buckets.KeyBiasNetwork`
    instead gives the bias by a network of the key features (the blocked computation then
    never stores it; the SDPA one evaluates it whole).
    ``backend`` (:data:`BACKENDS`) picks the computation
    (:func:`choose_backend`). The blocked result is stored channel-major (its
    ``transpose(1, 2)`` is contiguous), the SDPA result row-major;
    :func:`nlsr.attention.buckets.residual` takes both.
    """
    check_inputs(queries, codes)
    if values.dim() != 3 or values.shape[:2] != queries.shape[:2]:
        raise ValueError(
            f"values {tuple(values.shape)} do not match queries {tuple(queries.shape)}"
        )
    if exporting():
        if key_bias is not None and not isinstance(key_bias, Tensor):
            key_bias = key_bias.evaluate()
        return exported_attention(queries, values, codes, chunk_size, key_bias, eps)
    use_sdpa = choose_backend(backend, queries, codes.shape[1]) == "sdpa"
    layout = bucket_layout(codes, chunk_size)
    net = None
    if key_bias is not None and not isinstance(key_bias, Tensor):
        net = key_bias.truncated(layout.chunk)
    bias = None if key_bias is None or net is not None else key_bias[..., : layout.chunk]
    if use_sdpa:
        bias = net.evaluate() if net is not None else bias
        return _sdpa_attention(queries, values, bias, layout, eps)
    return blocked_attention(queries, values, bias, layout, eps, net)


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
    float mask viewing the gathered rows as overlapping windows, as the blocked kernel does.
    Padded query copies are computed and dropped by the final un-sorting gather.
    """
    n, length, d = queries.shape
    c, nc = layout.chunk, layout.n_chunks
    q = as_rows(queries)
    v = as_rows(values)
    keys = torch.nn.functional.normalize(q, dim=-1, eps=eps)
    windows = layout.rows.unfold(1, 3 * c, c).reshape(-1)  # [N * nc * 3c] key rows
    slots = layout.rows[:, c:-c]  # [N, nc * c] query rows in sorted order
    mask = None
    if bias is not None:
        by_slot = as_rows(bias).index_select(0, layout.rows.reshape(-1))
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


def exporting() -> bool:
    """True while ``torch.export`` (and so ``torch.onnx.export(..., dynamo=True)``) traces a
    model: the attention blocks then take their traceable path (docs/deploy.md)."""
    return torch.compiler.is_exporting()


class ExportedPattern(NamedTuple):
    """Who attends to whom in :func:`exported_pattern`: key positions ``[N, R, nc, 3c]`` of every
    chunk's window, probabilities ``[N, R, nc, c, 3c]`` already weighted by the round merge, and
    the slot of each position in each round's sorted order ``[N, R, L, 1]``."""

    key_positions: Tensor
    probs: Tensor
    unsort: Tensor


def exported_pattern(
    queries: Tensor,
    codes: Tensor,
    chunk_size: int,
    key_bias: Tensor | None = None,
    eps: float = KEY_EPS,
) -> ExportedPattern:
    """The attention pattern of :func:`bucket_attention` as one traceable computation for
    export: no loop over blocks, no autograd function, every shape a symbolic expression of
    ``L``. Same arithmetic (stable sort, tail padding, cyclic neighbour chunks, round merge by
    log-sum-exp), all chunks scored at once, so memory is ``O(R * L * 3 * chunk)``."""
    check_inputs(queries, codes)
    n, rounds, length = codes.shape
    c, device = chunk_size, codes.device
    nc = (length + c - 1) // c
    pad = nc * c - length
    position = torch.arange(length, device=device)
    # codes * L + position are distinct, so any sort of them is the stable sort of the codes
    order = torch.argsort(codes * length + position, dim=-1)  # [N, R, L]
    slot = torch.arange(nc * c, device=device)
    tail = slot - pad  # padding repeats sorted slots L - pad .. L - 1
    # Where the tail is undefined (pad > L, effective_chunk's one-chunk case) the padded slots
    # are masked out as keys instead: the single chunk then attends densely, as released.
    masked = (slot >= length) & (tail[:1] + length < 0)  # tail[0] + L = L - pad
    slots = order[..., torch.where(slot < length, slot, tail.clamp(min=0))]
    own = torch.arange(nc, device=device)
    cyclic = (torch.cat([own[-1:], own[:-1]]), own, torch.cat([own[1:], own[:1]]))
    window = torch.stack(cyclic, dim=1).unsqueeze(-1)  # [nc, 3, 1]: previous, own, next chunk
    key_slots = (window * c + torch.arange(c, device=device)).view(nc, 3 * c)
    batch = torch.arange(n, device=device).view(n, 1, 1, 1)
    query_pos = slots.view(n, rounds, nc, c)
    key_pos = slots[..., key_slots]  # [N, R, nc, 3c]
    keys = torch.nn.functional.normalize(queries, dim=-1, eps=eps)
    scores = torch.matmul(queries[batch, query_pos], keys[batch, key_pos].transpose(-1, -2))
    if key_bias is not None:
        scores = scores + key_bias[..., :c][batch, key_pos].transpose(-1, -2)
    scores = scores.masked_fill(masked[key_slots].view(nc, 1, 3 * c), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [N, R, nc, c, 1]
    # the first L sorted slots hold every position once: its round weight softmax_r(lse_r)
    unsort = torch.argsort(order, dim=-1).unsqueeze(-1)  # [N, R, L, 1]
    merge = torch.softmax(lse.reshape(n, rounds, nc * c, 1)[:, :, :length].gather(2, unsort), 1)
    by_slot = merge.gather(2, order.unsqueeze(-1))  # [N, R, L, 1] in sorted order
    by_slot = torch.cat([by_slot, by_slot.new_zeros(n, rounds, pad, 1)], dim=2)
    probs = torch.exp(scores - lse) * by_slot.view(n, rounds, nc, c, 1)
    return ExportedPattern(key_pos, probs, unsort)


def exported_apply(pattern: ExportedPattern, values: Tensor) -> Tensor:
    """The attention output ``[N, L, C]`` of ``values`` ``[N, L, C]`` under ``pattern``."""
    n, rounds, nc, c, _ = pattern.probs.shape
    length = pattern.unsort.shape[2]
    batch = torch.arange(n, device=values.device).view(n, 1, 1, 1)
    out = torch.matmul(pattern.probs, values[batch, pattern.key_positions])
    out = out.reshape(n, rounds, nc * c, -1)[:, :, :length]  # drop the padded query copies
    return out.gather(2, pattern.unsort.expand(-1, -1, -1, out.shape[-1])).sum(dim=1)


def exported_attention(
    queries: Tensor,
    values: Tensor,
    codes: Tensor,
    chunk_size: int,
    key_bias: Tensor | None,
    eps: float = KEY_EPS,
) -> Tensor:
    """:func:`bucket_attention` for export (:func:`exported_pattern`), ``[N, L, C]``."""
    return exported_apply(exported_pattern(queries, codes, chunk_size, key_bias, eps), values)
