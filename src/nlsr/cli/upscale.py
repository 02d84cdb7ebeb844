"""``nlsr upscale``: super-resolve image files, folders (recursively) and glob patterns.

Bad inputs do not stop the run: each is reported on stderr as ``path: reason``, the others
are processed, and the exit status is 1 if anything failed. Outputs are written atomically, so
an interrupted or failed image never leaves a partial file.
"""

from __future__ import annotations

import argparse
import glob
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Model used when neither --model nor --weights is given and nlsr ships no pretrained model
#: for the scale (otherwise the best shipped one, ``nlsr.pretrained.default_model``).
DEFAULT_MODEL = "bicubic"
#: Scale used with --model when --scale is not given.
DEFAULT_SCALE = 2
#: Without --tile, inputs above this many pixels run in AUTO_TILE-pixel tiles so that memory
#: stays bounded whatever the image size (--tile 0 forces the whole image).
AUTO_TILE_PIXELS = 1024 * 1024
AUTO_TILE = 512

_GLOB_CHARS = frozenset("*?[")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``upscale`` sub-command."""
    from nlsr.io import DEFAULT_MAX_PIXELS

    p = subparsers.add_parser(
        "upscale",
        help="super-resolve images",
        description="Super-resolve image files, folders (searched recursively) or glob "
        "patterns. One input file may be written to '-o file.png'; otherwise -o is a folder "
        "in which the inputs' relative paths are mirrored.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder or glob")
    p.add_argument("-o", "--output", required=True, help="output file (one input) or folder")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--model",
        help="shipped pretrained model or architecture (default: the shipped model for the "
        f"scale, else {DEFAULT_MODEL}; see 'nlsr models')",
    )
    source.add_argument("--weights", type=Path, help="checkpoint to load (.pt, .safetensors)")
    p.add_argument(
        "--scale", type=int, help=f"upscaling factor (default {DEFAULT_SCALE}, or the checkpoint's)"
    )
    p.add_argument(
        "--tile",
        type=int,
        help=f"run in overlapping tiles of N input pixels (default: {AUTO_TILE} for inputs above "
        f"{AUTO_TILE_PIXELS // 2**20} MP, else the whole image; 0: always the whole image)",
    )
    p.add_argument("--overlap", type=int, default=16, help="tile overlap in pixels (default 16)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument("--self-ensemble", action="store_true", help="average the x8 flips/rotations")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: bfloat16 autocast for the convolutions (faster on CUDA; about a "
        "grey level from fp32); attention stays float32 (default fp32)",
    )
    p.add_argument("--chop", action="store_true", help="the authors' quadrant chop (reproduction)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--suffix", default="", help="appended to output file names, e.g. _x2")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse inputs above N pixels (default {DEFAULT_MAX_PIXELS}; 0: no limit)",
    )
    p.set_defaults(run=run)
    return p


@dataclass(frozen=True)
class _Job:
    source: Path
    target: Path


def run(args: argparse.Namespace) -> int:
    """Upscale every input; 0 if all succeeded, 1 if any failed, 2 for unusable options."""
    try:
        _check_options(args)
        jobs, failures = _plan(args.inputs, Path(args.output), args.suffix)
        model, device = _load_model(args)
    except (ValueError, OSError) as e:
        print(f"nlsr upscale: error: {e}", file=sys.stderr)
        return 2
    for spec, reason in failures:
        _report(spec, reason)
    failed = len(failures)
    from nlsr.inference import upscale
    from nlsr.io import read_image, write_image

    max_pixels = args.max_pixels or None
    progress = sys.stderr.isatty()
    ok = 0
    megapixels = 0.0
    start = time.perf_counter()
    for job in jobs:
        if job.target.exists() and not args.overwrite:
            _report(job.source, f"output {job.target} already exists (use --overwrite)")
            failed += 1
            continue
        try:
            image = read_image(job.source, max_pixels=max_pixels)
            result = upscale(
                model,
                image,
                tile=_tile_for(args, image.width * image.height),
                overlap=args.overlap,
                chop=args.chop,
                self_ensemble=args.self_ensemble,
                device=device,
                progress=progress,
                precision=args.precision,
            )
            job.target.parent.mkdir(parents=True, exist_ok=True)
            write_image(job.target, result, overwrite=args.overwrite)
        except MemoryError:
            _report(job.source, "out of memory; try --tile 256")
            failed += 1
            continue
        except (ValueError, OSError, RuntimeError) as e:
            reason = str(e)
            if isinstance(e, RuntimeError) and "out of memory" in reason:
                reason = f"out of memory; try --tile 256 ({reason})"
            _report(job.source, reason)
            failed += 1
            continue
        ok += 1
        megapixels += result.width * result.height / 1e6
        size = f"{image.width}x{image.height} -> {result.width}x{result.height}"
        print(f"{job.source} -> {job.target} ({size})")
    seconds = time.perf_counter() - start
    rate = megapixels / seconds if seconds > 0 else 0.0
    print(
        f"{ok} ok, {failed} failed in {seconds:.2f} s "
        f"({megapixels:.2f} output megapixels, {rate:.2f} MP/s)"
    )
    return 1 if failed else 0


def _report(path: Path | str, reason: str) -> None:
    """One line on stderr: the path, then why it failed (without repeating the path)."""
    prefix = f"{path}: "
    reason = " ".join(reason.splitlines())
    print(reason if reason.startswith(prefix) else prefix + reason, file=sys.stderr)


def _check_options(args: argparse.Namespace) -> None:
    if args.tile and args.chop:
        raise ValueError("--tile and --chop are alternatives: give one of them")
    if args.tile is not None and args.tile < 0:
        raise ValueError(f"--tile must be a number of pixels (0: whole image), got {args.tile}")
    if args.overlap < 0 or (args.tile and args.overlap >= args.tile):
        raise ValueError(f"--overlap must be in [0, tile), got {args.overlap}")
    if args.scale is not None and args.scale < 1:
        raise ValueError(f"--scale must be a positive integer, got {args.scale}")
    if args.max_pixels < 0:
        raise ValueError(f"--max-pixels must be >= 0 (0: no limit), got {args.max_pixels}")
    if any(sep in args.suffix for sep in ("/", "\\")):
        raise ValueError(f"--suffix {args.suffix!r}: must not contain a path separator")


def _tile_for(args: argparse.Namespace, pixels: int) -> int | None:
    """The tile size for an input of ``pixels`` pixels: --tile, else automatic (None: whole)."""
    if args.tile is not None:
        return args.tile or None
    if args.chop or pixels <= AUTO_TILE_PIXELS:
        return None
    return max(AUTO_TILE, 4 * args.overlap)  # tiles well wider than their overlap


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model in eval mode on its device, that torch.device); torch is imported only here."""
    from nlsr.inference import select_device

    device = select_device(args.device)
    if args.weights is not None:
        from nlsr.checkpoint import load

        model = load(args.weights, scale=args.scale)
    else:
        from nlsr.models import available, create
        from nlsr.pretrained import available_pretrained, default_model, load_pretrained

        scale = args.scale or DEFAULT_SCALE
        name = args.model
        if name is None:
            name = default_model(scale)
            if name is None:
                print(f"model: {DEFAULT_MODEL} (no pretrained model is shipped for x{scale})")
                name = DEFAULT_MODEL
            else:
                print(f"model: {name} x{scale} (shipped pretrained weights)")
        shipped = available_pretrained()
        if name in shipped:
            model = load_pretrained(name, scale)
        elif name == "bicubic":
            model = create(name, scale)
        elif name in available():
            # An architecture: its best shipped weights (an untrained network is no upscaler).
            best = default_model(scale, arch=name)
            if best is None:
                raise ValueError(
                    f"--model {name}: no pretrained weights for {name} x{scale} yet; "
                    "pass --weights FILE"
                )
            model = load_pretrained(best, scale)
        else:
            raise ValueError(
                f"--model {name!r}: unknown model; available: {', '.join(shipped + available())}"
            )
    return model.eval().to(device), device


