"""``nlsr train``: configuration, exact data pipeline, training loop with exact resume, DDP.

``load_config(path, overrides)`` reads and validates a YAML/TOML config; ``train(config)`` runs
it; ``resume_config(run_dir)`` + ``train(config, resume=True)`` continues a run. The schema is in
``docs/training.md``.

Modules: ``config`` (the schema and its files), ``parse`` (validation against it), ``rundir``
(the run folder), ``data`` (images, patches, sampler), ``loop`` (the ``Trainer``), ``ema``,
``validation``, ``weights`` (initial weights, export provenance), ``events`` (``log.jsonl``),
``state`` (checkpoints), ``distributed`` (torchrun), ``publish`` (installing trained weights).
"""

from nlsr.train.config import ConfigError, TrainConfig
from nlsr.train.data import DataError
from nlsr.train.loop import TrainResult, train
from nlsr.train.parse import load_config, parse_config
from nlsr.train.rundir import resume_config
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
