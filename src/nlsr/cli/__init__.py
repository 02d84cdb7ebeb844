"""The ``nlsr`` command: one sub-command per module in this package."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

#: sub-command -> module under ``nlsr.cli`` with ``add_parser(subparsers)`` and ``run(args)``.
COMMANDS = {
    "upscale": "upscale",
    "eval": "evaluate",
    "models": "models",
    "convert": "convert",
    "train": "train",
    "bench": "bench",
}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (sub-commands registered by their modules)."""
    parser = argparse.ArgumentParser(
        prog="nlsr", description="Super-resolution with non-local attention networks."
    )
    parser.add_argument("--version", action="version", version=f"nlsr {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        if importlib.util.find_spec(f"nlsr.cli.{module}") is not None:
            importlib.import_module(f"nlsr.cli.{module}").add_parser(sub)
    return parser


def _version() -> str:
    from nlsr import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. ``nlsr models | head``): stop quietly, as Unix tools do.
        sys.stderr.close()
        return 141


if __name__ == "__main__":
    sys.exit(main())
