"""The run folder: the names of its files, the checks before a run starts or resumes in it, the
configuration ``--resume`` reads back, and what an OSError that ends a run left in it."""

from __future__ import annotations

import os
from pathlib import Path

from nlsr.train.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    read_config_file,
    save_config,
)
from nlsr.train.parse import parse_config
from nlsr.train.state import ResumeError

CONFIG_FILE = "config.yaml"
CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"


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


def resume_config(run_dir: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> TrainConfig:
    """The configuration saved in ``run_dir`` with optional ``key=value`` overrides applied
    (e.g. ``train.iterations=...`` to extend a finished run)."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ResumeError(f"{run_dir}: not a run folder (no {CONFIG_FILE}); start it with --config")
    if not (run_dir / CHECKPOINT_FILE).is_file():
        raise ResumeError(f"{run_dir}: no {CHECKPOINT_FILE} yet, nothing to resume")
    raw = apply_overrides(read_config_file(path), overrides)
    raw["run_dir"] = str(run_dir.resolve())
    return parse_config(raw, source=str(path))


def prepare_run_dir(cfg: TrainConfig, run_dir: Path, *, resume: bool, write: bool) -> None:
    """Refuse to start a run over another one, or to resume one without a checkpoint; when
    ``write`` (the main process), make the folder and save the resolved configuration."""
    checkpoint = run_dir / CHECKPOINT_FILE
    if resume:
        if not checkpoint.is_file():
            raise ResumeError(f"{run_dir}: no {CHECKPOINT_FILE} to resume from")
    elif checkpoint.exists():
        raise ConfigError(
            f"run_dir: {run_dir} already holds a run; continue it with "
            f"`nlsr train --resume {run_dir}` or choose another run_dir"
        )
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / CONFIG_FILE)


def stopped_error(exc: OSError, run_dir: Path) -> OSError:
    """``exc`` with what became of the run: training stopped, the last checkpoint (written
    atomically, so never torn) and how to continue."""
    reason = exc.strerror or str(exc)
    checkpoint = run_dir / CHECKPOINT_FILE
    resume = f"fix this, then `nlsr train --resume {run_dir}`"
    if checkpoint.is_file() and exc.filename is not None and Path(exc.filename) == checkpoint:
        note = f"training stopped; the previous checkpoint is intact: {resume}"
    elif checkpoint.is_file():
        note = f"training stopped; {checkpoint} holds the last saved state: {resume}"
    else:
        note = "training stopped before its first checkpoint"
    return OSError(exc.errno, f"{reason}; {note}", exc.filename)
