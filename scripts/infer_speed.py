"""Inference seconds per output megapixel of the shipped model against a plain convolutional
network of IMDN's cost, in float32 and bf16, on real images.

    python scripts/infer_speed.py [--scale 2] [--images DIR_OR_FILES...] [--repeat 5]
        [--threads 2] [--precisions fp32,bf16]

IMDN (Hui et al., 2019) does 158.8 G multiply-adds for a 1280x720 x2 output (its paper's table),
172 G per output megapixel. The reference here is EDSR with 7 residual blocks of 64 channels
(no attention): 177 k multiply-adds per output pixel at x2 against IMDN's 172 k (+3%; counted
by :func:`macs_per_output_pixel`) and 0.71M parameters against IMDN's 0.69M. It stands for "a
network of IMDN's cost", not for IMDN's own structure. Each model runs ``nlsr.upscale`` (whole
image, default seed) on every image, the models and precisions interleaved, ``--repeat`` times;
the script prints the median wall seconds per output megapixel and the ratio to the reference
in float32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import nlsr
from nlsr.io import read_image
from nlsr.models import create

REPO = Path(__file__).resolve().parents[1]
#: IMDN's published multiply-adds for a 1280x720 output at x2.
IMDN_MACS_720P = 158.8e9
#: The network of IMDN's cost (EDSR layout, no attention).
REFERENCE = {"n_resblocks": 7, "n_feats": 64, "res_scale": 1.0}


def macs_per_output_pixel(model: torch.nn.Module, scale: int, side: int = 64) -> float:
    """Multiply-adds of the convolutions and linear layers per output pixel, counted by hooks
    on a ``side`` x ``side`` input (attention products are not counted)."""
    total = 0.0

    def count(module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            per_out = (
                module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            )
            total += output.numel() * per_out
        elif isinstance(module, torch.nn.Linear):
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(count) for m in model.modules()]
    try:
        with torch.no_grad():
            model(torch.rand(1, 3, side, side))
    finally:
        for h in handles:
            h.remove()
    return total / (scale * side) ** 2


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--images", nargs="+", type=Path)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precisions", default="fp32,bf16")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = args.images or [REPO / "src" / "nlsr" / "assets" / "sample.png"]
    files = [f for p in paths for f in (sorted(p.glob("*.png")) if p.is_dir() else [p])]
    images = [read_image(f).pixels for f in files]
    torch.manual_seed(0)
    models = {
        "nlsr-dlsn-s": nlsr.models.create("nlsr-dlsn-s", args.scale, pretrained=True),
        "IMDN-cost EDSR 7x64": create("edsr", args.scale, **REFERENCE).eval(),
    }
    imdn = IMDN_MACS_720P / (1280 * 720)
    for name, m in models.items():
        macs = macs_per_output_pixel(m, args.scale)
        print(
            f"{name}: {macs / 1e3:.0f} k multiply-adds per output pixel ({macs / imdn:.2f}x IMDN's)"
        )
    precisions = args.precisions.split(",")
    out_mp = sum(i.shape[0] * i.shape[1] for i in images) * args.scale**2 / 1e6
    seconds: dict[tuple[str, str], list[float]] = {(n, q): [] for n in models for q in precisions}
    load = os.getloadavg()[0]
    for _ in range(args.repeat):
        for (name, precision), times in seconds.items():
            start = time.perf_counter()
            for image in images:
                nlsr.upscale(models[name], image, precision=precision)
            times.append((time.perf_counter() - start) / out_mp)
    base = statistics.median(seconds[("IMDN-cost EDSR 7x64", precisions[0])])
    print(f"{len(images)} image(s), {out_mp:.2f} output MP, {args.threads} threads")
    print(f"| model | precision | s per output MP (median of {args.repeat}) | vs reference |")
    print("|---|---|---|---|")
    for (name, precision), times in seconds.items():
        med = statistics.median(times)
        print(f"| {name} | {precision} | {med:.2f} | {med / base:.2f}x |")
    print(f"load average (1 min): {load:.2f} before, {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
