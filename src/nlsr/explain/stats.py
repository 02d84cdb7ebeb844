"""Attention statistics over every query of an image or a benchmark set.

Per block and per query position (all positions of the block's map), from the same rows as
:func:`nlsr.explain.explain`:

* **support size**: the number of keys whose weight exceeds ``threshold`` (default 1e-3);
  for HSPA also meaningful at 0 (its exact sparsemax support, ``threshold=0``);
* **entropy**: ``-sum_j w_j ln w_j`` in nats over the keys with ``w_j > 0`` (``ln L`` for a
  uniform row over ``L`` keys, 0 for one key);
* **promoted** (hashing blocks: GLA, and NLSA as the control without a learnable term): whether
  the key of largest merged weight is *not* among the ``promote_k`` keys of largest raw
  similarity ``q . k / |k|`` among the keys the query saw in any round, i.e. its similarity is
  below the ``promote_k``-th largest (ties count as among them); the query's own position is
  left out of both (it is always the most similar key) -- for GLA, how often the learnable
  term (or the round merge) hands the top weight to a less similar key.

Queries are processed in batches (:data:`BATCH` rows), so memory stays O(batch x positions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from nlsr.explain.capture import Captured, capture
from nlsr.explain.rows import attention_rows, bucket_entries, hashing_setup, lcoa_setup
from nlsr.inference import DEFAULT_SEED
from nlsr.models.descriptor import ModelDescriptor

#: Default weight above which a key counts in the support.
THRESHOLD = 1e-3
#: Query rows computed at once.
BATCH = 256
#: Percentiles reported in the summaries.
PERCENTILES = (5, 25, 50, 75, 95)


@dataclass
class QueryStats:
    """Per-query statistics of one block on one input: ``support`` ``[L]`` (int), ``entropy``
    ``[L]`` (nats), ``promoted`` ``[L]`` (bool; hashing blocks only, else None)."""

    support: np.ndarray
    entropy: np.ndarray
    promoted: np.ndarray | None


def _entry_stats(
    keys: Tensor,
    values: Tensor,
    similarity: Tensor | None,
    positions: Tensor,
    threshold: float,
    promote_k: int,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Support sizes, entropies and promoted flags of rows given by entries (key positions and
    weights ``[Q, E]``, a key possibly repeated): repeated keys are summed first. ``similarity``
    ``[Q, E]``: the raw similarity of each entry's key (None: no promoted flags), compared over
    the keys other than the query ``positions`` themselves."""
    keys, order = keys.sort(dim=1)
    values = values.gather(1, order).double()
    first = torch.ones_like(keys, dtype=torch.bool)
    first[:, 1:] = keys[:, 1:] != keys[:, :-1]
    group = first.long().cumsum(dim=1) - 1  # index of each entry's distinct key
    merged = torch.zeros_like(values).scatter_add_(1, group, values)
    support = (merged > threshold).sum(dim=1)
    logs = torch.where(merged > 0, merged.log(), torch.zeros_like(merged))
    entropy = -(merged * logs).sum(dim=1)
    if similarity is None:
        return support, entropy, None
    other = keys != positions.unsqueeze(1)
    similarity = similarity.gather(1, order).double()
    k = min(promote_k, similarity.shape[1])
    kth = similarity.masked_fill(~(first & other), -math.inf).topk(k, dim=1).values[:, -1]
    group_similarity = torch.zeros_like(similarity).scatter_(1, group, similarity)
    group_other = torch.zeros_like(other).scatter_(1, group, other)
    best = merged.masked_fill(~group_other, -1.0).argmax(dim=1, keepdim=True)
    return support, entropy, group_similarity.gather(1, best).squeeze(1) < kth


