"""One way to get a model: :func:`resolve_model` turns a shipped model's or an architecture's
name, a checkpoint file, a state dict, a module or a descriptor into a
:class:`~nlsr.models.descriptor.ModelDescriptor`. ``create``, ``load`` and ``save`` are built on it.

Every module nlsr builds or loads is remembered (weakly: nothing is kept alive) with its
architecture, options and source, so a plain module returned by ``create`` or ``load`` is
described again later without attributes set on it; a module nlsr did not build is described
by its declared contract alone (:func:`~nlsr.models.descriptor.describe_module`).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from nlsr.checkpoint import CheckpointError, read_state_dict, save_state, sha256_of
from nlsr.models.descriptor import ModelDescriptor, ModelSource, describe_module
from nlsr.models.loading import load_state
from nlsr.models.onnx_model import ONNX_SUFFIX, OnnxModel
from nlsr.models.pretrained import (
    MANIFEST,
    PretrainedError,
    available_pretrained,
    default_model,
    pretrained_weights,
    read_manifest,
    shipped_listing,
)
from nlsr.models.registry import available, build

__all__ = ["DEFAULT_SCALE", "create", "load", "resolve_model", "save"]

#: Scale of a model asked for by name without one.
DEFAULT_SCALE = 2


@dataclass(frozen=True)
class _Record:
    """What nlsr knows of a module it built, besides what the module declares itself."""

    arch: str
    options: Mapping[str, Any]
    source: ModelSource


_RECORDS: weakref.WeakKeyDictionary[nn.Module, _Record] = weakref.WeakKeyDictionary()


def resolve_model(
    model: ModelDescriptor | nn.Module | str | os.PathLike | Mapping[str, Any],
    scale: int | None = None,
    *,
    arch: str | None = None,
    pretrained: bool = True,
    weights_dir: str | Path | None = None,
    **options: Any,
) -> ModelDescriptor:
    """The descriptor of ``model``, which is one of:

    - a ``str``: the name of a shipped model (``nlsr models``) or of an architecture, for
      ``scale`` (default 2). With ``pretrained`` (the default) it means shipped weights, for an
      architecture its best shipped model (PretrainedError when there is none); without, a new
      untrained network built with ``options``;
    - a ``.onnx`` path: a model exported by ``nlsr export``, run by onnxruntime
      (:class:`~nlsr.models.onnx_model.OnnxModel`);
    - a path (``Path``/``os.PathLike``; a ``str`` is a name) or a state dict: the checkpoint,
      loaded strictly (:mod:`nlsr.models.loading`; ``arch``, ``scale`` and ``options`` override
      what the file says);
    - an ``nn.Module`` or a descriptor: described as it is.

    A given ``scale`` must be the model's (ValueError otherwise).
    """
    if isinstance(model, ModelDescriptor | nn.Module):
        if arch is not None or options:
            raise ValueError("arch= and options apply to names and checkpoints, not to a model")
        found = model if isinstance(model, ModelDescriptor) else _described(model)
        if scale is not None and scale != found.scale:
            raise ValueError(
                f"model {type(found.module).__name__} upscales x{found.scale}, but scale {scale} "
                "was asked for: the scale does not match"
            )
        return found
    if isinstance(model, str):
        if arch is not None:
            raise ValueError(f"{model!r}: arch= applies to checkpoints, not to a name")
        scale = DEFAULT_SCALE if scale is None else scale
        if not pretrained:
            return _described(create(model, scale, **options))
        if options:
            raise ValueError(
                f"{model!r}: options ({', '.join(sorted(options))}) cannot be changed on shipped "
                "weights; build without pretrained=True"
            )
        return _shipped(model, scale, weights_dir)
    if isinstance(model, os.PathLike) and Path(model).suffix.lower() == ONNX_SUFFIX:
        return _exported(Path(model), scale, arch, options)
    if isinstance(model, os.PathLike):
        path = Path(model)
        sd, config = read_state_dict(path)
        loaded = load_state(
            sd, config, str(path), arch=arch, scale=scale, options=options, path=path
        )
    elif isinstance(model, Mapping):
        sd, config = read_state_dict(model)
        loaded = load_state(sd, config, "state dict", arch=arch, scale=scale, options=options)
    else:
        raise ValueError(
            "model must be a name, a checkpoint path, a state dict, an nn.Module or a "
            f"ModelDescriptor, got {type(model).__name__}"
        )
    return _remember(loaded)


def create(
    name: str, scale: int = DEFAULT_SCALE, *, pretrained: bool = False, **options: Any
) -> nn.Module:
    """Build model ``name`` for upscaling factor ``scale``; ``options`` override its defaults.

    ``pretrained=True`` returns the weights shipped with nlsr instead (eval mode): ``name`` is a
    shipped model (``nlsr models``) or an architecture, meaning its best shipped model for
    ``scale``; the shipped model fixes the options. The module is a plain ``nn.Module``;
    :func:`resolve_model` describes it (architecture, options, source) and :func:`save` writes it.
    """
    if pretrained:
        return resolve_model(name, scale, **options).module
    if name not in available() and name in available_pretrained():
        raise KeyError(
            f"{name!r} is a pretrained model: use create({name!r}, scale, pretrained=True)"
        )
    module = build(name, scale, **options)
    _RECORDS[module] = _Record(name, dict(options), ModelSource(kind="created"))
    return module


def load(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    arch: str | None = None,
    scale: int | None = None,
    **options: Any,
) -> nn.Module:
    """Build the model a checkpoint file (or state dict) holds and load its weights strictly;
    eval mode. The configuration comes from the nlsr header if present, else from the tensors;
    ``arch``, ``scale`` and ``options`` override it (see docs/checkpoints.md).
    ``resolve_model(Path(source))`` gives the same model with its descriptor (source, metadata,
    load notes)."""
    path = Path(source) if isinstance(source, str) else source
    return resolve_model(path, scale, arch=arch, **options).module


def save(
    model: ModelDescriptor | nn.Module,
    path: str | Path,
    *,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a model nlsr built or loaded in nlsr's format: one ``.safetensors`` file whose
    header metadata ``nlsr_config`` is JSON ``{"arch", "scale", "options", **metadata}``;
    atomic (:func:`nlsr.checkpoint.save_state`)."""
    module = model.module if isinstance(model, ModelDescriptor) else model
    found = model if isinstance(model, ModelDescriptor) else None
    if found is None and module in _RECORDS:
        found = _described(module)
    if found is None or found.arch is None:
        raise CheckpointError(
            f"{path}: the model has no nlsr_config (architecture, scale and options); build it "
            "with nlsr.models.create or nlsr.load"
        )
    return save_state(
        module.state_dict(),
        path,
        arch=found.arch,
        scale=found.scale,
        options=found.options,
        metadata=metadata,
    )


