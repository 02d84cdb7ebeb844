"""16-bit colour PNG: decoded and encoded by libpng (imagecodecs); the chunks are walked here
only to check the CRCs and to find and insert the metadata (iCCP, eXIf)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass

import imagecodecs
import numpy as np

from nlsr.io.codec import ZLIB_LEVEL, CodecError, Decoded
from nlsr.io.metadata import exif_orientation

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: libpng refuses PNGs with more columns or rows than this (its default user limit).
_LIBPNG_MAX_SIDE = 1_000_000
#: Largest ICC profile taken from a compressed PNG iCCP chunk (real profiles are < 1 MiB).
_MAX_ICC_BYTES = 16 << 20


@dataclass(frozen=True)
class PngHeader:
    """The fields of a PNG's IHDR chunk that choose its decoder."""

    width: int
    height: int
    depth: int
    colour_type: int


def png_header(data: bytes) -> PngHeader:
    """The IHDR of a file that starts with the PNG signature."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise CodecError("corrupt PNG: missing IHDR header")
    width, height, depth, ctype = struct.unpack(">IIBB", data[16:26])
    return PngHeader(width, height, depth, ctype)


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(type, body) of every chunk up to IEND, CRCs verified."""
    pos = len(PNG_SIGNATURE)
    while True:
        if pos + 8 > len(data):
            raise CodecError("truncated PNG (ends before the IEND chunk)")
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > len(data):
            raise CodecError(f"truncated PNG (ends inside a {ctype.decode('latin-1')} chunk)")
        body = data[pos + 8 : end - 4]
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(ctype + body) != crc:
            raise CodecError(f"corrupt PNG (CRC mismatch in a {ctype.decode('latin-1')} chunk)")
        yield ctype, body
        if ctype == b"IEND":
            return
        pos = end


def decode_png_colour16(data: bytes, header: PngHeader) -> Decoded:
    """16-bit grey+alpha, RGB or RGBA PNG (any filters, Adam7 or not) -> HxWxC uint16; a tRNS
    colour key becomes an alpha channel (0 where the key matches, 65535 elsewhere)."""
    if max(header.width, header.height) > _LIBPNG_MAX_SIDE:
        raise CodecError(
            f"16-bit colour PNG of {header.width}x{header.height} pixels: libpng reads at most "
            f"{_LIBPNG_MAX_SIDE} columns and rows; save it as TIFF"
        )
    icc = exif = None
    # libpng gets the chunks that define the pixels only, so that it has nothing to warn about
    # on stderr in the others (it still warns once about an Adam7-interlaced file).
    pixels = [PNG_SIGNATURE]
    for ctype, body in _png_chunks(data):
        if ctype in (b"IHDR", b"tRNS", b"IDAT", b"IEND"):
            pixels.append(_png_chunk(ctype, body))
        elif ctype == b"iCCP":
            icc = _png_iccp(body)
        elif ctype == b"eXIf":
            exif = body
    arr = imagecodecs.png_decode(b"".join(pixels))
    if arr.dtype != np.uint16 or arr.shape[:2] != (header.height, header.width):
        raise CodecError(f"libpng returned a {arr.dtype} array of shape {arr.shape}")
    orientation = 1
    if exif is not None:
        with suppress(Exception):  # a broken EXIF block must not make the pixels unreadable
            orientation = exif_orientation(exif)
    return Decoded(arr[:, :, None] if arr.ndim == 2 else arr, orientation, icc, exif)


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


def encode_png16(a: np.ndarray, icc: bytes | None, exif: bytes | None) -> bytes:
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
    ihdr_end = len(PNG_SIGNATURE) + 12 + 13
    return png[:ihdr_end] + extra + png[ihdr_end:]
