"""``nlsr compare``: zoomed crops of several models on one benchmark image, with their scores.

The scores are :func:`nlsr.evaluation.score_image`'s, the very function ``nlsr eval`` scores
every image with, so they equal that image's line of ``nlsr eval --json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from nlsr.cli import add_seed_option, check_figure_outputs, print_load_notes, write_json_report

#: Side of the default box, HR pixels (smaller images: a quarter of their shorter side).
BOX = 96


def _box(text: str) -> tuple[int, int, int, int]:
    """``"X,Y,W,H"`` -> ``(x, y, w, h)`` (argparse type)."""
    try:
        x, y, w, h = (int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y,W,H in HR pixels, got {text!r}") from None
    return x, y, w, h


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``nlsr compare``."""
    p = subparsers.add_parser(
        "compare",
        help="zoomed crops of several models on one benchmark image, with PSNR/SSIM",
        description="Super-resolve one image of a benchmark set with each model, exactly as "
        "'nlsr eval' does, and draw the HR image with a box and the zoomed crop of every model "
        "with its PSNR (dB) / SSIM on the Y channel underneath.",
    )
    p.add_argument("--data", required=True, metavar="SET", help="benchmark set, e.g. Urban100")
    p.add_argument("--image", required=True, metavar="NAME", help="image name, e.g. img_092")
    p.add_argument(
        "--models",
        required=True,
        metavar="LIST",
        help="comma-separated: bicubic, shipped model names, checkpoint files",
    )
    p.add_argument("--scale", type=int, default=2, help="upscaling factor (default 2)")
    p.add_argument(
        "--box",
        type=_box,
        metavar="X,Y,W,H",
        help="HR region to zoom (default: the most detailed square of the HR image)",
    )
    p.add_argument(
        "-o", "--output", type=Path, required=True, metavar="FIG.png", help="figure to write (PNG)"
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the scores as JSON")
    p.add_argument("--data-root", type=Path, help="benchmark data root (default: $NLSR_DATA)")
    add_seed_option(p)
    p.set_defaults(run=run)


def _resolve(name: str, scale: int) -> Any:
    """bicubic, a shipped model or a checkpoint file, as a descriptor."""
    from nlsr.models.pretrained import available_pretrained
    from nlsr.models.resolve import resolve_model

    if name == "bicubic":
        return resolve_model("bicubic", scale, pretrained=False)
    if name in available_pretrained():
        return resolve_model(name, scale)
    path = Path(name)
    if not path.is_file():
        known = ", ".join(["bicubic", *available_pretrained()])
        raise ValueError(f"--models: {name!r} is neither a checkpoint file nor a model ({known})")
    model = resolve_model(path, scale)
    print_load_notes(path, model)
    return model


def detailed_box(hr: np.ndarray, side: int) -> tuple[int, int, int, int]:
    """The ``side``-square of ``hr`` (on a grid of ``side / 2`` steps) with the largest mean
    absolute Laplacian of the luma: a textured region, where the models differ."""
    luma = hr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    lap = np.abs(
        4 * luma[1:-1, 1:-1] - luma[:-2, 1:-1] - luma[2:, 1:-1] - luma[1:-1, :-2] - luma[1:-1, 2:]
    )
    step = max(1, side // 2)
    best, where = -1.0, (0, 0)
    for y in range(0, lap.shape[0] - side + 1, step):
        for x in range(0, lap.shape[1] - side + 1, step):
            value = float(lap[y : y + side, x : x + side].mean())
            if value > best:
                best, where = value, (x + 1, y + 1)
    return where[0], where[1], side, side


def run(args: argparse.Namespace) -> int:
    """Run ``nlsr compare``."""
    from nlsr.data import benchmark_images
    from nlsr.evaluation import lr_image, score_image
    from nlsr.figures import compare_figure, save_png

    check_figure_outputs(args.output, args.json)
    if args.scale < 1:
        raise ValueError(f"--scale must be a positive integer, got {args.scale}")
    names = [t.strip() for t in args.models.split(",") if t.strip()]
    if not names:
        raise ValueError("--models: give at least one model")
    files = benchmark_images(args.data, args.data_root)
    stems = [f.stem for f in files]
    if args.image not in stems:
        raise ValueError(f"--image {args.image}: not in {args.data} ({len(stems)} images)")
    index = stems.index(args.image)
    hr = lr_image(files[index], index, args.scale)[0]
    hr_shown = (hr >> 8).astype(np.uint8) if hr.dtype != np.uint8 else hr
    side = min(BOX, hr.shape[0] // 4, hr.shape[1] // 4)
    box = args.box or detailed_box(hr, max(1, side))
    x, y, w, h = box
    if w < 1 or h < 1 or x < 0 or y < 0 or x + w > hr.shape[1] or y + h > hr.shape[0]:
        raise ValueError(f"--box {x},{y},{w},{h}: outside the {hr.shape[1]}x{hr.shape[0]} HR image")
    crops, scores = [], []
    for name in names:
        model = _resolve(name, args.scale)
        model.module.eval()
        score, sr = score_image(model, files[index], index, args.scale, seed=args.seed)
        shown = (sr >> 8).astype(np.uint8) if sr.dtype != np.uint8 else sr
        label = model.source.shipped or ("bicubic" if name == "bicubic" else Path(name).name)
        crops.append((label, shown[y : y + h, x : x + w], score.psnr, score.ssim))
        scores.append({"model": name, "name": label, "psnr": score.psnr, "ssim": score.ssim})
        print(f"{label:<24} {score.psnr:8.4f} dB  SSIM {score.ssim:.4f}")
    title = f"{args.data} {args.image} x{args.scale}: PSNR (dB) / SSIM on Y"
    save_png(compare_figure(hr_shown, box, crops, title), args.output)
    print(f"wrote {args.output}")
    if args.json is not None:
        payload = {
            "dataset": args.data,
            "image": args.image,
            "scale": args.scale,
            "box": list(box),
            "seed": args.seed,
            "models": scores,
        }
        write_json_report(args.json, payload)
    return 0
