"""Weights shipped inside the package: a manifest (``weights/weights.json``) of named models,
one nlsr ``.safetensors`` file per scale, each checked against its SHA-256 before it is used.

The folder is ``nlsr/weights`` in the installed package; ``$NLSR_WEIGHTS_DIR`` or a
``weights_dir=`` argument points elsewhere (a folder laid out the same way), e.g. to try
weights before they are shipped. :func:`install` adds a trained run's weights to a folder.

Manifest layout (``format`` 1)::

    {"format": 1,
     "models": {"nlsr-dlsn-s": {
        "arch": "dlsn", "description": "...",
        "scales": {"2": {"file": "nlsr-dlsn-s-x2.safetensors", "sha256": "<64 hex>",
                         "parameters": 399164, "options": {...},
                         "scores": {"Set5": 37.2}, "training": {...},
                         "choices": {"n_hashes": {...}}}}}}}

``options`` are the constructor options the file is built with (also in its header);
``scores`` are measured benchmark PSNRs (dB; written by ``scripts/model_card.py``) that rank
models for :func:`default_model`; ``training`` is the provenance (data, recipe, iterations,
hardware, code version); ``choices`` records how inference-only options (e.g. the hash rounds)
were chosen: the value, the rule and the measurements behind it (:func:`record_choice`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from nlsr.atomic import atomic_write

__all__ = [
    "MANIFEST",
    "WEIGHTS_ENV",
    "PretrainedError",
    "PretrainedWeights",
    "available_pretrained",
    "default_model",
    "install",
    "load_pretrained",
    "pretrained_weights",
    "read_manifest",
    "resolve_weights_dir",
    "set_scores",
    "sha256_of",
]

#: Environment variable naming a weights folder that replaces the packaged one.
WEIGHTS_ENV = "NLSR_WEIGHTS_DIR"
#: File name of the manifest inside a weights folder.
MANIFEST = "weights.json"
#: The set whose PSNR ranks shipped models in :func:`default_model`.
RANKING_SET = "Set5"
_FORMAT = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class PretrainedError(ValueError):
    """A shipped model that is unknown, missing, corrupt or badly described in its manifest."""


@dataclass(frozen=True)
class PretrainedWeights:
    """One shipped weight file: model ``name`` at ``scale``, as its manifest entry states."""

    name: str
    arch: str
    scale: int
    file: Path
    sha256: str
    parameters: int
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    choices: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- the manifest


def resolve_weights_dir(path: str | Path | None = None) -> Path:
    """The weights folder in use: ``path``, else ``$NLSR_WEIGHTS_DIR``, else the package's."""
    if path is not None:
        return Path(path)
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env)
    return Path(str(resources.files("nlsr").joinpath("weights")))


def read_manifest(
    folder: str | Path | None = None,
) -> dict[str, dict[int, PretrainedWeights]]:
    """Every shipped model of a weights folder: name -> scale -> entry (validated; files are
    checked when loaded). A folder without a manifest ships nothing."""
    root = resolve_weights_dir(folder)
    path = root / MANIFEST
    if not path.is_file():
        if (folder is not None or os.environ.get(WEIGHTS_ENV)) and not root.is_dir():
            raise PretrainedError(f"{root}: weights folder does not exist")
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PretrainedError(f"{path}: unreadable manifest ({e})") from e
    return _parse_manifest(raw, path)


def _parse_manifest(raw: Any, path: Path) -> dict[str, dict[int, PretrainedWeights]]:
    def fail(where: str, problem: str) -> PretrainedError:
        return PretrainedError(f"{path}: {where}: {problem}")

    if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
        raise fail("format", f'expected a JSON object with "format": {_FORMAT}')
    models = raw.get("models", {})
    if not isinstance(models, dict):
        raise fail("models", "must be an object (name -> model)")
    from nlsr.models import available

    archs = set(available())
    out: dict[str, dict[int, PretrainedWeights]] = {}
    for name, model in models.items():
        where = f"models.{name}"
        if not _NAME.match(name):
            raise fail(where, "names are lower-case letters, digits, '.', '_' and '-'")
        if name in archs:
            raise fail(where, "a shipped model may not take the name of an architecture")
        if not isinstance(model, dict):
            raise fail(where, "must be an object")
        arch = model.get("arch")
        if arch not in archs:
            raise fail(f"{where}.arch", f"{arch!r} is not one of {', '.join(sorted(archs))}")
        scales = model.get("scales")
        if not isinstance(scales, dict) or not scales:
            raise fail(f"{where}.scales", "must be a non-empty object (scale -> weight file)")
        description = model.get("description", "")
        if not isinstance(description, str):
            raise fail(f"{where}.description", "must be a string")
        out[name] = {}
        for key, entry in scales.items():
            at = f"{where}.scales.{key}"
            if not key.isdigit() or int(key) < 1:
                raise fail(at, 'scale keys are positive integers, e.g. "2"')
            out[name][int(key)] = _parse_entry(entry, name, arch, int(key), description, path, at)
    return out


