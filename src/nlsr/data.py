"""The benchmark sets under a data root: ``<root>/<Set>/HR/*.png`` (+ optional official LR).

The root is the ``data_root`` argument, else ``$NLSR_DATA``, else ``./datasets``. Nothing is
downloaded: Manga109's licence forbids redistribution, so every set is found by path.
"""

from __future__ import annotations

import os
from pathlib import Path

from nlsr.io import IMAGE_EXTENSIONS

__all__ = [
    "BENCHMARKS",
    "DatasetError",
    "benchmark_images",
    "official_lr_path",
    "resolve_data_root",
]

#: The standard SR test sets, in the order the papers' tables list them.
BENCHMARKS = ("Set5", "Set14", "B100", "Urban100", "Manga109")

#: Environment variable naming the data root.
DATA_ENV = "NLSR_DATA"


class DatasetError(ValueError):
    """A benchmark set or one of its files is missing or unusable."""


def resolve_data_root(data_root: str | Path | None) -> Path:
    """The data root: ``data_root`` if given, else ``$NLSR_DATA``, else ``./datasets``."""
    if data_root is not None and str(data_root) != "":
        return Path(data_root).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path("datasets")


def _where(root: Path, data_root: str | Path | None) -> str:
    """How ``root`` was chosen, for error messages."""
    if data_root is not None and str(data_root) != "":
        return "given data root"
    if os.environ.get(DATA_ENV):
        return f"${DATA_ENV}"
    return f"default data root; pass --data-root or set ${DATA_ENV}"


def benchmark_images(name: str, data_root: str | Path | None = None) -> list[Path]:
    """Sorted HR image files of set ``name`` (``<root>/<name>/HR``); a clear error if absent."""
    root = resolve_data_root(data_root)
    hr_dir = root / name / "HR"
    if not hr_dir.is_dir():
        raise DatasetError(
            f"dataset {name!r} not found: no folder {hr_dir.resolve()} ({_where(root, data_root)})"
        )
    try:
        files = sorted(
            p for p in hr_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
    except OSError as e:
        raise DatasetError(
            f"dataset {name!r}: cannot read the folder {hr_dir.resolve()} ({e.strerror or e})"
        ) from e
    if not files:
        raise DatasetError(
            f"dataset {name!r}: {hr_dir.resolve()} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def official_lr_path(hr_path: str | Path, scale: int) -> Path:
    """Official LR file of an HR image: ``<Set>/LR_bicubic/X<s>/<name>x<s>.png``."""
    hr_path = Path(hr_path)
    return hr_path.parent.parent / "LR_bicubic" / f"X{scale}" / f"{hr_path.stem}x{scale}.png"
