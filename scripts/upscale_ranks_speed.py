"""Wall time of ``nlsr upscale`` on a folder in one process and under ``torchrun`` with N
processes (one torch thread each), interleaved runs, medians; prints a small table.

    python scripts/upscale_ranks_speed.py --images 8 --size 96 --processes 2 --repeats 3

Wall time (not CPU time) is the point here: sharding shortens the wall time of a batch when
cores are free; on a loaded machine the figures are noise, so the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _command(folder: Path, out: Path, processes: int, extra: list[str]) -> list[str]:
    upscale = ["-m", "nlsr", "upscale", str(folder), "-o", str(out), "--device", "cpu", *extra]
    if processes == 1:
        return [sys.executable, *upscale]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return [sys.executable, *launcher, *upscale]


def main() -> None:
    """Make the images, time the runs, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=96, help="side of the square inputs")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--options", default="--precision fp32", help="extra nlsr upscale options (one string)"
    )
    args = parser.parse_args()
    from nlsr.io import write_image

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        for i in range(args.images):
            pixels = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
            write_image(folder / f"{i:04d}.png", pixels)
        times: dict[int, list[float]] = {1: [], args.processes: []}
        for r in range(args.repeats):
            for n in times:  # interleaved, so drifting load hits both alike
                out = Path(tmp) / f"out_{n}_{r}"
                start = time.perf_counter()
                subprocess.run(
                    _command(folder, out, n, args.options.split()),
                    env=env,
                    check=True,
                    capture_output=True,
                )
                times[n].append(time.perf_counter() - start)
    print(f"{args.images} images of {args.size}x{args.size}, options: {args.options}")
    print(f"load average before the last run: {os.getloadavg()[0]:.2f}")
    print("processes  median wall s  images/s  runs")
    for n, values in times.items():
        median = statistics.median(values)
        runs = " ".join(f"{v:.2f}" for v in values)
        print(f"{n:>9}  {median:>12.2f}  {args.images / median:>8.2f}  {runs}")


if __name__ == "__main__":
    main()
