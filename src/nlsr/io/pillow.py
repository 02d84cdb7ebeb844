"""Pillow's share of :mod:`nlsr.io`: decoding every file the C codecs of libpng and tifffile do
not take (8-bit PNG, 16-bit grey PNG, JPEG, BMP, WebP, the unusual TIFFs) and encoding all but
16-bit PNG and TIFF."""

from __future__ import annotations

import io
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image as PILImage

from nlsr.io.codec import ZLIB_LEVEL, CodecError, Decoded, check_size
from nlsr.io.metadata import EXIF_ORIENTATION, EXIF_PREFIX, tiff_exif

#: Pillow formats :func:`~nlsr.io.read_image` accepts ("JPEG" includes the MPO files cameras
#: write).
_PILLOW_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
#: Largest EXIF block a JPEG APP1 segment holds (after its ``Exif\0\0`` prefix).
_JPEG_MAX_EXIF = 65533 - len(EXIF_PREFIX)

_PILLOW_LOCK = threading.Lock()


@contextmanager
def _pillow_unlimited() -> Iterator[None]:
    """Switch off Pillow's own pixel limit while a header is parsed: :func:`check_size` applies
    nlsr's limit instead, which the caller may set higher than Pillow's."""
    with _PILLOW_LOCK:
        saved = PILImage.MAX_IMAGE_PIXELS
        PILImage.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            PILImage.MAX_IMAGE_PIXELS = saved


def decode_pillow(data: bytes, max_pixels: int | None) -> Decoded:
    """Decode a file with Pillow, its size checked against ``max_pixels`` before the pixels;
    Pillow's UnidentifiedImageError when it is no format of ours."""
    with _pillow_unlimited():
        im = PILImage.open(io.BytesIO(data), formats=_PILLOW_FORMATS)
    with im:
        check_size(im.width, im.height, max_pixels)
        try:
            orientation = int(im.getexif().get(EXIF_ORIENTATION, 1))
        except (OSError, SyntaxError, ValueError, TypeError, struct.error):
            orientation = 1
        array = _pillow_array(im)
        icc = im.info.get("icc_profile")
        exif = tiff_exif(data) if im.format == "TIFF" else im.info.get("exif")
    return Decoded(array, orientation, icc or None, exif if isinstance(exif, bytes) else None)


def _pillow_array(im: PILImage.Image) -> np.ndarray:
    """Pillow image of any mode -> HxWxC uint8/uint16 array (C: 1 grey, 2 grey+alpha, 3, 4)."""
    mode = im.mode
    if mode == "F":
        raise CodecError("32-bit floating-point images are not supported")
    if mode == "1":
        im, mode = im.convert("L"), "L"
    if mode in ("L", "RGB") and "transparency" in im.info:
        mode = "LA" if mode == "L" else "RGBA"
        im = im.convert(mode)
    elif mode in ("P", "PA"):
        mode = "RGBA" if mode == "PA" or "transparency" in im.info else "RGB"
        im = im.convert(mode)
    elif mode in ("La", "RGBa"):
        mode = mode.upper()
        im = im.convert(mode)
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        mode = "RGB"
        im = im.convert(mode)
    if mode.startswith("I;16"):
        arr = np.asarray(im).astype(np.uint16)
        key = im.info.get("transparency")
        if isinstance(key, int):  # 16-bit grey PNG with a tRNS colour key
            alpha = np.where(arr == key, 0, 65535).astype(np.uint16)
            arr = np.stack([arr, alpha], axis=2)
    elif mode == "I":
        arr = np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
    elif mode in ("L", "LA", "RGB", "RGBA"):
        arr = np.array(im, dtype=np.uint8)  # a writable copy (asarray can be read-only)
    else:
        raise CodecError(f"unsupported pixel mode {mode!r}")
    return arr[:, :, None] if arr.ndim == 2 else arr


def encode_pillow(
    a: np.ndarray, fmt: str, icc: bytes | None, exif: bytes | None, quality: int | None = None
) -> bytes:
    """HxWxC -> 8-bit PNG, JPEG, BMP or WebP bytes, with the ICC profile and EXIF block where
    the format holds them; 16-bit data is rounded to 8 bits; alpha in JPEG or BMP is an error.
    ``quality`` (JPEG, WebP): None is JPEG quality 95 and lossless WebP."""
    channels = a.shape[2]
    if fmt in ("JPEG", "BMP") and channels in (2, 4):
        raise CodecError(f"{fmt} cannot store an alpha channel; write .png, .tif or .webp instead")
    options: dict[str, object] = {}
    if fmt == "PNG":
        options = {"compress_level": ZLIB_LEVEL}
    elif fmt == "JPEG":
        options = {"quality": 95 if quality is None else quality, "subsampling": 0}
        if exif and len(exif) <= _JPEG_MAX_EXIF:
            options["exif"] = EXIF_PREFIX + exif
    elif fmt == "WEBP":
        options = {"lossless": True, "exact": True} if quality is None else {"quality": quality}
    if fmt != "BMP":
        if icc:
            options["icc_profile"] = icc
        if exif and fmt != "JPEG":
            options["exif"] = exif
    return _pillow_bytes(a if fmt == "PNG" else _to_uint8(a), fmt, **options)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(v / 257), no ties


def _pillow_bytes(a: np.ndarray, fmt: str, **options: object) -> bytes:
    im = PILImage.fromarray(np.ascontiguousarray(a[:, :, 0] if a.shape[2] == 1 else a))
    buf = io.BytesIO()
    im.save(buf, format=fmt, **options)
    return buf.getvalue()
