"""Reading an image file: the codec chosen from its first bytes, the size checked before any
pixel is decoded, the codecs' failures turned into one ImageReadError, EXIF orientation applied."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import UnidentifiedImageError

from nlsr.io.codec import CodecError, Decoded, check_size
from nlsr.io.image import Image, ImageReadError, default_max_pixels
from nlsr.io.metadata import icc_fits, upright_exif
from nlsr.io.pillow import decode_pillow
from nlsr.io.png import PNG_SIGNATURE, decode_png_colour16, png_header
from nlsr.io.tiff import TIFF_MAGIC, decode_tiff

#: What the codecs raise on a bad file: imagecodecs' errors are RuntimeErrors, tifffile's and
#: Pillow's ValueErrors, OSErrors or SyntaxErrors.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    RuntimeError,
    struct.error,
    zlib.error,
)


def read_image(
    path: str | os.PathLike[str], *, max_pixels: int | Literal["default"] | None = "default"
) -> Image:
    """Read an image file (PNG, JPEG, BMP, TIFF, WebP) as an :class:`Image`, EXIF orientation
    applied, ICC profile and EXIF kept; 16-bit files give uint16 pixels. The header's size is
    checked against ``max_pixels`` (None: no limit; "default": :func:`default_max_pixels`)
    before anything is decoded."""
    if max_pixels == "default":
        max_pixels = default_max_pixels()
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise ImageReadError(f"{p}: is a folder, not an image file") from None
    except OSError as e:
        raise ImageReadError(f"{p}: cannot be read ({e.strerror or e})") from None
    if not data:
        raise ImageReadError(f"{p}: empty file (0 bytes)")
    try:
        decoded = _decode(data, max_pixels)
    except CodecError as e:
        raise ImageReadError(f"{p}: {e}") from None
    except UnidentifiedImageError:
        raise ImageReadError(
            f"{p}: not a supported image file (PNG, JPEG, BMP, TIFF or WebP expected)"
        ) from None
    except MemoryError:
        raise ImageReadError(f"{p}: not enough memory to decode it") from None
    except _DECODE_ERRORS as e:
        raise ImageReadError(f"{p}: corrupt or truncated image ({e})") from None
    a = _orient(decoded.array, decoded.orientation)
    c = a.shape[2]
    colour = a[:, :, :3] if c >= 3 else np.repeat(a[:, :, :1], 3, axis=2)
    alpha = a[:, :, c - 1].copy() if c in (2, 4) else None
    icc = decoded.icc_profile if icc_fits(decoded.icc_profile, c) else None
    exif = upright_exif(decoded.exif) if decoded.exif else None
    return Image(np.ascontiguousarray(colour), alpha, c <= 2, p, icc, exif)


def _decode(data: bytes, max_pixels: int | None) -> Decoded:
    if data.startswith(PNG_SIGNATURE):
        header = png_header(data)
        check_size(header.width, header.height, max_pixels)
        if header.depth == 16 and header.colour_type in (2, 4, 6):
            return decode_png_colour16(data, header)
    elif data[:4] in TIFF_MAGIC:
        return decode_tiff(data, max_pixels)
    return decode_pillow(data, max_pixels)


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to an HxWxC array, as Pillow's ``exif_transpose``."""
    if orientation == 2:
        a = a[:, ::-1]
    elif orientation == 3:
        a = a[::-1, ::-1]
    elif orientation == 4:
        a = a[::-1]
    elif orientation == 5:
        a = a.swapaxes(0, 1)
    elif orientation == 6:
        a = np.rot90(a, -1)
    elif orientation == 7:
        a = a.swapaxes(0, 1)[::-1, ::-1]
    elif orientation == 8:
        a = np.rot90(a, 1)
    return np.ascontiguousarray(a)
