"""Which files ``nlsr upscale`` reads and writes: inputs (files, folders walked recursively,
globs) resolved to (source, target) jobs, the rule that makes -o a file or a folder, and the
inputs that cannot be used, each with its reason."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

#: Image extensions nlsr does not write: ``-o photo.gif`` is an error, not a folder name.
OTHER_IMAGE_EXTENSIONS = (
    ".gif", ".apng", ".avif", ".heic", ".heif", ".jxl", ".jp2", ".j2k", ".jfif", ".ico",
    ".icns", ".psd", ".svg", ".tga", ".ppm", ".pgm", ".pbm", ".pnm", ".pcx", ".dds", ".exr",
    ".hdr", ".qoi", ".raw", ".dng", ".cr2", ".nef", ".arw", ".pdf", ".eps",
)  # fmt: skip

_GLOB_CHARS = frozenset("*?[")
OUTPUT_RULE = (
    "-o is a file when the input is one file and -o ends in an image extension nlsr writes; "
    "otherwise a folder (end it with / to make that explicit)"
)


#: --ext choices and the file extensions each one names (the first is written).
OUTPUT_EXTENSIONS = {
    "png": (".png",),
    "jpg": (".jpg", ".jpeg"),
    "webp": (".webp",),
    "tif": (".tif", ".tiff"),
}
#: Extensions of the formats --quality applies to (lossy JPEG and WebP).
QUALITY_EXTENSIONS = (".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class Job:
    """One input file and the output file it becomes."""

    source: Path
    target: Path


def _output_is_file(output: str, single_file: bool, found: int) -> bool:
    """Whether -o names a file (see ``OUTPUT_RULE``); ValueError when it cannot be used."""
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
        raise ValueError(f"-o {output}: is a file; give a folder ({OUTPUT_RULE})")
    return False


def plan(
    specs: list[str], output_text: str, suffix: str, ext: str | None = None
) -> tuple[list[Job], list[tuple[str, str]]]:
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
    if to_file and ext is not None and output.suffix.lower() not in OUTPUT_EXTENSIONS[ext]:
        raise ValueError(f"--ext {ext}: -o {output_text} names a {output.suffix} file")
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
            target = output / rel.parent / f"{rel.stem}{suffix}{_extension(rel, ext)}"
        planned.append((source, key, target))
    targets = {target.resolve() for _, _, target in planned}
    jobs: list[Job] = []
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
        jobs.append(Job(source, target))
    return jobs, failures


def _extension(rel: Path, ext: str | None) -> str:
    """The output extension: --ext, else the input's (every input has one nlsr writes)."""
    if ext is not None:
        return OUTPUT_EXTENSIONS[ext][0]
    from nlsr.io import IMAGE_EXTENSIONS

    return rel.suffix if rel.suffix.lower() in IMAGE_EXTENSIONS else ".png"


def check_quality(jobs: list[Job], quality: int | None) -> None:
    """--quality applies only when every output is JPEG or WebP: ValueError naming the first
    output that is not (a PNG written "at quality 90" would silently ignore it)."""
    if quality is None:
        return
    for job in jobs:
        if job.target.suffix.lower() not in QUALITY_EXTENSIONS:
            raise ValueError(
                f"--quality {quality}: applies to JPEG and WebP output only, but {job.target} "
                "is not one; add --ext jpg or --ext webp"
            )


def shard(jobs: list[Job], rank: int, world_size: int) -> list[Job]:
    """This rank's share of ``jobs``: every ``world_size``-th of them sorted by input path,
    starting at ``rank``, so each job goes to exactly one rank and the shares are balanced."""
    ordered = sorted(jobs, key=lambda job: os.fsencode(job.source))
    return ordered[rank::world_size]


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