def _parse_entry(
    entry: Any, name: str, arch: str, scale: int, description: str, path: Path, at: str
) -> PretrainedWeights:
    def fail(key: str, problem: str) -> PretrainedError:
        return PretrainedError(f"{path}: {at}.{key}: {problem}")

    if not isinstance(entry, dict):
        raise PretrainedError(f"{path}: {at}: must be an object")
    file = entry.get("file")
    if not isinstance(file, str) or not file or Path(file).name != file or file.startswith("."):
        raise fail("file", f"{file!r} must be a plain file name inside the weights folder")
    sha = entry.get("sha256")
    if not isinstance(sha, str) or not _SHA256.match(sha):
        raise fail("sha256", "must be 64 lower-case hexadecimal digits")
    parameters = entry.get("parameters")
    if not isinstance(parameters, int) or isinstance(parameters, bool) or parameters < 0:
        raise fail("parameters", "must be a non-negative integer")
    options = entry.get("options", {})
    training = entry.get("training", {})
    scores = entry.get("scores", {})
    choices = entry.get("choices", {})
    for key, value in (
        ("options", options),
        ("training", training),
        ("scores", scores),
        ("choices", choices),
    ):
        if not isinstance(value, dict):
            raise fail(key, "must be an object")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in scores.values()):
        raise fail("scores", "values must be numbers (PSNR in dB)")
    return PretrainedWeights(
        name=name,
        arch=arch,
        scale=scale,
        file=path.parent / file,
        sha256=sha,
        parameters=parameters,
        options=dict(options),
        description=description,
        scores={k: float(v) for k, v in scores.items()},
        training=dict(training),
        choices=dict(choices),
    )


def _write_manifest(folder: Path, models: dict[str, dict[int, PretrainedWeights]]) -> Path:
    """Write the manifest of ``models`` into ``folder`` atomically."""
    payload: dict[str, Any] = {"format": _FORMAT, "models": {}}
    for name in sorted(models):
        scales = models[name]
        first = scales[min(scales)]
        payload["models"][name] = {
            "arch": first.arch,
            "description": first.description,
            "scales": {
                str(s): {
                    "file": w.file.name,
                    "sha256": w.sha256,
                    "parameters": w.parameters,
                    "options": w.options,
                    "scores": w.scores,
                    "training": w.training,
                    **({"choices": w.choices} if w.choices else {}),
                }
                for s, w in sorted(scales.items())
            },
        }
    path = folder / MANIFEST
    atomic_write(path, (json.dumps(payload, indent=2) + "\n").encode("utf-8"))
    return path


# --------------------------------------------------------------------------- queries


def available_pretrained(
    scale: int | None = None, *, weights_dir: str | Path | None = None
) -> list[str]:
    """Names of the shipped models (those with weights for ``scale`` when it is given), sorted."""
    manifest = read_manifest(weights_dir)
    return sorted(n for n, scales in manifest.items() if scale is None or scale in scales)


def _shipped_listing(manifest: dict[str, dict[int, PretrainedWeights]]) -> str:
    if not manifest:
        return "no pretrained models are shipped"
    items = [
        f"{n} (x{', x'.join(str(s) for s in sorted(scales))})"
        for n, scales in sorted(manifest.items())
    ]
    return "shipped: " + "; ".join(items)


def pretrained_weights(
    name: str, scale: int, *, weights_dir: str | Path | None = None
) -> PretrainedWeights:
    """The manifest entry of model ``name`` at ``scale``; the error lists what is shipped."""
    manifest = read_manifest(weights_dir)
    if name not in manifest:
        raise PretrainedError(f"no pretrained model {name!r}; {_shipped_listing(manifest)}")
    if scale not in manifest[name]:
        raise PretrainedError(
            f"pretrained model {name!r} has no x{scale} weights; {_shipped_listing(manifest)}"
        )
    return manifest[name][scale]


