"""The decoded image type, the file extensions, the errors of reading and writing, and the
pixel limit of reading."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: File extensions nlsr reads and writes (lower case, with the dot).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

#: Largest width * height :func:`~nlsr.io.read_image` decodes unless told otherwise
#: (100 megapixels); guards against decompression bombs. ``$NLSR_MAX_PIXELS`` overrides it.
DEFAULT_MAX_PIXELS = 100_000_000


def default_max_pixels() -> int:
    """``$NLSR_MAX_PIXELS``, else :data:`DEFAULT_MAX_PIXELS`; read at every call (so a bad value
    fails the read that uses it, never ``import nlsr``), ValueError naming it when invalid."""
    raw = os.environ.get("NLSR_MAX_PIXELS")
    if raw is None:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"NLSR_MAX_PIXELS={raw!r}: must be a positive whole number of pixels")
    return value


class ImageReadError(ValueError):
    """An image file could not be read; the message starts with the path and says why."""


class ImageWriteError(ValueError):
    """An image file could not be written; the message starts with the path and says why."""


@dataclass(frozen=True)
class Image:
    """Decoded image: ``pixels`` HxWx3 uint8/uint16 (grey replicated to 3 channels), optional
    ``alpha`` HxW of the same dtype, ``grayscale`` when the source had one colour channel.

    ``icc_profile`` is the source's embedded ICC profile (kept only when its colour space is
    the image's: RGB, or grey for ``grayscale``); ``exif`` its EXIF block as TIFF-structured
    bytes (no ``Exif\\0\\0`` prefix) with the orientation reset to upright, since ``pixels`` are
    already turned. :func:`~nlsr.io.write_image` writes both where the format allows."""

    pixels: np.ndarray
    alpha: np.ndarray | None = None
    grayscale: bool = False
    path: Path | None = None
    icc_profile: bytes | None = None
    exif: bytes | None = None

    def __post_init__(self) -> None:
        p = self.pixels
        if not isinstance(p, np.ndarray) or p.ndim != 3 or p.shape[2] != 3:
            raise ValueError(f"Image.pixels must be an HxWx3 array, got {_describe(p)}")
        if p.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"Image.pixels must be uint8 or uint16, got {p.dtype}")
        if p.shape[0] < 1 or p.shape[1] < 1:
            raise ValueError(f"Image.pixels is empty: shape {p.shape}")
        a = self.alpha
        if a is not None and (
            not isinstance(a, np.ndarray) or a.shape != p.shape[:2] or a.dtype != p.dtype
        ):
            raise ValueError(
                f"Image.alpha must be an {p.shape[0]}x{p.shape[1]} {p.dtype} array, "
                f"got {_describe(a)}"
            )
        for name in ("icc_profile", "exif"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bytes):
                raise ValueError(f"Image.{name} must be bytes or None, got {_describe(value)}")

    @property
    def height(self) -> int:
        """Rows of pixels."""
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        """Columns of pixels."""
        return int(self.pixels.shape[1])


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {a.shape}"
    return type(a).__name__
