"""Read and write images of every common kind, with clear errors and atomic writes.

Pillow decodes and encodes the 8-bit cases. Pillow has no 16-bit colour modes (it keeps only
the high byte of 16-bit RGB PNGs), so 16-bit PNG and 16-bit multi-channel TIFF are read and
written by the small NumPy + zlib codecs in this module.

Colour management is not applied: ICC profiles and gamma chunks are ignored and the stored
sample values are returned as they are. EXIF orientation is applied on reading.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from PIL import UnidentifiedImageError, features

from nlsr.atomic import atomic_write

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "Image",
    "ImageReadError",
    "ImageWriteError",
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


def _default_max_pixels() -> int:
    raw = os.environ.get("NLSR_MAX_PIXELS")
    if raw is None:
        return 100_000_000
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"NLSR_MAX_PIXELS={raw!r}: must be a positive whole number of pixels")
    return value


#: Largest width * height :func:`read_image` decodes by default (100 megapixels; the
#: environment variable ``NLSR_MAX_PIXELS`` overrides it). Guards against decompression bombs.
DEFAULT_MAX_PIXELS: int = _default_max_pixels()


class ImageReadError(ValueError):
    """An image file could not be read; the message starts with the path and says why."""


class ImageWriteError(ValueError):
    """An image file could not be written; the message starts with the path and says why."""


class _Corrupt(ValueError):
    """Internal: reason a file cannot be decoded (wrapped into ImageReadError with the path)."""


@dataclass(frozen=True)
class Image:
    """Decoded image: ``pixels`` HxWx3 uint8/uint16 (grey replicated to 3 channels), optional
    ``alpha`` HxW of the same dtype, ``grayscale`` when the source had one colour channel."""

    pixels: np.ndarray
    alpha: np.ndarray | None = None
    grayscale: bool = False
    path: Path | None = None

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


def read_image(
    path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image:
    """Read an image file (PNG, JPEG, BMP, TIFF, WebP) as an :class:`Image`, EXIF orientation
    applied; 16-bit files give uint16 pixels. The header's size is checked against
    ``max_pixels`` (None: no limit) before anything is decoded."""
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
        channels, orientation = _decode(data, max_pixels)
    except _Corrupt as e:
        raise ImageReadError(f"{p}: {e}") from None
    except UnidentifiedImageError:
        raise ImageReadError(
            f"{p}: not a supported image file (PNG, JPEG, BMP, TIFF or WebP expected)"
        ) from None
    except MemoryError:
        raise ImageReadError(f"{p}: not enough memory to decode it") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error) as e:
        raise ImageReadError(f"{p}: corrupt or truncated image ({e})") from None
    channels = _orient(channels, orientation)
    return _to_image(channels, p)


def _decode(data: bytes, max_pixels: int | None) -> tuple[np.ndarray, int]:
    """File bytes -> (HxWxC array with C in 1..4, EXIF orientation)."""
    if data.startswith(_PNG_SIGNATURE):
        header = _png_header(data)
        if header.depth == 16:
            _check_size(header.width, header.height, max_pixels)
            return _decode_png(data, header)
    elif data[:4] in (b"II*\0", b"MM\0*"):
        ifd = _tiff_ifd(data)
        if _tiff_is_deep_colour(ifd):
            _check_size(_tiff_int(ifd, 256), _tiff_int(ifd, 257), max_pixels)
            return _decode_tiff(data, ifd), _tiff_int(ifd, 274, 1)
    with _pillow_unlimited():
        im = PILImage.open(io.BytesIO(data), formats=_PILLOW_FORMATS)
    with im:
        _check_size(im.width, im.height, max_pixels)
        try:
            orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1))
        except (OSError, SyntaxError, ValueError, TypeError, struct.error):
            orientation = 1
        return _pillow_array(im), orientation


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


def _to_image(a: np.ndarray, path: Path | None) -> Image:
    c = a.shape[2]
    colour = a[:, :, :3] if c >= 3 else np.repeat(a[:, :, :1], 3, axis=2)
    alpha = a[:, :, c - 1].copy() if c in (2, 4) else None
    return Image(np.ascontiguousarray(colour), alpha, grayscale=c <= 2, path=path)


# ----------------------------------------------------------------------------------------------
# PNG (used for 16-bit files; handles bit depths 8 and 16, colour types 0, 2, 4, 6)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: zlib level of PNG and TIFF output: level 6 (zlib's default) is up to 4x slower on noisy
#: super-resolved images for files only about 10% smaller.
ZLIB_LEVEL = 3
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}
_PNG_COLOUR_TYPE = {c: t for t, c in _PNG_CHANNELS.items()}
#: Adam7 passes: (x0, y0, dx, dy)
_ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)


@dataclass(frozen=True)
class _PngHeader:
    width: int
    height: int
    depth: int
    colour_type: int
    interlace: int


def _png_header(data: bytes) -> _PngHeader:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise _Corrupt("corrupt PNG: missing IHDR header")
    width, height, depth, ctype, _comp, _filter, interlace = struct.unpack(">IIBBBBB", data[16:29])
    return _PngHeader(width, height, depth, ctype, interlace)


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


def _decode_png(data: bytes, header: _PngHeader) -> tuple[np.ndarray, int]:
    """Decode a non-palette 8/16-bit PNG -> (HxWxC uint8/uint16, EXIF orientation)."""
    h = header
    if h.colour_type not in _PNG_CHANNELS or h.depth not in (8, 16) or h.interlace not in (0, 1):
        raise _Corrupt(
            f"unsupported PNG (colour type {h.colour_type}, bit depth {h.depth}, "
            f"interlace {h.interlace})"
        )
    channels = _PNG_CHANNELS[h.colour_type]
    idat: list[bytes] = []
    trns = exif = None
    for ctype, body in _png_chunks(data):
        if ctype == b"IDAT":
            idat.append(body)
        elif ctype == b"tRNS":
            trns = body
        elif ctype == b"eXIf":
            exif = body
    bpp = channels * h.depth // 8
    if h.interlace:
        passes = [
            (x0, y0, dx, dy, -(-(h.width - x0) // dx), -(-(h.height - y0) // dy))
            for x0, y0, dx, dy in _ADAM7
        ]
        passes = [p for p in passes if p[4] > 0 and p[5] > 0]
    else:
        passes = [(0, 0, 1, 1, h.width, h.height)]
    expected = sum(ph * (1 + pw * bpp) for *_, pw, ph in passes)
    try:
        raw = zlib.decompressobj().decompress(b"".join(idat), expected)
    except zlib.error as e:
        raise _Corrupt(f"corrupt PNG image data ({e})") from None
    if len(raw) < expected:
        raise _Corrupt("truncated PNG image data")
    buf = np.frombuffer(raw, np.uint8)
    out = np.empty((h.height, h.width * bpp), np.uint8)
    pos = 0
    for x0, y0, dx, dy, pw, ph in passes:
        n = ph * (1 + pw * bpp)
        rows = _png_unfilter(buf[pos : pos + n].reshape(ph, 1 + pw * bpp), bpp)
        pos += n
        out.reshape(h.height, h.width, bpp)[y0::dy, x0::dx] = rows.reshape(ph, pw, bpp)
    if h.depth == 16:
        arr = out.view(">u2").astype(np.uint16).reshape(h.height, h.width, channels)
    else:
        arr = out.reshape(h.height, h.width, channels)
    if trns is not None and channels in (1, 3):
        key = np.frombuffer(trns[: 2 * channels], ">u2").astype(np.int64)
        if key.size == channels:
            top = (1 << h.depth) - 1
            opaque = (arr != (key & top)).any(axis=2)
            arr = np.concatenate([arr, (opaque * top).astype(arr.dtype)[:, :, None]], axis=2)
    orientation = 1
    if exif is not None:
        with suppress(Exception):  # a broken EXIF block must not make the pixels unreadable
            orientation = _exif_orientation(exif)
    return arr, orientation


def _exif_orientation(exif: bytes) -> int:
    parsed = PILImage.Exif()
    parsed.load(exif)
    return int(parsed.get(_EXIF_ORIENTATION, 1))


def _png_unfilter(scan: np.ndarray, bpp: int) -> np.ndarray:
    """Undo PNG row filtering: (rows, 1 + width*bpp) filtered bytes -> (rows, width*bpp)."""
    height = scan.shape[0]
    width = (scan.shape[1] - 1) // bpp
    ftype = scan[:, 0]
    if ftype.size and ftype.max() > 4:
        raise _Corrupt(f"corrupt PNG (unknown row filter type {int(ftype.max())})")
    raw = scan[:, 1:].reshape(height, width, bpp)
    if not (ftype >= 3).any():
        # None / Sub / Up only: each row is vectorised, rows in order
        out = np.empty_like(raw)
        prev = np.zeros((width, bpp), np.uint8)
        for r in range(height):
            f = ftype[r]
            if f == 0:
                out[r] = raw[r]
            elif f == 1:
                np.cumsum(raw[r], axis=0, dtype=np.uint8, out=out[r])
            else:
                np.add(raw[r], prev, out=out[r])
            prev = out[r]
        return out.reshape(height, width * bpp)
    return _png_unfilter_wavefront(raw, ftype)


def _png_unfilter_wavefront(raw: np.ndarray, ftype: np.ndarray) -> np.ndarray:
    """Average/Paeth rows depend on the pixel to the left, so decode along anti-diagonals: every
    pixel on diagonal r + c = k only needs diagonals k-1 and k-2. On a zero-padded grid of width
    W+1 the pixels of one diagonal lie W apart in memory, so each diagonal is a strided slice."""
    height, width, bpp = raw.shape
    w1 = width + 1
    out = np.zeros(((height + 1) * w1, bpp), np.int16)
    src = np.zeros((height * w1, bpp), np.int16)
    src.reshape(height, w1, bpp)[:, :width] = raw
    fcol = ftype.astype(np.int16)[:, None]
    for k in range(height + width - 1):
        r0, r1 = max(0, k - width + 1), min(height - 1, k)
        n = r1 - r0 + 1
        t0 = r0 * width + k + width + 2  # flat index of pixel (r0, k - r0) in the padded output
        stop = t0 + (n - 1) * width + 1
        a = out[t0 - 1 : stop - 1 : width]
        b = out[t0 - w1 : stop - w1 : width]
        c = out[t0 - w1 - 1 : stop - w1 - 1 : width]
        s0 = r0 * width + k
        x = src[s0 : s0 + (n - 1) * width + 1 : width]
        f = fcol[r0 : r1 + 1]
        pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        pred = np.select([f == 1, f == 2, f == 3, f == 4], [a, b, (a + b) >> 1, paeth], 0)
        out[t0:stop:width] = (x + pred) & 255
    return out.reshape(height + 1, w1, bpp)[1:, 1:].astype(np.uint8).reshape(height, width * bpp)


def _png_filter(rows: np.ndarray, bpp: int) -> np.ndarray:
    """Filter (rows, width*bpp) bytes -> (rows, 1 + width*bpp), choosing None, Sub or Up per row
    by least sum of |signed byte| (libpng's heuristic); these three keep decoding vectorised.
    When encoding a block after the first, pass the previous row first (used as the prior)."""
    sub = rows.copy()
    sub[:, bpp:] -= rows[:, :-bpp]  # uint8 arithmetic wraps modulo 256, as PNG filters do
    up = rows.copy()
    up[1:] -= rows[:-1]
    candidates = np.stack([rows, sub, up])
    score = np.minimum(candidates, np.negative(candidates)).sum(axis=2, dtype=np.uint32)
    choice = score.argmin(axis=0)
    out = np.empty((rows.shape[0], 1 + rows.shape[1]), np.uint8)
    out[:, 0] = choice
    out[:, 1:] = candidates[choice, np.arange(rows.shape[0])]
    return out


def _encode_png(a: np.ndarray) -> bytes:
    """HxWxC uint8/uint16 (C: 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA) -> PNG file bytes."""
    height, width, channels = a.shape
    depth = 16 if a.dtype == np.uint16 else 8
    bpp = channels * depth // 8
    rows = (a.astype(">u2") if depth == 16 else a).reshape(height, width * channels)
    rows = np.ascontiguousarray(rows).view(np.uint8).reshape(height, width * bpp)
    packer = zlib.compressobj(ZLIB_LEVEL)
    idat = []
    block = max(1, (1 << 20) // max(1, width * bpp))
    for r in range(0, height, block):
        if r == 0:
            filtered = _png_filter(rows[:block], bpp)
        else:
            filtered = _png_filter(rows[r - 1 : r + block], bpp)[1:]
        idat.append(packer.compress(filtered.tobytes()))
    idat.append(packer.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, depth, _PNG_COLOUR_TYPE[channels], 0, 0, 0)
    compressed = b"".join(idat)
    pieces = [_PNG_SIGNATURE, _png_chunk(b"IHDR", ihdr)]
    step = 1 << 24
    pieces += [
        _png_chunk(b"IDAT", compressed[i : i + step]) for i in range(0, len(compressed), step)
    ]
    if not compressed:
        pieces.append(_png_chunk(b"IDAT", b""))
    pieces.append(_png_chunk(b"IEND", b""))
    return b"".join(pieces)


def _png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


# ----------------------------------------------------------------------------------------------
# TIFF (used for 16-bit files with more than one sample: grey+alpha, RGB, RGBA)

_TIFF_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8}
_TIFF_INT_TYPE = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i"}


@dataclass(frozen=True)
class _TiffIfd:
    order: str  # "<" or ">"
    tags: dict[int, tuple[int, ...]]


def _tiff_ifd(data: bytes) -> _TiffIfd:
    """The first IFD's integer tags."""
    order = "<" if data[:2] == b"II" else ">"
    if len(data) < 8:
        raise _Corrupt("truncated TIFF header")
    (offset,) = struct.unpack(order + "I", data[4:8])
    if offset + 2 > len(data):
        raise _Corrupt("truncated TIFF (directory missing)")
    (count,) = struct.unpack(order + "H", data[offset : offset + 2])
    tags: dict[int, tuple[int, ...]] = {}
    for i in range(count):
        pos = offset + 2 + 12 * i
        if pos + 12 > len(data):
            raise _Corrupt("truncated TIFF (directory cut short)")
        tag, typ, n = struct.unpack(order + "HHI", data[pos : pos + 8])
        if typ not in _TIFF_INT_TYPE:
            continue
        size = _TIFF_TYPE_SIZE[typ] * n
        if size <= 4:
            start = pos + 8
        else:
            (start,) = struct.unpack(order + "I", data[pos + 8 : pos + 12])
        if start + size > len(data):
            raise _Corrupt("truncated TIFF (tag values missing)")
        tags[tag] = struct.unpack(f"{order}{n}{_TIFF_INT_TYPE[typ]}", data[start : start + size])
    return _TiffIfd(order, tags)


def _tiff_int(ifd: _TiffIfd, tag: int, default: int | None = None) -> int:
    values = ifd.tags.get(tag)
    if not values:
        if default is None:
            raise _Corrupt(f"corrupt TIFF (required tag {tag} missing)")
        return default
    return int(values[0])


def _tiff_is_deep_colour(ifd: _TiffIfd) -> bool:
    bits = ifd.tags.get(258, (1,))
    return _tiff_int(ifd, 277, 1) > 1 and all(b == 16 for b in bits)


def _decode_tiff(data: bytes, ifd: _TiffIfd) -> np.ndarray:
    """Decode a 16-bit chunky TIFF (strips; no, deflate compression; predictor 1 or 2)."""
    width, height = _tiff_int(ifd, 256), _tiff_int(ifd, 257)
    spp = _tiff_int(ifd, 277)
    compression = _tiff_int(ifd, 259, 1)
    predictor = _tiff_int(ifd, 317, 1)
    photometric = _tiff_int(ifd, 262, 2 if spp >= 3 else 1)
    if spp > 4 or (spp == 2 and photometric != 1) or (spp >= 3 and photometric != 2):
        raise _Corrupt(f"unsupported 16-bit TIFF ({spp} samples, photometric {photometric})")
    if _tiff_int(ifd, 284, 1) != 1 or 322 in ifd.tags:
        raise _Corrupt("unsupported 16-bit TIFF layout (planar or tiled); save it as PNG")
    if compression not in (1, 8, 32946) or predictor not in (1, 2):
        raise _Corrupt(
            f"unsupported 16-bit colour TIFF compression {compression} / predictor {predictor} "
            "(none and deflate are supported); save it as PNG"
        )
    offsets, counts = ifd.tags.get(273), ifd.tags.get(279)
    if not offsets or not counts or len(offsets) != len(counts):
        raise _Corrupt("corrupt TIFF (strip offsets missing)")
    row_bytes = width * spp * 2
    rows_per_strip = min(_tiff_int(ifd, 278, height), height)
    parts = []
    for i, (off, n) in enumerate(zip(offsets, counts, strict=True)):
        if off + n > len(data):
            raise _Corrupt("truncated TIFF (image data cut short)")
        chunk = data[off : off + n]
        want = min(rows_per_strip, height - i * rows_per_strip) * row_bytes
        if compression != 1:
            try:
                chunk = zlib.decompressobj().decompress(chunk, want)
            except zlib.error as e:
                raise _Corrupt(f"corrupt TIFF image data ({e})") from None
        parts.append(chunk[:want])
    raw = b"".join(parts)
    if len(raw) < height * row_bytes:
        raise _Corrupt("truncated TIFF image data")
    arr = np.frombuffer(raw, ifd.order + "u2", height * width * spp).astype(np.uint16)
    arr = arr.reshape(height, width, spp)
    if predictor == 2:
        arr = np.cumsum(arr, axis=1, dtype=np.uint16)
    return arr


def _encode_tiff(a: np.ndarray) -> bytes:
    """HxWxC uint16 -> little-endian TIFF, deflate with horizontal predictor, ~256 KiB strips."""
    height, width, spp = a.shape
    diff = a.copy()
    diff[:, 1:] -= a[:, :-1]  # uint16 wraps: predictor 2 works modulo 2**16
    row_bytes = width * spp * 2
    rows_per_strip = max(1, min(height, (1 << 18) // row_bytes))
    strips = [
        zlib.compress(diff[r : r + rows_per_strip].astype("<u2").tobytes(), ZLIB_LEVEL)
        for r in range(0, height, rows_per_strip)
    ]
    ns = len(strips)
    entries: list[tuple[int, int, tuple[int, ...]]] = [
        (256, 4, (width,)),
        (257, 4, (height,)),
        (258, 3, (16,) * spp),
        (259, 3, (8,)),
        (262, 3, (2 if spp >= 3 else 1,)),
        (273, 4, (0,) * ns),  # patched below
        (277, 3, (spp,)),
        (278, 4, (rows_per_strip,)),
        (279, 4, tuple(len(s) for s in strips)),
        (284, 3, (1,)),
        (317, 3, (2,)),
    ]
    if spp in (2, 4):
        entries.append((338, 3, (2,)))  # unassociated alpha
    ifd_size = 2 + 12 * len(entries) + 4
    extra_at = 8 + ifd_size
    extra_size = sum(
        len(v) * _TIFF_TYPE_SIZE[t] for _, t, v in entries if len(v) * _TIFF_TYPE_SIZE[t] > 4
    )
    data_at = extra_at + extra_size
    strip_offsets = []
    pos = data_at
    for s in strips:
        strip_offsets.append(pos)
        pos += len(s)
    if pos >= 1 << 32:
        raise _Corrupt("image too large for a classic TIFF file (4 GiB); write PNG")
    entries[5] = (273, 4, tuple(strip_offsets))
    ifd = [struct.pack("<H", len(entries))]
    extra = []
    for tag, typ, values in entries:
        packed = struct.pack(f"<{len(values)}{_TIFF_INT_TYPE[typ]}", *values)
        if len(packed) <= 4:
            ifd.append(struct.pack("<HHI", tag, typ, len(values)) + packed.ljust(4, b"\0"))
        else:
            ifd.append(struct.pack("<HHII", tag, typ, len(values), extra_at + sum(map(len, extra))))
            extra.append(packed)
    ifd.append(struct.pack("<I", 0))
    return b"".join([b"II*\0", struct.pack("<I", 8), *ifd, *extra, *strips])


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
    with zlib level :data:`ZLIB_LEVEL`.
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
        payload = _encode(a, fmt)
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


def _encode(a: np.ndarray, fmt: str) -> bytes:
    deep = a.dtype == np.uint16
    channels = a.shape[2]
    if fmt == "PNG" and deep:
        return _encode_png(a)
    if fmt == "TIFF" and deep:
        return _encode_tiff(a) if channels > 1 else _pillow_bytes(a, "TIFF")
    if fmt in ("JPEG", "BMP") and channels in (2, 4):
        raise _Corrupt(f"{fmt} cannot store an alpha channel; write .png, .tif or .webp instead")
    options: dict[str, object] = {}
    if fmt == "PNG":
        options = {"compress_level": ZLIB_LEVEL}
    elif fmt == "JPEG":
        options = {"quality": 95, "subsampling": 0}
    elif fmt == "WEBP":
        options = {"lossless": True, "exact": True}
    elif fmt == "TIFF" and features.check("libtiff"):
        options = {"compression": "tiff_adobe_deflate"}
    return _pillow_bytes(a if fmt in ("PNG", "TIFF") else _to_uint8(a), fmt, **options)


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
