"""Cross-scale attention (CSNA) against the released approach on real-image features.

    python scripts/csna_speed.py [--sizes 48,96] [--channels 64,128] [--modes infer,train]
        [--repeat 5] [--threads 1] [--image PATH]

Features: a centre crop of a real image (Set14's barbara under the shared data root, else the
bundled sample), through a fixed seeded 3x3 head convolution ``3 -> C``, each channel
normalised to zero mean and unit std. The nlsr block and its released form
(:class:`nlsr.attention.reference.ReleasedCrossScaleAttention`, same parameters) run
interleaved, ``--repeat`` times each, after one warm-up and one memory-tracked call; the script
prints median process-CPU seconds, the released / nlsr ratio, and the extra peak memory of
each (``nlsr.bench.measuring.MemoryMeter``), with the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import nlsr
from nlsr.attention.cross_scale import CrossScaleAttention
from nlsr.attention.reference import ReleasedCrossScaleAttention
from nlsr.bench.measuring import MemoryMeter, load_average, workload
from nlsr.io import read_image

SET14_IMAGE = Path("/work/shared/datasets/benchmark/Set14/HR/barbara.png")


def features(image: Path, size: int, channels: int, seed: int = 0) -> Tensor:
    """``[1, channels, size, size]``: a centre crop through a fixed seeded head convolution,
    normalised per channel."""
    pixels = torch.from_numpy(read_image(image).pixels.copy()).float() / 255.0
    img = pixels.permute(2, 0, 1)[None, :3]
    top, left = (img.shape[-2] - size) // 2, (img.shape[-1] - size) // 2
    crop = img[..., top : top + size, left : left + size]
    torch.manual_seed(seed)
    head = nn.Conv2d(3, channels, 3, padding=1)
    with torch.no_grad():
        x = head(crop)
    return (x - x.mean(dim=(2, 3), keepdim=True)) / x.std(dim=(2, 3), keepdim=True)


def compare(x: Tensor, mode: str, repeat: int, meter: MemoryMeter) -> dict[str, tuple]:
    """Median CPU seconds and extra peak bytes of nlsr's block and the released form."""
    torch.manual_seed(1)
    block = CrossScaleAttention(x.shape[1], scale=2)
    targets = {"nlsr": block, "released": ReleasedCrossScaleAttention(block)}
    inputs = x.clone().requires_grad_(mode == "train")
    calls: dict[str, Callable[[], None]] = {
        name: workload(module, inputs, mode) for name, module in targets.items()
    }
    memory = {}
    for name, fn in calls.items():
        fn()  # warm-up
        with meter.track() as usage:
            fn()
        memory[name] = usage.extra_bytes
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):  # interleaved
        for name, fn in calls.items():
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    return {name: (statistics.median(times[name]), memory[name]) for name in calls}


def main() -> None:
    """Parse the options, print one line per size, width and mode."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="48,96")
    parser.add_argument("--channels", default="64,128")
    parser.add_argument("--modes", default="infer,train")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--image", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image = args.image or (
        SET14_IMAGE if SET14_IMAGE.is_file() else Path(nlsr.__file__).parent / "assets/sample.png"
    )
    meter = MemoryMeter("cpu")
    print(f"image {image.name}, threads {args.threads}, load {os.getloadavg()}, {meter.method}")
    print("size  C    mode   nlsr s  released s  ratio  nlsr MiB  released MiB")
    for size in map(int, args.sizes.split(",")):
        for channels in map(int, args.channels.split(",")):
            x = features(image, size, channels)
            for mode in args.modes.split(","):
                r = compare(x, mode, args.repeat, meter)
                (tn, mn), (tr, mr) = r["nlsr"], r["released"]
                print(
                    f"{size:<5d} {channels:<4d} {mode:<6s} {tn:7.3f} {tr:10.3f} {tr / tn:6.2f}x"
                    f" {(mn or 0) / 2**20:9.0f} {(mr or 0) / 2**20:13.0f}"
                )
    print(f"load at end {load_average()}")


if __name__ == "__main__":
    main()
