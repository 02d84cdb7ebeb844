"""Strict loading of untrusted weights: build the network a state dict holds and load it.

The configuration comes from the nlsr header, else from the tensors
(:mod:`nlsr.models.detection`); callers' ``arch``, ``scale`` and options override it. Options are
checked, the model's size is computed on the ``meta`` device (:mod:`nlsr.models.validation`),
the tensors are compared with the expected shapes (every mismatch named, with its likely cause)
and dtypes (:func:`nlsr.checkpoint.checked_weights`) before the real model is built.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from nlsr.checkpoint import HEADER_KEYS, CheckpointError, checked_weights, first_line, listing
from nlsr.models.descriptor import ModelDescriptor, ModelSource, describe_module
from nlsr.models.detection import detect, read_options, recognise
from nlsr.models.registry import available, build, spec
from nlsr.models.registry import options as default_options
from nlsr.models.validation import check_options, check_scale, expected_state

__all__ = ["load_state"]

log = logging.getLogger(__name__)


def load_state(
    sd: Mapping[str, Tensor],
    config: Mapping[str, Any] | None,
    name: str,
    *,
    arch: str | None = None,
    scale: int | None = None,
    options: Mapping[str, Any] | None = None,
    path: Path | None = None,
) -> ModelDescriptor:
    """The model a normalised state dict ``sd`` (and its nlsr header ``config``, if any) holds,
    weights loaded strictly, in eval mode; ``name`` (the file, or "state dict") starts every
    error message, ``path`` is recorded as the source. ``arch``, ``scale`` and ``options``
    override the header or what the tensors reveal (and supply what no tensor reveals)."""
    given = dict(options or {})
    found_in = "from the file's nlsr header" if config is not None else "read from the weights"
    if arch is not None and not isinstance(arch, str):
        raise CheckpointError(f"{name}: arch must be a string, got {arch!r}")
    if config is not None:
        base_arch, base_scale, base = config["arch"], config["scale"], dict(config["options"])
    elif arch is None:
        base_arch = recognise(sd, name)
        base_scale, base = read_options(sd, base_arch, name)
    else:
        base_arch, (base_scale, base) = arch, _read_quietly(sd, arch)
    arch = arch or base_arch
    if arch not in available():
        raise CheckpointError(f"{name}: unknown arch {arch!r}; available: {', '.join(available())}")
    if arch != base_arch:
        base_scale, base = _read_quietly(sd, arch)
    scale_from = found_in if scale is None else "as passed to load"
    scale = scale if scale is not None else base_scale
    if scale is None:
        raise CheckpointError(f"{name}: cannot read the scale from the weights; pass scale=")
    merged = {**base, **given}
    origins = {**dict.fromkeys(base, found_in), **dict.fromkeys(given, "as passed to load")}
    unknown = sorted(set(merged) - set(default_options(arch)))
    if unknown:
        raise CheckpointError(
            f"{name}: {arch} does not accept option(s) {', '.join(unknown)}; "
            f"it takes {', '.join(default_options(arch))}"
        )
    scale = check_scale(scale, name, scale_from)
    merged = check_options(arch, merged, name=name, origins=origins)
    expected = expected_state(arch, scale, merged, name, origins)
    _check_fit(expected, sd, name, arch, scale, merged)
    weights, notes = checked_weights(expected, sd, name)
    try:
        module = build(arch, scale, **merged)
        module.load_state_dict(weights, strict=True)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{name}: cannot load {arch} x{scale}: {first_line(e)}") from e
    for note in notes:
        log.info("%s: %s", name, note)
    metadata = {k: v for k, v in (config or {}).items() if k not in HEADER_KEYS}
    source = ModelSource(
        kind="state dict" if path is None else "file",
        path=path,
        metadata=metadata,
        notes=tuple(notes),
    )
    return describe_module(module.eval(), arch=arch, options=merged, source=source)


def _read_quietly(sd: Mapping[str, Tensor], arch: str) -> tuple[int | None, dict[str, Any]]:
    """Scale and options the weights reveal for ``arch``; when they do not fit ``arch``, only
    the scale of whatever they are (the strict load then says what is wrong)."""
    try:
        if arch in available() and spec(arch).read is not None:
            return read_options(sd, arch)
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
        parts.append(f"{len(misshaped)} mis-shaped: {listing(shapes)}")
    if missing:
        parts.append(f"{len(missing)} missing from the checkpoint: {listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (not in the model): {listing(unexpected)}")
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
        where = [k for k in misshaped if spec(arch).scale_keys(k)]
        causes.append(
            f"wrong scale: the upsampler shapes mismatch"
            f"{' (' + listing(where) + ')' if where else ''}; the checkpoint is for scale "
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
