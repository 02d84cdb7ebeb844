"""Whole paper networks: the released code's form in float32 against nlsr's float32 and default
("auto") paths, in inference and in a training step; and the grey levels bf16 moves.

    python scripts/network_speed.py [--networks dlsn,nlsn,hspan,lcoan,csnln,rcan,edsr]
        [--size 48] [--repeat 5] [--threads 1] [--modes infer,train] [--image PATH]
        [--grey Set5,Set14] [--grey-size 48] [--data ROOT] [--small] [--json PATH]

Each network is built at the paper configuration (``--small``: the small benchmark size, for a
quick check) at x2 with seed 0 and fed a real ``size`` x ``size`` crop of a benchmark image
(:func:`nlsr.bench.inputs.real_images`; default Set14 baboon, else the bundled sample). Forms:

- ``released``: the authors' computation in float32 (every NLSA, GLA, HSPA and CSNA block as
  :func:`~nlsr.attention.reference.released_baseline`, called as their test loop does, under
  ``no_grad``). EDSR, RCAN and LCoAN have no released form here: their row times nlsr's own
  float32 network called the same way (marked ``*``).
- ``fp32``: :func:`nlsr.inference.forward` with ``precision="fp32"``.
- ``auto``: :func:`nlsr.inference.forward` with its default (bf16 where the CPU computes it).

A training step is an L1 loss against the bicubic-upscaled crop, forward and backward: float32
(released form and nlsr), and nlsr's training default (``train.amp``: bf16 autocast where
native, channels-last). Runs are interleaved, CPU time (``time.process_time``), medians of
``repeat`` after one warm-up. Every form is seeded alike (the same hash draws), and the table
shows how far ``fp32`` and ``auto`` are from ``released``.

``--grey SETS``: for each network and each HR image of the sets, the centred ``2 * grey-size``
crop is bicubic-downscaled x2 (MATLAB-exact), upscaled in fp32 and in auto, quantised to 8 bits;
prints |auto - fp32| in grey levels (mean, 99th percentile, max, share above one level) and the
PSNR change (Y, border 2) against the HR crop. The paper networks are untrained (seeded
initialisation): their PSNR is low, only the size of the change is informative.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from nlsr.atomic import atomic_write
from nlsr.attention.reference import ReleasedFormError, released_baseline
from nlsr.bench.inputs import load_source, real_images
from nlsr.inference import _seeded_draws, forward, native_bf16, resolve_precision, to_array
from nlsr.io import read_image
from nlsr.metrics import psnr
from nlsr.models import create, resolve_model, small_config
from nlsr.resize import imresize

REPO = Path(__file__).resolve().parents[1]
DATA_ROOTS = (REPO.parent / "shared/datasets/benchmark", Path("/work/shared/datasets/benchmark"))
NETWORKS = ("dlsn", "nlsn", "hspan", "lcoan", "csnln", "rcan", "edsr")
FORMS = ("released", "fp32", "auto")
SEED = 0


def default_image() -> Path | None:
    """Set14 baboon under the shared benchmark data, if present (else the bundled sample)."""
    for root in DATA_ROOTS:
        if (root / "Set14/HR/baboon.png").exists():
            return root / "Set14/HR/baboon.png"
    return None


def build(name: str, small: bool) -> nn.Module:
    """Network ``name`` at x2, seed 0, paper configuration (or the small benchmark size)."""
    torch.manual_seed(SEED)
    return create(name, 2, **(small_config(name) if small else {})).eval()


def released_form(model: nn.Module) -> tuple[nn.Module, bool]:
    """(a copy of ``model`` computed the released way, whether it has a released form)."""
    try:
        return released_baseline(copy.deepcopy(model)), True
    except ReleasedFormError:
        return model, False


def call_seeded(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` with the hash draws :func:`nlsr.inference.forward` makes on its first call."""
    with _seeded_draws(module, SEED) as reseed:
        reseed()
        return module(x)


def infer_forms(model: nn.Module, x: Tensor) -> tuple[dict[str, Callable[[], Tensor]], bool]:
    """The three inference forms of ``model`` on ``x`` (each returns the output) and whether the
    released one is the released code's computation."""
    released, genuine = released_form(model)

    def release() -> Tensor:
        with torch.no_grad():
            return call_seeded(released, x)

    return {
        "released": release,
        "fp32": lambda: forward(model, x, precision="fp32"),
        "auto": lambda: forward(model, x),
    }, genuine


