"""GLA: global learnable attention with super-bit LSH (Su et al., DLSN, 2023).

Positions are hashed with orthogonal random projections (code ``argmax(xW)``), sorted, chunked
(128) and attend to their own and both neighbour chunks, as in NLSA, with a learnable score term
``fc(f_j)[i]`` added to ``q_i . k_j`` (``i`` = the query's slot in its chunk, so the chunk size is
baked into ``fc``). The term reaches the shared kernel as a :class:`KeyBiasMLP` (by its parts,
so the kernel recomputes it instead of storing it); hashing comes from
:class:`nlsr.attention.hashing.HashingAttention`. Parameter names equal the released code's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from nlsr.attention.backends import bucket_attention, exporting
from nlsr.attention.buckets import residual
from nlsr.attention.hashing import HashingAttention
from nlsr.attention.registry import register_attention

#: Largest learnable term ``[N, L, chunk]`` (values) that training keeps whole (16 MiB in
#: float32); larger ones are recomputed block by block in the backward pass (memory).
STORED_TERM_ELEMENTS = 2**22
#: Positions per slice when :meth:`KeyBiasMLP.sliced` evaluates the bias.
MLP_SLICE = 2**16


class KeyBiasMLP(NamedTuple):
    """GLA's learnable term ``fc(f_j)`` by its parts: ``W2 relu(W1 f_j + b1) + b2`` of the key
    features ``features`` ``[N, L, C]``, a :class:`~nlsr.attention.buckets.KeyBiasNetwork`. The
    blocked kernel evaluates it in slices of positions and recomputes it block by block in the
    backward pass, so neither the ``[N, L, chunk]`` bias nor its gradient is ever stored
    (training memory)."""

    features: Tensor
    weight1: Tensor
    bias1: Tensor
    weight2: Tensor
    bias2: Tensor

    def evaluate(self) -> Tensor:
        """The whole bias ``[N, L, chunk]``, differentiable by plain autograd."""
        hidden = torch.nn.functional.linear(self.features, self.weight1, self.bias1).relu()
        return torch.nn.functional.linear(hidden, self.weight2, self.bias2)

    @torch.no_grad()
    def sliced(self) -> Tensor:
        """The whole bias ``[N, L, chunk]`` without autograd, evaluated on slices of positions
        so that the row-major copy of the features never covers the whole map; in the weights'
        dtype, also under autocast (the bias is added to float32 scores)."""
        n, length, _ = self.features.shape
        out = self.features.new_empty(n, length, self.weight2.shape[0], dtype=self.weight2.dtype)
        with torch.autocast(self.features.device.type, enabled=False):
            for b in range(n):
                for start in range(0, length, MLP_SLICE):
                    stop = min(length, start + MLP_SLICE)
                    self.on_rows(self.features[b, start:stop], out=out[b, start:stop])
        return out

    def on_rows(self, rows: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Hidden layer and bias ``([M, hidden], [M, chunk])`` of feature ``rows`` ``[M, C]``
        in the weights' dtype (no autograd; the bias is written into ``out`` when given)."""
        rows = rows.to(self.weight1.dtype)
        hidden = torch.addmm(self.bias1, rows, self.weight1.t()).relu_()
        return hidden, torch.addmm(self.bias2, hidden, self.weight2.t(), out=out)

    def truncated(self, width: int) -> KeyBiasMLP:
        """The MLP giving the first ``width`` bias columns (query slots)."""
        return self._replace(weight2=self.weight2[:width], bias2=self.bias2[:width])

    def on_rows_backward(
        self, grad_bias: Tensor, rows: Tensor, hidden: Tensor, grads: list[Tensor]
    ) -> Tensor:
        """Accumulate the MLP's parameter gradients ``grads`` ``[_, dW1, db1, dW2, db2]`` from a
        block's bias gradient ``[M, chunk]`` and return the gradient of its feature ``rows``."""
        grads[3].addmm_(grad_bias.t(), hidden)
        grads[4].add_(grad_bias.sum(dim=0))
        grad_hidden = torch.ops.aten.threshold_backward(
            torch.mm(grad_bias, self.weight2), hidden, 0
        )
        grads[1].addmm_(grad_hidden.t(), rows)
        grads[2].add_(grad_hidden.sum(dim=0))
        return torch.mm(grad_hidden, self.weight1)


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
class GlobalLearnableAttention(HashingAttention):
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
    :func:`nlsr.attention.backends.choose_backend`).
    """

    kind = "gla"
    signed = False

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
        super().__init__(channels, n_hashes, reduction, chunk_size, res_scale, attention_backend)
        self.super_bit = super_bit
        self.learnable = learnable
        self.conv_match = _conv_relu(channels, channels // reduction, k_size)
        self.conv_assembly = _conv_relu(channels, channels, k_size)
        if learnable:
            self.conv_assembly_fc = _conv_relu(channels, channels, k_size)
            self.fc = nn.Sequential(
                nn.Linear(channels, chunk_size),
                nn.ReLU(inplace=True),
                nn.Linear(chunk_size, chunk_size),
            )

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

    def _learnable_term(self, input: Tensor) -> KeyBiasMLP | Tensor:
        """``fc(f_j)``: in training, by its parts, which the attention evaluates and recomputes
        block by block (neither the ``[N, L, chunk]`` term nor its gradient is kept), unless the
        term is at most :data:`STORED_TERM_ELEMENTS` (then kept whole: ~20% faster at 48x48 and
        96x96); without autograd evaluated here in slices, so that the features are freed
        before the attention runs (inference memory)."""
        fc1, fc2 = self.fc[0], self.fc[2]
        features = self.conv_assembly_fc(input).flatten(2).transpose(1, 2)  # [N, L, C]
        mlp = KeyBiasMLP(features, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        if exporting():
            return mlp.evaluate()
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
        codes = self.hash_codes(x.detach(), self.n_buckets(h * w))
        out = bucket_attention(
            x, y, codes, self.chunk_size, key_bias=bias, backend=self.attention_backend
        )  # [N, L, C]
        return residual(input, out, self.res_scale)
