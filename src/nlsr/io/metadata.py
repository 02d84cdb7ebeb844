"""ICC profiles and EXIF blocks: which profile fits the samples, the EXIF orientation, an
upright EXIF block to carry, and the EXIF of a TIFF file as a stand-alone block."""

from __future__ import annotations

import io
import struct
from contextlib import suppress

from PIL import Image as PILImage

EXIF_ORIENTATION = 0x0112
EXIF_PREFIX = b"Exif\0\0"
#: Text tags of the first EXIF directory that describe the picture (description, make, model,
#: software, date, artist, copyright; the others there describe the file's layout). TIFF output
#: carries them in its own first directory.
EXIF_TEXT_TAGS = (270, 271, 272, 305, 306, 315, 33432)
EXIF_SUB_IFDS = (0x8769, 0x8825)  # the Exif and GPS directories


def icc_fits(profile: bytes | None, channels: int) -> bool:
    """Whether an ICC profile describes samples of this many channels: its colour space
    (bytes 16..20 of the header) must be 'GRAY' for grey(+alpha), 'RGB ' for RGB(A)."""
    if not profile or len(profile) < 128:
        return False
    return profile[16:20] == (b"GRAY" if channels <= 2 else b"RGB ")


def exif_orientation(exif: bytes) -> int:
    """The orientation tag (1..8) of an EXIF block, 1 when it has none."""
    parsed = PILImage.Exif()
    parsed.load(exif)
    return int(parsed.get(EXIF_ORIENTATION, 1))


def upright_exif(exif: bytes) -> bytes | None:
    """An EXIF block (with or without the ``Exif\\0\\0`` prefix) -> TIFF-structured bytes whose
    orientation tag, if any, says 1 (upright); None when the block is not readable."""
    if exif.startswith(EXIF_PREFIX):
        exif = exif[len(EXIF_PREFIX) :]
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
            if tag == EXIF_ORIENTATION and typ in (3, 4) and n == 1:  # SHORT or LONG
                struct.pack_into(order + ("H" if typ == 3 else "I"), out, pos + 8, 1)
    except struct.error:
        return None
    return bytes(out)


def tiff_exif(data: bytes) -> bytes | None:
    """The EXIF of a TIFF file as a stand-alone EXIF block: the descriptive tags of its first
    directory and its Exif and GPS directories (orientation left out: it is applied)."""
    with suppress(Exception):  # a broken EXIF directory must not make the pixels unreadable
        source = PILImage.Exif()
        source.load_from_fp(io.BytesIO(data))
        exif = PILImage.Exif()
        for tag in EXIF_TEXT_TAGS:
            if isinstance(source.get(tag), str):
                exif[tag] = source[tag]
        for tag in EXIF_SUB_IFDS:
            if tag in source and (sub := source.get_ifd(tag)):
                exif[tag] = sub
        if len(exif):
            return exif.tobytes()[len(EXIF_PREFIX) :]
    return None
