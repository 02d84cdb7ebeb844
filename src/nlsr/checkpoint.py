"""Checkpoints: read the authors' ``.pt`` files, BasicSR-style wrappers and nlsr's own
safetensors format; recognise the architecture from the keys; load strictly; save.

Nothing here unpickles arbitrary objects: ``.pt``/``.pth`` files are read with
``torch.load(..., weights_only=True)``, nlsr files with safetensors. Nothing a file says is
trusted either: options are type- and range-checked, the model's size is computed on the
``meta`` device (no memory) and held to :data:`MAX_PARAMETERS` / :data:`MAX_BLOCKS` before
anything is allocated, the tensors are compared with the expected shapes and dtypes, and
non-finite weights are refused.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nlsr.atomic import atomic_write
from nlsr.models.common import RGB_MEAN

__all__ = [
    "MAX_BLOCKS",
    "MAX_PARAMETERS",
    "OPTION_RULES",
    "CheckpointError",
    "check_options",
    "detect",
    "load",
    "read_state_dict",
    "save",
]

#: Keys under which training frameworks nest the weights, in order of preference
#: (BasicSR ``params_ema``/``params``, Lightning ``state_dict``, generic ``model``).
WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model")
#: Safetensors header-metadata key holding nlsr's JSON model configuration.
CONFIG_KEY = "nlsr_config"
_RESERVED = ("arch", "scale", "options")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80
_MAX_LISTED = 5

#: Largest model :func:`load` builds, in parameter and buffer values (2 GB as float32); about
#: ten times the largest paper model (DLSN, 70M). Override with the environment variable below.
MAX_PARAMETERS = 500_000_000
MAX_PARAMETERS_ENV = "NLSR_MAX_PARAMETERS"
#: Largest number of residual blocks (``n_resgroups * (n_resblocks + 1)``, the attention or
#: channel-attention unit included) :func:`load` builds; RCAN, the deepest paper model, has 210.
#: Bounds the time even an empty (``meta``) build takes. Override with the variable below.
MAX_BLOCKS = 2048
MAX_BLOCKS_ENV = "NLSR_MAX_BLOCKS"
#: Largest upscaling factor accepted from a checkpoint or a caller.
MAX_SCALE = 16
#: Largest value of any integer option (they size tensors; 32-bit).
_MAX_INT = 2**31 - 1
#: Tensor dtypes a checkpoint may hold; anything else (complex, float8, quantised, unsigned
#: 16/32/64-bit) is refused.
_ACCEPTED_DTYPES = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
)
#: safetensors dtype names of the same (checked in the header, before any data is read).
_SAFETENSORS_DTYPES = ("F32", "F16", "BF16", "F64", "BOOL", "U8", "I8", "I16", "I32", "I64")

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, recognised or loaded; the message says which and why."""


# --------------------------------------------------------------------------- reading


def read_state_dict(
    source: str | Path | Mapping[str, Any],
) -> tuple[dict[str, Tensor], dict | None]:
    """Tensors of a checkpoint file or mapping, unwrapped and with ``module.`` prefixes removed,
    plus the nlsr configuration when the file is in nlsr's format (else ``None``)."""
    if isinstance(source, Mapping):
        return _normalise(source, "state dict"), None
    path = Path(source)
    obj, config = _read_file(path)
    return _normalise(obj, str(path)), config


def _read_file(path: Path) -> tuple[Any, dict | None]:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    with path.open("rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"{path}: the file is empty")
    if _looks_like_safetensors(head, path.stat().st_size):
        return _safetensors_load(path)
    if head.startswith(_ZIP_MAGIC) or head[0] == _PICKLE_PROTO:
        return _torch_load(path), None
    raise CheckpointError(
        f"{path}: not a checkpoint (neither a PyTorch .pt/.pth file nor a safetensors file)"
    )


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """Safetensors: an 8-byte little-endian header length, then that many bytes of JSON."""
    return (
        len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8
    )


def _torch_load(path: Path) -> Any:
    try:
        with warnings.catch_warnings():  # a corrupt file gets one error, not warnings as well
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to parse the file means it is not a usable checkpoint
        text = str(e)
        if "Weights only load failed" in text or "Unsupported global" in text:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path}: refused: the file holds pickled Python objects{what}, not only tensors; "
                "nlsr never unpickles arbitrary objects (torch.load weights_only=True)"
            ) from e
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise CheckpointError(f"{path}: unreadable PyTorch checkpoint ({first})") from e


