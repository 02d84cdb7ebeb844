"""``nlsr eval``: PSNR/SSIM of a model on the benchmark sets, with the papers' exact protocol.

Prints one table row per (set, scale) as it finishes and optionally writes every mean and
per-image score as JSON (``{"results": [EvalResult.to_dict(), ...]}``), atomically.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from nlsr.cli import add_seed_option, print_load_notes, write_json_report
from nlsr.inference import PRECISIONS

_ROW = "{:<10} {:>5}  {:<8} {:>9} {:>8} {:>7} {:>8}"


def _names(text: str) -> list[str]:
    """``"Set5,Set14"`` -> ``["Set5", "Set14"]`` (argparse type)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated set names, got {text!r}")
    return names


def _scales(text: str) -> list[int]:
    """``"2,3,4"`` -> ``[2, 3, 4]`` (argparse type); each a positive integer."""
    try:
        scales = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 2,3,4, got {text!r}") from None
    if not scales or min(scales) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 2,3,4, got {text!r}")
    return scales


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``nlsr eval``."""
    p = subparsers.add_parser(
        "eval",
        help="PSNR/SSIM on Set5, Set14, B100, Urban100, Manga109 (the papers' protocol)",
        description="Evaluate a model on benchmark sets: MATLAB-bicubic (BI), blur (BD) or "
        "noisy (DN) LR inputs, PSNR and SSIM on the Y channel with the border cropped, exactly "
        "as the published tables.",
    )
    p.add_argument(
        "--model",
        metavar="NAME",
        help="shipped pretrained model or architecture (default: the shipped model for each "
        "scale, else bicubic; with --weights: detected from the file)",
    )
    p.add_argument("--weights", type=Path, metavar="FILE", help="checkpoint to evaluate")
    p.add_argument(
        "--data",
        type=_names,
        required=True,
        metavar="SETS",
        help="comma-separated sets, e.g. Set5,Set14,B100,Urban100",
    )
    p.add_argument(
        "--scale",
        type=_scales,
        required=True,
        metavar="S",
        help="comma-separated scales, e.g. 2,3,4",
    )
    p.add_argument(
        "--degradation",
        type=str.upper,
        choices=("BI", "BD", "DN"),
        default="BI",
        help="LR degradation (default BI: MATLAB bicubic)",
    )
    p.add_argument(
        "--noise-sigma",
        type=float,
        metavar="S",
        help="DN noise standard deviation on the 0-255 scale (e.g. 15)",
    )
    p.add_argument(
        "--data-root",
        type=Path,
        metavar="DIR",
        help="folder holding <Set>/HR (default: $NLSR_DATA, else ./datasets)",
    )
    p.add_argument(
        "--official-lr",
        action="store_true",
        help="read <Set>/LR_bicubic/X<s>/<name>x<s>.png instead of making BI inputs",
    )
    p.add_argument(
        "--chop",
        action="store_true",
        help="run in overlapping quadrants as the authors did (exact reproduction)",
    )
    p.add_argument("--self-ensemble", action="store_true", help="x8 self-ensemble ('+' rows)")
    p.add_argument("--tile", type=int, metavar="N", help="run in NxN LR tiles (bounded memory)")
    p.add_argument("--device", metavar="D", help="cpu, cuda, cuda:1, mps (default: best)")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (default, the papers' protocol) or bf16 autocast, to measure what bf16 "
        "inference costs in dB (attention kept in float32)",
    )
    add_seed_option(p)
    p.add_argument(
        "--save-images",
        type=Path,
        metavar="DIR",
        help="write SR images to DIR/<set>/x<s>/<name>.png",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="write all scores as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the table; returns 0. A user error raises ValueError (exit status 2,
    one line on stderr, from :func:`nlsr.cli.main`)."""
    _evaluate(args)
    return 0


def _check_options(args: argparse.Namespace) -> None:
    """Reject inconsistent options before anything heavy runs."""
    if args.degradation == "DN" and not args.noise_sigma:
        raise ValueError("--degradation DN needs --noise-sigma S (e.g. 15)")
    if args.degradation != "DN" and args.noise_sigma:
        raise ValueError(f"--noise-sigma applies only to --degradation DN, not {args.degradation}")
    if args.official_lr and args.degradation != "BI":
        raise ValueError(f"--official-lr: the official LR files are BI, not {args.degradation}")
    if args.tile is not None and args.chop:
        raise ValueError("--tile and --chop are alternatives: give one of them")
    if args.tile is not None and args.tile < 1:
        raise ValueError(f"--tile must be a positive number of pixels, got {args.tile}")
    if args.json is not None and not args.json.parent.is_dir():
        raise ValueError(f"--json {args.json}: folder {args.json.parent} does not exist")
    if args.json is not None and args.json.is_dir():
        raise ValueError(f"--json {args.json}: is a folder; give a file name")
    if args.save_images is not None and args.save_images.exists() and not args.save_images.is_dir():
        raise ValueError(f"--save-images {args.save_images}: is a file; give a folder")