def default_model(
    scale: int, *, arch: str | None = None, weights_dir: str | Path | None = None
) -> str | None:
    """The best shipped model for ``scale`` (of architecture ``arch`` when given): highest
    measured Set5 PSNR, unscored models after scored ones, then by name; None if none."""
    manifest = read_manifest(weights_dir)
    candidates = [
        (n, scales[scale])
        for n, scales in manifest.items()
        if scale in scales and arch in (None, scales[scale].arch)
    ]
    if not candidates:
        return None

    def rank(item: tuple[str, PretrainedWeights]) -> tuple[bool, float, str]:
        name, w = item
        score = w.scores.get(RANKING_SET)
        return (score is None, -(score or 0.0), name)

    return min(candidates, key=rank)[0]


# --------------------------------------------------------------------------- loading


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_pretrained(
    name: str, scale: int = 2, *, weights_dir: str | Path | None = None
) -> nn.Module:
    """Build shipped model ``name`` for ``scale`` with its verified weights; eval mode.

    ``name`` is a shipped model, or an architecture (its best shipped model for ``scale``). The
    file must exist, match its SHA-256 and hold the architecture, scale and parameter count the
    manifest states; ``model.nlsr_pretrained`` is set to the shipped name.
    """
    from nlsr.checkpoint import CheckpointError, load, read_state_dict
    from nlsr.models import available

    manifest = read_manifest(weights_dir)
    if name not in manifest and name in available():
        best = default_model(scale, arch=name, weights_dir=weights_dir)
        if best is None:
            raise PretrainedError(
                f"no pretrained {name} weights for x{scale}; {_shipped_listing(manifest)}"
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
        _, config = read_state_dict(w.file)
        found = (config or {}).get("arch"), (config or {}).get("scale")
        if found != (w.arch, scale):
            raise PretrainedError(
                f"{w.file}: holds {found[0]} x{found[1]}, but the manifest lists {w.arch} "
                f"x{scale} for {where}"
            )
        model = load(w.file, arch=w.arch, scale=scale, **w.options)
    except CheckpointError as e:
        raise PretrainedError(f"{where}: {e}") from e
    count = sum(p.numel() for p in model.parameters())
    if count != w.parameters:
        raise PretrainedError(
            f"{w.file}: {count} parameters, but the manifest states {w.parameters} for {where}"
        )
    model.nlsr_pretrained = name
    return model.eval()


# --------------------------------------------------------------------------- installing


def _training_summary(config: Mapping[str, Any], hardware: str | None) -> dict[str, Any]:
    """Provenance kept in the manifest and the shipped header: what was trained, on what, how
    long and with which code; local folders are reduced to their names."""
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
            "loss": "L1",
            "optimizer": "Adam",
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
    from nlsr.checkpoint import load, read_state_dict, save
    from nlsr.models import available

    folder = resolve_weights_dir(weights_dir)
    if not _NAME.match(name) or name in available():
        raise PretrainedError(
            f"model name {name!r}: use lower-case letters, digits, '.', '_' and '-', and not "
            "the name of an architecture"
        )
    _, config = read_state_dict(source)
    if config is None:
        raise PretrainedError(f"{source}: not an nlsr-format file (no nlsr_config header)")
    model = load(source, **dict(options or {}))
    scale = int(model.scale)
    arch = model.nlsr_config["arch"]
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
        parameters=sum(p.numel() for p in model.parameters()),
        options=dict(model.nlsr_config["options"]),
        description=description if description is not None else _first_description(existing),
        training=training,
    )
    manifest[name] = {
        **{s: _with_description(w, entry.description) for s, w in existing.items()},
        scale: entry,
    }
    _write_manifest(folder, manifest)
    return entry


def set_scores(
    name: str, scale: int, scores: Mapping[str, float], *, weights_dir: str | Path | None = None
) -> PretrainedWeights:
    """Record measured PSNRs (dB, by set name) for a shipped model; they rank
    :func:`default_model` and fill the model card."""
    folder = resolve_weights_dir(weights_dir)
    manifest = read_manifest(folder)
    old = pretrained_weights(name, scale, weights_dir=folder)
    new = replace(old, scores={k: float(v) for k, v in scores.items()})
    manifest[name][scale] = new
    _write_manifest(folder, manifest)
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
    _write_manifest(folder, manifest)
    return new


def _first_description(scales: Mapping[int, PretrainedWeights]) -> str:
    return scales[min(scales)].description if scales else ""


def _with_description(w: PretrainedWeights, description: str) -> PretrainedWeights:
    return replace(w, description=description)
