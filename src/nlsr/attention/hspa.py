"""High-similarity-pass attention (HSPA, HSPAN): dense non-local attention with sparsemax.

``theta = PReLU(conv1x1(x))``, ``phi = PReLU(conv1x1(x))`` (C -> C/reduction) and
``g = PReLU(conv1x1(x))`` (C -> C); scores ``S = theta^T phi`` over all H*W keys (no scaling);
weights ``P = sparsemax(S)`` row by row; output ``res_scale * P g + x``.

Sparsemax (Martins & Astudillo, 2016), with ``z = s - max(s)`` sorted decreasingly::

    k   = #{m : 1 + m z_(m) > sum_{i<=m} z_(i)}        tau = (sum_{i<=k} z_(i) - 1) / k
    p   = max(z - tau, 0)

The released code finds the sorted prefix with ``torch.topk(topk)`` and, for the rows whose
support fills all ``topk`` slots, redoes the search with ``2 topk`` (then 4 topk, ... and a full
sort once that reaches L), so ``topk`` speeds up the search without ever capping the support.
On the features of real images supports are tens to hundreds of keys, and those partial sorts
cost more than the score product. nlsr's attention needs no sort: :func:`fixed_point_threshold`
runs Michelot's fixed point ``tau <- (sum_{z > tau} z - 1) / #{z > tau}`` (Newton's method on
``sum max(z - tau, 0) = 1``), two passes over a row per step, from the threshold of the maxima
of groups of :data:`START_GROUP` keys (a lower bound), until the support stops changing: then
tau is computed from that support, the exact threshold up to float rounding. Rows are computed
in blocks of queries (see :func:`nlsr.attention.nla.attend_blocked`), so memory is O(block x
L), not O(L^2); blocks whose supports hold a small share of the keys are kept by their supports
as sparse rows (:func:`sparsemax_rows_`), so that the products with the values and the whole
backward pass cost O(support) per row. The automatic query blocks are small enough
(:data:`BLOCK_ELEMENTS`) for the search's passes to run in cache. Inference takes
:func:`sparsemax_attention`: each block's product with the values over only the keys some of
its rows weigh (the union of a block's supports is 5-40% of the keys on real features).
:func:`sparsemax_threshold` keeps the sorted search (bit-for-bit the released tau and support
sizes) for reporting and checking supports. While ``torch.export`` (and so the ONNX exporter)
traces the block, it computes dense rows with :func:`sparsemax_sorted`, a full sort with no
data-dependent control flow.
"""

from __future__ import annotations

from functools import partial
from typing import Any, cast

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from nlsr.attention.backends import exporting
from nlsr.attention.nla import (
    NonLocalAttention,
    RowNormaliser,
    SparseRows,
    attend_blocked,
    flatten_embeddings,
)
from nlsr.attention.precision import in_float32
from nlsr.attention.registry import register_attention

#: Width of the column groups whose maxima prune the threshold search (:func:`candidates`).
GROUP = 64
#: Largest group maxima used for the first lower bound on the threshold.
BOUND_GROUPS = 64
#: Sorted entries of the first threshold search (doubled for the rows whose support fills them).
FIRST_K = 8
#: Width of the column groups whose maxima start the fixed point (:func:`fixed_point_threshold`).
START_GROUP = 32
#: Fixed-point steps before falling back to a full sort (real features settle in 4-8).
MAX_STEPS = 64
#: A block of rows whose supports hold at most this fraction of at least
#: :data:`SPARSE_MIN_KEYS` keys on average is kept by its supports (:func:`sparsemax_rows_`):
#: the sparse products cost O(support) per row, the conversion one pass over the block.
SPARSE_FRACTION = 1 / 16
SPARSE_MIN_KEYS = 1024
#: A query block's product with the values takes only the keys some of its rows weigh when
#: those are at most this fraction of the keys (:func:`weigh_used_keys`).
USED_KEYS_FRACTION = 1 / 2
#: Score elements (N x block x L) per query block when ``block_size`` is automatic: 2**20
#: float32 values (4 MiB) stay in cache through the several passes of the threshold search,
#: which made HSPAN's blocks 1.4x faster on their own features than 2**22 did.
BLOCK_ELEMENTS = 2**20


