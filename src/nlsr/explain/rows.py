"""The attention rows of chosen queries, computed with each block's own functions.

Given a block's captured input (:mod:`nlsr.explain.capture`), :func:`attention_rows` returns
the weights that the block gave the chosen query positions over the positions of its map --
only those rows, so memory is O(queries x positions) -- and the mechanism's own record:

* ``nla`` / ``in-scale``: dense softmax rows (:data:`nlsr.attention.nla.SOFTMAX`'s function);
* ``hspa``: sparsemax rows (:func:`nlsr.attention.hspa.sparsemax_rows`) and their support;
* ``nlsa`` / ``gla`` / ``lcoa``: per round the code (bucket or cluster) of the query, its chunk
  in the sorted layout (:func:`nlsr.attention.buckets.bucket_layout`), the keys it saw and the
  round's weight ``softmax_r(lse_r)``; the weights are the rounds' softmax rows merged with those
  round weights, as the kernel merges the rounds' outputs (a key seen twice sums its weights);
* ``csna``: softmax rows over the key grid of the ``1/s`` downscaled map (the patches matched at
  the other scale).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from nlsr.attention.buckets import KEY_EPS, BucketLayout, bucket_layout
from nlsr.attention.cross_scale import CrossScaleAttention, same_pad
from nlsr.attention.gla import GlobalLearnableAttention, KeyBiasMLP
from nlsr.attention.hashing import HashingAttention
from nlsr.attention.hspa import sparsemax_rows
from nlsr.attention.lcoa import LCoA
from nlsr.attention.nla import softmax_rows_
from nlsr.padding import pad_to_multiple


@dataclass
class Rows:
    """Weights ``[Q, h, w]`` of ``Q`` query positions over the block's ``h x w`` map (for
    ``csna`` over its key grid) and the mechanism's extras (module docstring), as tensors."""

    weights: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


def _flat(t: Tensor) -> Tensor:
    """``(1, C, h, w)`` -> position-major ``[h*w, C]``."""
    return t[0].flatten(1).t()


def dense_rows(
    theta: Tensor, phi: Tensor, positions: Tensor, sparse: bool, topk: int | None
) -> Tensor:
    """Rows ``[Q, L]`` of ``normalise(theta phi^T)`` for the query ``positions``: softmax, or
    sparsemax with ``sparse`` (the normalisers of NLA and HSPA)."""
    scores = (theta[positions] @ phi.t()).unsqueeze(0)
    if sparse:
        return sparsemax_rows(scores, topk)[0]
    return softmax_rows_(scores)[0][0]


def _dense(block: torch.nn.Module, x: Tensor, positions: Tensor, sparse: bool) -> Rows:
    theta, phi = _flat(block.conv_match1(x)), _flat(block.conv_match2(x))
    weights = dense_rows(theta, phi, positions, sparse, getattr(block, "topk", None))
    h, w = x.shape[-2:]
    rows = Rows(weights.view(-1, h, w))
    if sparse:
        rows.extras["support"] = rows.weights > 0
    return rows


def hashed_codes(block: HashingAttention, embed: Tensor, state: Tensor | None) -> Tensor:
    """The codes ``[1, R, L]`` the block computed in the captured run: its own
    :meth:`~nlsr.attention.hashing.HashingAttention.hash_codes`, drawing the projections from
    a generator restored to the captured ``state`` (or its fixed ``projections``)."""
    saved = block.generator
    if state is not None:
        block.generator = torch.Generator()
        block.generator.set_state(state)
    try:
        return block.hash_codes(embed, block.n_buckets(embed.shape[1]))
    finally:
        block.generator = saved


@dataclass
class BucketSetup:
    """What the sorted-chunk attention of one block input shares between queries: queries
    ``[L, d]``, normalised keys ``[L, d]``, codes ``[1, R, L]``, the layout, each position's
    sorted slot per round ``[R, L]`` and the learnable term ``[L, chunk]`` (GLA) or None."""

    queries: Tensor
    keys: Tensor
    codes: Tensor
    layout: BucketLayout
    slots: Tensor
    bias: Tensor | None = None


