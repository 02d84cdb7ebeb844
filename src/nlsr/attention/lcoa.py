"""LCoA (LCoAN, Zhao et al.): sparse attention over k-means clusters, shared across layers.

Positions are grouped by their nearest k-means centroid (cosine), sorted by cluster, cut into
windows, and every window attends to itself and its two neighbours. In collaborative use the
first block computes that *pattern* (sort order and attention probabilities;
:mod:`nlsr.attention.lcoa_pattern`) and every later block reuses it, computing only its own
values; gradients reach the first block through the shared probabilities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nlsr.attention.backends import bucket_attention, check_backend, exporting
from nlsr.attention.buckets import residual
from nlsr.attention.hashing import hash_codes
from nlsr.attention.lcoa_pattern import BucketPattern, apply_pattern, attention_pattern
from nlsr.attention.registry import register_attention

#: Iterations of Lloyd's algorithm run when the centroids are initialised from the first batch.
KMEANS_INIT_ITERS = 10
#: Values of ``centroid_update``: "none" = released code (init once, then frozen), "ema" = paper.
CENTROID_UPDATES = ("none", "ema")


def kmeans_step(
    x: torch.Tensor, means: torch.Tensor, codes: torch.Tensor | None = None
) -> torch.Tensor:
    """One Lloyd step on ``x`` [N, R, L, d] with centroids ``means`` [R, K, d]; returns [R, K, d].

    Points go to the centroid of largest dot product (or to ``codes`` [N, R, L] when given); a
    new centroid is the L2-normalised sum of its points over the batch; empty clusters keep theirs.
    """
    n, r, _, d = x.shape
    k = means.shape[1]
    if codes is None:
        codes = torch.einsum("bhld,hcd->bhlc", x, means).max(dim=-1).indices
    counts = torch.zeros(n, r, k, dtype=torch.long, device=x.device)
    counts.scatter_add_(-1, codes, torch.ones_like(codes))
    empty = counts.sum(0) == 0
    sums = torch.zeros(n, r, k, d, dtype=x.dtype, device=x.device)
    sums.scatter_add_(-2, codes.unsqueeze(-1).expand(-1, -1, -1, d), x)
    new = F.normalize(sums.sum(0), dim=-1)
    return torch.where(empty.unsqueeze(-1), means, new)


class KMeans(nn.Module):
    """Spherical k-means centroids ``means`` [n_rounds, n_clusters, dim] with flag ``initted``.

    Initialised from the first batch it sees (random samples + 10 Lloyd steps, as released);
    :meth:`ema_update` moves them toward their assigned points (the paper's training rule).
    """

    def __init__(self, n_rounds: int, dim: int, n_clusters: int, ema_decay: float = 0.999):
        super().__init__()
        self.ema_decay = ema_decay
        self.register_buffer("means", torch.randn(n_rounds, n_clusters, dim))
        self.register_buffer("initted", torch.tensor(False))

    @torch.no_grad()
    def initialise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Pick ``n_clusters`` of the (unnormalised) vectors ``x`` [N, L, d] at random and refine
        them with 10 Lloyd steps; the same samples seed every round, as in the released code."""
        r, k, d = self.means.shape
        xr = x.detach().unsqueeze(1).expand(-1, r, -1, -1)
        samples = xr.transpose(0, 1).reshape(r, -1, d)
        n_samples = samples.shape[1]
        device = generator.device if generator is not None else x.device
        if n_samples >= k:
            idx = torch.randperm(n_samples, generator=generator, device=device)[:k]
        else:
            idx = torch.randint(0, n_samples, (k,), generator=generator, device=device)
        means = samples[:, idx.to(x.device)]
        for _ in range(KMEANS_INIT_ITERS):
            means = kmeans_step(xr, means)
        self.means.copy_(means)
        self.initted.fill_(True)

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster index [N, R, L] of each vector of ``x`` [N, L, d]: argmax_c normalize(x).mu_c
        (first index on ties), computed in blocks of positions."""
        means = self.means.to(x.dtype).permute(2, 0, 1)  # [d, R, K]
        return hash_codes(F.normalize(x, dim=-1), means, signed=False)

    @torch.no_grad()
    def ema_update(self, x: torch.Tensor, codes: torch.Tensor) -> None:
        """Paper rule: mu <- decay * mu + (1 - decay) * normalize(sum of the normalised points
        assigned to mu) for ``x`` [N, L, d] and ``codes`` [N, R, L]; empty clusters stay put."""
        xn = F.normalize(x.detach(), dim=-1).unsqueeze(1).expand(-1, self.means.shape[0], -1, -1)
        target = kmeans_step(xn, self.means.to(x.dtype), codes).to(self.means.dtype)
        self.means.mul_(self.ema_decay).add_(target, alpha=1.0 - self.ema_decay)


@register_attention("lcoa")
class LCoA(nn.Module):
    """LCoAN's k-means sparse attention block: ``res_scale * attention(x) + x``.

    ``forward(x)`` computes its own pattern (standalone use, e.g. inside EDSR/RCAN);
    ``forward_shared(x, pattern)`` reuses a pattern from an earlier block and returns it.
    ``attention_backend`` ("auto", "blocked" or "sdpa"; see
    :func:`nlsr.attention.backends.choose_backend`) applies to ``forward`` only: a shared pattern
    keeps its probabilities, which SDPA does not return.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 1,
        n_clusters: int = 128,
        window_size: int = 384,
        n_rounds: int = 1,
        res_scale: float = 0.1,
        ema_decay: float = 0.999,
        centroid_update: str = "none",
        k_size: int = 3,
        attention_backend: str = "auto",
    ):
        super().__init__()
        if centroid_update not in CENTROID_UPDATES:
            raise ValueError(
                f"option centroid_update: expected one of {CENTROID_UPDATES}, "
                f"got {centroid_update!r}"
            )
        for name, value in (
            ("reduction", reduction),
            ("n_clusters", n_clusters),
            ("window_size", window_size),
            ("n_rounds", n_rounds),
        ):
            if value < 1:
                raise ValueError(f"option {name}: must be >= 1, got {value}")
        if channels % reduction:
            raise ValueError(f"option reduction: {reduction} does not divide {channels} channels")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"option ema_decay: must be in [0, 1), got {ema_decay}")
        self.window_size = window_size
        self.res_scale = res_scale
        self.centroid_update = centroid_update
        self.attention_backend = check_backend(attention_backend)
        #: Random source for the k-means initialisation (None: torch's global generator).
        self.generator: torch.Generator | None = None
        self.kmeans = KMeans(n_rounds, channels // reduction, n_clusters, ema_decay)
        self.conv_match = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, k_size, padding=k_size // 2)
        )
        self.conv_assembly = nn.Sequential(nn.Conv2d(channels, channels, 1))

    def _embed_and_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Match embedding [N, L, d] of ``x`` (N, C, H, W) and its cluster codes [N, R, L];
        initialises the centroids on first use and, with ``centroid_update="ema"``, updates
        them in training mode."""
        embed = self.conv_match(x).flatten(2).transpose(1, 2)
        if not exporting() and not bool(self.kmeans.initted):  # export: checked before
            self.kmeans.initialise(embed, self.generator)
        codes = self.kmeans.assign(embed)
        if self.training and self.centroid_update == "ema":
            self.kmeans.ema_update(embed, codes)
        return embed, codes

    def make_pattern(self, x: torch.Tensor) -> BucketPattern:
        """Cluster the match embedding of ``x`` (N, C, H, W) and build the attention pattern."""
        return attention_pattern(*self._embed_and_codes(x), self.window_size)

    def forward_shared(
        self, x: torch.Tensor, pattern: BucketPattern | None = None
    ) -> tuple[torch.Tensor, BucketPattern]:
        """Attention over ``x`` with ``pattern`` (computed here when None); returns the output and
        the pattern, to be handed to the next block."""
        if pattern is None:
            pattern = self.make_pattern(x)
        values = self.conv_assembly(x).flatten(2).transpose(1, 2)
        return residual(x, apply_pattern(pattern, values), self.res_scale), pattern

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Standalone: ``res_scale * attention(x) + x`` with this block's own clusters (fused:
        no pattern is kept, so memory stays O(H*W))."""
        embed, codes = self._embed_and_codes(x)
        values = self.conv_assembly(x).flatten(2).transpose(1, 2)
        out = bucket_attention(
            embed, values, codes, self.window_size, backend=self.attention_backend
        )
        return residual(x, out, self.res_scale)