def _prefix_threshold(rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """tau and support size of each row of ``rows`` from its ``k`` largest entries (exact when
    the support is smaller than k, or k covers the row)."""
    if k >= rows.shape[-1]:
        top = torch.sort(rows, dim=-1, descending=True).values
    else:
        top = torch.topk(rows, k, dim=-1).values
    cumsum = top.cumsum(dim=-1) - 1
    rho = torch.arange(1, top.shape[-1] + 1, device=rows.device, dtype=rows.dtype)
    support = (rho * top > cumsum).sum(dim=-1, keepdim=True)
    return cumsum.gather(-1, support - 1) / support.to(rows.dtype), support


def candidates(rows: Tensor) -> tuple[Tensor, Tensor | None]:
    """Entries of ``rows`` ``[B, L]`` that can be in the sparsemax support, and maybe a few more:
    ``[B, M]`` with ``M <= L``, in no particular order, and the column groups they come from
    (``[B, M // GROUP]``, see :func:`candidate_columns`; None when nothing was pruned and the
    entries are ``rows`` itself).

    Any ``m`` entries give a lower bound ``(sum - 1) / m`` on the threshold (it is the largest
    such average over the sorted prefixes), so with the maxima of column groups of
    :data:`GROUP` entries, every group whose maximum is below the best such bound (less a
    float-rounding margin) holds no support entry. The remaining groups (usually a handful per
    row) and the columns left over after the last full group are returned, unless they are
    over half the row (the copy would cost more than the search saves).
    """
    length = rows.shape[-1]
    n_groups = length // GROUP
    if n_groups < 2:
        return rows, None
    groups = rows[:, : n_groups * GROUP].reshape(rows.shape[0], n_groups, GROUP)
    group_max = groups.amax(dim=-1)  # [B, G]
    top, order = group_max.topk(min(n_groups, BOUND_GROUPS), dim=-1)
    sizes = torch.arange(1, top.shape[-1] + 1, device=rows.device, dtype=rows.dtype)
    bound = ((top.cumsum(dim=-1) - 1) / sizes).amax(dim=-1, keepdim=True)
    scale = torch.maximum(bound.abs(), top[:, :1].abs()).clamp_min(1.0)
    needed = int((group_max > bound - 1e-4 * scale).sum(dim=-1).max())
    if 2 * needed > n_groups:
        return rows, None
    if needed > order.shape[-1]:
        order = group_max.topk(needed, dim=-1).indices
    chosen = order[:, :needed]
    index = chosen.unsqueeze(-1).expand(-1, -1, GROUP)
    kept = torch.gather(groups, 1, index).reshape(rows.shape[0], needed * GROUP)
    return torch.cat([kept, rows[:, n_groups * GROUP :]], dim=-1), chosen


def candidate_columns(at: Tensor, chosen: Tensor | None, length: int) -> Tensor:
    """The columns of the rows (of ``length`` entries) of the candidates at positions ``at``
    ``[B, k]``, for the groups ``chosen`` that :func:`candidates` returned."""
    if chosen is None:
        return at
    kept = chosen.shape[-1] * GROUP
    group = chosen.gather(-1, (at // GROUP).clamp_(max=chosen.shape[-1] - 1))
    tail = at - kept + length // GROUP * GROUP
    return torch.where(at < kept, group * GROUP + at % GROUP, tail)


def sparsemax_threshold(z: Tensor, topk: int | None = None) -> tuple[Tensor, Tensor]:
    """Threshold ``tau`` and support size over the last axis of ``z`` (shapes ``(..., 1)``).

    As released, the sorted prefix is found with ``topk`` and rows whose support fills all the
    sorted entries are redone with twice as many, up to a full sort: the support is never
    capped. Here that search runs on the :func:`candidates` of each row, which hold its whole
    support, and starts from at most :data:`FIRST_K` entries (``topk`` only bounds that start;
    None: full sort in the release). The prefix sums of the sorted support, hence tau and the
    support size, are those of the released search.
    """
    shape = (*z.shape[:-1], 1)
    tau, size, _, _ = _candidate_threshold(z.reshape(-1, z.shape[-1]), topk)
    return tau.reshape(shape), size.reshape(shape)


def _candidate_threshold(
    rows: Tensor, topk: int | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """tau, support size (``[B, 1]``), candidates and their columns (:func:`candidates`) of
    ``rows`` ``[B, L]``, maxima subtracted (see :func:`sparsemax_threshold`)."""
    kept, columns = candidates(rows)
    length = kept.shape[-1]
    tau, size = doubling_threshold(kept, min(FIRST_K, length if topk is None else topk))
    return tau, size, kept, columns


def doubling_threshold(rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """tau and support size ``[B, 1]`` of every row of ``rows`` ``[B, L]`` (maxima subtracted):
    the released search, from the ``k`` largest entries, doubled for the rows whose support
    fills them, up to a full sort; exact whatever ``k``."""
    length = rows.shape[-1]
    k = min(k, length)
    tau, size = _prefix_threshold(rows, k)
    index = torch.arange(rows.shape[0], device=rows.device)
    while k < length:
        index = index[(size[index] == k).squeeze(-1)]
        if index.numel() == 0:
            break
        k = min(2 * k, length)
        tau[index], size[index] = _prefix_threshold(rows[index], k)
    return tau, size


def fixed_point_threshold(z: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    """tau and support size ``[B, 1]`` of the rows ``z`` ``[B, L]`` (maxima subtracted), by
    Michelot's fixed point from the threshold of the rows' group maxima; ``out`` ``[B, L]``
    receives the weights ``max(z - tau, 0)``."""
    groups = z.shape[-1] // START_GROUP
    start = z.new_full((z.shape[0], 1), -1.0)  # max(z) - 1: the threshold of one entry
    if groups >= 2:  # a subset's threshold is a lower bound on the row's
        maxima = z[:, : groups * START_GROUP].reshape(-1, groups, START_GROUP).amax(dim=-1)
        start = _fixed_point(maxima, start, torch.empty_like(maxima))[0]
    return _fixed_point(z, start, out)


def _fixed_point(z: Tensor, tau: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`fixed_point_threshold` from ``tau`` (a lower bound): step until no row's support
    shrinks (the supports ``{z > tau}`` are nested, so an unchanged size is an unchanged set,
    and the tau computed from it is the threshold; a size that grows is float rounding at the
    threshold, which would otherwise cycle); a full sort for rows still moving after
    :data:`MAX_STEPS`. Once at most half the rows move, only those are stepped, copied out."""
    final_tau, final_size = tau, tau  # all rows' results, once only some rows are stepped
    index: Tensor | None = None  # the rows stepped (None: all, in place in ``out``)
    rows, work, count, previous = z, out, torch.empty_like(out), None
    for _ in range(MAX_STEPS):
        torch.sub(rows, tau, out=work).clamp_(min=0)
        size = torch.sign(work, out=count).sum(dim=-1, keepdim=True)
        if previous is not None:
            moving = (size < previous).squeeze(-1)
            if index is None:
                final_tau, final_size = tau, size
            else:
                settled = ~moving
                out[index[settled]], final_size[index[settled]] = work[settled], size[settled]
                final_tau[index[settled]] = tau[settled]
            stepped = int(moving.sum())
            if stepped == 0:
                return final_tau, final_size
            if index is not None or 2 * stepped <= moving.numel():
                if index is None:
                    final_tau, final_size = tau.clone(), size.clone()
                    index = torch.arange(z.shape[0], device=z.device)
                index, rows = index[moving], rows[moving]
                tau, size, work = tau[moving], size[moving], work[moving]
                count = count[: index.numel()]
        previous = size
        tau = tau + (work.sum(dim=-1, keepdim=True) - 1) / size.clamp_min(1)
    rest = torch.arange(z.shape[0], device=z.device) if index is None else index
    if index is None:
        final_tau, final_size = tau.clone(), tau.clone()
    final_tau[rest], size = _prefix_threshold(z[rest], z.shape[-1])
    final_size[rest] = size.to(final_size.dtype)
    out[rest] = (z[rest] - final_tau[rest]).clamp_(min=0)
    return final_tau, final_size


def sparsemax_sorted(scores: Tensor) -> Tensor:
    """Sparsemax over the last axis by a full sort, with no data-dependent control flow and no
    autograd function (what ``torch.export`` and the ONNX exporter can trace); differentiable
    through autograd, O(L log L) per row."""
    z = scores - scores.amax(dim=-1, keepdim=True)
    ordered = torch.sort(z, dim=-1, descending=True).values
    cumsum = ordered.cumsum(dim=-1) - 1
    rank = torch.ones_like(ordered).cumsum(dim=-1)
    size = (rank * ordered > cumsum).sum(dim=-1, keepdim=True)  # >= 1: the maximum is 0
    tau = cumsum.gather(-1, size - 1) / size.to(z.dtype)
    return (z - tau).clamp(min=0)


def weigh_used_keys(weights: Tensor, value: Tensor) -> Tensor:
    """``weights @ value`` (``[n, B, L]``, ``[n, L, C]``) over only the keys that some row of
    the block weighs, where those are few: on real features the union of a block's sparsemax
    supports is 5-40% of the keys."""
    used = weights.amax(dim=1) > 0  # [n, L]
    if int(used.sum()) > USED_KEYS_FRACTION * used.numel():
        return torch.matmul(weights, value)
    products = []
    for w, v, keep in zip(weights, value, used, strict=True):
        keys = keep.nonzero().squeeze(1)
        products.append(w.index_select(1, keys) @ v.index_select(0, keys))
    return torch.stack(products)


@in_float32
def sparsemax_attention(query: Tensor, key: Tensor, value: Tensor, block: int) -> Tensor:
    """Inference: ``sparsemax(query @ key^T) @ value`` for ``(N, L, d)``, ``(N, L, d)``,
    ``(N, L, C)``, ``block`` query rows at a time, each block's product with the values over
    its used keys only (:func:`weigh_used_keys`); no autograd."""
    n, length = query.shape[:2]
    keys = key.shape[1]
    out = value.new_empty(n, length, value.shape[2])
    key_t = key.transpose(1, 2)
    scratch = query.new_empty(n * min(block, length) * keys)
    for start in range(0, length, block):
        q = query[:, start : start + block]
        scores = torch.matmul(q, key_t, out=scratch[: n * q.shape[1] * keys].view(n, -1, keys))
        weights = cast(Tensor, sparsemax_rows_(scores)[0])  # dense: not asked for sparse rows
        out[:, start : start + block] = weigh_used_keys(weights, value)
    return out


def sparsemax_rows(scores: Tensor, topk: int | None = None) -> Tensor:
    """Sparsemax over the last axis (no autograd; see :func:`sparsemax` for that)."""
    return sparsemax_rows_(scores.clone(memory_format=torch.contiguous_format), topk)[0]


def sparsemax_rows_(
    scores: Tensor, topk: int | None = None, sparse: bool = False
) -> tuple[Tensor | SparseRows, Tensor]:
    """:func:`sparsemax_rows` of ``scores`` (which it overwrites); statistics (row maximum,
    tau). ``topk`` is accepted for the released interface: no search here depends on it. With
    ``sparse``, a block ``[n, B, L]`` whose supports hold on average at most
    :data:`SPARSE_FRACTION` of at least :data:`SPARSE_MIN_KEYS` keys is returned by its
    supports (:class:`SparseRows`)."""
    shape = (*scores.shape[:-1], 1)
    keys = scores.shape[-1]
    high = scores.amax(dim=-1, keepdim=True)
    z = scores.sub_(high).reshape(-1, keys)
    weights = torch.empty_like(z)
    tau, size = fixed_point_threshold(z, weights)
    stats = torch.cat([high, tau.view(shape)], dim=-1)
    if sparse and keys >= SPARSE_MIN_KEYS and int(size.sum()) <= SPARSE_FRACTION * z.numel():
        return SparseRows.from_dense(weights.view(-1, *scores.shape[-2:])), stats
    return weights.view(scores.shape), stats


def sparsemax_rows_recompute_(scores: Tensor, stats: Tensor) -> Tensor:
    """:func:`sparsemax_rows_`'s weights from its statistics, without the threshold search."""
    return scores.sub_(stats[..., :1]).sub_(stats[..., 1:]).clamp_(min=0)


def sparsemax_normaliser(topk: int | None = None) -> RowNormaliser:
    """Sparsemax rows for :func:`nlsr.attention.nla.attend_blocked`, kept by their supports
    where those are narrow (``topk``: accepted, see :func:`sparsemax_rows_`)."""
    return RowNormaliser(
        partial(sparsemax_rows_, topk=topk, sparse=True),
        sparsemax_rows_recompute_,
        sparsemax_rows_backward_,
        sparsemax_support_backward,
    )


def sparsemax_support_backward(rows: SparseRows, grad: Tensor) -> Tensor:
    """:func:`sparsemax_rows_backward` of a block kept by its supports (``grad`` ``[nnz]``):
    every entry is in its row's support, so it is ``g`` less the row's mean of ``g``."""
    mean = rows.row_sums(grad).div_(rows.counts())
    return grad - mean[rows.row]


def sparsemax_rows_backward(weights: Tensor, grad: Tensor) -> Tensor:
    """Sparsemax Jacobian-vector product over the last axis: on the support ``p > 0`` it is
    ``g - mean_support(g)``, elsewhere 0."""
    return sparsemax_rows_backward_(weights.clone(), grad.clone())


def sparsemax_rows_backward_(weights: Tensor, grad: Tensor) -> Tensor:
    """:func:`sparsemax_rows_backward` computed in place: the result is written in ``grad`` and
    ``weights`` is overwritten with the support indicator."""
    support = weights.sign_()  # 1 on the support, 0 elsewhere (weights >= 0)
    masked = grad.mul_(support)
    mean = masked.sum(dim=-1, keepdim=True).div_(support.sum(dim=-1, keepdim=True))
    return masked.addcmul_(support, mean, value=-1.0)


class SparsemaxFunction(torch.autograd.Function):
    """Sparsemax over the last axis with its exact Jacobian as the backward pass."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor, topk: int | None) -> Tensor:
        weights = sparsemax_rows(scores, topk)
        ctx.save_for_backward(weights)
        return weights

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (weights,) = ctx.saved_tensors
        return sparsemax_rows_backward(weights, grad), None


def sparsemax(x: Tensor, dim: int = -1, topk: int | None = None) -> Tensor:
    """Differentiable sparsemax of ``x`` along ``dim`` (Euclidean projection onto the simplex)."""
    moved = x.movedim(dim, -1)
    return SparsemaxFunction.apply(moved, topk).movedim(-1, dim)


@register_attention("hspa")
class HSPA(NonLocalAttention):
    """High-similarity-pass attention: ``res_scale * sparsemax(theta phi^T) g + x`` over all
    positions, key names as released (``conv_match1/2``, ``conv_assembly``): the dense
    non-local block with sparsemax rows."""

    kind = "hspa"

    def __init__(
        self,
        channels: int,
        reduction: int = 2,
        topk: int | None = 128,
        res_scale: float = 0.1,
        block_size: int | None = None,
    ):
        if topk is not None and (not isinstance(topk, int) or topk < 1):
            raise ValueError(
                f"hspa: option 'topk' must be a positive integer or None, got {topk!r}"
            )
        super().__init__(channels, reduction, res_scale, block_size)
        self.topk = topk

    def normaliser(self) -> RowNormaliser:
        """Sparsemax rows, the threshold search started from ``topk`` entries."""
        return sparsemax_normaliser(self.topk)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        theta, phi, g = flatten_embeddings(
            self.conv_match1(x), self.conv_match2(x), self.conv_assembly(x)
        )
        if exporting():  # traceable: dense rows, sorted threshold, plain autograd
            y = sparsemax_sorted(theta @ phi.transpose(1, 2)) @ g
        else:
            block = self.block_size or max(1, BLOCK_ELEMENTS // (n * h * w))
            if theta.requires_grad or phi.requires_grad or g.requires_grad:
                y = attend_blocked(theta, phi, g, self.normaliser(), block)
            else:
                y = sparsemax_attention(theta, phi, g, block)
        return self.res_scale * y.transpose(1, 2).reshape(n, c, h, w) + x
