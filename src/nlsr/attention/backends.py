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
