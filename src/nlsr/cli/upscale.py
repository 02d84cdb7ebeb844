"""``nlsr upscale``: super-resolve image files, folders (recursively) and glob patterns.

Bad inputs do not stop the run: each is reported on stderr as ``path: reason``, the others
are processed, and the exit status is 1 if anything failed. Outputs are written atomically, so
an interrupted or failed image never leaves a partial file, and a batch can be run again:
``--skip-existing`` keeps the outputs already written, outputs of earlier runs lying in the
input tree are never taken as inputs, and the temporary files of a killed run are removed.
Under torchrun each process upscales its share of the inputs (docs/deploy.md). Which files are
read and written is decided in :mod:`nlsr.cli.upscale_plan`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

from nlsr.cli import EXIT_FAILED, add_seed_option, describe_error, print_load_notes
from nlsr.cli.upscale_plan import (
    OUTPUT_EXTENSIONS,
    OUTPUT_RULE,
    Job,
    check_quality,
    plan,
    shard,
)
from nlsr.inference import PRECISIONS

#: Model used when neither --model nor --weights is given and nlsr ships no pretrained model
#: for the scale (otherwise the best shipped one, ``nlsr.models.pretrained.default_model``).
DEFAULT_MODEL = "bicubic"
#: Scale used with --model when --scale is not given.
DEFAULT_SCALE = 2
#: Without --tile, inputs above this many pixels run in AUTO_TILE-pixel tiles so that memory
#: stays bounded whatever the image size (--tile 0 forces the whole image).
AUTO_TILE_PIXELS = 1024 * 1024
AUTO_TILE = 512
#: Under torchrun, how long the ranks that finished wait for the slowest one at the summary
#: (PyTorch's 30-minute default is too short for the uneven shares of a large batch).
RANK_TIMEOUT = timedelta(days=7)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``upscale`` sub-command."""
    p = subparsers.add_parser(
        "upscale",
        help="super-resolve images",
        description="Super-resolve image files, folders (searched recursively) or glob "
        f"patterns. {OUTPUT_RULE}; in a folder the inputs' "
        "relative paths are mirrored. Files inside the output folder, and files that are the "
        "output of another input (-o INPUT --suffix _x2), are not inputs. Under torchrun the "
        "inputs are shared out between the processes.",
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
    p.add_argument(
        "--device",
        help="cpu, cuda, cuda:N or mps (default: the best available; under torchrun the GPU of "
        "LOCAL_RANK, else the CPU)",
    )
    p.add_argument("--self-ensemble", action="store_true", help="average the x8 flips/rotations")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="bf16 (about a grey level from fp32) / fp16 (CUDA only): half-precision autocast "
        "for the convolutions, attention stays float32; fp32 throughout; auto: bf16 where the "
        "device computes it natively and the model allows it, else fp32 (default auto)",
    )
    p.add_argument(
        "--outscale",
        type=float,
        metavar="F",
        help="output scale, any positive number: the model's scale, then MATLAB bicubic to "
        "round(F x input size), halves up (default: the model's scale)",
    )
    p.add_argument(
        "--ext",
        choices=tuple(OUTPUT_EXTENSIONS),
        help="output format (default: the input's; with -o FILE, its extension)",
    )
    p.add_argument(
        "--quality",
        type=int,
        metavar="Q",
        help="JPEG / WebP quality, 1-100 (default: JPEG 95, WebP lossless)",
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


@dataclass
class _Tally:
    """What one process did: files done, skipped and failed, output megapixels, seconds."""

    ok: int = 0
    skipped: int = 0
    failed: int = 0
    megapixels: float = 0.0
    seconds: float = 0.0


def run(args: argparse.Namespace) -> int:
    """Upscale every input; 0 if all succeeded (or were skipped), 1 if any failed. Under
    torchrun every process takes its share of the inputs (:func:`_run_ranks`).

    Unusable options raise ValueError (exit status 2, one line, from :func:`nlsr.cli.main`)."""
    from nlsr.distributed import launched

    _check_options(args)
    max_pixels = _max_pixels(args)
    if launched():
        return _run_ranks(args, max_pixels)
    from nlsr.inference import select_device

    jobs, failures = plan(args.inputs, args.output, args.suffix, args.ext)
    check_quality(jobs, args.quality)
    model, device = _load_model(args, select_device(args.device))
    _remove_stale_temporaries(jobs)
    tally = _upscale_all(jobs, failures, args, model, device, max_pixels, sys.stderr.isatty())
    _summary(tally)
    return 1 if tally.failed else 0


def _run_ranks(args: argparse.Namespace, max_pixels: int | None) -> int:
    """One torchrun process: join the process group (Gloo: it only carries a few small
    objects), do this rank's share (:func:`_run_rank`) and leave."""
    from nlsr import distributed as D

    info = D.setup(partial(_rank_device, args.device), backend="gloo", timeout=RANK_TIMEOUT)
    try:
        status, error = _run_rank(args, max_pixels, info)
    except BaseException:
        D.teardown(info, wait=False)  # torchrun stops the other ranks
        raise
    D.teardown(info)
    if error is not None:
        raise error
    return status


def _run_rank(
    args: argparse.Namespace, max_pixels: int | None, info: Any
) -> tuple[int, Exception | None]:
    """Plan every input (as every rank does), upscale every ``world_size``-th of them (sorted)
    and gather the tallies on rank 0, which prints the inputs that could not be planned and
    the summary. (exit status, error to raise): 1 on every rank if any file failed anywhere."""
    from nlsr import distributed as D

    try:
        jobs, failures = plan(args.inputs, args.output, args.suffix, args.ext)
        check_quality(jobs, args.quality)
        model, device = _load_model(args, info.device, announce=info.is_main)
        error = None
    except Exception as e:  # every rank hears of it below, so none waits for this one
        error = e
    problems = D.gather(None if error is None else describe_error(error), info)
    if any(problems):
        return _rank_problem(problems, error, info.rank)
    if info.is_main:
        _remove_stale_temporaries(jobs)
    D.barrier(info)  # no rank writes before the stale temporaries are gone
    mine = shard(jobs, info.rank, info.world_size)
    failures = failures if info.is_main else []
    tally = _upscale_all(mine, failures, args, model, device, max_pixels, False)
    tallies = D.gather(tally, info)
    if info.is_main:
        for rank, each in enumerate(tallies):
            _summary(each, f"rank {rank}: ")
        total = _Tally(
            ok=sum(t.ok for t in tallies),
            skipped=sum(t.skipped for t in tallies),
            failed=sum(t.failed for t in tallies),
            megapixels=sum(t.megapixels for t in tallies),
            seconds=max(t.seconds for t in tallies),
        )
        _summary(total, f"all {info.world_size} processes: ")
    return (1 if any(t.failed for t in tallies) else 0), None


def _rank_problem(
    problems: list[Any], error: Exception | None, rank: int
) -> tuple[int, Exception | None]:
    """Some rank could not start. Each rank with an error of its own raises it (rank 0 always,
    the others when it differs from rank 0's, so that a bad option is printed once); rank 0
    without one names the first rank that failed; the others exit with that error's status."""
    if error is not None and (rank == 0 or problems[rank] != problems[0]):
        return EXIT_FAILED, error
    if rank == 0:
        first = next(r for r, problem in enumerate(problems) if problem)
        return EXIT_FAILED, RuntimeError(f"rank {first} could not start: {problems[first][1]}")
    return (problems[rank][0] if problems[rank] else EXIT_FAILED), None


def _rank_device(name: str | None, local_rank: int) -> Any:
    """The device of torchrun process ``local_rank``: --device, a bare ``cuda`` (or, by
    default, CUDA when present) as ``cuda:LOCAL_RANK`` modulo the GPUs; else the CPU."""
    import torch

    from nlsr.inference import select_device

    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = select_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def _upscale_all(
    jobs: list[Job],
    failures: list[tuple[str, str]],
    args: argparse.Namespace,
    model: Any,
    device: Any,
    max_pixels: int | None,
    progress: bool,
) -> _Tally:
    """Report ``failures``, then upscale ``jobs`` one by one, going on past bad files."""
    from tqdm.auto import tqdm

    tally = _Tally(failed=len(failures))
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
        tally.seconds = time.perf_counter() - start
        _summary(tally, "interrupted: ")
        raise
    bar.close()
    tally.seconds = time.perf_counter() - start
    return tally


def _process(
    job: Job,
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
            outscale=args.outscale,
        )
        job.target.parent.mkdir(parents=True, exist_ok=True)
        write_image(job.target, result, overwrite=args.overwrite, quality=args.quality)
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


def _summary(tally: _Tally, prefix: str = "") -> None:
    seconds = tally.seconds
    rate = tally.megapixels / seconds if seconds > 0 else 0.0
    print(
        f"{prefix}{tally.ok} ok, {tally.failed} failed, {tally.skipped} skipped in "
        f"{seconds:.2f} s ({tally.megapixels:.2f} output megapixels, {rate:.2f} MP/s)",
        flush=True,
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
    if args.outscale is not None and not (math.isfinite(args.outscale) and args.outscale > 0):
        raise ValueError(f"--outscale must be a positive number, got {args.outscale}")
    if args.quality is not None and not 1 <= args.quality <= 100:
        raise ValueError(f"--quality must be from 1 to 100, got {args.quality}")


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


def _load_model(args: argparse.Namespace, device: Any, *, announce: bool = True) -> tuple[Any, Any]:
    """(the model's descriptor, its module put in eval mode on ``device``) and that device;
    ``announce``: say which model and what loading noted (rank 0 alone under torchrun)."""
    from nlsr.inference import resolve_precision
    from nlsr.models.resolve import resolve_model

    if args.weights is not None:
        model = resolve_model(args.weights, args.scale)
        if announce:
            print_load_notes(args.weights, model)
    else:
        scale = args.scale or DEFAULT_SCALE
        name = _model_name(args.model, scale, announce)
        # The fallback needs no weights; any other name means shipped weights.
        model = resolve_model(name, scale, pretrained=name != DEFAULT_MODEL)
    model.module.eval().to(device)
    resolve_precision(model, args.precision, device)  # fp16 off CUDA: one error, not one per file
    return model, device


def _model_name(name: str | None, scale: int, announce: bool = True) -> str:
    """--model, checked (ValueError naming what is available), or the default: the best
    shipped model for ``scale``, else :data:`DEFAULT_MODEL`; says which one it picked."""
    from nlsr.models.pretrained import available_pretrained, default_model
    from nlsr.models.registry import available

    if name is None:
        name = default_model(scale)
        if name is None:
            if announce:
                print(f"model: {DEFAULT_MODEL} (no pretrained model is shipped for x{scale})")
            return DEFAULT_MODEL
        if announce:
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


def _remove_stale_temporaries(jobs: list[Job]) -> None:
    """Remove the temporary files a killed run left in the output folders (nlsr's own, whose
    writer is gone); say how many."""
    from nlsr.atomic import remove_stale_temporaries

    for folder in sorted({job.target.parent for job in jobs}):
        removed = remove_stale_temporaries(folder)
        if removed:
            print(f"{folder}: removed {len(removed)} temporary file(s) left by an interrupted run")
