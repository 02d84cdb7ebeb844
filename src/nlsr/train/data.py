"""Training data: HR folders -> exact LR images -> aligned, augmented patch pairs.

Every HR image is degraded ONCE, whole, at load (modcrop + ``nlsr.resize.degrade``), or paired
with a given LR file; HR and LR are kept as uint8 (in memory, or memory-mapped ``.npy`` files).
A patch pair is then a crop of the LR image and the aligned crop of the HR image, with the same
flip/rotation applied to both, so the LR patch is exactly what the degradation made.

The data order is a pure function of ``(seed, step)``: :class:`StepBatchSampler` derives the
global batch of step ``s`` (which images, crop positions, augmentations) without any iterator
state, so resuming at step ``s`` needs only ``s``, and DataLoader workers (which only crop) cannot
change it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from nlsr.io import IMAGE_EXTENSIONS, ImageReadError, read_image
from nlsr.resize import degrade, modcrop
from nlsr.train.config import ConfigError, DataSection

log = logging.getLogger("nlsr.train")

#: A patch request: (image index, LR top, LR left, augmentation code 0..7).
PatchSpec = tuple[int, int, int, int]

# Independent SeedSequence streams, so no two uses of the seed can collide.
_STREAM_ORDER, _STREAM_CROPS, _STREAM_NOISE = 0, 1, 2


class DataError(ValueError):
    """The training data cannot be used (no images, all too small); the message says why."""


def find_images(folder: str | Path, key: str = "data.train_dirs") -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by path so the order is reproducible."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{key}: folder {folder} does not exist")
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    return np.round(pixels.astype(np.float64) / 257.0).astype(np.uint8)  # 16-bit -> 8-bit


def _seed_for(seed: int, stream: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1)[0])


def augment(img: np.ndarray, code: int) -> np.ndarray:
    """Apply dihedral transform ``code`` (bit 0: left-right flip, bit 1: up-down flip,
    bit 2: transpose) to an HxWxC array; the same code on LR and HR keeps them aligned."""
    if code & 1:
        img = img[:, ::-1]
    if code & 2:
        img = img[::-1]
    if code & 4:
        img = img.transpose(1, 0, 2)
    return img


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)


@dataclass
class LoadReport:
    """What happened to each file found under the training folders."""

    found: int = 0
    used: int = 0
    unreadable: list[str] = field(default_factory=list)
    too_small: list[str] = field(default_factory=list)
    unpaired: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary (counts and the skipped paths)."""
        return {
            "found": self.found,
            "used": self.used,
            "unreadable": self.unreadable,
            "too_small": self.too_small,
            "unpaired": self.unpaired,
        }


def _find_lr(hr_path: Path, hr_root: Path, lr_root: Path, scale: int) -> Path | None:
    rel = hr_path.relative_to(hr_root)
    folder = lr_root / rel.parent
    for stem in (rel.stem, f"{rel.stem}x{scale}"):
        for ext in (hr_path.suffix, *IMAGE_EXTENSIONS):
            for cand in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
                if cand.is_file():
                    return cand
    return None