def bucket_setup(
    embed: Tensor, codes: Tensor, chunk_size: int, bias: Tensor | None = None
) -> BucketSetup:
    """Sort and chunk ``embed`` ``[1, L, d]`` by ``codes`` ``[1, R, L]`` with the kernel's own
    :func:`~nlsr.attention.buckets.bucket_layout`; keys ``normalize(embed)`` (eps as the
    kernel's)."""
    length = embed.shape[1]
    layout = bucket_layout(codes, chunk_size)
    c = layout.chunk
    order = layout.rows[:, c : c + length]  # [R, L] sorted positions (before the tail padding)
    slots = torch.empty_like(order)
    slots.scatter_(1, order, torch.arange(length, device=order.device).expand_as(order))
    keys = F.normalize(embed[0], dim=-1, eps=KEY_EPS)
    return BucketSetup(embed[0], keys, codes, layout, slots, bias)


def bucket_entries(setup: BucketSetup, positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The query ``positions``' entries: key positions ``[Q, R * 3c]`` (own round's previous,
    own and next chunk, round after round; a key may repeat) and merged weights ``[Q, R * 3c]``
    (the round's softmax times the round weight ``softmax_r(lse_r)``); chunks ``[Q, R]`` and
    round weights ``[Q, R]``."""
    c, rounds = setup.layout.chunk, setup.layout.rounds
    q = setup.queries[positions]  # [Q, d]
    window = torch.arange(3 * c, device=q.device)
    keys, probs, lses, chunks = [], [], [], []
    for r in range(rounds):
        slot = setup.slots[r, positions]  # [Q]
        chunk = slot // c
        seen = setup.layout.rows[r][chunk.unsqueeze(1) * c + window]  # [Q, 3c]
        scores = torch.einsum("qd,qkd->qk", q, setup.keys[seen])
        if setup.bias is not None:
            scores = scores + setup.bias[seen, (slot % c).unsqueeze(1)]
        lses.append(torch.logsumexp(scores, dim=1))
        probs.append(torch.softmax(scores, dim=1))
        keys.append(seen)
        chunks.append(chunk)
    round_weights = torch.softmax(torch.stack(lses, dim=1), dim=1)  # [Q, R]
    values = torch.cat([p * round_weights[:, r : r + 1] for r, p in enumerate(probs)], dim=1)
    return torch.cat(keys, dim=1), values, torch.stack(chunks, dim=1), round_weights


def bucket_rows(setup: BucketSetup, positions: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Merged weights ``[Q, L]`` of the query ``positions`` (a key seen twice sums its
    entries) and per round the query's code, chunk, seen keys ``[Q, R, L]`` and round weight."""
    length, rounds = setup.queries.shape[0], setup.layout.rounds
    keys, values, chunks, round_weights = bucket_entries(setup, positions)
    weights = values.new_zeros(len(positions), length).scatter_add_(1, keys, values)
    seen = torch.zeros(len(positions), rounds, length, dtype=torch.bool, device=keys.device)
    seen.scatter_(2, keys.view(len(positions), rounds, -1), True)
    extras = {
        "codes": setup.codes[0][:, positions].t(),
        "chunk": chunks,
        "seen": seen,
        "round_weights": round_weights,
    }
    return weights, extras


def hashing_setup(block: HashingAttention, x: Tensor, state: Tensor | None) -> BucketSetup:
    """The setup of an NLSA / GLA block on its input ``x`` with the run's draws (``state``)."""
    embed = _flat(block.conv_match(x)).unsqueeze(0).contiguous()
    codes = hashed_codes(block, embed, state)
    bias = None
    if isinstance(block, GlobalLearnableAttention) and block.learnable:
        fc1, fc2 = block.fc[0], block.fc[2]
        features = _flat(block.conv_assembly_fc(x)).unsqueeze(0)
        bias = KeyBiasMLP(features, fc1.weight, fc1.bias, fc2.weight, fc2.bias).sliced()[0]
    return bucket_setup(embed, codes, block.chunk_size, bias)


def lcoa_setup(block: LCoA, x: Tensor) -> BucketSetup:
    """The setup of an LCoA block on its input ``x``: its k-means clusters as codes."""
    embed = _flat(block.conv_match(x)).unsqueeze(0).contiguous()
    return bucket_setup(embed, block.kmeans.assign(embed), block.window_size)


def _bucketed(setup: BucketSetup, x: Tensor, positions: Tensor, members: bool) -> Rows:
    weights, extras = bucket_rows(setup, positions)
    if members:  # LCoA: the query's cluster in each round
        extras["members"] = setup.codes[0].unsqueeze(0) == extras["codes"].unsqueeze(-1)
    return Rows(weights.view(-1, *x.shape[-2:]), _maps(extras, x))


def _maps(extras: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
    """Per-position masks ``[Q, R, L]`` of ``extras`` as ``[Q, R, h, w]``."""
    h, w = x.shape[-2:]
    return {k: v.view(*v.shape[:2], h, w) if v.dim() == 3 else v for k, v in extras.items()}


def _cross_scale(block: CrossScaleAttention, x: Tensor, positions: Tensor) -> Rows:
    """Softmax over the key patches (the ``1/s`` map) of the query patches at ``positions``, as
    the block's strided path forms them (keys: ``same_pad`` + unfold, normalised, scaled)."""
    s, k, t = block.scale, block.ksize, block.stride
    w0 = x.shape[-1]
    x, _, _ = pad_to_multiple(x, s)
    query = same_pad(block.conv_match_1(x), k, 1)
    ref = F.interpolate(x, scale_factor=1.0 / s, mode="bilinear", align_corners=False)
    ref = block.conv_match_2(ref)
    keys = F.unfold(same_pad(ref, k, t), k, stride=t)[0]  # [C'k^2, K]
    norm = keys.pow(2).sum(dim=0, keepdim=True).sqrt()
    keys = keys * (block.softmax_scale / torch.maximum(norm, block.escape_NaN))
    ys, xs = positions // w0, positions % w0
    patches = torch.stack(
        [query[0, :, y : y + k, xx : xx + k].flatten() for y, xx in zip(ys, xs, strict=True)]
    )
    weights = torch.softmax(patches @ keys, dim=-1)  # [Q, K]
    if not block.average:
        weights = (weights == weights.amax(dim=-1, keepdim=True)).to(weights.dtype)
    grid = (-(-ref.shape[-2] // t), -(-ref.shape[-1] // t))
    return Rows(weights.view(-1, *grid), {"scale": torch.tensor(s * t)})


def attention_rows(
    block: torch.nn.Module, kind: str, x: Tensor, positions: Tensor, state: Tensor | None = None
) -> Rows:
    """The rows of the query ``positions`` (flat indices into ``x``'s ``h x w`` map) in
    ``block`` of mechanism ``kind`` for its input ``x`` ``(1, C, h, w)``; ``state`` is the
    captured generator state of a hashing block."""
    with torch.inference_mode():
        if kind in ("nla", "hspa", "in-scale"):
            return _dense(block, x, positions, sparse=kind == "hspa")
        if kind in ("nlsa", "gla"):
            assert isinstance(block, HashingAttention)
            return _bucketed(hashing_setup(block, x, state), x, positions, members=False)
        if kind == "lcoa":
            assert isinstance(block, LCoA)
            return _bucketed(lcoa_setup(block, x), x, positions, members=True)
        if kind == "csna":
            assert isinstance(block, CrossScaleAttention)
            return _cross_scale(block, x, positions)
    raise ValueError(f"no explanation for attention kind {kind!r}")
