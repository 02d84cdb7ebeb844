"""TIFF: the container by tifffile, the codecs by imagecodecs; files tifffile cannot return as
stored (palette, CMYK, YCbCr, image codecs inside TIFF...) go to Pillow. Every TIFF is written
by tifffile, with its ICC profile and EXIF directories."""

from __future__ import annotations

import io
import logging
import struct
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import numpy as np
import tifffile
from PIL import Image as PILImage
from PIL import TiffImagePlugin, UnidentifiedImageError

from nlsr.io.codec import ZLIB_LEVEL, CodecError, Decoded, check_size
from nlsr.io.metadata import EXIF_SUB_IFDS, EXIF_TEXT_TAGS, tiff_exif
from nlsr.io.pillow import decode_pillow

TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF
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


def decode_tiff(data: bytes, max_pixels: int | None) -> Decoded:
    """The first page of a TIFF file, its size and tile layout checked before any pixel."""
    with _quiet_tifffile(), tifffile.TiffFile(io.BytesIO(data)) as tif:
        if not len(tif.pages):
            raise CodecError("corrupt TIFF (no readable image directory)")
        page = tif.pages.first
        width, height, depth = page.imagewidth, page.imagelength, page.imagedepth
        check_size(width, height, max_pixels)
        if depth != 1:
            raise CodecError(f"3-D TIFF ({depth} slices of {width}x{height}) is not supported")
        if page.is_tiled:
            tile = page.tilewidth * page.tilelength * page.tiledepth
            if tile > max(width * height, _TIFF_TILE_FLOOR):
                raise CodecError(
                    f"corrupt TIFF (tiles of {page.tilewidth}x{page.tilelength} pixels for a "
                    f"{width}x{height} image)"
                )
        if not _tiff_plain(page):
            try:
                return decode_pillow(data, max_pixels)
            except UnidentifiedImageError:
                raise CodecError(f"unsupported TIFF ({_tiff_kind(page)})") from None
            except (OSError, SyntaxError) as e:
                raise CodecError(f"unsupported TIFF ({_tiff_kind(page)}; {e})") from None
        for offset, count in zip(page.dataoffsets, page.databytecounts, strict=False):
            if count and offset + count > len(data):
                raise CodecError("truncated TIFF (image data cut short)")
        arr = page.asarray().reshape(page.shaped)[:, 0]  # (separate samples, H, W, contiguous)
        orientation = int(page.tags.valueof(274, 1))
        icc = page.iccprofile
    arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr[..., 0], 0, -1)
    return Decoded(np.ascontiguousarray(arr), orientation, icc, tiff_exif(data))


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


def encode_tiff(a: np.ndarray, icc: bytes | None, exif: bytes | None) -> bytes:
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
            for tag in EXIF_SUB_IFDS:
                if sub := parsed.get_ifd(tag):
                    sub_ifds[tag] = sub
            for tag in EXIF_TEXT_TAGS:
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
