"""``nlsr convert IN OUT``: turn an authors' / BasicSR checkpoint into nlsr's safetensors format.

The architecture and its options are detected from the weights (or taken from ``--arch``,
``--scale`` and ``--opt``), the weights are loaded strictly, and the model is saved with its
configuration and provenance in the file's header.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` -> (key, value); the value is read as JSON (numbers, true/false, null,
    lists, objects) and otherwise kept as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise ValueError(f"--opt {text!r}: expected key=value with a Python identifier as key")
    raw = raw.strip()
    if raw.lower() in ("true", "false", "none", "null"):
        return key, {"true": True, "false": False}.get(raw.lower())
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _fmt(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items()) or "none"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``nlsr convert``."""
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint (.pt/.pth/BasicSR) to nlsr's safetensors format",
        description="Detect the architecture of a checkpoint, load it strictly and save it as "
        "an nlsr .safetensors file that records arch, scale and options.",
    )
    p.add_argument("input", type=Path, help="checkpoint to convert (.pt, .pth or .safetensors)")
    p.add_argument("output", type=Path, help="nlsr checkpoint to write (.safetensors)")
    p.add_argument("--arch", help="architecture (default: detected from the weights)")
    p.add_argument("--scale", type=int, help="upscaling factor (default: read from the weights)")
    p.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model option the weights do not reveal, e.g. --opt n_hashes=3 (repeatable)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Convert; prints what was detected and written (errors become one line in
    :func:`nlsr.cli.main`: exit 2 for a bad option or file, 1 for a failed write)."""
    _convert(args)
    return 0


def _convert(args: argparse.Namespace) -> None:
    from nlsr import __version__
    from nlsr.checkpoint import read_state_dict, sha256_of
    from nlsr.models.detection import read_options, recognise
    from nlsr.models.resolve import resolve_model, save
    from nlsr.models.validation import check_options

    src: Path = args.input
    dst: Path = args.output
    given = dict(parse_option(o) for o in args.opt)
    # Types and ranges first: a bad --opt is named before the input is even read.
    check_options(
        args.arch or "model", given, name=str(src), origins=dict.fromkeys(given, "from --opt")
    )
    if dst.suffix != ".safetensors":
        raise ValueError(f"{dst}: the output must be a .safetensors file")
    if dst.exists() and not args.overwrite:
        raise ValueError(f"{dst}: exists; pass --overwrite to replace it")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: the output would replace the input")

    state_dict, config = read_state_dict(src)
    if config is not None:
        arch, found, origin = config["arch"], dict(config["options"]), "its nlsr header"
    elif args.arch is None:
        arch = recognise(state_dict, str(src))
        found, origin = read_options(state_dict, arch, str(src))[1], "the weights"
    else:
        arch, found, origin = args.arch, {}, "--arch"
    print(f"{src}: {args.arch or arch} (from {origin}); options read: {_fmt(found)}")
    if given:
        print(f"  options given: {_fmt(given)}")
    model = resolve_model(src, args.scale, arch=args.arch, **given)
    n_params = sum(p.numel() for p in model.module.parameters())
    print(
        f"  loaded strictly as {model.arch} x{model.scale}: {len(state_dict)} tensors, "
        f"{n_params / 1e6:.2f}M parameters"
    )
    for note in model.source.notes:
        print(f"  note: {note}")
    provenance = {
        "converted_from": src.name,
        "source_sha256": sha256_of(src),
        "nlsr_version": __version__,
    }
    save(model, dst, metadata=provenance)
    print(f"wrote {dst}")
