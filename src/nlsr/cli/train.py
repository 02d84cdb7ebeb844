"""``nlsr train --config FILE [key=value ...]`` and ``nlsr train --resume RUN_DIR [...]``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

EPILOG = """\
examples:
  nlsr train --config configs/compact/edsr_tiny_x2.yaml
  nlsr train --config configs/edsr_x2.yaml train.iterations=2000 model.n_feats=32
  nlsr train --resume runs/edsr_x2
  torchrun --nproc_per_node=4 -m nlsr.train --config configs/nlsn_x2.yaml
the configuration schema is documented in docs/training.md
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``train`` sub-command."""
    p = subparsers.add_parser(
        "train",
        help="train a network (YAML/TOML config, exact resume, torchrun-ready)",
        description="Train a super-resolution network from a YAML or TOML config.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--config", metavar="FILE", help="training configuration (.yaml, .yml or .toml)"
    )
    src.add_argument("--resume", metavar="RUN_DIR", help="continue the run saved in RUN_DIR")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. train.iterations=2000 model.n_feats=32 optim.ema=0.999",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(run=run)
    return p


@contextlib.contextmanager
def _console_logging() -> Iterator[None]:
    """Show the trainer's messages on stderr (rank 0: info and up; other ranks: warnings)."""
    logger = logging.getLogger("nlsr.train")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def run(args: argparse.Namespace) -> int:
    """Validate the config, train, print where the weights are.

    Returns 0, or :data:`~nlsr.cli.EXIT_INTERRUPTED` when stopped by a signal (a checkpoint was
    saved). Errors reach :func:`nlsr.cli.main`, which prints them as one line: a bad config
    (ConfigError, exit status 2), a failed write (OSError saying what became of the run,
    exit status 1)."""
    with _console_logging():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from nlsr.atomic import remove_stale_temporaries
    from nlsr.cli import EXIT_INTERRUPTED
    from nlsr.train import load_config, resume_config, train
    from nlsr.train.rundir import check_run_dir

    if args.resume is not None:
        cfg = resume_config(args.resume, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    if args.print_config:
        sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    run_dir = Path(cfg.run_dir or ".")
    check_run_dir(run_dir)
    if os.environ.get("RANK", "0") == "0":
        removed = remove_stale_temporaries(run_dir)
        if removed:
            print(f"{run_dir}: removed {len(removed)} temporary file(s) left by an interrupted run")
    result = train(cfg, resume=args.resume is not None)
    if result.interrupted:
        return EXIT_INTERRUPTED
    if os.environ.get("RANK", "0") == "0":
        for label, path in (("final", result.final), ("best", result.best), ("ema", result.ema)):
            if path is not None:
                print(f"{label}: {path}")
    return 0
