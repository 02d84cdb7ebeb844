"""GLA: global learnable attention with super-bit LSH (Su et al., DLSN, 2023).

Positions are hashed with orthogonal random projections (code ``argmax(xW)``), sorted, chunked
(128) and attend to their own and both neighbour chunks, as in NLSA, with a learnable score term
``fc(f_j)[i]`` added to ``q_i . k_j`` (``i`` = the query's slot in its chunk, so the chunk size is
baked into ``fc``). Parameter names equal the released code's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nlsr.attention import register_attention
from nlsr.attention.buckets import (
    KeyBiasMLP,
    bucket_attention,
    bucket_count,
    check_backend,
    check_hashing_options,
    hash_codes,
    residual,
)

#: Largest learnable term ``[N, L, chunk]`` (values) that training keeps whole (16 MiB in
#: float32); larger ones are recomputed block by block in the backward pass (memory).
STORED_TERM_ELEMENTS = 2**22


def orthogonal_columns(
    d: int, k: int, generator: torch.Generator | None = None, device: torch.device | None = None
) -> Tensor:
    """One ``torch.nn.init.orthogonal_(torch.empty(d, k))`` draw: orthonormal columns when
    ``k <= d``, orthonormal rows otherwise."""
    return torch.nn.init.orthogonal_(torch.empty(d, k, device=device), generator=generator)


def _conv_relu(c_in: int, c_out: int, k_size: int) -> nn.Sequential:
    """'Same' conv followed by an in-place ReLU (the released ``BasicBlock`` with ``act=ReLU``)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, k_size, padding=k_size // 2), nn.ReLU(inplace=True))


@register_attention("gla")
class GlobalLearnableAttention(nn.Module):
    """DLSN's attention block: ``res_scale * (hashed attention with learnable scores) + x``.

    Projections ``[d, n_hashes, n_buckets]`` are drawn at every forward (from ``self.generator`` if
    set, else the global CPU RNG as released) unless ``self.projections`` is set. Released hashing
    draws one ``orthogonal_(empty(d, n_buckets))`` per round; ``super_bit=True`` instead
    orthogonalises the directions in batches of at most ``d`` (paper-faithful super-bit LSH, which
    differs when ``n_buckets > d``). ``learnable=False`` drops the learnable score term (ablation;
    no ``conv_assembly_fc``/``fc`` parameters). For ``H * W < chunk_size`` (where the release
    crashes) one bucket is used and all positions share one chunk (see
    :func:`nlsr.attention.buckets.effective_chunk`). ``attention_backend`` picks the computation
    of the bucketed attention ("auto", "blocked" or "sdpa"; see
    :func:`nlsr.attention.buckets.choose_backend`).
    """

    def __init__(
        self,
        channels: int,
        n_hashes: int = 3,
        reduction: int = 4,
        chunk_size: int = 128,
        res_scale: float = 1.0,
        k_size: int = 3,
        super_bit: bool = False,
        learnable: bool = True,
        attention_backend: str = "auto",
    ):
        super().__init__()
        check_hashing_options("gla", channels, reduction, n_hashes, chunk_size)
        self.chunk_size = chunk_size
        self.n_hashes = n_hashes
        self.reduction = reduction
        self.res_scale = res_scale
        self.super_bit = super_bit
        self.learnable = learnable
        self.attention_backend = check_backend(attention_backend)
        self.conv_match = _conv_relu(channels, channels // reduction, k_size)
        self.conv_assembly = _conv_relu(channels, channels, k_size)
        if learnable:
            self.conv_assembly_fc = _conv_relu(channels, channels, k_size)
            self.fc = nn.Sequential(
                nn.Linear(channels, chunk_size),
                nn.ReLU(inplace=True),
                nn.Linear(chunk_size, chunk_size),
            )
        self.projections: Tensor | None = None
        self.generator: torch.Generator | None = None

    def draw_projections(
        self, n_buckets: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """Projections ``[d, n_hashes, n_buckets]`` with the released (or super-bit) draws."""
        d = self.conv_match[0].out_channels
        gen = self.generator
        draw_device = gen.device if gen is not None else torch.device("cpu")
        rounds = []
        for _ in range(self.n_hashes):
            if self.super_bit:
                sizes = [min(d, n_buckets - s) for s in range(0, n_buckets, d)]
                parts = [orthogonal_columns(d, k, gen, draw_device) for k in sizes]
                rounds.append(torch.cat(parts, dim=1))
            else:
                rounds.append(orthogonal_columns(d, n_buckets, gen, draw_device))
        return torch.stack(rounds, dim=1).to(device=device, dtype=dtype)

    def hash_codes(self, x: Tensor, n_buckets: int) -> Tensor:
        """Bucket codes ``[N, n_hashes, L]`` of embeddings ``x`` ``[N, L, d]``."""
        proj = self.projections
        expected = (x.shape[-1], self.n_hashes, n_buckets)
        if proj is None:
            proj = self.draw_projections(n_buckets, x.device, x.dtype)
        elif tuple(proj.shape) != expected:
            raise ValueError(
                f"gla projections have shape {tuple(proj.shape)}, expected {expected} "
                f"[d, n_hashes, n_buckets] for {x.shape[1]} positions"
            )
        return hash_codes(x, proj.to(device=x.device, dtype=x.dtype), signed=False)

    def _learnable_term(self, input: Tensor) -> KeyBiasMLP | Tensor:
        """``fc(f_j)``: in training, by its parts, which the attention evaluates and recomputes
        block by block (neither the ``[N, L, chunk]`` term nor its gradient is kept), unless the
        term is at most :data:`STORED_TERM_ELEMENTS` (then kept whole: ~20% faster at 48x48 and
        96x96); without autograd evaluated here in slices, so that the features are freed
        before the attention runs (inference memory)."""
        fc1, fc2 = self.fc[0], self.fc[2]
        features = self.conv_assembly_fc(input).flatten(2).transpose(1, 2)  # [N, L, C]
        mlp = KeyBiasMLP(features, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        if not torch.is_grad_enabled():
            return mlp.sliced()
        n, length = features.shape[:2]
        return mlp.evaluate() if n * length * self.chunk_size <= STORED_TERM_ELEMENTS else mlp

    def forward(self, input: Tensor) -> Tensor:
        h, w = input.shape[-2:]
        x = self.conv_match(input).flatten(2).transpose(1, 2).contiguous()  # [N, L, d]
        y = self.conv_assembly(input).flatten(2).transpose(1, 2)  # [N, L, C]
        bias = None
        if self.learnable:
            bias = self._learnable_term(input)
        codes = self.hash_codes(x.detach(), bucket_count(h * w, self.chunk_size))
        out = bucket_attention(
            x, y, codes, self.chunk_size, key_bias=bias, backend=self.attention_backend
        )  # [N, L, C]
        return residual(input, out, self.res_scale)
