"""Dense non-local attention (embedded Gaussian), computed in query blocks.

The block is the form used throughout the EDSR-derived SR code bases (CSNLN, NLSN, HSPAN):
``theta = PReLU(conv1x1(x))`` and ``phi = PReLU(conv1x1(x))`` map C -> C/reduction,
``g = PReLU(conv1x1(x))`` maps C -> C, and every position attends to all H*W positions::

    y_i = sum_j softmax_j(theta_i . phi_j) g_j          (no 1/sqrt(d) scaling)
    out = res_scale * y + x

so the output conv of Wang et al.'s block is replaced by the residual sum with ``res_scale``.
Memory is O(block x L) for L = H*W in the forward *and* the backward pass: the L x L weight
matrix is never materialised; each query block's rows are recomputed in the backward pass.
:func:`attend_blocked` is shared with the sparsemax attention of HSPAN (``hspa.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from nlsr.attention.backends import exporting
from nlsr.attention.precision import in_float32
from nlsr.attention.registry import register_attention

#: Score elements (N x block x L) computed at once when ``block_size`` is automatic: 2**22
#: float32 values are 16 MiB per buffer, a few tens of MiB peak for any image size.
BLOCK_ELEMENTS = 2**22

# SparseRows' compressed-sparse-row products are stable for what they are used for here.
warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)


class SparseRows(NamedTuple):
    """A block of weight rows ``[n, B, L]`` by its nonzero entries, as compressed sparse rows
    over the ``n B`` rows and the ``n L`` keys of the batch (batch ``b``'s keys are columns
    ``b L ...``): row offsets ``crow`` ``[n B + 1]``, and per entry its ``column``, its ``row``
    and its weight (``weights``, all > 0). Sparsemax rows have few nonzero weights, so the
    products with the values and the whole backward pass cost O(nonzeros), not O(B L): sparse
    matrix products, no gathers. The ``x`` arguments are position-major ``[n, L, c]``."""

    crow: Tensor
    column: Tensor
    row: Tensor
    weights: Tensor

    @classmethod
    def from_dense(cls, weights: Tensor) -> SparseRows:
        """The nonzero entries of ``weights`` ``[n, B, L]`` (>= 0); the row offsets are counted
        from them (a search's support sizes may differ by float rounding at the threshold)."""
        n, rows, keys = weights.shape
        flat = weights.reshape(-1)
        at = (flat > 0).nonzero().squeeze(1)
        row = at.div(keys, rounding_mode="floor")
        column = at.remainder(keys).add_(row.div(rows, rounding_mode="floor").mul_(keys))
        sizes = torch.bincount(row, minlength=n * rows)
        crow = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
        return cls(crow, column, row, flat[at])

    def _matrix(self, values: Tensor, keys: int) -> Tensor:
        """The ``[n B, keys]`` sparse matrix holding ``values`` at the entries."""
        size = (self.crow.shape[0] - 1, keys)
        return torch.sparse_csr_tensor(
            self.crow, self.column, values, size=size, check_invariants=False
        )

    def combine(self, coefficients: Tensor, x: Tensor) -> Tensor:
        """``W @ x`` for the weights ``W`` holding ``coefficients`` at the entries:
        ``[n, B, c]``."""
        n, keys, c = x.shape
        out = self._matrix(coefficients, n * keys) @ x.reshape(n * keys, c)
        return out.view(n, -1, c)

    def dot(self, x: Tensor, rows: Tensor) -> Tensor:
        """The entries of ``rows @ x^T`` (``rows`` ``[n, B, c]``): ``[nnz]``."""
        n, keys, c = x.shape
        pattern = self._matrix(self.weights, n * keys)
        flat_x = x.reshape(n * keys, c)
        sampled = torch.sparse.sampled_addmm(pattern, rows.reshape(-1, c), flat_x.t(), beta=0.0)
        return sampled.values()

    def scatter_add_(self, target: Tensor, coefficients: Tensor, rows: Tensor) -> None:
        """``target += W^T @ rows`` in place, ``W`` holding ``coefficients`` at the entries
        (``rows`` ``[n, B, c]``): a product with the transposed sparse matrix."""
        n, keys, c = target.shape
        order = self.column.argsort(stable=True)
        ccol = torch.bincount(self.column, minlength=n * keys).cumsum_(0)
        transposed = torch.sparse_csr_tensor(
            torch.cat([ccol.new_zeros(1), ccol]),
            self.row[order],
            coefficients[order],
            size=(n * keys, self.crow.shape[0] - 1),
            check_invariants=False,
        )
        target.view(n * keys, c).add_(transposed @ rows.reshape(-1, c))

    def row_sums(self, values: Tensor) -> Tensor:
        """Sum of ``values`` ``[nnz]`` over each row's entries: ``[n B]``."""
        return torch.segment_reduce(values, "sum", offsets=self.crow)

    def counts(self) -> Tensor:
        """Entries per row: ``[n B]``."""
        return self.crow.diff()


class RowNormaliser(NamedTuple):
    """How a block of scores ``[n, B, L]`` becomes weights, row by row; all three may work in
    place. The forward pass keeps each row's statistics (O(L) memory) so that the backward pass
    rebuilds bitwise the same weights without searching the rows again. ``forward`` may return
    :class:`SparseRows` instead of dense weights; the pass then keeps them (O(k) per row) and
    ``sparse_backward`` maps the gradient of their weights (``[nnz]``) to that of the scores."""

    forward: Callable[[Tensor], tuple[Tensor | SparseRows, Tensor]]  # -> weights, stats
    recompute: Callable[[Tensor, Tensor], Tensor]  # (scores, stats) -> the same dense weights
    backward: Callable[[Tensor, Tensor], Tensor]  # (weights, grad of weights) -> grad of scores
    sparse_backward: Callable[[SparseRows, Tensor], Tensor] | None = None


def softmax_rows_(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last axis in place in ``scores``; statistics (row maximum, row sum)."""
    high = scores.amax(dim=-1, keepdim=True)
    scores.sub_(high).exp_()
    total = scores.sum(dim=-1, keepdim=True)
    return scores.div_(total), torch.cat([high, total], dim=-1)


def softmax_rows_recompute_(scores: Tensor, stats: Tensor) -> Tensor:
    """:func:`softmax_rows_`'s weights from its statistics, the same operations in place."""
    return scores.sub_(stats[..., :1]).exp_().div_(stats[..., 1:])


def softmax_rows_backward_(weights: Tensor, grad: Tensor) -> Tensor:
    """Softmax Jacobian-vector product in place in ``grad``: p*g - p <g, p>."""
    grad.mul_(weights)
    return grad.addcmul_(weights, grad.sum(dim=-1, keepdim=True), value=-1.0)


#: The softmax of the embedded-Gaussian attention.
SOFTMAX = RowNormaliser(softmax_rows_, softmax_rows_recompute_, softmax_rows_backward_)


def auto_block_size(batch: int, length: int, block_size: int | None = None) -> int:
    """Queries per block: ``block_size`` if given, else as many as fit in :data:`BLOCK_ELEMENTS`."""
    if block_size is not None:
        return max(1, min(block_size, length))
    return max(1, min(length, BLOCK_ELEMENTS // max(1, batch * length)))


def _scratch(like: Tensor, batch: int, rows: int, length: int) -> Tensor:
    """A flat scratch buffer for ``[batch, rows, length]`` blocks, reused by every block: no fresh
    multi-MiB allocation (and page faults) per block."""
    return like.new_empty(batch * rows * length)


def _block(buffer: Tensor, batch: int, rows: int, length: int) -> Tensor:
    """A contiguous ``[batch, rows, length]`` view at the start of a scratch buffer."""
    return buffer[: batch * rows * length].view(batch, rows, length)


class _BlockedAttention(torch.autograd.Function):
    """out[:, i] = normalise(q[:, i] @ k^T) @ v, one block of query rows at a time.

    Only q, k, v and the rows' statistics are saved; the backward pass recomputes each block's
    weights from them, so training memory is O(block x L) too. Scores are computed into reused
    scratch buffers. Blocks whose normaliser returns :class:`SparseRows` are kept as such and
    take the sparse products both ways (no recomputation).
    """

    @staticmethod
    def forward(
        ctx: Any,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        normaliser: RowNormaliser,
        block: int,
    ) -> Tensor:
        n, length = query.shape[:2]
        keys = key.shape[1]
        out = value.new_empty(n, length, value.shape[2])
        stats: Tensor | None = None
        sparse: dict[int, SparseRows] = {}
        key_t = key.transpose(1, 2)
        scratch = _scratch(query, n, min(block, length), keys)
        for start in range(0, length, block):
            q = query[:, start : start + block]
            scores = torch.matmul(q, key_t, out=_block(scratch, n, q.shape[1], keys))
            weights, row_stats = normaliser.forward(scores)
            if stats is None:
                stats = row_stats.new_empty(n, length, row_stats.shape[-1])
            stats[:, start : start + block] = row_stats
            if isinstance(weights, SparseRows):
                if not sparse:  # the sparse products gather rows: a position-major copy, once
                    value_rows = value.contiguous()
                sparse[start] = weights
                out[:, start : start + block] = weights.combine(weights.weights, value_rows)
            else:
                out[:, start : start + block] = torch.matmul(weights, value)
        ctx.save_for_backward(query, key, value, stats)
        ctx.normaliser, ctx.block, ctx.sparse = normaliser, block, sparse
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        query, key, value, stats = ctx.saved_tensors
        normaliser: RowNormaliser = ctx.normaliser
        length, block = query.shape[1], ctx.block
        n, keys = query.shape[0], key.shape[1]
        grad_q = torch.empty_like(query)
        grad_k = key.new_zeros(key.shape)  # contiguous: the sparse blocks add to a view
        grad_v = value.new_zeros(value.shape)
        key_t, value_t = key.transpose(1, 2), value.transpose(1, 2)
        n_blocks = -(-length // block)
        rows = min(block, length) if len(ctx.sparse) < n_blocks else 0  # scratch: dense blocks only
        scores_scratch = _scratch(query, n, rows, keys)
        grad_scratch = _scratch(query, n, rows, keys)
        if ctx.sparse:  # the sparse products gather rows: position-major copies, made once
            key, value = key.contiguous(), value.contiguous()
        for start in range(0, length, block):
            span = slice(start, start + block)
            q, go = query[:, span], grad_out[:, span]
            picked: SparseRows | None = ctx.sparse.get(start)
            if picked is not None:
                grad_w = picked.dot(value, go)
                picked.scatter_add_(grad_v, picked.weights, go)
                assert normaliser.sparse_backward is not None  # it returned SparseRows
                grad_scores = normaliser.sparse_backward(picked, grad_w)
                grad_q[:, span] = picked.combine(grad_scores, key)
                picked.scatter_add_(grad_k, grad_scores, q)
                continue
            size = q.shape[1]
            scores = torch.matmul(q, key_t, out=_block(scores_scratch, n, size, keys))
            weights = normaliser.recompute(scores, stats[:, span])
            grad_v += torch.matmul(weights.transpose(1, 2), go)
            grad_w = torch.matmul(go, value_t, out=_block(grad_scratch, n, size, keys))
            grad_scores = normaliser.backward(weights, grad_w)
            grad_q[:, span] = torch.matmul(grad_scores, key)
            grad_k += torch.matmul(grad_scores.transpose(1, 2), q)
        return grad_q, grad_k, grad_v, None, None


@in_float32
def attend_blocked(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    normaliser: RowNormaliser = SOFTMAX,
    block_size: int | None = None,
) -> Tensor:
    """``normalise(query @ key^T) @ value`` for ``(N, L, d)``, ``(N, L, d)``, ``(N, L, C)``,
    computed ``block_size`` query rows at a time (automatic when None), differentiable."""
    if exporting():  # traceable: all rows at once, no autograd function (docs/deploy.md)
        weights = normaliser.forward(torch.matmul(query, key.transpose(1, 2)))[0]
        return torch.matmul(weights, value)
    block = auto_block_size(query.shape[0], key.shape[1], block_size)
    return _BlockedAttention.apply(query, key, value, normaliser, block)


def conv1x1_prelu(in_channels: int, out_channels: int) -> nn.Sequential:
    """conv1x1 + PReLU, named ``.0`` / ``.1`` as the authors' ``BasicBlock``."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), nn.PReLU())


def check_reduction(channels: int, reduction: int, name: str) -> int:
    """Validate ``reduction`` for a block over ``channels``; return the embedding width."""
    if not isinstance(reduction, int) or reduction < 1 or channels // reduction < 1:
        raise ValueError(
            f"{name}: option 'reduction' must be an integer in [1, {channels}] for "
            f"{channels} channels, got {reduction!r}"
        )
    return channels // reduction


def check_block_size(block_size: int | None, name: str) -> int | None:
    """Validate the ``block_size`` option (positive integer or None)."""
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(
            f"{name}: option 'block_size' must be a positive integer, got {block_size!r}"
        )
    return block_size


def flatten_embeddings(theta: Tensor, phi: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(N, d, H, W) x2 and (N, C, H, W) -> (N, L, d) x2 and (N, L, C) position-major views."""
    return tuple(t.flatten(2).transpose(1, 2) for t in (theta, phi, g))  # type: ignore[return-value]


@register_attention("nla")
class NonLocalAttention(nn.Module):
    """Dense embedded-Gaussian non-local attention: ``res_scale * softmax(theta phi^T) g + x``.

    Subclasses change only the row normaliser (:meth:`normaliser`; HSPA's sparsemax)."""

    #: Name used in error messages.
    kind = "nla"

    def __init__(
        self,
        channels: int,
        reduction: int = 2,
        res_scale: float = 1.0,
        block_size: int | None = None,
    ):
        super().__init__()
        inner = check_reduction(channels, reduction, self.kind)
        self.block_size = check_block_size(block_size, self.kind)
        self.res_scale = res_scale
        self.conv_match1 = conv1x1_prelu(channels, inner)
        self.conv_match2 = conv1x1_prelu(channels, inner)
        self.conv_assembly = conv1x1_prelu(channels, channels)

    def normaliser(self) -> RowNormaliser:
        """How the scores of a query row become its weights."""
        return SOFTMAX

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        theta, phi, g = flatten_embeddings(
            self.conv_match1(x), self.conv_match2(x), self.conv_assembly(x)
        )
        y = attend_blocked(theta, phi, g, self.normaliser(), self.block_size)
        return self.res_scale * y.transpose(1, 2).reshape(n, c, h, w) + x
