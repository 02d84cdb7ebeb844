"""``nlsr explain``: where the attention of a network looks, as figures and JSON.

``nlsr explain IMAGE --query X,Y ... -o FIG.png``: per attention block, the weights of the
chosen LR pixels as heat maps over the input (docs/explain.md). ``--stats`` (over IMAGE, or the
LR images of ``--data SET``): per block, the distributions of support size and entropy over
every query, and for hashing blocks how often the top weight goes to a less similar key.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nlsr.cli import add_seed_option, check_figure_outputs, print_load_notes, write_json_report


def _point(text: str) -> tuple[int, int]:
    """``"X,Y"`` -> ``(x, y)`` (argparse type)."""
    try:
        x, y = (int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y in LR pixels, got {text!r}") from None
    return x, y


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``nlsr explain``."""
    p = subparsers.add_parser(
        "explain",
        help="where the attention blocks look: heat maps per block, attention statistics",
        description="Run the model once (seeded) on IMAGE and show, for every attention block "
        "(or --block K), the attention weights of the chosen LR pixels over the image, with "
        "each mechanism's own record (hash buckets and chunks, HSPA's sparse support, LCoA's "
        "cluster, CSNLN's matched patches); --stats: per-block distributions of support size "
        "and entropy over every query (docs/explain.md).",
    )
    p.add_argument("image", nargs="?", type=Path, metavar="IMAGE", help="LR input image")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--model",
        metavar="NAME",
        help="shipped pretrained model (default: the shipped model for the scale)",
    )
    source.add_argument("--weights", type=Path, metavar="FILE", help="checkpoint to explain")
    p.add_argument("--scale", type=int, help="upscaling factor (default 2, or the checkpoint's)")
    p.add_argument(
        "--query",
        type=_point,
        action="append",
        default=[],
        metavar="X,Y",
        help="LR pixel whose attention to show (repeatable)",
    )
    p.add_argument(
        "--block",
        type=int,
        action="append",
        metavar="K",
        help="attention block number, from 0 in module order (repeatable; default: all)",
    )
    p.add_argument(
        "-o", "--output", type=Path, required=True, metavar="FIG.png", help="figure to write (PNG)"
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the numbers as JSON")
    p.add_argument("--stats", action="store_true", help="statistics over every query")
    p.add_argument("--data", metavar="SET", help="--stats over the LR images of a benchmark set")
    p.add_argument("--data-root", type=Path, help="benchmark data root (default: $NLSR_DATA)")
    p.add_argument("--max-images", type=int, metavar="N", help="--data: the first N images")
    p.add_argument(
        "--threshold",
        type=float,
        default=1e-3,
        help="--stats: weight above which a key counts in the support (default 1e-3)",
    )
    p.add_argument(
        "--promote-k",
        type=int,
        default=1,
        metavar="K",
        help="--stats: a query is 'promoted' when its top-weighted key is not among the K most "
        "similar keys it saw (default 1)",
    )
    add_seed_option(p)
    p.set_defaults(run=run)


def _check(args: argparse.Namespace) -> None:
    """Option rules, checked before any model is loaded."""
    check_figure_outputs(args.output, args.json)
    if args.seed is None:
        raise ValueError("--seed random: explain recomputes the run's draws; give a number")
    if args.data is not None and not args.stats:
        raise ValueError("--data applies to --stats")
    if args.data is not None and args.image is not None:
        raise ValueError("give IMAGE or --data SET, not both")
    if args.data is None and args.image is None:
        raise ValueError("give IMAGE (or --stats --data SET)")
    if not args.stats and not args.query:
        raise ValueError("give --query X,Y (or --stats)")
    if args.stats and args.query:
        raise ValueError("--stats covers every query; drop --query")
    if args.scale is not None and args.scale < 1:
        raise ValueError(f"--scale must be a positive integer, got {args.scale}")


def _model(args: argparse.Namespace) -> Any:
    """The descriptor: --weights, --model (a shipped model) or the shipped model for --scale."""
    from nlsr.models.pretrained import available_pretrained, default_model
    from nlsr.models.resolve import resolve_model

    if args.weights is not None:
        model = resolve_model(args.weights, args.scale)
        print_load_notes(args.weights, model)
        return model
    scale = args.scale or 2
    name = args.model or default_model(scale)
    if name is None:
        raise ValueError(f"no shipped model for x{scale}; pass --weights FILE")
    if name not in available_pretrained():
        shipped = ", ".join(available_pretrained())
        raise ValueError(f"--model {name!r}: not a shipped model ({shipped}); use --weights FILE")
    return resolve_model(name, scale)


def _read_lr(path: Path) -> Any:
    """The LR image as 8-bit RGB (the figure's background) and as the model's input."""
    import numpy as np

    from nlsr.io import read_image

    if not path.is_file():
        raise ValueError(f"{path}: no such image file")
    pixels = read_image(path).pixels
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    pixels = np.ascontiguousarray(pixels[..., :3])
    shown = (pixels >> 8).astype(np.uint8) if pixels.dtype == np.uint16 else pixels
    return pixels, shown


def _explain(args: argparse.Namespace, model: Any) -> None:
    from nlsr.explain import explain
    from nlsr.figures import explain_figure, save_png

    pixels, shown = _read_lr(args.image)
    result = explain(model, pixels, args.query, blocks=args.block, seed=args.seed)
    save_png(explain_figure(shown, result), args.output)
    print(f"wrote {args.output}")
    if args.json is not None:
        payload = {
            "model": model.name,
            "image": str(args.image),
            "scale": model.scale,
            "seed": args.seed,
            "blocks": [r.to_dict() for r in result],
        }
        write_json_report(args.json, payload)


def _stats(args: argparse.Namespace, model: Any) -> None:
    from nlsr.data import benchmark_images
    from nlsr.evaluation import lr_image
    from nlsr.explain.stats import statistics
    from nlsr.figures import save_png, stats_figure
    from nlsr.inference import to_tensor

    if args.data is not None:
        files = benchmark_images(args.data, args.data_root)[: args.max_images]
        images = [to_tensor(lr_image(f, i, model.scale)[1]) for i, f in enumerate(files)]
        source = f"{model.name} x{model.scale} on {args.data} ({len(images)} images)"
    else:
        images = [to_tensor(_read_lr(args.image)[0])]
        source = f"{model.name} x{model.scale} on {args.image.name}"
    summaries = statistics(
        model,
        images,
        blocks=args.block,
        threshold=args.threshold,
        promote_k=args.promote_k,
        seed=args.seed,
    )
    blocks = [s.to_dict(args.threshold, args.promote_k) for s in summaries]
    for b in blocks:
        line = (
            f"block {b['block']:>2} {b['kind']:<8} support median "
            f"{b['support_size']['percentiles']['50']:g}, entropy median "
            f"{b['entropy_nats']['percentiles']['50']:.3f} nats"
        )
        if "promoted_fraction" in b:
            line += f", promoted {100 * b['promoted_fraction']:.1f}%"
        print(line)
    save_png(stats_figure(blocks, source), args.output)
    print(f"wrote {args.output}")
    if args.json is not None:
        write_json_report(
            args.json,
            {
                "model": model.name,
                "scale": model.scale,
                "source": source,
                "seed": args.seed,
                "blocks": blocks,
            },
        )


def run(args: argparse.Namespace) -> int:
    """Run ``nlsr explain``."""
    _check(args)
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {args.max_images}")
    model = _model(args)
    model.module.eval()
    if args.stats:
        _stats(args, model)
    else:
        _explain(args, model)
    return 0