def _described(module: nn.Module) -> ModelDescriptor:
    """The descriptor of ``module``, with what nlsr recorded when it built or loaded it."""
    record = _RECORDS.get(module)
    if record is None:
        return describe_module(module)
    return describe_module(module, arch=record.arch, options=record.options, source=record.source)


def _remember(found: ModelDescriptor) -> ModelDescriptor:
    """Record ``found``'s architecture, options and source for its module; returns it."""
    assert found.arch is not None
    _RECORDS[found.module] = _Record(found.arch, found.options, found.source)
    return found


def _shipped(name: str, scale: int, weights_dir: str | Path | None) -> ModelDescriptor:
    """Shipped model ``name`` (or an architecture's best) for ``scale`` with its verified
    weights: the file must exist, match its SHA-256 and hold the architecture, scale and
    parameter count the manifest states."""
    manifest = read_manifest(weights_dir)
    if name not in manifest and name in available():
        best = default_model(scale, arch=name, weights_dir=weights_dir)
        if best is None:
            raise PretrainedError(
                f"no pretrained {name} weights for x{scale}; {shipped_listing(manifest)}"
            )
        name = best
    w = pretrained_weights(name, scale, weights_dir=weights_dir)
    where = f"pretrained model {name!r} x{scale}"
    if not w.file.is_file():
        raise PretrainedError(
            f"{w.file}: weight file of {where} is missing (listed in {w.file.parent / MANIFEST}); "
            "the installation is incomplete: reinstall nlsr"
        )
    actual = sha256_of(w.file)
    if actual != w.sha256:
        raise PretrainedError(
            f"{w.file}: SHA-256 {actual} does not match the manifest's {w.sha256} for {where}; "
            "the file is corrupt or was replaced: reinstall nlsr"
        )
    try:
        sd, config = read_state_dict(w.file)
        found = (config or {}).get("arch"), (config or {}).get("scale")
        if found != (w.arch, scale):
            raise PretrainedError(
                f"{w.file}: holds {found[0]} x{found[1]}, but the manifest lists {w.arch} "
                f"x{scale} for {where}"
            )
        loaded = load_state(
            sd, config, str(w.file), arch=w.arch, scale=scale, options=w.options, path=w.file
        )
    except CheckpointError as e:
        raise PretrainedError(f"{where}: {e}") from e
    count = sum(p.numel() for p in loaded.module.parameters())
    if count != w.parameters:
        raise PretrainedError(
            f"{w.file}: {count} parameters, but the manifest states {w.parameters} for {where}"
        )
    source = ModelSource(
        kind="shipped",
        path=w.file,
        shipped=name,
        metadata=loaded.source.metadata,
        notes=loaded.source.notes,
    )
    return _remember(
        describe_module(loaded.module, arch=w.arch, options=loaded.options, source=source)
    )


def _exported(
    path: Path, scale: int | None, arch: str | None, options: Mapping[str, Any]
) -> ModelDescriptor:
    """The descriptor of the ONNX model at ``path`` (``nlsr export``): its scale and architecture
    come from the file; ``arch`` and ``scale``, when given, must match them."""
    if options:
        raise ValueError(f"{path}: options cannot be changed on an exported ONNX model")
    module = OnnxModel(path)
    found_arch = module.metadata.get("arch") or None
    if arch is not None and arch != found_arch:
        raise ValueError(f"{path}: holds an exported {found_arch} model, not {arch}")
    if scale is not None and scale != module.scale:
        raise ValueError(
            f"{path}: the exported model upscales x{module.scale}, but scale {scale} was asked "
            "for: the scale does not match"
        )
    source = ModelSource(kind="file", path=path, metadata=dict(module.metadata))
    found = describe_module(module, arch=found_arch, options=module.options(), source=source)
    return replace(found, bf16=False)
