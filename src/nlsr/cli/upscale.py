"""``nlsr upscale``: super-resolve image files, folders (recursively) and glob patterns.

Bad inputs do not stop the run: each is reported on stderr as ``path: reason``, the others
are processed, and the exit status is 1 if anything failed. Outputs are written atomically, so
an interrupted or failed image never leaves a partial file, and a batch can be run again:
``--skip-existing`` keeps the outputs already written, outputs of earlier runs lying in the
input tree are never taken as inputs, and the temporary files of a killed run are removed.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nlsr.cli import add_seed_option, describe_error, print_load_notes

#: Model used when neither --model nor --weights is given and nlsr ships no pretrained model
#: for the scale (otherwise the best shipped one, ``nlsr.models.pretrained.default_model``).
DEFAULT_MODEL = "bicubic"
#: Scale used with --model when --scale is not given.
DEFAULT_SCALE = 2
#: Without --tile, inputs above this many pixels run in AUTO_TILE-pixel tiles so that memory
#: stays bounded whatever the image size (--tile 0 forces the whole image).
AUTO_TILE_PIXELS = 1024 * 1024
AUTO_TILE = 512
#: Image extensions nlsr does not write: ``-o photo.gif`` is an error, not a folder name.
OTHER_IMAGE_EXTENSIONS = (
    ".gif", ".apng", ".avif", ".heic", ".heif", ".jxl", ".jp2", ".j2k", ".jfif", ".ico",
    ".icns", ".psd", ".svg", ".tga", ".ppm", ".pgm", ".pbm", ".pnm", ".pcx", ".dds", ".exr",
    ".hdr", ".qoi", ".raw", ".dng", ".cr2", ".nef", ".arw", ".pdf", ".eps",
)  # fmt: skip

_GLOB_CHARS = frozenset("*?[")
_OUTPUT_RULE = (
    "-o is a file when the input is one file and -o ends in an image extension nlsr writes; "
    "otherwise a folder (end it with / to make that explicit)"
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``upscale`` sub-command."""
    p = subparsers.add_parser(
        "upscale",
        help="super-resolve images",
        description="Super-resolve image files, folders (searched recursively) or glob "
        f"patterns. {_OUTPUT_RULE}; in a folder the inputs' "
        "relative paths are mirrored. Files inside the output folder, and files that are the "
        "output of another input (-o INPUT --suffix _x2), are not inputs.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder or glob")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="output file (one input file, an extension among .png .jpg .jpeg .bmp .tif .tiff "
        ".webp) or folder",
    )
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
        help="bf16: bfloat16 autocast for the convolutions (faster on CUDA and on CPUs with "
        "native bf16; about a grey level from fp32); attention stays float32 (default fp32)",
    )
    p.add_argument("--chop", action="store_true", help="the authors' quadrant chop (reproduction)")
    add_seed_option(p)
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace existing output files")
    existing.add_argument(
        "--skip-existing",
        action="store_true",
        help="keep existing output files and count them as done (to finish an interrupted batch)",
    )
    p.add_argument("--suffix", default="", help="appended to output file names, e.g. _x2")
    p.add_argument(
        "--max-pixels",
        type=int,
        help="refuse inputs above N pixels (default: $NLSR_MAX_PIXELS, else 100000000; "
        "0: no limit)",
    )
    p.set_defaults(run=run)
    return p


@dataclass(frozen=True)
class _Job:
    source: Path
    target: Path


@dataclass
class _Tally:
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    megapixels: float = 0.0


