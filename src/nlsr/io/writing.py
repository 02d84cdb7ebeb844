"""Writing an image file atomically, in the format of its extension, with the ICC profile and
EXIF block of an :class:`~nlsr.io.image.Image` where the format holds them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nlsr.atomic import atomic_write
from nlsr.io.codec import CodecError
from nlsr.io.image import IMAGE_EXTENSIONS, Image, ImageWriteError
from nlsr.io.metadata import icc_fits, upright_exif
from nlsr.io.pillow import encode_pillow
from nlsr.io.png import encode_png16
from nlsr.io.tiff import encode_tiff

_FORMAT_BY_EXTENSION = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
}


#: Formats ``quality`` applies to.
QUALITY_FORMATS = ("JPEG", "WEBP")


def write_image(
    path: str | os.PathLike[str],
    image: Image | np.ndarray,
    *,
    overwrite: bool = False,
    quality: int | None = None,
) -> Path:
    """Write ``image`` atomically (temporary file in the same folder, then rename), in the
    format of the extension; refuses to replace an existing file unless ``overwrite``.

    Arrays may be HxW, HxWx1 (grey), HxWx2 (grey+alpha), HxWx3, HxWx4, uint8 or uint16; an
    :class:`Image` with ``grayscale`` is written with one colour channel. 16-bit data stays
    16-bit in PNG and TIFF; JPEG, BMP and WebP hold 8 bits, so it is rounded to
    ``round(v / 257)``. JPEG and BMP cannot store alpha: writing alpha to them is an error.
    JPEG is written at ``quality`` (default 95) without chroma subsampling, WebP losslessly or,
    with ``quality`` (1-100), lossy at that quality; PNG and TIFF with zlib level
    :data:`~nlsr.io.codec.ZLIB_LEVEL` (``quality`` is an error for them and BMP). An
    :class:`Image`'s ICC profile (when its colour space fits the channels written) and EXIF
    block go into PNG (iCCP, eXIf), JPEG (APP2, APP1), TIFF (ICC tag, Exif and GPS
    directories) and WebP; BMP stores neither.
    """
    p = Path(path)
    fmt = _FORMAT_BY_EXTENSION.get(p.suffix.lower())
    if fmt is None:
        raise ImageWriteError(
            f"{p}: unknown image extension {p.suffix!r}; use one of {', '.join(IMAGE_EXTENSIONS)}"
        )
    if quality is not None:
        if fmt not in QUALITY_FORMATS:
            raise ImageWriteError(f"{p}: quality applies to JPEG and WebP only, not {fmt}")
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ImageWriteError(
                f"{p}: quality must be a whole number from 1 to 100, got {quality!r}"
            )
    try:
        a = _channels(image)
    except ValueError as e:
        raise ImageWriteError(f"{p}: {e}") from None
    if p.is_dir():
        raise ImageWriteError(f"{p}: is a folder")
    if not p.parent.is_dir():
        raise ImageWriteError(f"{p}: folder {p.parent} does not exist")
    if not overwrite and p.exists():
        raise ImageWriteError(f"{p}: {_EXISTS}")
    try:
        payload = _encode(a, fmt, *_metadata(image, a.shape[2]), quality)
    except CodecError as e:
        raise ImageWriteError(f"{p}: {e}") from None
    except (OSError, ValueError) as e:
        raise ImageWriteError(f"{p}: cannot encode as {fmt} ({e})") from None
    _write_file(p, payload, overwrite)
    return p


def _channels(image: Image | np.ndarray) -> np.ndarray:
    """An Image or array -> HxWxC (C in 1..4) uint8/uint16."""
    if isinstance(image, Image):
        px = image.pixels
        if image.grayscale:
            px = np.rint(px.mean(axis=2, keepdims=True)).astype(px.dtype)
        if image.alpha is not None:
            px = np.concatenate([px, image.alpha[:, :, None]], axis=2)
        return px
    if not isinstance(image, np.ndarray):
        raise ValueError(f"expected an Image or a NumPy array, got {type(image).__name__}")
    a = image[:, :, None] if image.ndim == 2 else image
    if a.ndim != 3 or not 1 <= a.shape[2] <= 4 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"expected an HxW or HxWxC (C = 1..4) array, got shape {image.shape}")
    if a.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected uint8 or uint16 pixels, got {a.dtype}")
    return a


def _metadata(image: Image | np.ndarray, channels: int) -> tuple[bytes | None, bytes | None]:
    """(ICC profile, upright EXIF block) to write with ``image``: arrays carry none."""
    if not isinstance(image, Image):
        return None, None
    icc = image.icc_profile if icc_fits(image.icc_profile, channels) else None
    return icc, upright_exif(image.exif) if image.exif else None


def _encode(
    a: np.ndarray, fmt: str, icc: bytes | None, exif: bytes | None, quality: int | None
) -> bytes:
    if fmt == "PNG" and a.dtype == np.uint16:
        return encode_png16(a, icc, exif)
    if fmt == "TIFF":
        return encode_tiff(a, icc, exif)
    return encode_pillow(a, fmt, icc, exif, quality)


_EXISTS = "already exists (pass overwrite=True to replace it)"


def _write_file(p: Path, payload: bytes, overwrite: bool) -> None:
    """Write ``payload`` to ``p`` atomically, turning OS errors into ImageWriteError."""
    try:
        atomic_write(p, payload, overwrite=overwrite)
    except FileExistsError:
        raise ImageWriteError(f"{p}: {_EXISTS}") from None
    except OSError as e:
        raise ImageWriteError(f"{p}: cannot write ({e.strerror or e})") from None