class TrainImages:
    """All usable training pairs (HR uint8, LR uint8), degraded once and exactly.

    With ``cache=False`` the arrays are written as ``.npy`` files under ``cache_dir`` and
    memory-mapped, so RAM holds only what the page cache keeps and workers share it.
    """

    def __init__(
        self,
        cfg: DataSection,
        scale: int,
        seed: int,
        *,
        cache_dir: str | Path | None = None,
        threads: int = 1,
    ) -> None:
        self.scale = scale
        self.lr_patch = cfg.patch_size // scale
        self.report = LoadReport()
        jobs: list[tuple[Path, Path | None]] = []
        for i, root in enumerate(cfg.train_dirs):
            files = find_images(root, f"data.train_dirs[{i}]")
            lr_root = Path(cfg.lr_dirs[i]) if cfg.lr_dirs is not None else None
            if lr_root is not None and not lr_root.is_dir():
                raise ConfigError(f"data.lr_dirs[{i}]: folder {lr_root} does not exist")
            for f in files:
                self.report.found += 1
                if lr_root is None:
                    jobs.append((f, None))
                    continue
                lr = _find_lr(f, Path(root), lr_root, scale)
                if lr is None:
                    log.warning("skipping %s: no LR image for it in %s", f, lr_root)
                    self.report.unpaired.append(str(f))
                else:
                    jobs.append((f, lr))
        if self.report.found == 0:
            raise DataError(
                f"data.train_dirs: no images ({', '.join(IMAGE_EXTENSIONS)}) in "
                f"{', '.join(cfg.train_dirs)}"
            )

        def load_one(job_index: int) -> tuple[np.ndarray, np.ndarray] | str:
            """Decode + degrade one image: (HR, LR), or why it cannot be used."""
            hr_path, lr_path = jobs[job_index]
            try:
                hr = _to_uint8(read_image(hr_path).pixels)
                if lr_path is None:
                    hr = modcrop(hr, scale)
                    lr = degrade(
                        hr,
                        scale,
                        cfg.degradation,
                        noise_sigma=cfg.noise_sigma,
                        seed=_seed_for(seed, _STREAM_NOISE, job_index),
                    )
                else:
                    lr = _to_uint8(read_image(lr_path).pixels)
                    if lr.shape[0] * scale > hr.shape[0] or lr.shape[1] * scale > hr.shape[1]:
                        return (
                            f"LR {lr_path} ({lr.shape[1]}x{lr.shape[0]}) is larger than "
                            f"HR/{scale} ({hr.shape[1]}x{hr.shape[0]})"
                        )
                    hr = hr[: lr.shape[0] * scale, : lr.shape[1] * scale]
            except ImageReadError as exc:
                return str(exc)
            return hr, lr

        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            results = list(pool.map(load_one, range(len(jobs))))

        self.paths: list[Path] = []
        self.hr: list[np.ndarray] = []
        self.lr: list[np.ndarray] = []
        for (hr_path, _), result in zip(jobs, results, strict=True):
            if isinstance(result, str):
                log.warning("skipping unreadable image: %s", result)
                self.report.unreadable.append(str(hr_path))
                continue
            hr, lr = result
            if min(lr.shape[:2]) < self.lr_patch:
                log.warning(
                    "skipping %s: %dx%d is smaller than the %d px patch (x%d)",
                    hr_path,
                    hr.shape[1],
                    hr.shape[0],
                    cfg.patch_size,
                    scale,
                )
                self.report.too_small.append(str(hr_path))
                continue
            self.paths.append(hr_path)
            self.hr.append(np.ascontiguousarray(hr))
            self.lr.append(np.ascontiguousarray(lr))
        self.report.used = len(self.paths)
        if not self.paths:
            raise DataError(
                f"data.train_dirs: none of the {self.report.found} images can be used "
                f"({len(self.report.unreadable)} unreadable, {len(self.report.too_small)} smaller "
                f"than data.patch_size={cfg.patch_size}, {len(self.report.unpaired)} without LR)"
            )
        if not cfg.cache:
            if cache_dir is None:
                raise ValueError("cache_dir is needed when data.cache is false")
            self._memory_map(Path(cache_dir))

    def _memory_map(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for kind, arrays in (("hr", self.hr), ("lr", self.lr)):
            for i, arr in enumerate(arrays):
                path = folder / f"{kind}_{i:06d}.npy"
                np.save(path, arr)
                arrays[i] = np.load(path, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.paths)

    def lr_sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every LR image, for the sampler."""
        return [(a.shape[0], a.shape[1]) for a in self.lr]


class PatchDataset(Dataset):
    """Map-style dataset keyed by :data:`PatchSpec`: returns an aligned (LR, HR) tensor pair."""

    def __init__(self, images: TrainImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, spec: PatchSpec) -> tuple[torch.Tensor, torch.Tensor]:
        index, top, left, code = spec
        s, p = self.images.scale, self.images.lr_patch
        lr = self.images.lr[index][top : top + p, left : left + p]
        hr = self.images.hr[index][top * s : (top + p) * s, left * s : (left + p) * s]
        return to_tensor(augment(lr, code)), to_tensor(augment(hr, code))


class StepBatchSampler:
    """Yields, for each step in ``[start, end)``, this rank's share of the global batch.

    Image order: consecutive global samples walk through a seeded permutation of the images,
    a new permutation per pass ("epoch"). Crop positions and augmentation codes come from a
    generator seeded by ``(seed, step)``. Both are pure functions of ``(seed, step)``.
    """

    def __init__(
        self,
        lr_sizes: Sequence[tuple[int, int]],
        batch_size: int,
        lr_patch: int,
        seed: int,
        *,
        augment: bool = True,
        start: int = 0,
        end: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ConfigError(
                f"data.batch_size: the global batch ({batch_size}) must be divisible by the "
                f"number of processes ({world_size})"
            )
        self.sizes = list(lr_sizes)
        self.batch_size = batch_size
        self.lr_patch = lr_patch
        self.seed = seed
        self.augment = augment
        self.start, self.end = start, end
        self.rank, self.world_size = rank, world_size
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, _STREAM_ORDER, epoch])
            self._perm, self._perm_epoch = rng.permutation(len(self.sizes)), epoch
        return self._perm

    def global_batch(self, step: int) -> list[PatchSpec]:
        """The whole batch of ``step`` (all ranks), as patch specs."""
        n = len(self.sizes)
        rng = np.random.default_rng([self.seed, _STREAM_CROPS, step])
        out: list[PatchSpec] = []
        for j in range(self.batch_size):
            g = step * self.batch_size + j
            index = int(self._order(g // n)[g % n])
            h, w = self.sizes[index]
            top = int(rng.integers(0, h - self.lr_patch + 1))
            left = int(rng.integers(0, w - self.lr_patch + 1))
            code = int(rng.integers(0, 8)) if self.augment else 0
            out.append((index, top, left, code))
        return out

    def __iter__(self) -> Iterator[list[PatchSpec]]:
        share = self.batch_size // self.world_size
        for step in range(self.start, self.end):
            yield self.global_batch(step)[self.rank * share : (self.rank + 1) * share]

    def __len__(self) -> int:
        return max(0, self.end - self.start)
