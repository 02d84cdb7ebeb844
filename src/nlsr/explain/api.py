"""``explain()``: where chosen LR pixels attend in every attention block of a network.

One seeded inference captures each block's input (:mod:`nlsr.explain.capture`); the queries'
rows are then computed with the blocks' own functions (:mod:`nlsr.explain.rows`). A block whose
map is ``f`` times the LR image (CSNLN's second x2 stage) takes the query at ``(f x, f y)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from nlsr.explain.capture import Captured, ExplainError, capture
from nlsr.explain.rows import attention_rows
from nlsr.inference import DEFAULT_SEED, to_tensor
from nlsr.io import Image
from nlsr.models.descriptor import ModelDescriptor
from nlsr.models.resolve import resolve_model


@dataclass
class BlockExplanation:
    """The attention of the chosen queries in one block, as NumPy arrays.

    ``weights`` ``[Q, h, w]`` (float32, each row sums to 1) over the block's ``h x w`` map
    (``csna``: over its key grid, the map downscaled ``scale`` times); ``queries`` the LR pixels
    ``(x, y)`` asked for and ``positions`` ``[Q, 2]`` the ``(x, y)`` on the block's map, which is
    ``factor`` times the LR image. ``extras``: see :mod:`nlsr.explain.rows`; ``shared_from``: the
    LCoA block whose pattern this one applied (its weights are that block's)."""

    index: int
    name: str
    kind: str
    map_size: tuple[int, int]
    factor: int
    queries: list[tuple[int, int]]
    positions: np.ndarray
    weights: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    shared_from: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: the fields, each query's top keys and, per mechanism, the extras
        that are per query and round (codes, chunks, round weights, support sizes)."""
        per_query = []
        flat = self.weights.reshape(len(self.queries), -1)
        width = self.weights.shape[-1]
        for i, row in enumerate(flat):
            top = np.argsort(-row, kind="stable")[:10]
            item: dict[str, Any] = {
                "query": list(self.queries[i]),
                "top_keys": [
                    {"x": int(j % width), "y": int(j // width), "weight": float(row[j])}
                    for j in top
                ],
            }
            for key in ("codes", "chunk", "round_weights"):
                if key in self.extras:
                    item[key] = self.extras[key][i].tolist()
            for key in ("support", "seen", "members"):
                if key in self.extras:
                    item[f"{key}_size"] = (
                        np.asarray(self.extras[key][i])
                        .reshape(*self.extras[key][i].shape[:-2], -1)
                        .sum(-1)
                        .tolist()
                    )
            per_query.append(item)
        return {
            "block": self.index,
            "name": self.name,
            "kind": self.kind,
            "map_size": list(self.map_size),
            "factor": self.factor,
            "grid": list(self.weights.shape[1:]),
            "shared_from": self.shared_from,
            "queries": per_query,
        }


def _factor(captured: Captured, lr_size: tuple[int, int]) -> int:
    """How many times larger than the LR image the block's map is (1 for padded maps)."""
    assert captured.input is not None
    return max(1, captured.input.shape[-2] // lr_size[0])


def _as_tensor(image: np.ndarray | Image | torch.Tensor) -> torch.Tensor:
    """An RGB LR image (HxWx3 array, :class:`~nlsr.io.Image` or ``(1, 3, H, W)`` in [0, 1])."""
    if isinstance(image, torch.Tensor):
        return image
    pixels = image.pixels if isinstance(image, Image) else image
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    return to_tensor(np.ascontiguousarray(pixels[..., :3]))


def explain(
    model: nn.Module | ModelDescriptor | str,
    image: np.ndarray | Image | torch.Tensor,
    queries: list[tuple[int, int]],
    *,
    blocks: list[int] | None = None,
    scale: int | None = None,
    seed: int = DEFAULT_SEED,
) -> list[BlockExplanation]:
    """Attention of the LR pixels ``queries`` ``[(x, y), ...]`` of ``image`` in the blocks
    numbered ``blocks`` (all when None) of ``model`` (anything :func:`nlsr.models.resolve_model`
    takes), computed from one inference seeded with ``seed`` (the run's own draws)."""
    described = resolve_model(model, scale) if scale is not None else resolve_model(model)
    lr = _as_tensor(image)
    height, width = lr.shape[-2:]
    if not queries:
        raise ExplainError("--query: give at least one query pixel X,Y")
    for x, y in queries:
        if not (0 <= x < width and 0 <= y < height):
            raise ExplainError(f"--query {x},{y}: outside the {width}x{height} input image")
    device = next(iter(described.module.parameters()), torch.empty(0)).device

    def rows_of(c: Captured) -> tuple[Any, np.ndarray, int, tuple[int, int]] | None:
        """The queries' rows in block ``c``, computed right after it ran (None: it applied
        another block's pattern, whose rows are its own)."""
        if c.shared_from is not None or c.input is None:
            return None
        f = _factor(c, (height, width))
        h, w = c.input.shape[-2:]
        pos = np.array([(min(w - 1, x * f), min(h - 1, y * f)) for x, y in queries])
        flat = torch.as_tensor(pos[:, 1] * w + pos[:, 0], device=c.input.device)
        rows = attention_rows(c.block, c.kind, c.input, flat, c.generator_state)
        return rows, pos, f, (h, w)

    captured, _ = capture(described, lr.to(device), blocks, seed, process=rows_of)
    by_index = {c.index: c for c in captured}
    out = []
    for c in captured:
        if blocks is not None and c.index not in blocks:
            continue
        source = by_index[c.shared_from] if c.shared_from is not None else c
        rows, pos, f, size = source.result
        out.append(
            BlockExplanation(
                index=c.index,
                name=c.name,
                kind=c.kind,
                map_size=size,
                factor=f,
                queries=[(int(x), int(y)) for x, y in queries],
                positions=pos,
                weights=rows.weights.float().cpu().numpy(),
                extras={k: v.cpu().numpy() for k, v in rows.extras.items()},
                shared_from=c.shared_from,
            )
        )
    return out
