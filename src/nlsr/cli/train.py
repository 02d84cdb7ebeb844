"""``nlsr train --config FILE [key=value ...]`` and ``nlsr train --resume RUN_DIR [...]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

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


def _setup_logging() -> None:
    logger = logging.getLogger("nlsr.train")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)


def run(args: argparse.Namespace) -> int:
    """Validate the config, train, print where the weights are.

    Returns 0, 2 on user errors, 130 when stopped by a signal (a checkpoint was saved)."""
    from nlsr.train import load_config, resume_config, train

    _setup_logging()
    try:
        if args.resume is not None:
            cfg = resume_config(args.resume, args.overrides)
        else:
            cfg = load_config(args.config, args.overrides)
        if args.print_config:
            sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        result = train(cfg, resume=args.resume is not None)
    except ValueError as exc:
        print(f"nlsr train: error: {exc}", file=sys.stderr)
        return 2
    if result.interrupted:
        return 130
    if os.environ.get("RANK", "0") == "0":
        for label, path in (("final", result.final), ("best", result.best), ("ema", result.ema)):
            if path is not None:
                print(f"{label}: {path}")
    return 0