def _safetensors_load(path: Path) -> tuple[dict[str, Tensor], dict | None]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
            config = None
            if CONFIG_KEY in metadata:
                config = _parse_config(metadata[CONFIG_KEY], str(path))
            # The header's dtypes and shapes, checked before any tensor data is read.
            declared = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in keys}
            bad = [f"{k} ({d})" for k, (d, _) in declared.items() if d not in _SAFETENSORS_DTYPES]
            if bad:
                raise CheckpointError(
                    f"{path}: tensors of a dtype nlsr does not accept: {_listing(bad)} (accepted: "
                    f"{', '.join(_SAFETENSORS_DTYPES)})"
                )
            _check_total(sum(math.prod(shape) for _, shape in declared.values()), str(path))
            tensors = {k: f.get_tensor(k) for k in keys}
    except CheckpointError:
        raise
    except Exception as e:  # corrupt header or data
        raise CheckpointError(f"{path}: unreadable safetensors file ({_first_line(e)})") from e
    return tensors, config


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _parse_config(text: str, name: str) -> dict:
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError; over-long integers; nesting
        raise CheckpointError(
            f"{name}: the {CONFIG_KEY} header is not valid JSON ({_first_line(e)})"
        ) from e
    ok = (
        isinstance(config, dict)
        and isinstance(config.get("arch"), str)
        and _is_int(config.get("scale"))
        and isinstance(config.get("options", {}), dict)
    )
    if not ok:
        raise CheckpointError(
            f"{name}: the {CONFIG_KEY} header must hold 'arch' (str), 'scale' (int) and "
            f"'options' (object), got {text[:200]!r}"
        )
    config.setdefault("options", {})
    return config


def _normalise(obj: Any, name: str) -> dict[str, Tensor]:
    """Unwrap training-framework containers, check every entry is a tensor, strip ``module.``."""
    while isinstance(obj, Mapping) and not _all_tensors(obj):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, Tensor):
        raise CheckpointError(f"{name}: holds a single tensor, not a state dict")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name}: holds a {type(obj).__name__}, not a state dict of tensors")
    if not obj:
        raise CheckpointError(f"{name}: the state dict is empty")
    bad = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            f"{name}: not a state dict of tensors; entries that are not tensors: {_listing(bad)}"
        )
    odd = [f"{k} ({why})" for k, v in obj.items() if (why := _odd_tensor(v)) is not None]
    if odd:
        raise CheckpointError(
            f"{name}: tensors nlsr does not accept: {_listing(odd)}; a checkpoint holds dense "
            "float, integer or bool tensors"
        )
    _check_total(sum(v.numel() for v in obj.values()), name)
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{name}: state-dict key {key!r} is not a string")
        short = key
        while short.startswith("module."):
            short = short[len("module.") :]
        if short in out:
            raise CheckpointError(f"{name}: key {short!r} appears twice once 'module.' is removed")
        out[short] = value
    return out


def _odd_tensor(t: Tensor) -> str | None:
    """Why tensor ``t`` cannot be a weight (sparse, quantised, nested, no data, odd dtype, a
    subclass), or None."""
    if type(t) not in (Tensor, nn.Parameter):
        return f"a {type(t).__name__}, a tensor subclass"
    if t.is_nested:
        return "a nested tensor"
    if t.layout != torch.strided:
        return f"a {str(t.layout).removeprefix('torch.')} tensor, not a dense one"
    if t.is_quantized:
        return "a quantized tensor"
    if t.device.type == "meta":
        return "a meta tensor, which holds no values"
    if t.dtype not in _ACCEPTED_DTYPES:
        return f"dtype {str(t.dtype).removeprefix('torch.')}"
    return None


