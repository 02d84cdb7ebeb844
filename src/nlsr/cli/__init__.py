"""The ``nlsr`` command: one sub-command per module in this package.

Errors are handled here, once for every command: an error the user can cause (a bad option,
environment variable, configuration or input; a file that cannot be read or written) ends in
one line on stderr, ``nlsr COMMAND: error: ...``, and the exit status of :data:`EXIT_CODES`.
``nlsr --debug COMMAND ...`` lets the exception through, with its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from nlsr.models.descriptor import ModelDescriptor

#: sub-command -> module under ``nlsr.cli`` with ``add_parser(subparsers)`` and ``run(args)``.
COMMANDS = {
    "upscale": "upscale",
    "eval": "evaluate",
    "models": "models",
    "convert": "convert",
    "train": "train",
    "bench": "bench",
    "explain": "explain",
    "compare": "compare",
    "export": "export",
    "serve": "serve",
}

#: Exit statuses of every command (documented in README.md, "Exit status").
EXIT_OK = 0
#: Some inputs failed (``nlsr upscale`` goes on past them; ``nlsr bench``: a point failed), or
#: the system refused a read or write (permission, disk full), or the run failed (out of memory,
#: training diverged).
EXIT_FAILED = 1
#: A bad option, environment variable, configuration or input: fix the command line or file.
EXIT_USAGE = 2
#: Stopped by Ctrl-C (``nlsr train``: also SIGTERM, after saving a checkpoint).
EXIT_INTERRUPTED = 130
#: The reader of stdout went away (``nlsr models | head``).
EXIT_BROKEN_PIPE = 141
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILED: "some inputs failed, or a read/write or the run itself failed",
    EXIT_USAGE: "bad option, environment variable, configuration or input",
    EXIT_INTERRUPTED: "interrupted",
    EXIT_BROKEN_PIPE: "stdout closed by its reader",
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump); sub-command parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (sub-commands registered by their modules)."""
    parser = _Parser(prog="nlsr", description="Super-resolution with non-local attention networks.")
    parser.add_argument("--version", action="version", version=f"nlsr {_version()}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the Python traceback of an error instead of one line",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        if importlib.util.find_spec(f"nlsr.cli.{module}") is not None:
            importlib.import_module(f"nlsr.cli.{module}").add_parser(sub)
    for command in {id(p): p for p in sub.choices.values()}.values():
        # also after the command: ``python -m nlsr.train --debug ...``
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    return parser


def _version() -> str:
    from nlsr import __version__

    return __version__


def parse_seed(text: str) -> int | None:
    """``--seed`` value: an integer in [0, 2**63), or ``random`` -> None (a fresh draw)."""
    if text.strip().lower() == "random":
        return None
    from nlsr.inference import check_seed  # the range forward() accepts

    try:
        value = int(text)
        check_seed(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer from 0 to 2**63-1, or 'random', got {text!r}"
        ) from None
    return value


def add_seed_option(parser: argparse.ArgumentParser) -> None:
    """``--seed N|random`` (default 0), parsed by :func:`parse_seed`, for the commands that run
    networks with hashing attention."""
    parser.add_argument(
        "--seed",
        type=parse_seed,
        default=0,
        metavar="N|random",
        help="seed of the random hash projections of hashing attention (NLSA, GLA, LCoA), "
        "so that results repeat exactly; 'random': a fresh draw every run (default 0)",
    )


def check_figure_outputs(output: Path, report: Path | None) -> None:
    """Before any work: the figure ``-o`` must be a PNG, and it and the ``--json`` report must
    go into folders that exist."""
    if output.suffix.lower() != ".png":
        raise ValueError(f"-o {output}: the figure is a PNG; give a .png file name")
    for path, option in ((output, "-o"), (report, "--json")):
        if path is not None and not path.parent.is_dir():
            raise ValueError(f"{option} {path}: folder {path.parent} does not exist")


def write_json_report(path: Path, payload: dict[str, Any]) -> None:
    """Write a command's ``--json`` report atomically (strict JSON, no NaN) and say so."""
    from nlsr.atomic import atomic_write

    text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    atomic_write(path, text.encode("utf-8"))
    print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    options = argv[: argv.index("--")] if "--" in argv else argv
    debug = "--debug" in options
    prog = "nlsr"
    with _lenient_output():
        try:
            parser = build_parser()
            args = parser.parse_args(argv)
            debug = debug or bool(getattr(args, "debug", False))
            if args.command is None:
                commands = ", ".join(COMMANDS)
                message = f"nlsr: error: give a command: {commands} (see 'nlsr --help')"
                print(message, file=sys.stderr)
                return EXIT_USAGE
            prog = f"nlsr {args.command}"
            return int(args.run(args) or 0)
        except KeyboardInterrupt:
            if debug:
                raise
            print(f"{prog}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            # The reader went away (e.g. ``nlsr models | head``): stop quietly, as Unix tools do.
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            return EXIT_BROKEN_PIPE
        except Exception as exc:
            if debug:
                raise
            status, message = describe_error(exc)
            print(f"{prog}: error: {message}", file=sys.stderr)
            return status


def print_load_notes(source: object, model: ModelDescriptor) -> None:
    """``SOURCE: note: ...`` on stderr for what loading noted about a file (e.g. weights stored
    in half precision)."""
    for note in model.source.notes:
        print(f"{source}: note: {note}", file=sys.stderr)


def describe_error(exc: BaseException) -> tuple[int, str]:
    """(exit status, one-line message) for an exception that ends a command."""
    if isinstance(exc, OSError):
        status, message = EXIT_FAILED, _os_error(exc)
    elif isinstance(exc, MemoryError):
        status, message = EXIT_FAILED, "out of memory" + (f" ({exc})" if str(exc) else "")
    elif isinstance(exc, ValueError):
        status, message = EXIT_USAGE, str(exc) or type(exc).__name__
    elif isinstance(exc, RuntimeError | ArithmeticError):
        # torch's failures (e.g. CUDA out of memory), a diverged training
        status, message = EXIT_FAILED, str(exc) or type(exc).__name__
    else:
        status = EXIT_FAILED
        message = (
            f"internal error: {type(exc).__name__}: {exc} (a bug in nlsr; 'nlsr --debug ...' "
            "shows the traceback)"
        )
    return status, " ".join(message.split())


def _os_error(exc: OSError) -> str:
    """``file: reason`` for an OSError (``[Errno 28] ...`` without the number)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is None:
        return reason
    name = os.fsdecode(exc.filename)
    if exc.filename2 is not None:
        name = f"{name} -> {os.fsdecode(exc.filename2)}"
    return f"{name}: {reason}"


@contextlib.contextmanager
def _lenient_output() -> Iterator[None]:
    """Print what the terminal cannot encode (a file name in another script on an ASCII-only
    stdout, undecodable bytes in a file name) as backslash escapes instead of failing."""
    changed = []
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            with contextlib.suppress(AttributeError, OSError, ValueError):
                stream.reconfigure(errors="backslashreplace")
                changed.append(stream)
    try:
        yield
    finally:
        for stream in changed:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                stream.reconfigure(errors="strict")


if __name__ == "__main__":
    sys.exit(main())
