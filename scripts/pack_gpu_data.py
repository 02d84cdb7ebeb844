"""Pack the data that ``scripts/gpu_run.sh`` needs on a lent GPU machine into one git-ignored
folder, small enough to travel with the working tree (64 MiB in all), and measure the payload.

    python scripts/pack_gpu_data.py [--shared ../shared] [--out .data/gpu] [--jobs N]
    python scripts/pack_gpu_data.py --measure-only [--out .data/gpu]

The folder mirrors the layout of ``../shared`` (so ``NLSR_SHARED=.data/gpu`` works for the tests
and for ``gpu_run.sh``):

* ``fixtures/official/``: the authors' parity fixtures, copied as they are (6.8 MB);
* ``datasets/benchmark/Set5/HR/``: the validation images, copied (0.8 MB);
* ``datasets/train/{T91,BSD200}/*.webp``: the training images re-encoded as lossless WebP
  (``nlsr``'s training data pipeline reads WebP), 70% of the PNG size. Every file is decoded
  again with ``nlsr.io.read_image`` and compared with the PNG's pixels: a mismatch is an error.

Files already packed (same name, newer than the source) are kept, so a second run is quick.
The payload is what ``git ls-files -co --exclude-standard`` lists (what the machine receives
besides carried paths) plus this folder; the script prints both and exits 1 when the total is
over the 64 MiB the ``run`` tool takes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from nlsr.io import read_image

REPO = Path(__file__).resolve().parents[1]
#: What one call of the ``run`` tool may take: the working tree plus carried paths.
PAYLOAD_LIMIT = 64 * 2**20
TRAIN_SETS = ("T91", "BSD200")
VAL_SETS = ("Set5",)


def encode(job: tuple[Path, Path]) -> int:
    """Re-encode ``src`` (any image nlsr reads) as lossless WebP at ``dst`` unless ``dst`` is
    newer; check that it decodes to the same pixels; return its size in bytes."""
    src, dst = job
    if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst.stat().st_size
    pixels = read_image(src).pixels
    if pixels.dtype != np.uint8:
        raise SystemExit(f"{src}: {pixels.dtype} pixels; WebP holds 8 bits (keep it as PNG)")
    tmp = dst.with_name(f".{dst.name}.tmp")
    PILImage.fromarray(pixels).save(
        tmp, format="WEBP", lossless=True, quality=100, method=4, exact=True
    )
    if not np.array_equal(read_image(tmp).pixels, pixels):
        tmp.unlink()
        raise SystemExit(f"{src}: the lossless WebP does not decode to the same pixels")
    os.replace(tmp, dst)
    return dst.stat().st_size


def tree_bytes(repo: Path = REPO) -> int:
    """Bytes of the files git would send: tracked and untracked-but-not-ignored ones."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    paths = [repo / os.fsdecode(p) for p in listed if p]
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(out: Path) -> int:
    """Print the payload of a ``run`` call carrying ``out``; 0 if it fits, else 1."""
    tree, data = tree_bytes(), folder_bytes(out) if out.is_dir() else 0
    total = tree + data
    mib = 2**20
    print(f"working tree (git ls-files -co --exclude-standard): {tree / mib:7.2f} MiB")
    for part in sorted(out.glob("*/*")) if out.is_dir() else []:
        print(
            f"  carried {part.relative_to(REPO) if part.is_relative_to(REPO) else part}: "
            f"{folder_bytes(part) / mib:7.2f} MiB"
        )
    print(f"carried {out}: {data / mib:7.2f} MiB")
    print(
        f"total: {total / mib:.2f} MiB of {PAYLOAD_LIMIT / mib:.0f} MiB "
        f"({total} bytes; {(PAYLOAD_LIMIT - total) / mib:.2f} MiB to spare)"
    )
    if total > PAYLOAD_LIMIT:
        print("over the limit: the run tool would refuse the call", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shared",
        type=Path,
        default=Path(os.environ.get("NLSR_SHARED", REPO.parent / "shared")),
        help="the shared material (default ../shared)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / ".data" / "gpu",
        help="the folder to fill (default .data/gpu, git-ignored)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="encoding processes (default 1)")
    parser.add_argument(
        "--measure-only", action="store_true", help="pack nothing, only print the payload"
    )
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if args.measure_only:
        return measure(out)

    fixtures = args.shared / "fixtures" / "official"
    if fixtures.is_dir():
        shutil.copytree(fixtures, out / "fixtures" / "official", dirs_exist_ok=True)
    else:
        print(f"no {fixtures}: the CUDA parity check will be skipped", file=sys.stderr)
    for name in VAL_SETS:
        src = args.shared / "datasets" / "benchmark" / name / "HR"
        shutil.copytree(src, out / "datasets" / "benchmark" / name / "HR", dirs_exist_ok=True)
    jobs = []
    for name in TRAIN_SETS:
        src = args.shared / "datasets" / "train" / name
        dst = out / "datasets" / "train" / name
        dst.mkdir(parents=True, exist_ok=True)
        files = sorted(p for p in src.iterdir() if p.suffix.lower() in (".png", ".bmp", ".tif"))
        if not files:
            raise SystemExit(f"{src}: no training images")
        jobs += [(f, dst / f"{f.stem}.webp") for f in files]
    before = sum(src.stat().st_size for src, _ in jobs)
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        after = sum(pool.map(encode, jobs, chunksize=4))
    print(
        f"{len(jobs)} training images: {before / 1e6:.1f} MB as PNG -> {after / 1e6:.1f} MB "
        "as lossless WebP (pixels checked)"
    )
    return measure(out)


if __name__ == "__main__":
    sys.exit(main())
