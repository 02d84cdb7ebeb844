"""Publishing trained weights: add a run's exported weights to a weights folder as a shipped
model (:func:`install`), and record what was measured about it (:func:`set_scores`,
:func:`record_choice`). The manifest itself is :mod:`nlsr.models.pretrained`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from nlsr.checkpoint import read_state_dict, sha256_of
from nlsr.models.pretrained import (
    MANIFEST,
    NAME_PATTERN,
    PretrainedError,
    PretrainedWeights,
    pretrained_weights,
    read_manifest,
    resolve_weights_dir,
    write_manifest,
)
from nlsr.models.registry import available
from nlsr.models.resolve import resolve_model, save

__all__ = ["install", "record_choice", "set_scores"]


def _training_summary(config: Mapping[str, Any], hardware: str | None) -> dict[str, Any]:
    """Provenance kept in the manifest and the shipped header, from the ``training`` entry
    ``nlsr train`` writes into its exports (:func:`nlsr.train.weights.provenance`): what was
    trained, on what, how long and with which code; local folders are reduced to their names."""
    training = dict(config.get("training") or {})
    run = training.get("config") or {}
    data, optim, train = run.get("data", {}), run.get("optim", {}), run.get("train", {})
    found = training.get("data") or {}
    finetune = train.get("finetune_from")
    warm = train.get("warm_start")
    summary: dict[str, Any] = {
        "weights": training.get("weights"),
        "iterations": training.get("iterations"),
        "data": {
            "train_sets": [Path(p).name for p in found.get("train_dirs") or []],
            "images_used": found.get("images_used"),
            "degradation": found.get("degradation"),
        },
        "recipe": {
            "loss": training.get("loss"),
            "optimizer": training.get("optimizer"),
            "lr": optim.get("lr"),
            "betas": optim.get("betas"),
            "schedule": optim.get("schedule", "step"),
            "milestones": optim.get("milestones"),
            "gamma": optim.get("gamma"),
            "min_lr": optim.get("min_lr"),
            "ema": optim.get("ema"),
            "batch_size": data.get("batch_size"),
            "patch_size": data.get("patch_size"),
            "augment": data.get("augment"),
            "seed": train.get("seed"),
            "finetune_from": "/".join(Path(finetune).parts[-2:]) if finetune else None,
            "warm_start": "/".join(Path(warm).parts[-2:]) if warm else None,
            "train_options": (run.get("model") or {}).get("options"),
        },
        "validation": training.get("best"),
        "device": train.get("device"),
        "threads": train.get("threads"),
        "git_commit": training.get("git_commit"),
        "nlsr_version": training.get("nlsr_version"),
        "torch_version": training.get("torch_version"),
    }
    if hardware:
        summary["hardware"] = hardware
    return summary


def install(
    source: str | Path,
    name: str,
    *,
    weights_dir: str | Path | None = None,
    description: str | None = None,
    options: Mapping[str, Any] | None = None,
    hardware: str | None = None,
) -> PretrainedWeights:
    """Add trained weights (an nlsr ``.safetensors`` export of ``nlsr train``) to a weights
    folder as model ``name`` at their scale, and update its manifest.

    The file is re-saved as ``<name>-x<scale>.safetensors`` with its training provenance (local
    paths reduced to names); ``options`` override inference-only options (e.g. ``n_hashes``).
    Scores of weights it replaces are dropped: measure the new ones (:func:`set_scores`).
    """
    folder = resolve_weights_dir(weights_dir)
    if not NAME_PATTERN.match(name) or name in available():
        raise PretrainedError(
            f"model name {name!r}: use lower-case letters, digits, '.', '_' and '-', and not "
            "the name of an architecture"
        )
    _, config = read_state_dict(source)
    if config is None:
        raise PretrainedError(f"{source}: not an nlsr-format file (no nlsr_config header)")
    model = resolve_model(Path(source), **dict(options or {}))
    scale, arch = model.scale, model.arch
    manifest = read_manifest(folder) if (folder / MANIFEST).is_file() else {}
    existing = manifest.get(name, {})
    if existing and next(iter(existing.values())).arch != arch:
        raise PretrainedError(
            f"{name}: already shipped as {next(iter(existing.values())).arch}, not {arch}"
        )
    training = _training_summary(config, hardware)
    folder.mkdir(parents=True, exist_ok=True)
    target = save(
        model,
        folder / f"{name}-x{scale}.safetensors",
        metadata={"training": training, "pretrained": name},
    )
    target.chmod(0o644)
    entry = PretrainedWeights(
        name=name,
        arch=arch,
        scale=scale,
        file=target,
        sha256=sha256_of(target),
        parameters=sum(p.numel() for p in model.module.parameters()),
        options=dict(model.options),
        description=description if description is not None else _first_description(existing),
        training=training,
    )
    manifest[name] = {
        **{s: _with_description(w, entry.description) for s, w in existing.items()},
        scale: entry,
    }
    write_manifest(folder, manifest)
    return entry


def set_scores(
    name: str, scale: int, scores: Mapping[str, float], *, weights_dir: str | Path | None = None
) -> PretrainedWeights:
    """Record measured PSNRs (dB, by set name) for a shipped model; they rank
    ``nlsr.models.pretrained.default_model`` and fill the model card."""
    folder = resolve_weights_dir(weights_dir)
    manifest = read_manifest(folder)
    old = pretrained_weights(name, scale, weights_dir=folder)
    new = replace(old, scores={k: float(v) for k, v in scores.items()})
    manifest[name][scale] = new
    write_manifest(folder, manifest)
    return new


def record_choice(
    name: str,
    scale: int,
    option: str,
    value: Any,
    evidence: Mapping[str, Any],
    *,
    weights_dir: str | Path | None = None,
) -> PretrainedWeights:
    """Set inference option ``option`` of a shipped model to ``value`` and record why
    (``evidence``: the rule and the measurements) under the entry's ``choices``."""
    folder = resolve_weights_dir(weights_dir)
    manifest = read_manifest(folder)
    old = pretrained_weights(name, scale, weights_dir=folder)
    new = replace(
        old,
        options={**old.options, option: value},
        choices={**old.choices, option: {"value": value, **evidence}},
    )
    manifest[name][scale] = new
    write_manifest(folder, manifest)
    return new


def _first_description(scales: Mapping[int, PretrainedWeights]) -> str:
    return scales[min(scales)].description if scales else ""


def _with_description(w: PretrainedWeights, description: str) -> PretrainedWeights:
    return replace(w, description=description)
