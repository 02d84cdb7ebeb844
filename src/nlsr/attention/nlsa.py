"""NLSA: non-local sparse attention with spherical LSH (Mei et al., NLSN, CVPR 2021).

Positions are hashed with random rotations (code ``argmax([xR, -xR])``), sorted by code, and each
chunk of 144 sorted positions attends to itself and its two neighbour chunks; rounds are merged by
their log-sum-exp (see :mod:`nlsr.attention.buckets`). Parameter names equal the released code's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nlsr.attention.backends import bucket_attention
from nlsr.attention.buckets import residual
from nlsr.attention.hashing import HashingAttention
from nlsr.attention.registry import register_attention


@register_attention("nlsa")
class NonLocalSparseAttention(HashingAttention):
    """NLSN's attention block: ``res_scale * LSH-bucketed attention(x) + x``.

    Random Gaussian rotations ``[d, n_hashes, n_buckets // 2]`` are drawn at every forward (from
    ``self.generator`` if set, else the global RNG, exactly as the release draws them) unless
    ``self.projections`` holds a fixed tensor of that layout (``projections.pt`` of the official
    fixtures). For ``H * W < chunk_size`` (where the release crashes) two buckets are used and all
    positions share one chunk (see :func:`nlsr.attention.buckets.effective_chunk`).
    ``attention_backend`` picks the computation of the bucketed attention ("auto", "blocked" or
    "sdpa"; see :func:`nlsr.attention.backends.choose_backend`).
    """

    kind = "nlsa"
    signed = True

    def __init__(
        self,
        channels: int,
        n_hashes: int = 4,
        reduction: int = 4,
        chunk_size: int = 144,
        res_scale: float = 0.1,
        k_size: int = 3,
        attention_backend: str = "auto",
    ):
        super().__init__(channels, n_hashes, reduction, chunk_size, res_scale, attention_backend)
        d = channels // reduction
        self.conv_match = nn.Sequential(nn.Conv2d(channels, d, k_size, padding=k_size // 2))
        self.conv_assembly = nn.Sequential(nn.Conv2d(channels, channels, 1))

    def draw_projections(
        self, n_buckets: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """Random rotations ``[d, n_hashes, n_buckets // 2]``, drawn as the release's ``randn``."""
        d = self.conv_match[0].out_channels
        shape = (1, d, self.n_hashes, n_buckets // 2)
        gen = self.generator
        draw_device = gen.device if gen is not None else device
        return torch.randn(shape, generator=gen, device=draw_device, dtype=dtype)[0].to(device)

    def forward(self, input: Tensor) -> Tensor:
        h, w = input.shape[-2:]
        x = self.conv_match(input).flatten(2).transpose(1, 2).contiguous()  # [N, L, d]
        y = self.conv_assembly(input).flatten(2).transpose(1, 2)  # [N, L, C]
        codes = self.hash_codes(x.detach(), self.n_buckets(h * w))
        out = bucket_attention(
            x, y, codes, self.chunk_size, backend=self.attention_backend
        )  # [N, L, C]
        return residual(input, out, self.res_scale)
