"""Read and write images of every common kind, with clear errors and atomic writes.

Codecs, all maintained C libraries (no pixel is decoded in Python):

- 16-bit colour PNG (grey+alpha, RGB, RGBA) is read and written by ``imagecodecs`` (libpng).
- TIFF of grey or RGB(A) samples of 8 or 16 bits, uncompressed or LZW, PackBits, Deflate, zstd
  or LZMA, in strips or tiles, contiguous or planar, is read by ``tifffile`` with the codecs of
  ``imagecodecs`` (the first page of a multi-page file). Every TIFF is written by ``tifffile``:
  Deflate with the horizontal predictor.
- Everything else, including 8-bit PNG, 16-bit grey PNG and the other TIFFs (palette, CMYK,
  YCbCr, JPEG-compressed...), goes through Pillow, which has no 16-bit colour modes (it keeps
  only the high byte of 16-bit RGB PNGs).

Why imagecodecs + tifffile rather than OpenCV (the other maintained option): they return the
stored samples exactly (OpenCV returns BGR and turns grey+alpha into four channels), raise
exceptions that say what is wrong (``cv2.imdecode`` returns None), expose every TIFF tag (size,
layout, ICC profile, EXIF) before any pixel is decoded, and install at half the size. Both use
libpng, which refuses PNGs wider or taller than 1,000,000 pixels: 16-bit grey PNGs of that
shape are read by Pillow, 16-bit colour ones are refused with that reason.

Colour management is not applied: the stored sample values are returned as they are. The ICC
profile and the EXIF block are returned with the pixels (:attr:`Image.icc_profile`,
:attr:`Image.exif`) and written back by :func:`write_image` where the format holds them (PNG,
JPEG, TIFF, WebP). EXIF orientation is applied on reading, and the carried EXIF then says
"upright".
"""

from __future__ import annotations

import io
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import imagecodecs
import numpy as np
import tifffile
from PIL import Image as PILImage
from PIL import TiffImagePlugin, UnidentifiedImageError

from nlsr.atomic import atomic_write

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "Image",
    "ImageReadError",
    "ImageWriteError",
    "default_max_pixels",
    "read_image",
    "write_image",
]

#: File extensions nlsr reads and writes (lower case, with the dot).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

_FORMAT_BY_EXTENSION = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
}
#: Pillow formats :func:`read_image` accepts ("JPEG" includes the MPO files cameras write).
_PILLOW_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
_EXIF_ORIENTATION = 0x0112
_EXIF_PREFIX = b"Exif\0\0"
_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF


#: Largest width * height :func:`read_image` decodes unless told otherwise (100 megapixels);
#: guards against decompression bombs. ``$NLSR_MAX_PIXELS`` overrides it.
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


class _Corrupt(ValueError):
    """Internal: reason a file cannot be decoded (wrapped into ImageReadError with the path)."""


@dataclass(frozen=True)
class Image:
    """Decoded image: ``pixels`` HxWx3 uint8/uint16 (grey replicated to 3 channels), optional
    ``alpha`` HxW of the same dtype, ``grayscale`` when the source had one colour channel.

    ``icc_profile`` is the source's embedded ICC profile (kept only when its colour space is
    the image's: RGB, or grey for ``grayscale``); ``exif`` its EXIF block as TIFF-structured
    bytes (no ``Exif\\0\\0`` prefix) with the orientation reset to upright, since ``pixels`` are
    already turned. :func:`write_image` writes both where the format allows."""

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


# ----------------------------------------------------------------------------------------------
# reading

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


@dataclass(frozen=True)
class _Decoded:
    array: np.ndarray  # HxWxC, C in 1..4, uint8/uint16
    orientation: int = 1
    icc_profile: bytes | None = None
    exif: bytes | None = None


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
    except _Corrupt as e:
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
    icc = decoded.icc_profile if _icc_fits(decoded.icc_profile, c) else None
    exif = _upright_exif(decoded.exif) if decoded.exif else None
    return Image(np.ascontiguousarray(colour), alpha, c <= 2, p, icc, exif)


def _decode(data: bytes, max_pixels: int | None) -> _Decoded:
    if data.startswith(_PNG_SIGNATURE):
        header = _png_header(data)
        _check_size(header.width, header.height, max_pixels)
        if header.depth == 16 and header.colour_type in (2, 4, 6):
            return _decode_png_colour16(data, header)
    elif data[:4] in _TIFF_MAGIC:
        return _decode_tiff(data, max_pixels)
    return _decode_pillow(data, max_pixels)


