"""``nlsr export``: write a model as ONNX with dynamic batch, height and width (docs/deploy.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``nlsr export``."""
    p = subparsers.add_parser(
        "export",
        help="export a model to ONNX (dynamic batch, height and width)",
        description="Export a shipped model, an architecture's best shipped weights or a "
        "checkpoint file to ONNX. The graph takes float32 [N, 3, H, W] in [0, 1] of any size and "
        "returns the upscaled image in [0, 1]; hash projections are drawn once from --seed and "
        "stored in the file. Run it with 'nlsr upscale --weights model.onnx'.",
    )
    p.add_argument("model", help="shipped model or architecture name, or a checkpoint file")
    p.add_argument("-o", "--output", type=Path, required=True, help="ONNX file to write")
    p.add_argument("--scale", type=int, help="upscaling factor (default: the model's, else 2)")
    p.add_argument("--opset", type=int, help="ONNX opset version (default: the exporter's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fixed hash projections")
    p.add_argument(
        "--check",
        action="store_true",
        help="run the file in onnxruntime against PyTorch and report the largest difference",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Export and print a JSON summary; errors become one line in :func:`nlsr.cli.main`."""
    from nlsr.export import describe, export_onnx

    if args.output.suffix.lower() != ".onnx":
        raise ValueError(f"-o {args.output}: the output file must end in .onnx")
    if args.opset is not None and args.opset < 18:
        raise ValueError(f"--opset {args.opset}: the exporter needs opset 18 or newer")
    source = Path(args.model)
    model = source if source.is_file() or source.suffix else args.model
    result = export_onnx(
        model, args.output, scale=args.scale, opset=args.opset, seed=args.seed, check=args.check
    )
    print(json.dumps(describe(result), indent=2))
    return 0
