"""What the networks' checkpoint readers share: key lookups with clear errors, block counts,
the head/tail facts every EDSR-family state dict reveals (width, colours, rgb_range, scale)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from nlsr.checkpoint import CheckpointError
from nlsr.models.common import RGB_MEAN


def has_key(sd: Mapping[str, Tensor], pattern: str) -> bool:
    """Whether any key of ``sd`` matches regular expression ``pattern`` (from its start)."""
    rx = re.compile(pattern)
    return any(rx.match(k) for k in sd)


def need(sd: Mapping[str, Tensor], key: str, arch: str) -> Tensor:
    """Tensor ``key``, which every ``arch`` checkpoint has; CheckpointError when missing."""
    if key not in sd:
        raise CheckpointError(
            f"key {key!r} is missing, which every {arch} checkpoint has: the state dict is "
            "truncated or not from this architecture"
        )
    return sd[key]


def indices(sd: Mapping[str, Tensor], pattern: str) -> list[int]:
    """Sorted distinct integers captured by the first group of ``pattern`` over all keys."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})


def groups_with(sd: Mapping[str, Tensor], pattern: str) -> tuple[list[int], list[int]]:
    """(group indices, in-group indices) over keys matching a two-group pattern."""
    rx = re.compile(pattern)
    found = [(int(m.group(1)), int(m.group(2))) for k in sd if (m := rx.match(k))]
    return sorted({g for g, _ in found}), sorted({i for _, i in found})


def common(sd: Mapping[str, Tensor], head_key: str, arch: str) -> dict[str, Any]:
    """``n_feats`` and ``n_colors`` from the head convolution ``head_key``, and ``rgb_range``
    from the mean shift when it has one."""
    head = need(sd, head_key, arch)
    options: dict[str, Any] = {"n_feats": int(head.shape[0]), "n_colors": int(head.shape[1])}
    found = rgb_range(sd)
    if found is not None:
        options["rgb_range"] = found
    return options


def rgb_range(sd: Mapping[str, Tensor]) -> float | int | None:
    """``rgb_range`` from the frozen mean shift: ``sub_mean.bias = -rgb_range * RGB_MEAN``."""
    bias = sd.get("sub_mean.bias")
    if bias is None or bias.numel() != len(RGB_MEAN):
        return None
    ratio = -bias.double() / torch.tensor(RGB_MEAN, dtype=torch.float64)
    value = float(ratio.mean())
    if not math.isfinite(value) or value <= 0:
        return None
    nearest = round(value)
    return nearest if nearest > 0 and abs(value - nearest) <= 1e-4 * value else value


def tail_scale(sd: Mapping[str, Tensor], n_feats: int) -> int:
    """Scale from the sub-pixel upsampler ``tail.0``: k stages of 4C outputs = x2^k, 9C = x3."""
    stages = indices(sd, r"tail\.0\.(\d+)\.weight$")
    if not stages:
        if "tail.1.weight" in sd:
            return 1
        raise CheckpointError(
            "no upsampler keys (tail.*): the state dict is truncated or not a model"
        )
    outs = [int(sd[f"tail.0.{i}.weight"].shape[0]) for i in stages]
    if all(o == 4 * n_feats for o in outs):
        return 2 ** len(outs)
    if outs == [9 * n_feats]:
        return 3
    raise CheckpointError(
        f"upsampler (tail.0) output channels {outs} fit no scale for n_feats={n_feats}"
    )


def check_body(sd: Mapping[str, Tensor], arch: str, units: list[int], n: int, pattern: str) -> None:
    """EDSR/RCAN bodies are ``units`` 0..n-1 then one conv at ``n``; anything else (an attention
    block nlsr inserted) cannot be configured from the weights alone."""
    present = set(indices(sd, pattern))
    others = sorted(present - set(units))
    if units == list(range(n)) and others == [n] and f"body.{n}.weight" in sd:
        return
    odd = [i for i in others if i != max(present, default=-1)] or others
    raise CheckpointError(
        f"the {arch} body holds modules that are not plain {arch} blocks (at body."
        f"{', body.'.join(map(str, odd))}), e.g. an inserted attention block; pass arch= and the "
        "options (attention=...) explicitly, or use an nlsr-format checkpoint, which records them"
    )


def read_grouped(sd: Mapping[str, Tensor], arch: str, match_key: str) -> tuple[dict[str, Any], int]:
    """Shared reader of DLSN/HSPAN: groups ``body.g.body.{0..n-1}`` blocks, attention at
    ``body.g.body.n``; returns options and n."""
    options = common(sd, "head.0.weight", arch)
    groups, inner = groups_with(
        sd, rf"body\.(\d+)\.body\.(\d+)\.{re.escape(match_key)}\.0\.weight$"
    )
    if not groups:
        raise CheckpointError(f"no {arch} attention keys (*.{match_key}.*) found")
    n = inner[0]
    options["n_resgroups"] = len(groups)
    options["n_resblocks"] = n
    match = need(sd, f"body.0.body.{n}.{match_key}.0.weight", arch)
    options["reduction"] = options["n_feats"] // int(match.shape[0])
    return options, n