def _check_size(width: int, height: int, max_pixels: int | None) -> None:
    if width < 1 or height < 1:
        raise _Corrupt(f"invalid image size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise _Corrupt(
            f"image is {width}x{height} = {width * height} pixels, above the limit of "
            f"{max_pixels} (possible decompression bomb; raise max_pixels / NLSR_MAX_PIXELS "
            "if the file is trusted)"
        )


_PILLOW_LOCK = threading.Lock()


@contextmanager
def _pillow_unlimited() -> Iterator[None]:
    """Switch off Pillow's own pixel limit while a header is parsed: :func:`_check_size` applies
    nlsr's limit instead, which the caller may set higher than Pillow's."""
    with _PILLOW_LOCK:
        saved = PILImage.MAX_IMAGE_PIXELS
        PILImage.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            PILImage.MAX_IMAGE_PIXELS = saved


def _decode_pillow(data: bytes, max_pixels: int | None) -> _Decoded:
    with _pillow_unlimited():
        im = PILImage.open(io.BytesIO(data), formats=_PILLOW_FORMATS)
    with im:
        _check_size(im.width, im.height, max_pixels)
        try:
            orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1))
        except (OSError, SyntaxError, ValueError, TypeError, struct.error):
            orientation = 1
        array = _pillow_array(im)
        icc = im.info.get("icc_profile")
        exif = _tiff_exif(data) if im.format == "TIFF" else im.info.get("exif")
    return _Decoded(array, orientation, icc or None, exif if isinstance(exif, bytes) else None)


def _pillow_array(im: PILImage.Image) -> np.ndarray:
    """Pillow image of any mode -> HxWxC uint8/uint16 array (C: 1 grey, 2 grey+alpha, 3, 4)."""
    mode = im.mode
    if mode == "F":
        raise _Corrupt("32-bit floating-point images are not supported")
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
        raise _Corrupt(f"unsupported pixel mode {mode!r}")
    return arr[:, :, None] if arr.ndim == 2 else arr


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


# ----------------------------------------------------------------------------------------------
# metadata: ICC profiles and EXIF blocks

#: Largest ICC profile taken from a compressed PNG iCCP chunk (real profiles are < 1 MiB).
_MAX_ICC_BYTES = 16 << 20
#: Text tags of the first EXIF directory that describe the picture (description, make, model,
#: software, date, artist, copyright; the others there describe the file's layout). TIFF output
#: carries them in its own first directory.
_EXIF_TEXT_TAGS = (270, 271, 272, 305, 306, 315, 33432)
_EXIF_SUB_IFDS = (0x8769, 0x8825)  # the Exif and GPS directories


def _icc_fits(profile: bytes | None, channels: int) -> bool:
    """Whether an ICC profile describes samples of this many channels: its colour space
    (bytes 16..20 of the header) must be 'GRAY' for grey(+alpha), 'RGB ' for RGB(A)."""
    if not profile or len(profile) < 128:
        return False
    return profile[16:20] == (b"GRAY" if channels <= 2 else b"RGB ")


def _exif_orientation(exif: bytes) -> int:
    parsed = PILImage.Exif()
    parsed.load(exif)
    return int(parsed.get(_EXIF_ORIENTATION, 1))


