"""``nlsr train``: configuration, exact data pipeline, training loop with exact resume, DDP.

``load_config(path, overrides)`` reads and validates a YAML/TOML config; ``train(config)`` runs
it; ``resume_config(run_dir)`` + ``train(config, resume=True)`` continues a run. The schema is in
``docs/training.md``.
"""

from __future__ import annotations

from nlsr.train.config import ConfigError, TrainConfig, load_config, parse_config
from nlsr.train.data import DataError
from nlsr.train.loop import TrainResult, resume_config, train
from nlsr.train.state import ResumeError

__all__ = [
    "ConfigError",
    "DataError",
    "ResumeError",
    "TrainConfig",
    "TrainResult",
    "load_config",
    "parse_config",
    "resume_config",
    "train",
]
