"""What a model's options may be, and how large a model nlsr agrees to build.

Options come from files, command lines and callers, so every one is type- and range-checked
(:data:`OPTION_RULES`), and a model is first built on the ``meta`` device (no memory) and held to
the limits of :mod:`nlsr.checkpoint` before anything is allocated.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nlsr.attention import available_attention
from nlsr.checkpoint import (
    MAX_BLOCKS,
    MAX_BLOCKS_ENV,
    MAX_PARAMETERS,
    MAX_PARAMETERS_ENV,
    CheckpointError,
    first_line,
    is_int,
    limit,
)
from nlsr.models.registry import build
from nlsr.models.registry import options as default_options

__all__ = ["MAX_SCALE", "OPTION_RULES", "check_options", "check_scale", "expected_state"]

#: Largest upscaling factor accepted from a checkpoint or a caller.
MAX_SCALE = 16
#: Largest value of any integer option (they size tensors; 32-bit).
_MAX_INT = 2**31 - 1


@dataclass(frozen=True)
class _Rule:
    """What an option's value may be: ``kind`` "int" (in [low, _MAX_INT]), "real" (finite, in
    [low, high], above ``low`` if ``open_low``), "bool", "choice" (one of ``choices``),
    "attention" (a registered attention block) or "mapping" (str keys); ``none``: None allowed."""

    kind: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    none: bool = False
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "int":
            text = f"an integer >= {int(self.low or 0)} (below 2**31)"
        elif self.kind == "real":
            bounds = []
            if self.low is not None:
                bounds.append(f"{'>' if self.open_low else '>='} {self.low:g}")
            if self.high is not None:
                bounds.append(f"<= {self.high:g}")
            text = "a finite number" + (f" {' and '.join(bounds)}" if bounds else "")
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "choice":
            text = "one of " + ", ".join(map(repr, self.choices))
        elif self.kind == "attention":
            text = "an attention block name (" + ", ".join(available_attention()) + ")"
        else:
            text = "an object (mapping) with string keys"
        return text + (" or null" if self.none else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.none
        if self.kind == "int":
            return is_int(value) and (self.low or 0) <= value <= _MAX_INT
        if self.kind == "real":
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                return False
            try:
                v = float(value)
            except OverflowError:  # an integer beyond float range
                return False
            return (
                math.isfinite(v)
                and (self.low is None or (v > self.low if self.open_low else v >= self.low))
                and (self.high is None or v <= self.high)
            )
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices
        if self.kind == "attention":
            return isinstance(value, str) and value in available_attention()
        return isinstance(value, Mapping) and all(isinstance(k, str) for k in value)


_COUNT = _Rule("int", 1)
#: The rule of every option of the registered networks (tests check that none is missing).
OPTION_RULES: dict[str, _Rule] = {
    "n_resblocks": _Rule("int", 0),
    "n_resgroups": _COUNT,
    "n_feats": _COUNT,
    "n_colors": _COUNT,
    "reduction": _COUNT,
    "chunk_size": _COUNT,
    "n_hashes": _COUNT,
    "n_clusters": _COUNT,
    "window_size": _COUNT,
    "depth": _COUNT,
    "csnla_ksize": _COUNT,
    "csnla_stride": _COUNT,
    "topk": _Rule("int", 1, none=True),
    "block_size": _Rule("int", 1, none=True),
    "attention_every": _Rule("int", 1, none=True),
    "res_scale": _Rule("real"),
    "rgb_range": _Rule("real", 0, open_low=True),
    "ema_decay": _Rule("real", 0, 1),
    "csnla_softmax_scale": _Rule("real"),
    "super_bit": _Rule("bool"),
    "csnla_average": _Rule("bool"),
    "centroid_update": _Rule("choice", choices=("none", "ema")),
    "attention": _Rule("attention", none=True),
    "attention_options": _Rule("mapping", none=True),
}
#: Options that change how many parameters a network has (named when it is too large).
_SIZE_OPTIONS = (
    "n_feats",
    "n_resblocks",
    "n_resgroups",
    "depth",
    "reduction",
    "chunk_size",
    "n_hashes",
    "n_clusters",
    "csnla_ksize",
    "attention",
    "attention_every",
    "attention_options",
)


def _origin(origins: Mapping[str, str] | None, key: str, joint: str = "") -> str:
    """Where option ``key`` came from, as `` (from ...)`` or, with ``joint``, ``, from ...``."""
    where = (origins or {}).get(key)
    if not where:
        return ""
    return f"{joint}{where}" if joint else f" ({where})"


def check_options(
    arch: str,
    options: Mapping[str, Any],
    *,
    name: str = "options",
    origins: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``options`` of ``arch`` with every value type- and range-checked (integers as ``int``);
    raises CheckpointError naming the first bad option, its value and where it came from
    (``origins``: option -> e.g. "from the file's nlsr header")."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        rule = OPTION_RULES.get(key)
        if rule is None:
            ok = value is None or isinstance(value, (bool, int, float, str))
            if not ok:
                raise CheckpointError(
                    f"{name}: {arch} option {key!r} must be a number, string, bool or null, got "
                    f"{_shown(value)}{_origin(origins, key, ', ')}"
                )
        elif not rule.accepts(value):
            raise CheckpointError(
                f"{name}: {arch} option {key!r} must be {rule.describe()}, got "
                f"{_shown(value)}{_origin(origins, key, ', ')}"
            )
        out[key] = int(value) if is_int(value) else value
    return out


def _shown(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print (Python's int-to-str limit)
        text = f"<an integer of {value.bit_length()} bits>"
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def check_scale(scale: Any, name: str, where: str) -> int:
    """``scale`` as an int when it is an integer from 1 to :data:`MAX_SCALE`; else a
    CheckpointError saying where it came from (``where``)."""
    if not is_int(scale) or not 1 <= scale <= MAX_SCALE:
        raise CheckpointError(
            f"{name}: scale must be an integer from 1 to {MAX_SCALE}, got {_shown(scale)}, {where}"
        )
    return int(scale)


def expected_state(
    arch: str, scale: int, options: dict[str, Any], name: str, origins: Mapping[str, str]
) -> dict[str, Tensor]:
    """The state dict (shapes and dtypes only) of ``arch`` x``scale`` with ``options``, built on
    the ``meta`` device, which allocates nothing; refused when above the size limits."""
    defaults = default_options(arch)
    size = {k: options.get(k, defaults.get(k)) for k in ("n_resgroups", "n_resblocks")}
    groups = size["n_resgroups"] if "n_resgroups" in defaults else 1
    blocks = groups * ((size["n_resblocks"] if "n_resblocks" in defaults else 0) + 1)
    most = limit(MAX_BLOCKS_ENV, MAX_BLOCKS)
    if blocks > most:
        raise CheckpointError(
            f"{name}: {arch} with {_size_listing(options, origins, defaults, limit_blocks=True)} "
            f"would have {blocks:,} residual blocks, more than the limit of {most:,} "
            f"({MAX_BLOCKS_ENV})"
        )
    try:
        with torch.device("meta"):
            model = build(arch, scale, **options)
    except Exception as e:  # any constructor failure on bad options: no allocation happened
        raise CheckpointError(
            f"{name}: cannot build {arch} x{scale} with {options}: {first_line(e)}"
        ) from e
    values = sum(t.numel() for t in (*model.parameters(), *model.buffers()))
    most = limit(MAX_PARAMETERS_ENV, MAX_PARAMETERS)
    if values > most:
        nbytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        raise CheckpointError(
            f"{name}: {arch} x{scale} with {_size_listing(options, origins, defaults)} would "
            f"have {values:,} parameter and buffer values ({nbytes / 2**30:,.1f} GiB), more "
            f"than the limit of {most:,} ({MAX_PARAMETERS_ENV}); refused before allocating"
        )
    return model.state_dict()


def _size_listing(
    options: Mapping[str, Any],
    origins: Mapping[str, str],
    defaults: Mapping[str, Any],
    *,
    limit_blocks: bool = False,
) -> str:
    """The size options set, the furthest above its default first, with where each came from."""
    keys = ("n_resgroups", "n_resblocks") if limit_blocks else _SIZE_OPTIONS
    named = [k for k in keys if k in options]

    def excess(key: str) -> float:
        value, default = options[key], defaults.get(key)
        if is_int(value) and is_int(default) and default > 0:
            return value / default
        return 0.0

    named.sort(key=excess, reverse=True)
    shown = [f"option {k}={options[k]!r}{_origin(origins, k)}" for k in named]
    return ", ".join(shown) or "its default options"
