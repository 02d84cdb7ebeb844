"""Checkpoint files: read the authors' ``.pt`` files, BasicSR-style wrappers and nlsr's own
safetensors format into a plain state dict; check weights against the tensors a model expects;
write nlsr's format. The bottom layer: nothing here knows an architecture.

Nothing here unpickles arbitrary objects: ``.pt``/``.pth`` files are read with
``torch.load(..., weights_only=True)``, nlsr files with safetensors. Nothing a file says is
trusted either: dtypes, tensor kinds and the total size (:data:`MAX_PARAMETERS`) are checked
while reading, and :func:`checked_weights` refuses conversions that change values and non-finite
weights. Which network a state dict holds is read in :mod:`nlsr.models.detection`; building and
strictly loading it is :mod:`nlsr.models.loading`'s job.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nlsr.atomic import atomic_write

__all__ = [
    "HEADER_KEYS",
    "MAX_BLOCKS",
    "MAX_PARAMETERS",
    "CheckpointError",
    "checked_weights",
    "read_state_dict",
    "save_state",
    "sha256_of",
]

#: Keys under which training frameworks nest the weights, in order of preference
#: (BasicSR ``params_ema``/``params``, Lightning ``state_dict``, generic ``model``).
WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model")
#: Safetensors header-metadata key holding nlsr's JSON model configuration.
CONFIG_KEY = "nlsr_config"
#: Entries of that configuration that describe the model; the others are metadata.
HEADER_KEYS = ("arch", "scale", "options")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80
_MAX_LISTED = 5

#: Largest model nlsr loads, in parameter and buffer values (2 GB as float32); about
#: ten times the largest paper model (DLSN, 70M). Override with the environment variable below.
MAX_PARAMETERS = 500_000_000
MAX_PARAMETERS_ENV = "NLSR_MAX_PARAMETERS"
#: Largest number of residual blocks (``n_resgroups * (n_resblocks + 1)``, the attention or
#: channel-attention unit included) nlsr builds from a checkpoint; RCAN, the deepest paper model,
#: has 210. Bounds the time even an empty (``meta``) build takes. Override with the variable below.
MAX_BLOCKS = 2048
MAX_BLOCKS_ENV = "NLSR_MAX_BLOCKS"
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, recognised or loaded; the message says which and why."""


# --------------------------------------------------------------------------- reading


def read_state_dict(
    source: str | Path | Mapping[str, Any],
) -> tuple[dict[str, Tensor], dict | None]:
    """Tensors of a checkpoint file or mapping, unwrapped and with ``module.`` prefixes removed,
    plus the nlsr configuration when the file is in nlsr's format (else ``None``)."""
    if isinstance(source, Mapping):
        return normalise_state_dict(source, "state dict"), None
    path = Path(source)
    obj, config = _read_file(path)
    return normalise_state_dict(obj, str(path)), config


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
                    f"{path}: tensors of a dtype nlsr does not accept: {listing(bad)} (accepted: "
                    f"{', '.join(_SAFETENSORS_DTYPES)})"
                )
            _check_total(sum(math.prod(shape) for _, shape in declared.values()), str(path))
            tensors = {k: f.get_tensor(k) for k in keys}
    except CheckpointError:
        raise
    except Exception as e:  # corrupt header or data
        raise CheckpointError(f"{path}: unreadable safetensors file ({first_line(e)})") from e
    return tensors, config


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), else its type name."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _parse_config(text: str, name: str) -> dict:
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError; over-long integers; nesting
        raise CheckpointError(
            f"{name}: the {CONFIG_KEY} header is not valid JSON ({first_line(e)})"
        ) from e
    ok = (
        isinstance(config, dict)
        and isinstance(config.get("arch"), str)
        and is_int(config.get("scale"))
        and isinstance(config.get("options", {}), dict)
    )
    if not ok:
        raise CheckpointError(
            f"{name}: the {CONFIG_KEY} header must hold 'arch' (str), 'scale' (int) and "
            f"'options' (object), got {text[:200]!r}"
        )
    config.setdefault("options", {})
    return config


def normalise_state_dict(obj: Any, name: str) -> dict[str, Tensor]:
    """Unwrap training-framework containers, check every entry is a tensor, strip ``module.``;
    ``name`` (a file name or "state dict") starts every error message."""
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
            f"{name}: not a state dict of tensors; entries that are not tensors: {listing(bad)}"
        )
    odd = [f"{k} ({why})" for k, v in obj.items() if (why := _odd_tensor(v)) is not None]
    if odd:
        raise CheckpointError(
            f"{name}: tensors nlsr does not accept: {listing(odd)}; a checkpoint holds dense "
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
    most = limit(MAX_PARAMETERS_ENV, MAX_PARAMETERS)
    if values > most:
        raise CheckpointError(
            f"{name}: the tensors hold {values:,} values, more than the limit of {most:,} "
            f"({MAX_PARAMETERS_ENV}): no model nlsr loads is that large"
        )


def limit(env: str, default: int) -> int:
    """The positive integer in environment variable ``env``, else ``default``."""
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


def listing(items: list[str]) -> str:
    """The first few ``items`` joined by commas, then how many more there are."""
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


# --------------------------------------------------------------------------- checking


def checked_weights(
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


def is_int(value: Any) -> bool:
    """An integer (NumPy's and torch's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# --------------------------------------------------------------------------- writing


def save_state(
    state_dict: Mapping[str, Tensor],
    path: str | Path,
    *,
    arch: str,
    scale: int,
    options: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``state_dict`` in nlsr's format: one ``.safetensors`` file whose header metadata
    ``nlsr_config`` is JSON ``{"arch", "scale", "options", **metadata}``; atomic."""
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: nlsr checkpoints are .safetensors files")
    extra = dict(metadata or {})
    clash = [k for k in HEADER_KEYS if k in extra]
    if clash:
        raise CheckpointError(f"{path}: metadata may not set {', '.join(clash)}")
    header = {"arch": arch, "scale": scale, "options": dict(options), **extra}
    try:
        text = json.dumps(header)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: options/metadata are not JSON-serialisable ({e})") from e
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, save(tensors, metadata={CONFIG_KEY: text, "format": "pt"}))
    return path


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
