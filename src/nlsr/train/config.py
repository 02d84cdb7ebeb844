"""The ``nlsr train`` configuration's schema and its files: YAML or TOML read with size and
alias-bomb limits, dotted ``key=value`` overrides, the resolved config written back.

Every key has a type and a default (a few are required); the schema is documented in
``docs/training.md`` and mirrored by the dataclasses below. :mod:`nlsr.train.parse` checks a
raw mapping against it (unknown keys with a did-you-mean, types, ranges, the model's options).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomllib
import yaml

from nlsr.atomic import atomic_write

#: Largest config file read, in bytes (configs are a few kilobytes).
MAX_CONFIG_BYTES = 1 << 20
#: Most values (mappings, lists and scalars, every use of an alias counted) a YAML config or
#: override may expand to: a "billion laughs" alias bomb is refused before it is built.
MAX_YAML_VALUES = 100_000
#: option names of ``model`` that are not constructor options
_MODEL_KEYS = ("arch", "scale", "options")


class ConfigError(ValueError):
    """A training configuration (file, override or value) is invalid; the message names it."""


@dataclass
class ModelSection:
    """Which network to train: registry name, upscaling factor and constructor options."""

    arch: str = field(default="", metadata={"required": True})
    scale: int = 2
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    """Training images and how patches are made from them."""

    train_dirs: list[str] = field(default_factory=list, metadata={"required": True})
    lr_dirs: list[str] | None = None
    degradation: Literal["BI", "BD", "DN"] = "BI"
    noise_sigma: float = 0.0
    patch_size: int = 96
    augment: bool = True
    cache: bool = True
    workers: int = 2
    batch_size: int = 16


@dataclass
class OptimSection:
    """Adam, the learning-rate schedule, gradient clipping and the weight EMA.

    ``schedule: step`` halves (``gamma``) the rate at each of ``milestones`` (the papers' recipe);
    ``schedule: cosine`` anneals it from ``lr`` to ``min_lr`` over ``train.iterations`` (a faster
    recipe for compact models on small budgets). The EMA decay is warmed up as
    ``min(ema, (1 + n) / (10 + n))`` after ``n`` updates, so early EMA weights are not dominated
    by the random initialisation.
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "step"
    milestones: list[int] = field(default_factory=lambda: [200_000, 400_000, 600_000, 800_000])
    gamma: float = 0.5
    min_lr: float = 0.0
    grad_clip: float | None = None
    ema: float | None = None


@dataclass
class TrainSection:
    """Length, seeding, numerics, logging/checkpoint cadence and initial weights."""

    iterations: int = 1_000_000
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    threads: int | None = None
    amp: bool | None = None  # None: bf16 autocast where the device computes bf16 natively
    channels_last: bool = True
    log_every: int = 100
    checkpoint_every: int = 5000
    warm_start: str | None = None
    finetune_from: str | None = None


@dataclass
class ValSection:
    """Periodic validation on benchmark sets with the exact evaluation protocol."""

    every: int = 5000
    sets: list[str] = field(default_factory=lambda: ["Set5"])
    data_root: str | None = None
    max_images: int | None = None


@dataclass
class TrainConfig:
    """A complete, validated training configuration."""

    model: ModelSection
    data: DataSection
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    val: ValSection = field(default_factory=ValSection)
    run_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists, not tuples) that round-trips through
        :func:`~nlsr.train.parse.parse_config`."""
        return _plain(dataclasses.asdict(self))


#: The sections of a config file, by name.
SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "optim": OptimSection,
    "train": TrainSection,
    "val": ValSection,
}
#: The keys allowed at the top of a config file.
TOP_KEYS = (*SECTIONS, "run_dir")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def all_keys() -> list[str]:
    """Every dotted key of the schema (``model.options.*`` excluded), for docs and did-you-mean."""
    keys = ["run_dir"]
    for name, cls in SECTIONS.items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


# ----------------------------------------------------------------------------- reading


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a ``.yaml``/``.yml`` or ``.toml`` file into a dict (not yet validated).

    Files above :data:`MAX_CONFIG_BYTES` and YAML expanding to more than
    :data:`MAX_YAML_VALUES` values (alias bombs) are refused."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise ConfigError(f"{path}: config must be .yaml, .yml or .toml, got {suffix!r}")
    text = _read_text(path)
    try:
        raw = tomllib.loads(text) if suffix == ".toml" else load_yaml(text, str(path))
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot parse: {' '.join(str(exc).split())}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def _read_text(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror or exc})") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB; not a training config"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)``, refusing documents that expand to more than
    :data:`MAX_YAML_VALUES` values (aliases count at every use: "billion laughs"), recursive
    aliases and very deep nesting, before anything is built; ``source`` names the text."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _count_values(node, {}, set(), source)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply") from None
    finally:
        loader.dispose()


def _count_values(node: yaml.Node, sizes: dict[int, int], open_: set[int], source: str) -> int:
    """Number of values ``node`` expands to (each alias as a full copy of its anchor)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise ConfigError(f"{source}: YAML alias refers to itself (recursive structure)")
    open_.add(key)
    if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    else:
        children = []
    total = 1
    for child in children:
        total += _count_values(child, sizes, open_, source)
        if total > MAX_YAML_VALUES:
            raise ConfigError(
                f"{source}: YAML expands to more than {MAX_YAML_VALUES} values through its "
                "aliases (an alias bomb?); refused"
            )
    open_.discard(key)
    sizes[key] = total
    return total


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``a.b.c=value`` overrides applied (values parsed as YAML).

    ``model.<option>=v`` is shorthand for ``model.options.<option>=v``.
    """
    out = _deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"override {item!r}: must look like key=value, e.g. train.iterations=2000"
            )
        try:
            value = load_yaml(text, f"override {item!r}")
        except yaml.YAMLError as exc:
            reason = " ".join(str(exc).split())
            raise ConfigError(f"override {item!r}: cannot parse the value: {reason}") from exc
        parts = key.split(".")
        if any(not p for p in parts):
            raise ConfigError(f"override {item!r}: empty component in key {key!r}")
        if parts[0] == "model" and len(parts) == 2 and parts[1] not in _MODEL_KEYS:
            parts = ["model", "options", parts[1]]
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"override {item!r}: {where} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the resolved configuration as YAML, atomically (it is what ``--resume`` reads)."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
