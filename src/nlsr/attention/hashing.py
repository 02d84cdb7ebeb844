"""Hash codes of positions and the base class of the LSH blocks (NLSA, GLA).

:func:`hash_codes` turns embeddings into one integer code per round (the bucket of each position,
also LCoA's nearest centroid); :class:`HashingAttention` holds what NLSA and GLA share around it:
their options, the ``projections`` / ``generator`` contract and the projection shape check.
The codes feed the sorted-chunk kernel of :mod:`nlsr.attention.buckets`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor, nn

from nlsr.attention.backends import check_backend, exporting
from nlsr.attention.buckets import MAX_BUCKETS, bucket_count

#: Projected values computed at once by :func:`hash_codes` (one block of positions).
BLOCK_ELEMENTS = 2**20


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
    if exporting():  # one traceable computation; ONNX ArgMax also takes the first maximum
        part = torch.matmul(x, weights.t()).view(n, length, rounds, width)
        if signed:
            part = torch.cat([part, -part], dim=-1)
        return part.argmax(dim=-1).transpose(1, 2)
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


class HashingAttention(nn.Module, ABC):
    """Base of the LSH attention blocks: options, projections and codes shared by NLSA and GLA.

    Projections ``[d, n_hashes, width]`` are drawn at every forward by :meth:`draw_projections`
    (from ``self.generator`` if set, else the global RNG, as released) unless
    ``self.projections`` holds a fixed tensor of that layout; ``width`` is ``n_buckets // 2`` for
    signed (spherical) LSH, whose codes are ``argmax([xR, -xR])``, and ``n_buckets`` otherwise.
    Subclasses set ``kind`` (the name in messages) and ``signed`` and build the convolutions.
    """

    kind: ClassVar[str]
    signed: ClassVar[bool]

    def __init__(
        self,
        channels: int,
        n_hashes: int,
        reduction: int,
        chunk_size: int,
        res_scale: float,
        attention_backend: str,
    ):
        super().__init__()
        kind = self.kind
        if channels % reduction or channels < reduction:
            raise ValueError(
                f"{kind}: channels ({channels}) must be a multiple of reduction ({reduction})"
            )
        if n_hashes < 1 or chunk_size < 1:
            raise ValueError(
                f"{kind}: n_hashes and chunk_size must be >= 1, got {n_hashes}, {chunk_size}"
            )
        self.chunk_size = chunk_size
        self.n_hashes = n_hashes
        self.reduction = reduction
        self.res_scale = res_scale
        self.attention_backend = check_backend(attention_backend)
        self.projections: Tensor | None = None
        self.generator: torch.Generator | None = None

    def n_buckets(self, length: int) -> int:
        """Buckets for ``length`` positions: the released count, at least 2 for signed LSH (one
        direction per round) and at least 1 otherwise."""
        return bucket_count(length, self.chunk_size, minimum=2 if self.signed else 1)

    @abstractmethod
    def draw_projections(
        self, n_buckets: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """Fresh projections ``[d, n_hashes, width]`` for ``n_buckets`` buckets."""

    def export_projections(self, generator: torch.Generator) -> Tensor:
        """Fixed projections for an exported graph: one draw from ``generator`` for the most
        buckets (:data:`~nlsr.attention.buckets.MAX_BUCKETS`); an input hashed into fewer
        buckets uses the leading columns (:meth:`hash_codes` slices them while exporting)."""
        saved, self.generator = self.generator, generator
        try:
            return self.draw_projections(MAX_BUCKETS, torch.device("cpu"))
        finally:
            self.generator = saved

    def hash_codes(self, x: Tensor, n_buckets: int) -> Tensor:
        """Bucket codes ``[N, n_hashes, L]`` of embeddings ``x`` ``[N, L, d]``."""
        proj = self.projections
        width = n_buckets // 2 if self.signed else n_buckets
        expected = (x.shape[-1], self.n_hashes, width)
        if proj is None:
            proj = self.draw_projections(n_buckets, x.device, x.dtype)
        elif exporting() and proj.shape[:2] == expected[:2]:
            proj = proj[..., :width]  # the export's fixed projections for the most buckets
        elif tuple(proj.shape) != expected:
            layout = "n_buckets//2" if self.signed else "n_buckets"
            raise ValueError(
                f"{self.kind} projections have shape {tuple(proj.shape)}, expected {expected} "
                f"[d, n_hashes, {layout}] for {x.shape[1]} positions"
            )
        return hash_codes(x, proj.to(device=x.device, dtype=x.dtype), signed=self.signed)