def run(args: argparse.Namespace) -> int:
    """Upscale every input; 0 if all succeeded (or were skipped), 1 if any failed.

    Unusable options raise ValueError (exit status 2, one line, from :func:`nlsr.cli.main`)."""
    _check_options(args)
    max_pixels = _max_pixels(args)
    jobs, failures = _plan(args.inputs, args.output, args.suffix)
    model, device = _load_model(args)
    _remove_stale_temporaries(jobs)
    from tqdm.auto import tqdm

    tally = _Tally(failed=len(failures))
    progress = sys.stderr.isatty()
    bar = tqdm(
        total=len(jobs), unit="file", desc="nlsr upscale", disable=not progress, dynamic_ncols=True
    )
    out = _Printer(bar)
    for spec, reason in failures:
        out.error(spec, reason)
    start = time.perf_counter()
    try:
        for job in jobs:
            _process(job, args, model, device, max_pixels, progress, tally, out)
            bar.update(1)
            bar.set_postfix_str(f"{tally.megapixels:.1f} MP out, {tally.failed} failed")
    except KeyboardInterrupt:
        bar.close()
        _summary(tally, time.perf_counter() - start, "interrupted: ")
        raise
    bar.close()
    _summary(tally, time.perf_counter() - start)
    return 1 if tally.failed else 0


def _process(
    job: _Job,
    args: argparse.Namespace,
    model: Any,
    device: Any,
    max_pixels: int | None,
    progress: bool,
    tally: _Tally,
    out: _Printer,
) -> None:
    """Upscale one file, or report why not; updates ``tally``."""
    from nlsr.inference import upscale
    from nlsr.io import read_image, write_image

    if job.target.exists() and not args.overwrite:
        if args.skip_existing:
            out.line(f"{job.source} -> {job.target} (skipped: exists)")
            tally.skipped += 1
        else:
            out.error(
                job.source,
                f"output {job.target} already exists (--overwrite replaces it, --skip-existing "
                "keeps it)",
            )
            tally.failed += 1
        return
    start = time.perf_counter()
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
            seed=args.seed,
        )
        job.target.parent.mkdir(parents=True, exist_ok=True)
        write_image(job.target, result, overwrite=args.overwrite)
    except MemoryError:
        out.error(job.source, "out of memory; try --tile 256")
        tally.failed += 1
        return
    except (ValueError, OSError, RuntimeError) as e:
        reason = describe_error(e)[1]  # "file: reason" for an OSError, as nlsr.cli.main says it
        if isinstance(e, RuntimeError) and "out of memory" in reason:
            reason = f"out of memory; try --tile 256 ({reason})"
        out.error(job.source, reason)
        tally.failed += 1
        return
    seconds = time.perf_counter() - start
    tally.ok += 1
    tally.megapixels += result.width * result.height / 1e6
    size = f"{image.width}x{image.height} -> {result.width}x{result.height}"
    out.line(f"{job.source} -> {job.target} ({size}, {seconds:.2f} s)")


def _summary(tally: _Tally, seconds: float, prefix: str = "") -> None:
    rate = tally.megapixels / seconds if seconds > 0 else 0.0
    print(
        f"{prefix}{tally.ok} ok, {tally.failed} failed, {tally.skipped} skipped in "
        f"{seconds:.2f} s ({tally.megapixels:.2f} output megapixels, {rate:.2f} MP/s)"
    )


