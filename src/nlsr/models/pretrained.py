"""Weights shipped inside the package: a manifest (``weights/weights.json``) of named models,
one nlsr ``.safetensors`` file per scale, each checked against its SHA-256 before it is used.

The folder is ``nlsr/weights`` in the installed package; ``$NLSR_WEIGHTS_DIR`` or a
``weights_dir=`` argument points elsewhere (a folder laid out the same way), e.g. to try
weights before they are shipped. Loading a shipped model is :func:`nlsr.models.resolve_model`'s
job; adding trained weights to a folder is :mod:`nlsr.train.publish`'s.

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
were chosen: the value, the rule and the measurements behind it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from nlsr.atomic import atomic_write
from nlsr.models.registry import available

__all__ = [
    "MANIFEST",
    "NAME_PATTERN",
    "WEIGHTS_ENV",
    "PretrainedError",
    "PretrainedWeights",
    "available_pretrained",
    "default_model",
    "pretrained_weights",
    "read_manifest",
    "resolve_weights_dir",
    "shipped_listing",
    "write_manifest",
]

#: Environment variable naming a weights folder that replaces the packaged one.
WEIGHTS_ENV = "NLSR_WEIGHTS_DIR"
#: File name of the manifest inside a weights folder.
MANIFEST = "weights.json"
#: The set whose PSNR ranks shipped models in :func:`default_model`.
RANKING_SET = "Set5"
#: What a shipped model's name may look like (it may not be an architecture's name either).
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_FORMAT = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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
    archs = set(available())
    out: dict[str, dict[int, PretrainedWeights]] = {}
    for name, model in models.items():
        where = f"models.{name}"
        if not NAME_PATTERN.match(name):
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


def write_manifest(folder: Path, models: dict[str, dict[int, PretrainedWeights]]) -> Path:
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


def shipped_listing(manifest: dict[str, dict[int, PretrainedWeights]]) -> str:
    """``shipped: NAME (x2, x3); ...`` for error messages, or that nothing is shipped."""
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
        raise PretrainedError(f"no pretrained model {name!r}; {shipped_listing(manifest)}")
    if scale not in manifest[name]:
        raise PretrainedError(
            f"pretrained model {name!r} has no x{scale} weights; {shipped_listing(manifest)}"
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
