"""What the format modules of :mod:`nlsr.io` share: their error, their result and their limits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: zlib level of PNG and TIFF output: level 6 (zlib's default) is up to 4x slower on noisy
#: super-resolved images for files only about 10% smaller.
ZLIB_LEVEL = 3


class CodecError(ValueError):
    """Why a file cannot be decoded or an array encoded; :mod:`nlsr.io` wraps it into
    ImageReadError or ImageWriteError with the path."""


@dataclass(frozen=True)
class Decoded:
    """A decoder's result: the stored samples as HxWxC (C in 1..4) uint8/uint16, before the
    EXIF ``orientation`` is applied, and the file's ICC profile and EXIF block."""

    array: np.ndarray
    orientation: int = 1
    icc_profile: bytes | None = None
    exif: bytes | None = None


def check_size(width: int, height: int, max_pixels: int | None) -> None:
    """Refuse a header's size before decoding: empty, or above ``max_pixels`` (None: no limit)."""
    if width < 1 or height < 1:
        raise CodecError(f"invalid image size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise CodecError(
            f"image is {width}x{height} = {width * height} pixels, above the limit of "
            f"{max_pixels} (possible decompression bomb; raise max_pixels / NLSR_MAX_PIXELS "
            "if the file is trusted)"
        )