class _Printer:
    """Per-file lines (stdout) and errors (stderr) that do not break the progress bar."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def _write(self, text: str, stream: Any) -> None:
        if self.bar.disable:
            print(text, file=stream)
        else:
            self.bar.write(text, file=stream)

    def line(self, text: str) -> None:
        self._write(text, sys.stdout)

    def error(self, path: Path | str, reason: str) -> None:
        """One line on stderr: the path, then why it failed (without repeating the path)."""
        prefix = f"{path}: "
        reason = " ".join(reason.splitlines())
        self._write(reason if reason.startswith(prefix) else prefix + reason, sys.stderr)


def _check_options(args: argparse.Namespace) -> None:
    if args.tile and args.chop:
        raise ValueError("--tile and --chop are alternatives: give one of them")
    if args.tile is not None and args.tile < 0:
        raise ValueError(f"--tile must be a number of pixels (0: whole image), got {args.tile}")
    if args.overlap < 0 or (args.tile and args.overlap >= args.tile):
        raise ValueError(f"--overlap must be in [0, tile), got {args.overlap}")
    if args.scale is not None and args.scale < 1:
        raise ValueError(f"--scale must be a positive integer, got {args.scale}")
    if args.max_pixels is not None and args.max_pixels < 0:
        raise ValueError(f"--max-pixels must be >= 0 (0: no limit), got {args.max_pixels}")
    if any(sep in args.suffix for sep in ("/", "\\")):
        raise ValueError(f"--suffix {args.suffix!r}: must not contain a path separator")


def _max_pixels(args: argparse.Namespace) -> int | None:
    """--max-pixels (0: None, no limit), else the default of :mod:`nlsr.io` (which reads
    ``$NLSR_MAX_PIXELS`` and raises ValueError naming it when it is not a number)."""
    if args.max_pixels is not None:
        return args.max_pixels or None
    from nlsr.io import default_max_pixels

    return default_max_pixels()


def _tile_for(args: argparse.Namespace, pixels: int) -> int | None:
    """The tile size for an input of ``pixels`` pixels: --tile, else automatic (None: whole)."""
    if args.tile is not None:
        return args.tile or None
    if args.chop or pixels <= AUTO_TILE_PIXELS:
        return None
    return max(AUTO_TILE, 4 * args.overlap)  # tiles well wider than their overlap


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """(the model's descriptor, its module put in eval mode on the device, and that
    torch.device); torch is imported only here."""
    from nlsr.inference import select_device
    from nlsr.models.resolve import resolve_model

    device = select_device(args.device)
    if args.weights is not None:
        model = resolve_model(args.weights, args.scale)
        print_load_notes(args.weights, model)
    else:
        scale = args.scale or DEFAULT_SCALE
        name = _model_name(args.model, scale)
        # The fallback needs no weights; any other name means shipped weights.
        model = resolve_model(name, scale, pretrained=name != DEFAULT_MODEL)
    model.module.eval().to(device)
    return model, device


def _model_name(name: str | None, scale: int) -> str:
    """--model, checked (ValueError naming what is available), or the default: the best
    shipped model for ``scale``, else :data:`DEFAULT_MODEL`; says which one it picked."""
    from nlsr.models.pretrained import available_pretrained, default_model
    from nlsr.models.registry import available

    if name is None:
        name = default_model(scale)
        if name is None:
            print(f"model: {DEFAULT_MODEL} (no pretrained model is shipped for x{scale})")
            return DEFAULT_MODEL
        print(f"model: {name} x{scale} (shipped pretrained weights)")
        return name
    shipped = available_pretrained()
    if name in shipped or name == DEFAULT_MODEL:
        return name
    if name not in available():
        raise ValueError(
            f"--model {name!r}: unknown model; available: {', '.join(shipped + available())}"
        )
    # An architecture: its best shipped weights (an untrained network is no upscaler).
    if default_model(scale, arch=name) is None:
        raise ValueError(
            f"--model {name}: no pretrained weights for {name} x{scale} yet; pass --weights FILE"
        )
    return name


def _output_is_file(output: str, single_file: bool, found: int) -> bool:
    """Whether -o names a file (see ``_OUTPUT_RULE``); ValueError when it cannot be used."""
    from nlsr.io import IMAGE_EXTENSIONS

    path = Path(output)
    ext = path.suffix.lower()
    if output.endswith(("/", os.sep)) or path.is_dir():
        return False
    if ext in OTHER_IMAGE_EXTENSIONS:
        raise ValueError(
            f"-o {output}: nlsr cannot write {ext} images; use one of "
            f"{', '.join(IMAGE_EXTENSIONS)} (or end -o with / for a folder)"
        )
    if ext in IMAGE_EXTENSIONS:
        if not single_file:
            raise ValueError(
                f"-o {output}: names an image file, but the inputs are not one file "
                f"({found} images found); give a folder"
            )
        return True
    if path.exists():
        raise ValueError(f"-o {output}: is a file; give a folder ({_OUTPUT_RULE})")
    return False


def _plan(
    specs: list[str], output_text: str, suffix: str
) -> tuple[list[_Job], list[tuple[str, str]]]:
    """Resolve inputs to (source, target) jobs, plus (input, reason) for inputs that failed.

    Folders are walked recursively (a folder that cannot be read is a failure); files inside
    the output folder (when it lies inside an input folder or below a glob's fixed part) and
    files that are the output of another input are not inputs: they come from earlier runs."""
    from nlsr.io import IMAGE_EXTENSIONS

    output = Path(output_text)
    out_key = output.resolve()
    found: list[tuple[Path, Path]] = []  # (file, path relative to its input root)
    failures: list[tuple[str, str]] = []
    single_file = len(specs) == 1 and Path(specs[0]).is_file()
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            skip = out_key if _strictly_inside(out_key, p.resolve()) else None
            files, errors = _walk(p, skip, IMAGE_EXTENSIONS)
            found += [(f, f.relative_to(p)) for f in files]
            failures += errors
            if not files and not errors:
                failures.append((spec, "folder holds no images"))
        elif p.is_file():
            found.append((p, Path(p.name)))
        elif _GLOB_CHARS & set(spec):
            base = _glob_base(spec)
            inside = _strictly_inside(out_key, base.resolve())
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
            files = [
                m
                for m in matches
                if _is_image(m, IMAGE_EXTENSIONS)
                and not (inside and _strictly_inside(m.resolve(), out_key))
            ]
            found += [(f, f.relative_to(base)) for f in files]
            if not files:
                failures.append((spec, "pattern matches no images"))
        else:
            failures.append((spec, "no such file or folder"))

    to_file = _output_is_file(output_text, single_file, len(found))
    planned: list[tuple[Path, Path, Path]] = []  # (source, its resolved path, target)
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
        planned.append((source, key, target))
    targets = {target.resolve() for _, _, target in planned}
    jobs: list[_Job] = []
    claimed: dict[Path, Path] = {}
    for source, key, target in planned:
        resolved = target.resolve()
        if resolved == key:
            reason = f"output {target} would replace the input; choose another -o or --suffix"
            failures.append((str(source), reason))
            continue
        if key in targets:
            continue  # the output of another input (an earlier run): not an input
        if resolved in claimed:
            failures.append(
                (str(source), f"output {target} is also the output of {claimed[resolved]}")
            )
            continue
        claimed[resolved] = source
        jobs.append(_Job(source, target))
    return jobs, failures


def _walk(
    root: Path, skip: Path | None, extensions: tuple[str, ...]
) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files below ``root`` (sorted; following links, each folder once), and a failure
    for every folder that cannot be read; the folder ``skip`` (resolved) is left out."""
    files: list[Path] = []
    errors: list[tuple[str, str]] = []

    def unreadable(err: OSError) -> None:
        where = os.fsdecode(err.filename) if err.filename is not None else str(root)
        errors.append((where, f"cannot read the folder ({err.strerror or err})"))

    visited: set[tuple[int, int]] = set()
    for folder, dirs, names in os.walk(root, onerror=unreadable, followlinks=True):
        here = Path(folder)
        try:
            st = here.stat()
        except OSError as err:
            unreadable(err)
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in visited:  # a link back up the tree
            dirs[:] = []
            continue
        visited.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if skip is None or (here / d).resolve() != skip)
        files += [here / n for n in names if _is_image(here / n, extensions)]
    return sorted(files), errors


def _strictly_inside(path: Path, folder: Path) -> bool:
    """``path`` lies below ``folder`` (both resolved), not equal to it."""
    return path != folder and path.is_relative_to(folder)


def _remove_stale_temporaries(jobs: list[_Job]) -> None:
    """Remove the temporary files a killed run left in the output folders (nlsr's own, whose
    writer is gone); say how many."""
    from nlsr.atomic import remove_stale_temporaries

    for folder in sorted({job.target.parent for job in jobs}):
        removed = remove_stale_temporaries(folder)
        if removed:
            print(f"{folder}: removed {len(removed)} temporary file(s) left by an interrupted run")


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
