"""Validating a raw configuration against the schema of :mod:`nlsr.train.config`: unknown keys
with a did-you-mean, types, ranges and the model's options, checked precisely before a run
folder is made; :func:`parse_config` and :func:`load_config` give a :class:`TrainConfig`."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from nlsr.train.config import (
    SECTIONS,
    TOP_KEYS,
    ConfigError,
    ModelSection,
    TrainConfig,
    apply_overrides,
    read_config_file,
)


def _suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


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


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def parse_config(raw: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
    """Validate a raw nested mapping and return a :class:`TrainConfig` with absolute paths.

    Relative paths are resolved against the current directory; ``run_dir`` defaults to
    ``runs/<arch>_x<scale>``.
    """
    for key in raw:
        if key not in TOP_KEYS:
            raise ConfigError(
                f"{source}: unknown section {key!r}{_suggest(str(key), TOP_KEYS)}; "
                f"allowed: {', '.join(TOP_KEYS)}"
            )
    sections = {
        name: _build_section(name, cls, raw.get(name), source) for name, cls in SECTIONS.items()
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