def _check_total(values: int, name: str) -> None:
    """Refuse a checkpoint holding more values than any model nlsr builds may have."""
    limit = _limit(MAX_PARAMETERS_ENV, MAX_PARAMETERS)
    if values > limit:
        raise CheckpointError(
            f"{name}: the tensors hold {values:,} values, more than the limit of {limit:,} "
            f"({MAX_PARAMETERS_ENV}): no model nlsr loads is that large"
        )


def _limit(env: str, default: int) -> int:
    raw = os.environ.get(env)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw.replace("_", "").strip())
    except ValueError:
        value = 0
    if value < 1:
        raise CheckpointError(f"environment variable {env}={raw!r}: must be a positive integer")
    return value


def _all_tensors(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


# --------------------------------------------------------------------------- detection


def detect(state_dict: Mapping[str, Any]) -> tuple[str, int, dict[str, Any]]:
    """Architecture, scale and the options the tensors reveal (sizes, counts, reduction,
    chunk size, clusters, rgb_range ...), read from key names and shapes."""
    sd = _normalise(state_dict, "state dict")
    arch = _recognise(sd)
    scale, options = _read(sd, arch)
    return arch, scale, options


def _read(sd: Mapping[str, Tensor], arch: str) -> tuple[int, dict[str, Any]]:
    """``_READERS[arch]``, with any failure on odd shapes (a scalar where a matrix belongs, a
    zero-sized dimension) reported as a CheckpointError."""
    try:
        return _READERS[arch](sd)
    except CheckpointError:
        raise
    except (IndexError, KeyError, ValueError, TypeError, ZeroDivisionError, RuntimeError) as e:
        raise CheckpointError(
            f"the tensors have the keys of a {arch} checkpoint but shapes no {arch} has "
            f"({type(e).__name__}: {_first_line(e)})"
        ) from e


def _recognise(sd: Mapping[str, Tensor]) -> str:
    keys = list(sd)

    def has(pattern: str) -> bool:
        rx = re.compile(pattern)
        return any(rx.match(k) for k in keys)

    if has(r"SEM\."):
        return "csnln"
    if has(r"body\.\d+\.attention\.0\.kmeans\.means$") or has(r"body\.\d+\.local_body\."):
        return "lcoan"
    if has(r"body\.\d+\.body\.\d+\.conv_assembly_fc\."):
        return "dlsn"
    if has(r"body\.\d+\.body\.\d+\.conv_match1\."):
        return "hspan"
    if "body.0.conv_match.0.weight" in sd:
        return "nlsn"
    if has(r"body\.\d+\.body\.\d+\.body\.3\.conv_du\.0\.weight$"):
        return "rcan"
    if has(r"body\.\d+\.body\.0\.weight$") and "head.0.weight" in sd:
        return "edsr"
    raise CheckpointError(
        "cannot tell the architecture from the keys (first keys: "
        f"{_listing(keys)}); pass arch= (one of edsr, rcan, nlsn, dlsn, hspan, lcoan, csnln)"
    )


def _need(sd: Mapping[str, Tensor], key: str, arch: str) -> Tensor:
    if key not in sd:
        raise CheckpointError(
            f"key {key!r} is missing, which every {arch} checkpoint has: the state dict is "
            "truncated or not from this architecture"
        )
    return sd[key]


def _indices(sd: Mapping[str, Tensor], pattern: str) -> list[int]:
    """Sorted distinct integers captured by the first group of ``pattern`` over all keys."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})


def _common(sd: Mapping[str, Tensor], head_key: str, arch: str) -> dict[str, Any]:
    head = _need(sd, head_key, arch)
    options: dict[str, Any] = {"n_feats": int(head.shape[0]), "n_colors": int(head.shape[1])}
    rgb_range = _rgb_range(sd)
    if rgb_range is not None:
        options["rgb_range"] = rgb_range
    return options


def _rgb_range(sd: Mapping[str, Tensor]) -> float | int | None:
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


def _tail_scale(sd: Mapping[str, Tensor], n_feats: int) -> int:
    """Scale from the sub-pixel upsampler ``tail.0``: k stages of 4C outputs = x2^k, 9C = x3."""
    stages = _indices(sd, r"tail\.0\.(\d+)\.weight$")
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


def _groups_with(sd: Mapping[str, Tensor], pattern: str) -> tuple[list[int], list[int]]:
    """(group indices, in-group indices) over keys matching a two-group pattern."""
    rx = re.compile(pattern)
    found = [(int(m.group(1)), int(m.group(2))) for k in sd if (m := rx.match(k))]
    return sorted({g for g, _ in found}), sorted({i for _, i in found})


def _read_edsr(sd: Mapping[str, Tensor]) -> tuple[int, dict[str, Any]]:
    options = _common(sd, "head.0.weight", "edsr")
    blocks = _indices(sd, r"body\.(\d+)\.body\.0\.weight$")
    n = len(blocks)
    _check_body(sd, "edsr", blocks, n, r"body\.(\d+)\.")
    options["n_resblocks"] = n
    if options["n_feats"] == 64 and n == 16:
        # The published EDSR-baseline models use no residual scaling (res_scale 1).
        options["res_scale"] = 1.0
    return _tail_scale(sd, options["n_feats"]), options


def _read_rcan(sd: Mapping[str, Tensor]) -> tuple[int, dict[str, Any]]:
    options = _common(sd, "head.0.weight", "rcan")
    groups = _indices(sd, r"body\.(\d+)\.body\.\d+\.body\.0\.weight$")
    _check_body(sd, "rcan", groups, len(groups), r"body\.(\d+)\.")
    blocks = _indices(sd, r"body\.0\.body\.(\d+)\.body\.0\.weight$")
    options["n_resgroups"] = len(groups)
    options["n_resblocks"] = len(blocks)
    squeeze = _need(sd, "body.0.body.0.body.3.conv_du.0.weight", "rcan")
    options["reduction"] = options["n_feats"] // int(squeeze.shape[0])
    return _tail_scale(sd, options["n_feats"]), options


def _check_body(
    sd: Mapping[str, Tensor], arch: str, units: list[int], n: int, pattern: str
) -> None:
    """EDSR/RCAN bodies are ``units`` 0..n-1 then one conv at ``n``; anything else (an attention
    block nlsr inserted) cannot be configured from the weights alone."""
    present = set(_indices(sd, pattern))
    others = sorted(present - set(units))
    if units == list(range(n)) and others == [n] and f"body.{n}.weight" in sd:
        return
    odd = [i for i in others if i != max(present, default=-1)] or others
    raise CheckpointError(
        f"the {arch} body holds modules that are not plain {arch} blocks (at body."
        f"{', body.'.join(map(str, odd))}), e.g. an inserted attention block; pass arch= and the "
        "options (attention=...) explicitly, or use an nlsr-format checkpoint, which records them"
    )


def _read_nlsn(sd: Mapping[str, Tensor]) -> tuple[int, dict[str, Any]]:
    options = _common(sd, "head.0.weight", "nlsn")
    options["n_resblocks"] = len(_indices(sd, r"body\.(\d+)\.body\.0\.weight$"))
    match = _need(sd, "body.0.conv_match.0.weight", "nlsn")
    options["reduction"] = options["n_feats"] // int(match.shape[0])
    return _tail_scale(sd, options["n_feats"]), options


def _read_grouped(
    sd: Mapping[str, Tensor], arch: str, match_key: str
) -> tuple[dict[str, Any], int]:
    """Shared reader of DLSN/HSPAN: groups ``body.g.body.{0..n-1}`` blocks, attention at
    ``body.g.body.n``; returns options and n."""
    options = _common(sd, "head.0.weight", arch)
    groups, inner = _groups_with(
        sd, rf"body\.(\d+)\.body\.(\d+)\.{re.escape(match_key)}\.0\.weight$"
    )
    if not groups:
        raise CheckpointError(f"no {arch} attention keys (*.{match_key}.*) found")
    n = inner[0]
    options["n_resgroups"] = len(groups)
    options["n_resblocks"] = n
    match = _need(sd, f"body.0.body.{n}.{match_key}.0.weight", arch)
    options["reduction"] = options["n_feats"] // int(match.shape[0])
    return options, n


def _read_dlsn(sd: Mapping[str, Tensor]) -> tuple[int, dict[str, Any]]:
    options, n = _read_grouped(sd, "dlsn", "conv_match")
    options["chunk_size"] = int(_need(sd, f"body.0.body.{n}.fc.0.weight", "dlsn").shape[0])
    return _tail_scale(sd, options["n_feats"]), options


def _read_hspan(sd: Mapping[str, Tensor]) -> tuple[int, dict[str, Any]]:
    options, _ = _read_grouped(sd, "hspan", "conv_match1")
    return _tail_scale(sd, options["n_feats"]), options


def _read_lcoan(sd: Mapping[str, Tensor]) -> tuple[int, dict[str, Any]]:
    options = _common(sd, "head.0.weight", "lcoan")
    options["n_resgroups"] = len(_indices(sd, r"body\.(\d+)\.attention\.0\."))
    options["n_resblocks"] = len(_indices(sd, r"body\.0\.local_body\.(\d+)\.body\.0\.weight$"))
    match = _need(sd, "body.0.attention.0.conv_match.0.weight", "lcoan")
    options["reduction"] = options["n_feats"] // int(match.shape[0])
    means = _need(sd, "body.0.attention.0.kmeans.means", "lcoan")
    if means.dim() != 3:
        raise CheckpointError(
            f"lcoan k-means means must be [rounds, clusters, d], got {list(means.shape)}"
        )
    options["n_hashes"] = int(means.shape[0])
    options["n_clusters"] = int(means.shape[1])
    return _tail_scale(sd, options["n_feats"]), options


def _read_csnln(sd: Mapping[str, Tensor]) -> tuple[int, dict[str, Any]]:
    options = _common(sd, "head.0.0.weight", "csnln")
    n_feats = options["n_feats"]
    options["depth"] = int(_need(sd, "tail.0.weight", "csnln").shape[1]) // n_feats
    kernel = int(_need(sd, "SEM.down_sample_1.0.weight", "csnln").shape[-1])
    two_stage = any(k.startswith("SEM.multi_source_projection_2.") for k in sd)
    scales = {(6, False): 2, (9, False): 3, (6, True): 4}
    if (kernel, two_stage) not in scales:
        raise CheckpointError(f"csnln down-sampling kernel {kernel} fits no scale (2, 3 or 4)")
    width_key = "SEM.multi_source_projection.up_attention.conv_assembly.0.weight"
    width = int(_need(sd, width_key, "csnln").shape[0])
    if width != n_feats:
        # The released code hard-codes 128 attention channels, so only n_feats = 128 models run.
        raise CheckpointError(
            f"csnln attention width {width} differs from n_feats {n_feats}; no CSNLN (released or "
            "nlsr) computes with such weights"
        )
    return scales[(kernel, two_stage)], options


_READERS: dict[str, Callable[[Mapping[str, Tensor]], tuple[int, dict[str, Any]]]] = {
    "edsr": _read_edsr,
    "rcan": _read_rcan,
    "nlsn": _read_nlsn,
    "dlsn": _read_dlsn,
    "hspan": _read_hspan,
    "lcoan": _read_lcoan,
    "csnln": _read_csnln,
}


# --------------------------------------------------------------------------- loading


def load(
    source: str | Path | Mapping[str, Any],
    *,
    arch: str | None = None,
    scale: int | None = None,
    **options: Any,
) -> nn.Module:
    """Build the model a checkpoint holds and load its weights strictly; eval mode.

    The configuration comes from the nlsr header if present, else from :func:`detect`;
    ``arch``, ``scale`` and ``options`` override it (and supply what no tensor reveals).
    Options are type- and range-checked and the model's size is computed on the ``meta`` device
    before anything is allocated (limits :data:`MAX_PARAMETERS`, :data:`MAX_BLOCKS`); the
    tensors must have the model's shapes, finite values and a dtype that converts without
    changing them (half precision and float64 are accepted: ``model.nlsr_load_notes`` says so).
    """
    from nlsr import models

    name = "state dict" if isinstance(source, Mapping) else str(source)
    sd, config = read_state_dict(source)
    found_in = "from the file's nlsr header" if config is not None else "read from the weights"
    if arch is not None and not isinstance(arch, str):
        raise CheckpointError(f"{name}: arch must be a string, got {arch!r}")
    if config is not None:
        base_arch, base_scale, base = config["arch"], config["scale"], dict(config["options"])
    elif arch is None:
        try:
            base_arch, base_scale, base = detect(sd)
        except CheckpointError as e:
            raise CheckpointError(f"{name}: {e}") from e
    else:
        base_arch, (base_scale, base) = arch, _read_quietly(sd, arch)
    arch = arch or base_arch
    if arch not in models.available():
        raise CheckpointError(
            f"{name}: unknown arch {arch!r}; available: {', '.join(models.available())}"
        )
    if arch != base_arch:
        base_scale, base = _read_quietly(sd, arch)
    scale_from = found_in if scale is None else "as passed to load"
    scale = scale if scale is not None else base_scale
    if scale is None:
        raise CheckpointError(f"{name}: cannot read the scale from the weights; pass scale=")
    merged = {**base, **options}
    origins = {**dict.fromkeys(base, found_in), **dict.fromkeys(options, "as passed to load")}
    unknown = sorted(set(merged) - set(models.options(arch)))
    if unknown:
        raise CheckpointError(
            f"{name}: {arch} does not accept option(s) {', '.join(unknown)}; "
            f"it takes {', '.join(models.options(arch))}"
        )
    scale = _check_scale(scale, name, scale_from)
    merged = check_options(arch, merged, name=name, origins=origins)
    expected = _expected_state(arch, scale, merged, name, origins)
    _check_fit(expected, sd, name, arch, scale, merged)
    weights, notes = _checked_weights(expected, sd, name)
    try:
        model = models.create(arch, scale, **merged)
        model.load_state_dict(weights, strict=True)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{name}: cannot load {arch} x{scale}: {_first_line(e)}") from e
    model.nlsr_load_notes = notes
    for note in notes:
        log.info("%s: %s", name, note)
    if config is not None:
        model.nlsr_metadata = {k: v for k, v in config.items() if k not in _RESERVED}
    return model.eval()


# --------------------------------------------------------------------------- validation


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
            from nlsr.attention import available_attention

            text = "an attention block name (" + ", ".join(available_attention()) + ")"
        else:
            text = "an object (mapping) with string keys"
        return text + (" or null" if self.none else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.none
        if self.kind == "int":
            return _is_int(value) and (self.low or 0) <= value <= _MAX_INT
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
            from nlsr.attention import available_attention

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


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


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
        out[key] = int(value) if _is_int(value) else value
    return out


def _shown(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print (Python's int-to-str limit)
        text = f"<an integer of {value.bit_length()} bits>"
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _check_scale(scale: Any, name: str, where: str) -> int:
    if not _is_int(scale) or not 1 <= scale <= MAX_SCALE:
        raise CheckpointError(
            f"{name}: scale must be an integer from 1 to {MAX_SCALE}, got {_shown(scale)}, {where}"
        )
    return int(scale)


def _expected_state(
    arch: str, scale: int, options: dict[str, Any], name: str, origins: Mapping[str, str]
) -> dict[str, Tensor]:
    """The state dict (shapes and dtypes only) of ``arch`` x``scale`` with ``options``, built on
    the ``meta`` device, which allocates nothing; refused when above the size limits."""
    from nlsr import models

    defaults = models.options(arch)
    size = {k: options.get(k, defaults.get(k)) for k in ("n_resgroups", "n_resblocks")}
    groups = size["n_resgroups"] if "n_resgroups" in defaults else 1
    blocks = groups * ((size["n_resblocks"] if "n_resblocks" in defaults else 0) + 1)
    limit = _limit(MAX_BLOCKS_ENV, MAX_BLOCKS)
    if blocks > limit:
        raise CheckpointError(
            f"{name}: {arch} with {_size_listing(options, origins, defaults, limit_blocks=True)} "
            f"would have {blocks:,} residual blocks, more than the limit of {limit:,} "
            f"({MAX_BLOCKS_ENV})"
        )
    try:
        with torch.device("meta"):
            model = models.create(arch, scale, **options)
    except Exception as e:  # any constructor failure on bad options: no allocation happened
        raise CheckpointError(
            f"{name}: cannot build {arch} x{scale} with {options}: {_first_line(e)}"
        ) from e
    values = sum(t.numel() for t in (*model.parameters(), *model.buffers()))
    limit = _limit(MAX_PARAMETERS_ENV, MAX_PARAMETERS)
    if values > limit:
        nbytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        raise CheckpointError(
            f"{name}: {arch} x{scale} with {_size_listing(options, origins, defaults)} would "
            f"have {values:,} parameter and buffer values ({nbytes / 2**30:,.1f} GiB), more "
            f"than the limit of {limit:,} ({MAX_PARAMETERS_ENV}); refused before allocating"
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
        if _is_int(value) and _is_int(default) and default > 0:
            return value / default
        return 0.0

    named.sort(key=excess, reverse=True)
    shown = [f"option {k}={options[k]!r}{_origin(origins, k)}" for k in named]
    return ", ".join(shown) or "its default options"


def _checked_weights(
    expected: Mapping[str, Tensor], sd: Mapping[str, Tensor], name: str
) -> tuple[dict[str, Tensor], list[str]]:
    """The checkpoint's tensors converted to the model's dtypes, refusing conversions that
    change values (integers or bools where floats belong, out-of-range integers) and non-finite
    values; returns them with notes on accepted conversions (half precision, float64)."""
    out: dict[str, Tensor] = {}
    converted: dict[torch.dtype, int] = {}
    for key, want in expected.items():
        t = sd[key]
        if want.is_floating_point():
            if not t.is_floating_point():
                raise CheckpointError(
                    f"{name}: tensor {key!r} holds {str(t.dtype).removeprefix('torch.')} values "
                    f"where the model has {str(want.dtype).removeprefix('torch.')}; converting "
                    "would change them (quantised or corrupt weights)"
                )
            value = t.to(want.dtype)
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                if bool(torch.isfinite(t).all()):
                    raise CheckpointError(
                        f"{name}: tensor {key!r} holds {bad:,} value(s) beyond the range of "
                        f"{str(want.dtype).removeprefix('torch.')} (they would become Inf)"
                    )
                raise CheckpointError(
                    f"{name}: tensor {key!r} holds {bad:,} non-finite (NaN/Inf) value(s) of "
                    f"{t.numel():,}; the weights are corrupt (e.g. a diverged training run)"
                )
        else:
            if t.is_floating_point():
                raise CheckpointError(
                    f"{name}: tensor {key!r} holds {str(t.dtype).removeprefix('torch.')} values "
                    f"where the model has {str(want.dtype).removeprefix('torch.')}"
                )
            value = t.to(want.dtype)
            if not torch.equal(value.to(t.dtype), t):
                raise CheckpointError(
                    f"{name}: tensor {key!r} holds {str(t.dtype).removeprefix('torch.')} values "
                    f"that do not fit {str(want.dtype).removeprefix('torch.')}"
                )
        if t.dtype != want.dtype:
            converted[t.dtype] = converted.get(t.dtype, 0) + 1
        out[key] = value
    notes = []
    for dtype, count in converted.items():
        kind = str(dtype).removeprefix("torch.")
        how = "rounded" if dtype == torch.float64 else "converted exactly"
        notes.append(f"{count} tensor(s) stored as {kind}, {how} to the model's dtype")
    return out, notes


def _read_quietly(sd: Mapping[str, Tensor], arch: str) -> tuple[int | None, dict[str, Any]]:
    """Scale and options the weights reveal for ``arch``; when they do not fit ``arch``, only
    the scale of whatever they are (the strict load then says what is wrong)."""
    try:
        if arch in _READERS:
            return _read(sd, arch)
    except CheckpointError:
        pass
    try:
        return detect(sd)[1], {}
    except CheckpointError:
        return None, {}


def _check_fit(
    expected: Mapping[str, Tensor],
    sd: Mapping[str, Tensor],
    name: str,
    arch: str,
    scale: int,
    options: dict[str, Any],
) -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys and the likely cause;
    ``expected`` is the model's state dict (on the meta device: shapes only)."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    misshaped = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if not (missing or unexpected or misshaped):
        return
    parts = []
    if misshaped:
        shapes = [
            f"{k} (checkpoint {_shape(sd[k])}, model {_shape(expected[k])})" for k in misshaped
        ]
        parts.append(f"{len(misshaped)} mis-shaped: {_listing(shapes)}")
    if missing:
        parts.append(f"{len(missing)} missing from the checkpoint: {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (not in the model): {_listing(unexpected)}")
    cause = _likely_cause(sd, arch, scale, options, misshaped, missing, unexpected)
    raise CheckpointError(
        f"{name}: does not fit {arch} x{scale} (strict load): {'; '.join(parts)}. "
        f"Likely cause: {cause}"
    )


def _shape(t: Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def _likely_cause(
    sd: Mapping[str, Tensor],
    arch: str,
    scale: int,
    options: dict[str, Any],
    misshaped: list[str],
    missing: list[str],
    unexpected: list[str],
) -> str:
    try:
        found_arch, found_scale, found = detect(sd)
    except CheckpointError:
        found_arch, found_scale, found = None, None, {}
    if found_arch is not None and found_arch != arch:
        return (
            f"wrong architecture: the keys are those of a {found_arch!r} checkpoint; pass "
            f"arch={found_arch!r} or omit arch"
        )
    causes = []
    if found_scale is not None and found_scale != scale:
        where = [k for k in misshaped if _is_upsampler(k)]
        causes.append(
            f"wrong scale: the upsampler shapes mismatch"
            f"{' (' + _listing(where) + ')' if where else ''}; the checkpoint is for scale "
            f"{found_scale}, not {scale}: use scale={found_scale}"
        )
    for key, value in found.items():
        if key in options and options[key] != value:
            causes.append(
                f"wrong option: {key}={options[key]!r} but the weights imply {key}={value!r}"
            )
    if causes:
        return "; ".join(causes)
    if missing and not unexpected and not misshaped:
        return "the checkpoint lacks tensors the model needs: the file is truncated or incomplete"
    if unexpected and not missing and not misshaped:
        return f"the checkpoint carries tensors this {arch} model does not define"
    return f"the checkpoint is from another architecture or configuration than {arch} {options}"


def _is_upsampler(key: str) -> bool:
    """Keys whose shapes depend on the scale (sub-pixel tail; CSNLN's strided (de)convs)."""
    if key.startswith("tail."):
        return True
    return key.startswith("SEM.") and any(
        p in key for p in ("upsample", "down_sample", "error_encode")
    )


# --------------------------------------------------------------------------- saving


def save(model: nn.Module, path: str | Path, *, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` in nlsr's format: one ``.safetensors`` file whose header metadata
    ``nlsr_config`` is JSON ``{"arch", "scale", "options", **metadata}``; atomic."""
    from safetensors.torch import save

    path = Path(path)
    config = getattr(model, "nlsr_config", None)
    if not isinstance(config, Mapping) or not all(k in config for k in _RESERVED):
        raise CheckpointError(
            f"{path}: the model has no nlsr_config; build it with nlsr.models.create or nlsr.load"
        )
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: nlsr checkpoints are .safetensors files")
    extra = dict(metadata or {})
    clash = [k for k in _RESERVED if k in extra]
    if clash:
        raise CheckpointError(f"{path}: metadata may not set {', '.join(clash)}")
    header = {
        "arch": config["arch"],
        "scale": config["scale"],
        "options": config["options"],
        **extra,
    }
    try:
        text = json.dumps(header)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: options/metadata are not JSON-serialisable ({e})") from e
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, save(tensors, metadata={CONFIG_KEY: text, "format": "pt"}))
    return path
