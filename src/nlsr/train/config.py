"""The ``nlsr train`` configuration: one schema, read from YAML or TOML, validated precisely.

Every key has a type and a default (a few are required); unknown keys are errors with a
did-you-mean; ``key=value`` overrides address keys by dotted path. The schema is documented in
``docs/training.md`` and mirrored by the dataclasses below.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomllib
import yaml

from nlsr.atomic import atomic_write

DEGRADATIONS = ("BI", "BD", "DN")
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
    amp: bool = False
    channels_last: bool = False
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
        """Plain nested dict (lists, not tuples) that round-trips through :func:`parse_config`."""
        return _plain(dataclasses.asdict(self))


_SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "optim": OptimSection,
    "train": TrainSection,
    "val": ValSection,
}
_TOP_KEYS = (*_SECTIONS, "run_dir")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def all_keys() -> list[str]:
    """Every dotted key of the schema (``model.options.*`` excluded), for docs and did-you-mean."""
    keys = ["run_dir"]
    for name, cls in _SECTIONS.items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


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


# ----------------------------------------------------------------------------- validation


_PLURAL = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} {_PLURAL[args[0]]}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}[tp]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it in canonical form or raise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"{key}: must be {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        try:
            return _coerce(value, inner, key)
        except ConfigError:
            raise bad from None
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise bad
        return tuple(
            _coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e6 in YAML/TOML
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build_section(name: str, cls: type, raw: Any, source: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {name} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(
                f"{source}: unknown key {name}.{key}{_suggest(str(key), list(fields))}; "
                f"allowed: {', '.join(fields)}"
            )
        values[key] = _coerce(value, hints[key], f"{source}: {name}.{key}")
    for key, f in fields.items():
        if f.metadata.get("required") and key not in values:
            raise ConfigError(f"{source}: {name}.{key} is required ({_type_name(hints[key])})")
    return cls(**values)


def _check_range(ok: bool, key: str, message: str, value: Any, source: str) -> None:
    if not ok:
        raise ConfigError(f"{source}: {key}: {message}, got {value!r}")


def _validate(cfg: TrainConfig, source: str) -> None:
    from nlsr.models import available
    from nlsr.models.registry import options

    m, d, o, t, v = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.val
    models = available()
    if m.arch not in models:
        raise ConfigError(
            f"{source}: model.arch: unknown model {m.arch!r}{_suggest(m.arch, models)}; "
            f"available: {', '.join(models)}"
        )
    _check_range(m.scale in (2, 3, 4, 8), "model.scale", "must be 2, 3, 4 or 8", m.scale, source)
    allowed = list(options(m.arch))
    for key in m.options:
        if key not in allowed:
            raise ConfigError(
                f"{source}: unknown option model.options.{key} for {m.arch}"
                f"{_suggest(key, allowed)}; allowed: {', '.join(allowed)}"
            )
    _check_model_options(m, options(m.arch), source)
    _check_range(
        len(d.train_dirs) > 0, "data.train_dirs", "needs at least one folder", d.train_dirs, source
    )
    if d.lr_dirs is not None and len(d.lr_dirs) != len(d.train_dirs):
        raise ConfigError(
            f"{source}: data.lr_dirs: must list one LR folder per data.train_dirs entry "
            f"({len(d.train_dirs)}), got {len(d.lr_dirs)}"
        )
    if d.lr_dirs is not None and d.degradation != "BI":
        raise ConfigError(
            f"{source}: data.degradation: LR images come from data.lr_dirs, so it must be BI "
            f"(the default), got {d.degradation!r}"
        )
    if d.degradation == "DN":
        _check_range(
            d.noise_sigma > 0, "data.noise_sigma", "must be > 0 for DN", d.noise_sigma, source
        )
    else:
        _check_range(
            d.noise_sigma == 0,
            "data.noise_sigma",
            "is only used with degradation DN; must be 0",
            d.noise_sigma,
            source,
        )
    _check_range(d.patch_size > 0, "data.patch_size", "must be > 0", d.patch_size, source)
    _check_range(
        d.patch_size % m.scale == 0,
        "data.patch_size",
        f"must be a multiple of model.scale ({m.scale}); it is in HR pixels",
        d.patch_size,
        source,
    )
    _check_range(d.workers >= 0, "data.workers", "must be >= 0", d.workers, source)
    _check_range(d.batch_size >= 1, "data.batch_size", "must be >= 1", d.batch_size, source)
    _check_range(o.lr > 0, "optim.lr", "must be > 0", o.lr, source)
    _check_range(
        all(0 <= b < 1 for b in o.betas), "optim.betas", "must lie in [0, 1)", o.betas, source
    )
    _check_range(o.eps > 0, "optim.eps", "must be > 0", o.eps, source)
    _check_range(
        o.schedule in ("step", "cosine"),
        "optim.schedule",
        "must be 'step' or 'cosine'",
        o.schedule,
        source,
    )
    _check_range(
        0 <= o.min_lr <= o.lr, "optim.min_lr", "must lie in [0, optim.lr]", o.min_lr, source
    )
    _check_range(
        all(x > 0 for x in o.milestones) and o.milestones == sorted(set(o.milestones)),
        "optim.milestones",
        "must be positive and strictly increasing",
        o.milestones,
        source,
    )
    _check_range(0 < o.gamma <= 1, "optim.gamma", "must lie in (0, 1]", o.gamma, source)
    _check_range(
        o.grad_clip is None or o.grad_clip > 0,
        "optim.grad_clip",
        "must be > 0 or null",
        o.grad_clip,
        source,
    )
    _check_range(
        o.ema is None or 0 < o.ema < 1, "optim.ema", "must lie in (0, 1) or be null", o.ema, source
    )
    _check_range(t.iterations >= 1, "train.iterations", "must be >= 1", t.iterations, source)
    _check_range(t.seed >= 0, "train.seed", "must be >= 0", t.seed, source)
    _check_range(
        re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", t.device) is not None,
        "train.device",
        "must be auto, cpu, cuda, cuda:N or mps",
        t.device,
        source,
    )
    _check_range(
        t.threads is None or t.threads >= 1,
        "train.threads",
        "must be >= 1 or null",
        t.threads,
        source,
    )
    _check_range(t.log_every >= 1, "train.log_every", "must be >= 1", t.log_every, source)
    _check_range(
        t.checkpoint_every >= 1,
        "train.checkpoint_every",
        "must be >= 1",
        t.checkpoint_every,
        source,
    )
    if t.warm_start is not None and t.finetune_from is not None:
        raise ConfigError(
            f"{source}: train.warm_start and train.finetune_from are exclusive; set one"
        )
    _check_range(v.every >= 0, "val.every", "must be >= 0 (0 disables validation)", v.every, source)
    _check_range(
        v.max_images is None or v.max_images >= 1,
        "val.max_images",
        "must be >= 1 or null",
        v.max_images,
        source,
    )
    if not all(math.isfinite(x) for x in (o.lr, o.eps, o.gamma, d.noise_sigma)):
        raise ConfigError(
            f"{source}: optim.lr, optim.eps, optim.gamma and data.noise_sigma must be finite"
        )


def _check_model_options(m: ModelSection, defaults: dict[str, Any], source: str) -> None:
    """Each option of the type of its default (integers are counts and sizes, >= 1; numbers
    finite), then the network built with them on the meta device (no memory, no time), so
    that a value the network refuses is reported before a run folder is made."""
    for key, value in m.options.items():
        default = defaults[key]
        where = f"{source}: model.options.{key}"
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: must be true/false, got {value!r}")
        elif isinstance(default, int):
            if isinstance(value, float) and value.is_integer():  # 1e3 in YAML
                value = m.options[key] = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}: must be a positive integer, got {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{where}: must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"{where}: must be finite, got {value!r}")
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{where}: must be a string, got {value!r}")
    _check_buildable(m, source)


def _check_buildable(m: ModelSection, source: str) -> None:
    import torch

    from nlsr.models import create

    try:
        with torch.device("meta"):
            create(m.arch, m.scale, **m.options)
        return
    except Exception:  # tried again on the CPU below, which has every operation
        pass
    try:
        create(m.arch, m.scale, **m.options)
    except Exception as exc:  # the networks' own checks raise various types
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(
            f"{source}: model: cannot build {m.arch} x{m.scale} with options {m.options}: {reason}"
        ) from exc


def check_run_dir(run_dir: str | Path) -> None:
    """Raise ConfigError unless ``run_dir`` is a folder, or can be made one, that this process
    can write to (checked before training starts, so that no work is lost)."""
    path = Path(run_dir)
    existing = path
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        if existing == path:
            raise ConfigError(f"run_dir: {path} is a file, not a folder")
        raise ConfigError(f"run_dir: {path} cannot be created: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created in {existing}"
        raise ConfigError(f"run_dir: {path} {what} (permission denied or read-only)")


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def parse_config(raw: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
    """Validate a raw nested mapping and return a :class:`TrainConfig` with absolute paths.

    Relative paths are resolved against the current directory; ``run_dir`` defaults to
    ``runs/<arch>_x<scale>``.
    """
    for key in raw:
        if key not in _TOP_KEYS:
            raise ConfigError(
                f"{source}: unknown section {key!r}{_suggest(str(key), _TOP_KEYS)}; "
                f"allowed: {', '.join(_TOP_KEYS)}"
            )
    sections = {
        name: _build_section(name, cls, raw.get(name), source) for name, cls in _SECTIONS.items()
    }
    run_dir = raw.get("run_dir")
    if run_dir is not None and not isinstance(run_dir, str):
        raise ConfigError(f"{source}: run_dir: must be a string (a folder), got {run_dir!r}")
    cfg = TrainConfig(run_dir=run_dir, **sections)
    _validate(cfg, source)
    cfg.run_dir = _absolute(cfg.run_dir or f"runs/{cfg.model.arch}_x{cfg.model.scale}")
    cfg.data.train_dirs = [_absolute(p) for p in cfg.data.train_dirs]
    if cfg.data.lr_dirs is not None:
        cfg.data.lr_dirs = [_absolute(p) for p in cfg.data.lr_dirs]
    cfg.train.warm_start = _absolute(cfg.train.warm_start)
    cfg.train.finetune_from = _absolute(cfg.train.finetune_from)
    cfg.val.data_root = _absolute(cfg.val.data_root)
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read ``path`` (YAML or TOML), apply dotted ``key=value`` overrides, validate."""
    raw = apply_overrides(read_config_file(path), overrides)
    return parse_config(raw, source=str(path))


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the resolved configuration as YAML, atomically (it is what ``--resume`` reads)."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