def block_statistics(
    block: nn.Module,
    kind: str,
    x: Tensor,
    state: Tensor | None = None,
    *,
    threshold: float = THRESHOLD,
    promote_k: int = 1,
    batch: int = BATCH,
) -> QueryStats:
    """Statistics of every query of ``block`` (mechanism ``kind``) on its input ``x``
    ``(1, C, h, w)`` (``state``: the captured generator state of a hashing block). Bucketed
    blocks are computed from their entries (O(rounds x 3 chunks) per query, no dense row)."""
    h, w = x.shape[-2:]
    length = h * w
    support = np.empty(length, dtype=np.int64)
    entropy = np.empty(length, dtype=np.float64)
    hashing = kind in ("nlsa", "gla")
    promoted = np.empty(length, dtype=bool) if hashing else None
    with torch.inference_mode():
        setup = None
        if hashing:
            setup = hashing_setup(block, x, state)  # type: ignore[arg-type]
        elif kind == "lcoa":
            setup = lcoa_setup(block, x)  # type: ignore[arg-type]
        step = batch * 16 if setup is not None else batch
        for start in range(0, length, step):
            positions = torch.arange(start, min(length, start + step), device=x.device)
            span = slice(start, start + len(positions))
            if setup is not None:
                keys, values, _, _ = bucket_entries(setup, positions)
                similarity = None
                if hashing:
                    q = setup.queries[positions].unsqueeze(1).double()  # float64: no near-ties
                    similarity = (q * setup.keys[keys].double()).sum(dim=-1)
                s, e, p = _entry_stats(keys, values, similarity, positions, threshold, promote_k)
                if promoted is not None and p is not None:
                    promoted[span] = p.cpu().numpy()
            else:
                rows = attention_rows(block, kind, x, positions, state)
                weights = rows.weights.reshape(len(positions), -1).double()
                s = (weights > threshold).sum(dim=1)
                logs = torch.where(weights > 0, weights.log(), torch.zeros_like(weights))
                e = -(weights * logs).sum(dim=1)
            support[span] = s.cpu().numpy()
            entropy[span] = e.cpu().numpy()
    return QueryStats(support, entropy, promoted)


def _summary(values: np.ndarray, counts: bool) -> dict[str, Any]:
    """Mean, percentiles and a histogram: power-of-two bins ``[1, 2), [2, 4), ...`` for
    ``counts`` (a support of 0 keys falls in none), else 20 equal bins."""
    values = np.asarray(values, dtype=np.float64)
    if counts:
        edges = 2.0 ** np.arange(0, math.ceil(math.log2(max(1.0, values.max()) + 1)) + 1)
    else:
        edges = np.linspace(values.min(), max(values.max(), values.min() + 1e-9), 21)
    hist, edges = np.histogram(values, bins=edges)
    return {
        "mean": float(values.mean()),
        "percentiles": {str(p): float(np.percentile(values, p)) for p in PERCENTILES},
        "histogram": {"edges": edges.tolist(), "counts": hist.tolist()},
    }


@dataclass
class BlockSummary:
    """Statistics of one block over all queries of all images."""

    index: int
    name: str
    kind: str
    stats: list[QueryStats]

    def to_dict(self, threshold: float, promote_k: int) -> dict[str, Any]:
        """JSON layout: counts, support size and entropy summaries, promoted fraction."""
        support = np.concatenate([s.support for s in self.stats])
        entropy = np.concatenate([s.entropy for s in self.stats])
        out: dict[str, Any] = {
            "block": self.index,
            "name": self.name,
            "kind": self.kind,
            "queries": int(support.size),
            "support_threshold": threshold,
            "support_size": _summary(support, counts=True),
            "entropy_nats": _summary(entropy, counts=False),
        }
        if self.stats[0].promoted is not None:
            promoted = np.concatenate([s.promoted for s in self.stats])  # type: ignore[misc]
            out["promoted_fraction"] = float(promoted.mean())
            out["promote_k"] = promote_k
        return out


def statistics(
    model: ModelDescriptor,
    images: list[Tensor],
    *,
    blocks: list[int] | None = None,
    threshold: float = THRESHOLD,
    promote_k: int = 1,
    seed: int = DEFAULT_SEED,
) -> list[BlockSummary]:
    """Per-block statistics of ``model`` over every query of the LR ``images``
    (``(1, 3, H, W)`` in [0, 1]); blocks applying another block's LCoA pattern are skipped
    (their rows are that block's)."""
    if threshold < 0:
        raise ValueError(f"--threshold must be >= 0, got {threshold}")
    if promote_k < 1:
        raise ValueError(f"--promote-k must be >= 1, got {promote_k}")
    summaries: dict[int, BlockSummary] = {}

    def stats_of(c: Captured) -> QueryStats | None:
        """The block's statistics, right after it ran (None: it applied another's pattern)."""
        if c.shared_from is not None or c.input is None:
            return None
        return block_statistics(
            c.block,
            c.kind,
            c.input,
            c.generator_state,
            threshold=threshold,
            promote_k=promote_k,
        )

    for lr in images:
        for c in capture(model, lr, blocks, seed, process=stats_of)[0]:
            if c.result is not None:
                summary = summaries.setdefault(c.index, BlockSummary(c.index, c.name, c.kind, []))
                summary.stats.append(c.result)
    return [summaries[k] for k in sorted(summaries)]