def _plan(specs: list[str], output: Path, suffix: str) -> tuple[list[_Job], list[tuple[str, str]]]:
    """Resolve inputs to (source, target) jobs, plus (input, reason) for inputs that failed."""
    from nlsr.io import IMAGE_EXTENSIONS

    found: list[tuple[Path, Path]] = []  # (file, path relative to its input root)
    failures: list[tuple[str, str]] = []
    single_file = len(specs) == 1 and Path(specs[0]).is_file()
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if _is_image(f, IMAGE_EXTENSIONS))
            found += [(f, f.relative_to(p)) for f in files]
            if not files:
                failures.append((spec, "folder holds no images"))
        elif p.is_file():
            found.append((p, Path(p.name)))
        elif _GLOB_CHARS & set(spec):
            base = _glob_base(spec)
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
            files = [m for m in matches if _is_image(m, IMAGE_EXTENSIONS)]
            found += [(f, f.relative_to(base)) for f in files]
            if not files:
                failures.append((spec, "pattern matches no images"))
        else:
            failures.append((spec, "no such file or folder"))

    to_file = single_file and output.suffix.lower() in IMAGE_EXTENSIONS and not output.is_dir()
    if not to_file:
        if output.exists() and not output.is_dir():
            raise ValueError(f"-o {output}: is a file; give a folder when there are several inputs")
        if output.suffix.lower() in IMAGE_EXTENSIONS and not output.exists() and len(found) > 1:
            raise ValueError(f"-o {output}: names an image file but {len(found)} inputs were found")
    jobs: list[_Job] = []
    claimed: dict[Path, Path] = {}
    seen: set[Path] = set()
    for source, rel in found:
        key = source.resolve()
        if key in seen:
            continue
        seen.add(key)
        if to_file:
            target = output
        else:
            ext = rel.suffix if rel.suffix.lower() in IMAGE_EXTENSIONS else ".png"
            target = output / rel.parent / f"{rel.stem}{suffix}{ext}"
        resolved = target.resolve()
        if resolved == key:
            reason = f"output {target} would replace the input; choose another -o or --suffix"
            failures.append((str(source), reason))
            continue
        if resolved in claimed:
            failures.append(
                (str(source), f"output {target} is also the output of {claimed[resolved]}")
            )
            continue
        claimed[resolved] = source
        jobs.append(_Job(source, target))
    return jobs, failures


def _is_image(path: Path, extensions: tuple[str, ...]) -> bool:
    return path.suffix.lower() in extensions and path.is_file() and not path.name.startswith(".")


def _glob_base(pattern: str) -> Path:
    """The leading folders of a glob pattern that hold no wildcard (relative paths mirror below)."""
    parts = Path(pattern).parts
    base = []
    for part in parts[:-1]:
        if _GLOB_CHARS & set(part):
            break
        base.append(part)
    return Path(*base) if base else Path()