def _upright_exif(exif: bytes) -> bytes | None:
    """An EXIF block (with or without the ``Exif\\0\\0`` prefix) -> TIFF-structured bytes whose
    orientation tag, if any, says 1 (upright); None when the block is not readable."""
    if exif.startswith(_EXIF_PREFIX):
        exif = exif[len(_EXIF_PREFIX) :]
    if exif[:4] not in (b"II*\0", b"MM\0*"):
        return None
    order = "<" if exif[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack_from(order + "I", exif, 4)
        (count,) = struct.unpack_from(order + "H", exif, ifd)
        out = bytearray(exif)
        for i in range(count):
            pos = ifd + 2 + 12 * i
            tag, typ, n = struct.unpack_from(order + "HHI", exif, pos)
            if tag == _EXIF_ORIENTATION and typ in (3, 4) and n == 1:  # SHORT or LONG
                struct.pack_into(order + ("H" if typ == 3 else "I"), out, pos + 8, 1)
    except struct.error:
        return None
    return bytes(out)


def _tiff_exif(data: bytes) -> bytes | None:
    """The EXIF of a TIFF file as a stand-alone EXIF block: the descriptive tags of its first
    directory and its Exif and GPS directories (orientation left out: it is applied)."""
    with suppress(Exception):  # a broken EXIF directory must not make the pixels unreadable
        source = PILImage.Exif()
        source.load_from_fp(io.BytesIO(data))
        exif = PILImage.Exif()
        for tag in _EXIF_TEXT_TAGS:
            if isinstance(source.get(tag), str):
                exif[tag] = source[tag]
        for tag in _EXIF_SUB_IFDS:
            if tag in source and (sub := source.get_ifd(tag)):
                exif[tag] = sub
        if len(exif):
            return exif.tobytes()[len(_EXIF_PREFIX) :]
    return None


# ----------------------------------------------------------------------------------------------
# PNG: 16-bit colour files are decoded by libpng (imagecodecs); the chunks are walked here only
# to check the CRCs and find the metadata.

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: zlib level of PNG and TIFF output: level 6 (zlib's default) is up to 4x slower on noisy
#: super-resolved images for files only about 10% smaller.
ZLIB_LEVEL = 3
#: libpng refuses PNGs with more columns or rows than this (its default user limit).
_LIBPNG_MAX_SIDE = 1_000_000


@dataclass(frozen=True)
class _PngHeader:
    width: int
    height: int
    depth: int
    colour_type: int


def _png_header(data: bytes) -> _PngHeader:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise _Corrupt("corrupt PNG: missing IHDR header")
    width, height, depth, ctype = struct.unpack(">IIBB", data[16:26])
    return _PngHeader(width, height, depth, ctype)


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(type, body) of every chunk up to IEND, CRCs verified."""
    pos = len(_PNG_SIGNATURE)
    while True:
        if pos + 8 > len(data):
            raise _Corrupt("truncated PNG (ends before the IEND chunk)")
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > len(data):
            raise _Corrupt(f"truncated PNG (ends inside a {ctype.decode('latin-1')} chunk)")
        body = data[pos + 8 : end - 4]
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(ctype + body) != crc:
            raise _Corrupt(f"corrupt PNG (CRC mismatch in a {ctype.decode('latin-1')} chunk)")
        yield ctype, body
        if ctype == b"IEND":
            return
        pos = end


def _decode_png_colour16(data: bytes, header: _PngHeader) -> _Decoded:
    """16-bit grey+alpha, RGB or RGBA PNG (any filters, Adam7 or not) -> HxWxC uint16; a tRNS
    colour key becomes an alpha channel (0 where the key matches, 65535 elsewhere)."""
    if max(header.width, header.height) > _LIBPNG_MAX_SIDE:
        raise _Corrupt(
            f"16-bit colour PNG of {header.width}x{header.height} pixels: libpng reads at most "
            f"{_LIBPNG_MAX_SIDE} columns and rows; save it as TIFF"
        )
    icc = exif = None
    # libpng gets the chunks that define the pixels only, so that it has nothing to warn about
    # on stderr in the others (it still warns once about an Adam7-interlaced file).
    pixels = [_PNG_SIGNATURE]
    for ctype, body in _png_chunks(data):
        if ctype in (b"IHDR", b"tRNS", b"IDAT", b"IEND"):
            pixels.append(_png_chunk(ctype, body))
        elif ctype == b"iCCP":
            icc = _png_iccp(body)
        elif ctype == b"eXIf":
            exif = body
    arr = imagecodecs.png_decode(b"".join(pixels))
    if arr.dtype != np.uint16 or arr.shape[:2] != (header.height, header.width):
        raise _Corrupt(f"libpng returned a {arr.dtype} array of shape {arr.shape}")
    orientation = 1
    if exif is not None:
        with suppress(Exception):  # a broken EXIF block must not make the pixels unreadable
            orientation = _exif_orientation(exif)
    return _Decoded(arr[:, :, None] if arr.ndim == 2 else arr, orientation, icc, exif)


def _png_iccp(body: bytes) -> bytes | None:
    """iCCP chunk body (name, 0, method 0, zlib data) -> the profile, None if unreadable."""
    name_end = body.find(b"\0")
    if name_end < 1 or body[name_end + 1 : name_end + 2] != b"\0":
        return None
    try:
        inflater = zlib.decompressobj()
        profile = inflater.decompress(body[name_end + 2 :], _MAX_ICC_BYTES)
    except zlib.error:
        return None
    return profile if inflater.eof else None


def _png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def _encode_png16(a: np.ndarray, icc: bytes | None, exif: bytes | None) -> bytes:
    """HxWxC uint16 -> PNG by libpng (None/Sub/Up filters, zlib level ZLIB_LEVEL), with iCCP
    and eXIf chunks inserted after IHDR."""
    filters = imagecodecs.PNG.FILTER.NONE | imagecodecs.PNG.FILTER.SUB | imagecodecs.PNG.FILTER.UP
    png = imagecodecs.png_encode(
        np.ascontiguousarray(a[:, :, 0] if a.shape[2] == 1 else a), level=ZLIB_LEVEL, filter=filters
    )
    extra = b""
    if icc:
        extra += _png_chunk(b"iCCP", b"ICC Profile\0\0" + zlib.compress(icc))
    if exif:
        extra += _png_chunk(b"eXIf", exif)
    ihdr_end = len(_PNG_SIGNATURE) + 12 + 13
    return png[:ihdr_end] + extra + png[ihdr_end:]


# ----------------------------------------------------------------------------------------------
# TIFF: container by tifffile, codecs by imagecodecs

#: TIFF photometric interpretations read by tifffile: 1 grey (min is black), 2 RGB. Palette,
#: CMYK, YCbCr, CIELab, bilevel and min-is-white files go to Pillow, which converts them.
_TIFF_GREY, _TIFF_RGB = 1, 2
#: A tile may exceed the image (writers pad small images to 256x256 tiles) up to this size.
_TIFF_TILE_FLOOR = 1 << 20
#: Compressions tifffile decodes into a buffer of the strip's or tile's size, whatever the data
#: claims: none, LZW, Deflate (new and old code), PackBits, LZMA, zstd. Image codecs inside TIFF
#: (JPEG, WebP, JPEG 2000...) allocate what their own header says, so those files go to
#: Pillow, whose libtiff checks that header against the tile first.
_TIFF_BOUNDED_CODECS = frozenset({1, 5, 8, 32946, 32773, 34925, 50000})


def _decode_tiff(data: bytes, max_pixels: int | None) -> _Decoded:
    with _quiet_tifffile(), tifffile.TiffFile(io.BytesIO(data)) as tif:
        if not len(tif.pages):
            raise _Corrupt("corrupt TIFF (no readable image directory)")
        page = tif.pages.first
        width, height, depth = page.imagewidth, page.imagelength, page.imagedepth
        _check_size(width, height, max_pixels)
        if depth != 1:
            raise _Corrupt(f"3-D TIFF ({depth} slices of {width}x{height}) is not supported")
        if page.is_tiled:
            tile = page.tilewidth * page.tilelength * page.tiledepth
            if tile > max(width * height, _TIFF_TILE_FLOOR):
                raise _Corrupt(
                    f"corrupt TIFF (tiles of {page.tilewidth}x{page.tilelength} pixels for a "
                    f"{width}x{height} image)"
                )
        if not _tiff_plain(page):
            try:
                return _decode_pillow(data, max_pixels)
            except UnidentifiedImageError:
                raise _Corrupt(f"unsupported TIFF ({_tiff_kind(page)})") from None
            except (OSError, SyntaxError) as e:
                raise _Corrupt(f"unsupported TIFF ({_tiff_kind(page)}; {e})") from None
        for offset, count in zip(page.dataoffsets, page.databytecounts, strict=False):
            if count and offset + count > len(data):
                raise _Corrupt("truncated TIFF (image data cut short)")
        arr = page.asarray().reshape(page.shaped)[:, 0]  # (separate samples, H, W, contiguous)
        orientation = int(page.tags.valueof(274, 1))
        icc = page.iccprofile
    arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr[..., 0], 0, -1)
    return _Decoded(np.ascontiguousarray(arr), orientation, icc, _tiff_exif(data))


def _tiff_kind(page: tifffile.TiffPage) -> str:
    def name(value: object) -> str:
        return str(getattr(value, "name", value)).lower()

    bits = page.tags.valueof(258, 1)
    bits = "/".join(str(b) for b in sorted(set(bits))) if isinstance(bits, tuple) else bits
    return (
        f"{bits}-bit {name(page.photometric)}, {page.samplesperpixel} samples, "
        f"{name(page.compression)} compression"
    )


@contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """Keep tifffile's warnings about a damaged file off stderr while nlsr reads it: what is
    wrong reaches the caller as an ImageReadError instead."""
    logger = logging.getLogger("tifffile")
    mute = logging.Filter("tifffile.nlsr-muted")  # matches no logger: drops every record
    logger.addFilter(mute)
    try:
        yield
    finally:
        logger.removeFilter(mute)


def _tiff_plain(page: tifffile.TiffPage) -> bool:
    """Grey(+alpha) or RGB(+alpha) samples of unsigned 8 or 16 bits in a bounded compression,
    which tifffile returns as stored. 8-bit premultiplied alpha goes to Pillow, which
    un-premultiplies it."""
    samples = page.samplesperpixel
    return (
        page.compression in _TIFF_BOUNDED_CODECS
        and page.sampleformat == 1
        and page.bitspersample in (8, 16)
        and (
            (page.photometric == _TIFF_GREY and samples in (1, 2))
            or (page.photometric == _TIFF_RGB and samples in (3, 4))
        )
        and not (page.bitspersample == 8 and 1 in page.extrasamples)
    )


def _encode_tiff(a: np.ndarray, icc: bytes | None, exif: bytes | None) -> bytes:
    """HxWxC uint8/uint16 -> little-endian TIFF, Deflate (level ZLIB_LEVEL) with the horizontal
    predictor in ~256 KiB strips, alpha as unassociated; ICC profile tag, EXIF directories."""
    height, width, channels = a.shape
    rows_per_strip = max(1, min(height, (1 << 18) // (width * channels * a.itemsize)))
    extratags: list[tuple[int, str, int, object, bool]] = []
    sub_ifds: dict[int, dict[int, object]] = {}
    if exif:
        with suppress(Exception):  # a broken EXIF block is left out, the pixels are written
            parsed = PILImage.Exif()
            parsed.load(exif)
            for tag in _EXIF_SUB_IFDS:
                if sub := parsed.get_ifd(tag):
                    sub_ifds[tag] = sub
            for tag in _EXIF_TEXT_TAGS:
                if isinstance(value := parsed.get(tag), str) and value.isascii():
                    extratags.append((tag, "s", 0, value, True))
    # tifffile writes no Exif/GPS directory tags: a placeholder tag numbered one higher (no
    # tag sorts between the two, so the directory stays in order) is renamed after writing.
    extratags += [(tag + 1, "I", 1, 0, True) for tag in sub_ifds]
    buf = io.BytesIO()
    tifffile.imwrite(
        buf,
        a[:, :, 0] if channels == 1 else a,
        byteorder="<",
        photometric="rgb" if channels >= 3 else "minisblack",
        planarconfig="contig" if channels > 1 else None,
        extrasamples=("unassalpha",) if channels in (2, 4) else None,
        compression="zlib",
        compressionargs={"level": ZLIB_LEVEL},
        predictor=True,
        rowsperstrip=rows_per_strip,
        iccprofile=icc,
        extratags=extratags,
        metadata=None,
        software=False,
    )
    data = bytearray(buf.getvalue())
    if sub_ifds and data[:4] == b"II*\0":  # BigTIFF output (over 4 GiB) keeps ICC only
        _tiff_attach_ifds(data, sub_ifds)
    return bytes(data)


def _tiff_attach_ifds(data: bytearray, sub_ifds: dict[int, dict[int, object]]) -> None:
    """Append each sub-directory (Exif, GPS) to a classic little-endian TIFF and turn its
    placeholder entry (tag + 1, LONG) in the first directory into the real tag pointing at it.
    Pillow serialises the directories."""
    (ifd0,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd0)
    for i in range(count):
        entry = ifd0 + 2 + 12 * i
        tag = struct.unpack_from("<H", data, entry)[0] - 1
        if tag not in sub_ifds:
            continue
        data += bytes(len(data) % 2)  # directories start on a word boundary
        directory = TiffImagePlugin.ImageFileDirectory_v2(b"II*\0\x08\0\0\0", group=tag)
        for key, value in sub_ifds[tag].items():
            directory[key] = value
        offset = len(data)
        data += directory.tobytes(offset)
        struct.pack_into("<H", data, entry, tag)
        struct.pack_into("<I", data, entry + 8, offset)


# ----------------------------------------------------------------------------------------------
# writing


def write_image(
    path: str | os.PathLike[str], image: Image | np.ndarray, *, overwrite: bool = False
) -> Path:
    """Write ``image`` atomically (temporary file in the same folder, then rename), in the
    format of the extension; refuses to replace an existing file unless ``overwrite``.

    Arrays may be HxW, HxWx1 (grey), HxWx2 (grey+alpha), HxWx3, HxWx4, uint8 or uint16; an
    :class:`Image` with ``grayscale`` is written with one colour channel. 16-bit data stays
    16-bit in PNG and TIFF; JPEG, BMP and WebP hold 8 bits, so it is rounded to
    ``round(v / 257)``. JPEG and BMP cannot store alpha: writing alpha to them is an error.
    JPEG is written at quality 95 without chroma subsampling, WebP losslessly, PNG and TIFF
    with zlib level :data:`ZLIB_LEVEL`. An :class:`Image`'s ICC profile (when its colour
    space fits the channels written) and EXIF block go into PNG (iCCP, eXIf), JPEG (APP2,
    APP1), TIFF (ICC tag, Exif and GPS directories) and WebP; BMP stores neither.
    """
    p = Path(path)
    fmt = _FORMAT_BY_EXTENSION.get(p.suffix.lower())
    if fmt is None:
        raise ImageWriteError(
            f"{p}: unknown image extension {p.suffix!r}; use one of {', '.join(IMAGE_EXTENSIONS)}"
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
        payload = _encode(a, fmt, *_metadata(image, a.shape[2]))
    except _Corrupt as e:
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


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(v / 257), no ties


def _metadata(image: Image | np.ndarray, channels: int) -> tuple[bytes | None, bytes | None]:
    """(ICC profile, upright EXIF block) to write with ``image``: arrays carry none."""
    if not isinstance(image, Image):
        return None, None
    icc = image.icc_profile if _icc_fits(image.icc_profile, channels) else None
    return icc, _upright_exif(image.exif) if image.exif else None


#: Largest EXIF block a JPEG APP1 segment holds (after its ``Exif\0\0`` prefix).
_JPEG_MAX_EXIF = 65533 - len(_EXIF_PREFIX)


def _encode(a: np.ndarray, fmt: str, icc: bytes | None, exif: bytes | None) -> bytes:
    deep = a.dtype == np.uint16
    channels = a.shape[2]
    if fmt == "PNG" and deep:
        return _encode_png16(a, icc, exif)
    if fmt == "TIFF":
        return _encode_tiff(a, icc, exif)
    if fmt in ("JPEG", "BMP") and channels in (2, 4):
        raise _Corrupt(f"{fmt} cannot store an alpha channel; write .png, .tif or .webp instead")
    options: dict[str, object] = {}
    if fmt == "PNG":
        options = {"compress_level": ZLIB_LEVEL}
    elif fmt == "JPEG":
        options = {"quality": 95, "subsampling": 0}
        if exif and len(exif) <= _JPEG_MAX_EXIF:
            options["exif"] = _EXIF_PREFIX + exif
    elif fmt == "WEBP":
        options = {"lossless": True, "exact": True}
    if fmt != "BMP":
        if icc:
            options["icc_profile"] = icc
        if exif and fmt != "JPEG":
            options["exif"] = exif
    return _pillow_bytes(a if fmt == "PNG" else _to_uint8(a), fmt, **options)


def _pillow_bytes(a: np.ndarray, fmt: str, **options: object) -> bytes:
    im = PILImage.fromarray(np.ascontiguousarray(a[:, :, 0] if a.shape[2] == 1 else a))
    buf = io.BytesIO()
    im.save(buf, format=fmt, **options)
    return buf.getvalue()


_EXISTS = "already exists (pass overwrite=True to replace it)"


def _write_file(p: Path, payload: bytes, overwrite: bool) -> None:
    """Write ``payload`` to ``p`` atomically, turning OS errors into ImageWriteError."""
    try:
        atomic_write(p, payload, overwrite=overwrite)
    except FileExistsError:
        raise ImageWriteError(f"{p}: {_EXISTS}") from None
    except OSError as e:
        raise ImageWriteError(f"{p}: cannot write ({e.strerror or e})") from None