def train_forms(model: nn.Module, x: Tensor) -> dict[str, Callable[[], Tensor]]:
    """One training step (L1 loss, forward and backward) of each form; each returns the loss.
    ``auto`` is nlsr's training default: bf16 autocast where native, channels-last."""
    target = nn.functional.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
    low = resolve_precision(resolve_model(model), "auto", x.device) == "bf16"
    released = released_form(copy.deepcopy(model))[0].train()
    fp32 = copy.deepcopy(model).train()
    auto = copy.deepcopy(model).train().to(memory_format=torch.channels_last)
    x_last = x.contiguous(memory_format=torch.channels_last)

    def step(net: nn.Module, inp: Tensor, amp: bool) -> Callable[[], Tensor]:
        def run() -> Tensor:
            net.zero_grad(set_to_none=True)
            with torch.autocast(inp.device.type, dtype=torch.bfloat16, enabled=amp):
                loss = (call_seeded(net, inp).float() - target).abs().mean()
            loss.backward()
            return loss.detach()

        return run

    return {
        "released": step(released, x, False),
        "fp32": step(fp32, x, False),
        "auto": step(auto, x_last, low),
    }


def cpu_medians(fns: dict[str, Callable[[], Tensor]], repeat: int) -> dict[str, float]:
    """Median CPU seconds of each function, run interleaved ``repeat`` times after a warm-up."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeat):
        for k, fn in fns.items():
            start = time.process_time()
            fn()
            times[k].append(time.process_time() - start)
    return {k: statistics.median(t) for k, t in times.items()}


def measure(name: str, mode: str, x: Tensor, repeat: int, small: bool) -> dict[str, Any]:
    """One table row: CPU medians of the forms, ratios to ``released``, output differences."""
    model = build(name, small)
    if mode == "infer":
        fns, genuine = infer_forms(model, x)
    else:
        fns, genuine = train_forms(model, x), released_form(model)[1]
    outs = {k: fn() for k, fn in fns.items()}
    seconds = cpu_medians(fns, repeat)
    ref = outs["released"]
    return {
        "network": name,
        "mode": mode,
        "released_form": genuine,
        "seconds": seconds,
        "speedup": {k: seconds["released"] / s for k, s in seconds.items()},
        "max_abs_diff": {k: (v.float() - ref.float()).abs().max().item() for k, v in outs.items()},
    }


def benchmark_crops(root: Path, sets: list[str], side: int) -> list[tuple[str, np.ndarray]]:
    """(name, centred ``side`` x ``side`` HR crop) of every image of the benchmark sets."""
    crops = []
    for name in sets:
        folder = root / name / "HR"
        if not folder.is_dir():
            raise SystemExit(f"--grey: no folder {folder}")
        for path in sorted(folder.glob("*.png")):
            pixels = read_image(path).pixels
            top, left = (pixels.shape[0] - side) // 2, (pixels.shape[1] - side) // 2
            crops.append((f"{name}/{path.stem}", pixels[top : top + side, left : left + side]))
    return crops


def grey_levels(name: str, crops: list[tuple[str, np.ndarray]], small: bool) -> dict[str, Any]:
    """|auto - fp32| of the 8-bit outputs over all crops, and the PSNR change."""
    model = build(name, small)
    diffs, gains = [], []
    for _, hr in crops:
        lr = torch.from_numpy(imresize(hr, 0.5).astype(np.float32) / 255).permute(2, 0, 1)[None]
        fp32 = to_array(forward(model, lr, precision="fp32"))
        auto = to_array(forward(model, lr))
        diffs.append(np.abs(auto.astype(np.int16) - fp32.astype(np.int16)).ravel())
        gains.append(psnr(auto, hr, 2) - psnr(fp32, hr, 2))
    d = np.concatenate(diffs)
    return {
        "network": name,
        "images": len(crops),
        "mean": float(d.mean()),
        "p99": float(np.percentile(d, 99)),
        "max": int(d.max()),
        "above_one": float((d > 1).mean()),
        "psnr_change_mean": float(np.mean(gains)),
        "psnr_change_worst": float(max(gains, key=abs)),
    }


def print_speed(rows: list[dict[str, Any]], header: bool = True) -> None:
    if header:
        print(
            f"{'network':>8} {'mode':>5} {'released s':>10} {'fp32 s':>8} {'auto s':>8} "
            f"{'fp32 x':>7} {'auto x':>7} {'|fp32-rel|':>10} {'|auto-rel|':>10}"
        )
    for r in rows:
        s, x, d = r["seconds"], r["speedup"], r["max_abs_diff"]
        mark = "" if r["released_form"] else "*"
        print(
            f"{r['network'] + mark:>8} {r['mode']:>5} {s['released']:10.3f} {s['fp32']:8.3f} "
            f"{s['auto']:8.3f} {x['fp32']:6.2f}x {x['auto']:6.2f}x "
            f"{d['fp32']:10.1e} {d['auto']:10.1e}"
        )


def print_grey(rows: list[dict[str, Any]], header: bool = True) -> None:
    if header:
        print(
            f"{'network':>8} {'images':>6} {'mean':>6} {'p99':>4} {'max':>4} {'>1 lvl':>7} "
            f"{'dPSNR mean':>10} {'dPSNR worst':>11}"
        )
    for r in rows:
        print(
            f"{r['network']:>8} {r['images']:6d} {r['mean']:6.3f} {r['p99']:4.0f} {r['max']:4d} "
            f"{r['above_one']:7.2%} {r['psnr_change_mean']:+10.4f} {r['psnr_change_worst']:+11.4f}"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default="infer,train")
    parser.add_argument("--image", type=Path, default=None)
    parser.add_argument("--grey", default="", help="benchmark sets for the grey-level table")
    parser.add_argument("--grey-size", type=int, default=48, help="LR side of the grey crops")
    parser.add_argument("--data", type=Path, default=None, help="benchmark root (Set5/HR, ...)")
    parser.add_argument("--small", action="store_true", help="small networks, a quick check")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    networks = [n for n in args.networks.split(",") if n]
    modes = [m for m in args.modes.split(",") if m]
    if unknown := sorted(set(networks) - set(NETWORKS)):
        parser.error(f"--networks: unknown {', '.join(unknown)}; choose from {', '.join(NETWORKS)}")
    if unknown := sorted(set(modes) - {"infer", "train"}):
        parser.error(f"--modes: unknown {', '.join(unknown)}; choose from infer, train")
    torch.set_num_threads(args.threads)
    x = real_images(load_source(args.image or default_image()), args.size)
    cpu = torch.device("cpu")
    header = {
        "size": args.size,
        "threads": args.threads,
        "repeat": args.repeat,
        "config": "small" if args.small else "paper",
        "native_bf16": native_bf16(cpu),
        "load_before": os.getloadavg()[0],
    }
    print(
        f"x2, {args.size}x{args.size} crop, {header['config']} config, {args.threads} thread(s), "
        f"CPU-time medians of {args.repeat}, native bf16: {header['native_bf16']}, "
        f"load {header['load_before']:.2f}"
    )
    rows = []
    for name in networks:
        for mode in modes:
            rows.append(measure(name, mode, x, args.repeat, args.small))
            print_speed(rows[-1:], header=len(rows) == 1)
    print("x: released time / form time; *: no released form here, nlsr's fp32 network instead")
    grey = []
    if args.grey:
        root = args.data or next((r for r in DATA_ROOTS if r.is_dir()), DATA_ROOTS[0])
        crops = benchmark_crops(root, args.grey.split(","), 2 * args.grey_size)
        print(f"\n|auto - fp32| in grey levels, {args.grey} centred crops {args.grey_size}x LR:")
        for name in networks:
            grey.append(grey_levels(name, crops, args.small))
            print_grey(grey[-1:], header=len(grey) == 1)
    header["load_after"] = os.getloadavg()[0]
    print(f"load after: {header['load_after']:.2f}")
    report = {**header, "rows": rows, "grey": grey}
    if args.json is not None:
        atomic_write(args.json, json.dumps(report, indent=1).encode())
    return report


if __name__ == "__main__":
    main()