def _models(args: argparse.Namespace) -> dict[int, Any]:
    """Per scale, the descriptor of the model to evaluate: a loaded checkpoint, shipped
    pretrained weights or bicubic; without --model and --weights, the shipped model of each
    scale (bicubic where none is)."""
    from nlsr.models.pretrained import available_pretrained, default_model
    from nlsr.models.registry import available
    from nlsr.models.resolve import resolve_model

    name = args.model
    if name is None and args.weights is None:
        defaults = {s: default_model(s) for s in args.scale}
        return {
            s: resolve_model(n or "bicubic", s, pretrained=n is not None)
            for s, n in defaults.items()
        }
    if name is not None and name in available_pretrained():
        if args.weights is not None:
            raise ValueError(f"--model {name}: a shipped pretrained model; drop --weights")
        return {s: resolve_model(name, s) for s in args.scale}
    if name in (None, "bicubic"):
        if args.weights is None:
            return {s: resolve_model("bicubic", s, pretrained=False) for s in args.scale}
        if name == "bicubic":
            raise ValueError("--model bicubic has no weights; drop --weights")
    if name is not None and name not in available():
        known = ", ".join(available_pretrained() + available())
        raise ValueError(f"--model {name!r}: unknown model; available: {known}")
    if args.weights is None:
        best = {s: default_model(s, arch=name) for s in args.scale}
        missing = [f"x{s}" for s, n in best.items() if n is None]
        if missing:
            which = "" if len(missing) == len(best) else f" at {', '.join(missing)}"
            raise ValueError(f"no pretrained weights for {name}{which} yet; pass --weights FILE")
        return {s: resolve_model(n, s) for s, n in best.items()}
    models = {s: resolve_model(args.weights, s, arch=name) for s in args.scale}
    print_load_notes(args.weights, next(iter(models.values())))
    return models


def _label(models: dict[int, Any], weights: Path | None, defaulted: bool = False) -> str:
    """``bicubic``, ``<shipped name> x<s> (shipped pretrained weights)`` or ``<arch> (<weights
    file>)`` for the table's title line; ``defaulted``: no --model given, say what was picked."""
    if weights is None:
        groups: dict[str, list[int]] = {}
        for scale, model in models.items():
            groups.setdefault(model.source.shipped or "bicubic", []).append(scale)
        parts = []
        for name, scales in groups.items():
            xs = ", ".join(f"x{s}" for s in scales)
            if name != "bicubic":
                parts.append(f"{name} {xs} (shipped pretrained weights)")
            else:
                shipped = f" (no pretrained model is shipped for {xs})" if defaulted else ""
                parts.append(f"bicubic{shipped}")
        return "; ".join(parts)
    return f"{next(iter(models.values())).arch} ({weights})"


def _evaluate(args: argparse.Namespace) -> None:
    from nlsr.data import benchmark_images
    from nlsr.evaluation import evaluate

    _check_options(args)
    for name in args.data:
        benchmark_images(name, args.data_root)
    models = _models(args)
    deg = args.degradation
    if deg == "DN":
        deg = f"DN {args.noise_sigma:g}"
    print(f"model: {_label(models, args.weights, args.model is None)}")
    print(_ROW.format("set", "scale", "degr.", "PSNR (dB)", "SSIM", "images", "time (s)"))
    results = []
    for name in args.data:
        for scale in args.scale:
            start = time.perf_counter()
            r = evaluate(
                models[scale],
                name,
                scale,
                degradation=args.degradation,
                noise_sigma=args.noise_sigma or 0.0,
                data_root=args.data_root,
                official_lr=args.official_lr,
                chop=args.chop,
                self_ensemble=args.self_ensemble,
                tile=args.tile,
                device=args.device,
                save_images=args.save_images,
                seed=args.seed,
                precision=args.precision,
            )
            took = time.perf_counter() - start
            print(
                _ROW.format(
                    name,
                    f"x{scale}",
                    deg,
                    f"{r.psnr:.4f}",
                    f"{r.ssim:.4f}",
                    len(r.per_image),
                    f"{took:.1f}",
                ),
                flush=True,
            )
            results.append(r.to_dict())
    if args.json is not None:
        write_json_report(args.json, {"results": results})
