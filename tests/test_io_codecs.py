"""nlsr.io through its C codecs: TIFF of every common compression and layout, 16-bit PNG of every
row filter, the scaling of tall and wide files, pixel limits read from headers, and ICC / EXIF
carried from input to output.

References are independent of nlsr: arrays built here, files written by tifffile, Pillow or a
vectorised PNG row-filter encoder written here from the PNG specification (itself checked
against Pillow's decoder on 8-bit files), and files read back by tifffile or Pillow."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from dataclasses import replace
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import Image as PILImage
from PIL import ImageCms

from nlsr.io import ImageReadError, read_image, write_image

RNG = np.random.default_rng(2024)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COMPRESSIONS = [None, "lzw", "packbits", "zlib", "zstd"]


def noise(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    return RNG.integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)


def as_image(a: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """HxWxC -> the (pixels, alpha) nlsr.read_image is expected to return."""
    c = a.shape[2]
    colour = a[:, :, :3] if c >= 3 else np.repeat(a[:, :, :1], 3, axis=2)
    return colour, (a[:, :, -1] if c in (2, 4) else None)


def assert_reads_as(path: Path, a: np.ndarray) -> None:
    im = read_image(path)
    colour, alpha = as_image(a)
    assert im.pixels.dtype == a.dtype and np.array_equal(im.pixels, colour)
    assert im.grayscale == (a.shape[2] <= 2)
    if alpha is None:
        assert im.alpha is None
    else:
        assert np.array_equal(im.alpha, alpha)


# ----------------------------------------------------------------------------------------------
# a PNG encoder from the specification, vectorised (prediction uses the unfiltered bytes)


def chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def filter_rows(rows: np.ndarray, bpp: int, ftype: int) -> np.ndarray:
    """(H, L) unfiltered bytes -> (H, 1 + L) with every row filtered by ``ftype`` (0..4)."""
    x = rows.astype(np.int16)
    a = np.zeros_like(x)
    a[:, bpp:] = x[:, :-bpp]
    b = np.zeros_like(x)
    b[1:] = x[:-1]
    c = np.zeros_like(x)
    c[1:, bpp:] = x[:-1, :-bpp]
    if ftype == 4:
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    else:
        pred = [np.zeros_like(x), a, b, (a + b) // 2][ftype]
    out = np.empty((rows.shape[0], 1 + rows.shape[1]), np.uint8)
    out[:, 0] = ftype
    out[:, 1:] = (x - pred) & 255
    return out


def png_bytes(a: np.ndarray, ftype: int, extra: bytes = b"") -> bytes:
    """HxWxC uint8/uint16 -> PNG whose every row uses filter ``ftype``; ``extra`` chunks are
    placed before IDAT."""
    h, w, c = a.shape
    depth = 8 * a.itemsize
    rows = np.ascontiguousarray(a.astype(">u2") if depth == 16 else a).view(np.uint8)
    filtered = filter_rows(rows.reshape(h, -1), c * a.itemsize, ftype)
    ihdr = struct.pack(">IIBBBBB", w, h, depth, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(filtered.tobytes(), 6))
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + extra + idat + chunk(b"IEND", b"")


def row_filters(png: bytes) -> np.ndarray:
    """The filter byte of every row of a non-interlaced PNG, parsed independently."""
    pos, idat, ihdr = 8, [], b""
    while pos < len(png):
        (n,) = struct.unpack(">I", png[pos : pos + 4])
        ctype, body = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + n]
        ihdr = body if ctype == b"IHDR" else ihdr
        if ctype == b"IDAT":
            idat.append(body)
        pos += 12 + n
    w, h, depth, ctype = struct.unpack(">IIBB", ihdr[:10])
    row = 1 + w * {0: 1, 2: 3, 4: 2, 6: 4}[ctype] * depth // 8
    return np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, row)[:, 0]


# ----------------------------------------------------------------------------------------------
# PNG


@pytest.mark.parametrize("ftype", [0, 1, 2, 3, 4])
@pytest.mark.parametrize(
    "dtype,channels",
    [(np.uint16, 1), (np.uint16, 2), (np.uint16, 3), (np.uint16, 4), (np.uint8, 3), (np.uint8, 2)],
)
def test_png_every_filter_type(tmp_path: Path, ftype: int, dtype: type, channels: int) -> None:
    a = noise((9, 14, channels), dtype)
    data = png_bytes(a, ftype)
    assert set(row_filters(data).tolist()) == {ftype}
    (tmp_path / "f.png").write_bytes(data)
    assert_reads_as(tmp_path / "f.png", a)
    if dtype == np.uint8:  # the reference encoder agrees with Pillow's decoder
        with PILImage.open(tmp_path / "f.png") as im:
            assert np.array_equal(np.asarray(im), a)


@pytest.mark.parametrize(
    "shape",
    [(4_000_000, 1, 1), (1, 4_000_000, 1), (500_000, 1, 4), (1, 500_000, 3)],
    ids=["grey-1x4M", "grey-4Mx1", "rgba-1x500k", "rgb-500kx1"],
)
def test_tall_and_wide_16bit_paeth_png_decode_exactly(tmp_path: Path, shape: tuple) -> None:
    """The old decoder took one Python step per pixel diagonal (minutes here); these decode
    in C in well under a second (see docs for the 1 x 100,000,000 figure)."""
    n = max(shape[:2])
    a = ((np.arange(n, dtype=np.uint32) * 7919) % 65536).astype(np.uint16)
    a = np.repeat(a.reshape((*shape[:2], 1)), shape[2], axis=2)
    a[..., -1] ^= 0x5A5A  # channels differ
    data = png_bytes(a, 4)
    assert np.all(row_filters(data) == 4)  # Paeth on every row
    (tmp_path / "p.png").write_bytes(data)
    assert_reads_as(tmp_path / "p.png", a)


def test_16bit_png_with_transparency_key_is_alpha(tmp_path: Path) -> None:
    g = noise((5, 6, 1), np.uint16)
    g[1, 2] = 4321
    (tmp_path / "g.png").write_bytes(png_bytes(g, 4, chunk(b"tRNS", struct.pack(">H", 4321))))
    im = read_image(tmp_path / "g.png")
    assert im.grayscale and np.array_equal(im.pixels[:, :, 0], g[:, :, 0])
    assert np.array_equal(im.alpha, np.where(g[:, :, 0] == 4321, 0, 65535))


def test_16bit_png_write_is_bit_exact_for_independent_readers(tmp_path: Path) -> None:
    for channels in (1, 2, 3, 4):
        a = noise((17, 19, channels), np.uint16)
        path = write_image(tmp_path / f"w{channels}.png", a, overwrite=True)
        decoded = imagecodecs.png_decode(path.read_bytes())
        assert np.array_equal(decoded.reshape(a.shape), a)
        assert set(row_filters(path.read_bytes()).tolist()) <= {0, 1, 2}  # None, Sub, Up
        assert_reads_as(path, a)


# ----------------------------------------------------------------------------------------------
# TIFF


def tiff_bytes(a: np.ndarray, compression: str | None, layout: str, **kw: object) -> bytes:
    """Write with tifffile: layout "strips", "tiles" or "planar" (one plane per sample)."""
    c = a.shape[2]
    kw.setdefault("photometric", "rgb" if c >= 3 else "minisblack")
    if c in (2, 4):
        kw.setdefault("extrasamples", ("unassalpha",))
    data: np.ndarray = a[:, :, 0] if c == 1 else a
    if layout == "tiles":
        kw["tile"] = (16, 32)
    elif layout == "planar" and c > 1:
        data, kw["planarconfig"] = np.moveaxis(a, 2, 0), "separate"
    elif layout == "strips":
        kw["rowsperstrip"] = 4
    buf = io.BytesIO()
    predictor = compression in ("lzw", "zlib", "zstd")
    tifffile.imwrite(buf, data, compression=compression, predictor=predictor, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("layout", ["strips", "tiles", "planar"])
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_tiff_every_compression_and_layout(
    tmp_path: Path, compression: str | None, layout: str, channels: int
) -> None:
    a = noise((21, 37, channels), np.uint16)
    data = tiff_bytes(a, compression, layout)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:  # the file is what the case says
        page = tif.pages.first
        assert page.is_tiled == (layout == "tiles")
        assert page.compression == {None: 1, "lzw": 5, "packbits": 32773, "zlib": 8}.get(
            compression, 50000
        )
    (tmp_path / "t.tif").write_bytes(data)
    assert_reads_as(tmp_path / "t.tif", a)


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("layout", ["strips", "tiles"])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_8bit_tiff_every_compression_and_layout(
    tmp_path: Path, compression: str | None, layout: str, channels: int
) -> None:
    a = noise((21, 37, channels), np.uint8)
    (tmp_path / "t.tiff").write_bytes(tiff_bytes(a, compression, layout))
    assert_reads_as(tmp_path / "t.tiff", a)


def test_multipage_tiff_gives_its_first_page_and_big_endian_reads(tmp_path: Path) -> None:
    first, second = noise((8, 9, 3), np.uint16), noise((30, 40, 3), np.uint16)
    with tifffile.TiffWriter(tmp_path / "m.tif", byteorder=">") as w:
        w.write(first, photometric="rgb", compression="lzw")
        w.write(second, photometric="rgb", compression="zstd")
    assert_reads_as(tmp_path / "m.tif", first)
    # the second page's size does not count against the limit
    assert read_image(tmp_path / "m.tif", max_pixels=72).width == 9


def test_jpeg_inside_tiff_goes_to_libtiff_which_checks_its_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = noise((16, 24, 3), np.uint8)
    (tmp_path / "j.tif").write_bytes(tiff_bytes(a, "jpeg", "strips", photometric="ycbcr"))
    with PILImage.open(tmp_path / "j.tif") as im:
        assert np.array_equal(read_image(tmp_path / "j.tif").pixels, np.asarray(im))
    # a 16x16 RGB TIFF whose JPEG strip says 4000x4000: refused before that is allocated
    data = bytearray(tiff_with(a[:16, :16], {}))
    big = imagecodecs.jpeg8_encode(np.zeros((4000, 4000, 3), np.uint8), level=50)
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        tags = tif.pages.first.tags
        places = tags[259].valueoffset, tags[273].valueoffset, tags[279].valueoffset
    struct.pack_into("<H", data, places[0], 7)  # JPEG compression
    struct.pack_into("<I", data, places[1], len(data))
    struct.pack_into("<I", data, places[2], len(big))
    (tmp_path / "bomb.tif").write_bytes(bytes(data) + big)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", no_decoding)
    with pytest.raises(ImageReadError, match=r"unsupported TIFF .*jpeg compression"):
        read_image(tmp_path / "bomb.tif")


def test_tiff_orientation_tag_is_applied(tmp_path: Path) -> None:
    a = noise((5, 8, 3), np.uint16)
    (tmp_path / "o.tif").write_bytes(tiff_bytes(a, "zlib", "strips", extratags=[(274, 3, 1, 6)]))
    assert_reads_as(tmp_path / "o.tif", np.rot90(a, -1))


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_tiff_write_is_bit_exact_deflate_with_predictor(
    tmp_path: Path, channels: int, dtype: type
) -> None:
    a = noise((300, 500, channels), dtype)
    path = write_image(tmp_path / "w.tif", a)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        assert np.array_equal(page.asarray().reshape(a.shape), a)
        assert (page.compression, page.predictor) == (8, 2)  # Deflate, horizontal
        row = 500 * channels * a.itemsize  # strips of at most 256 KiB, as many rows as fit
        assert page.rowsperstrip == min(300, (1 << 18) // row)
        assert page.extrasamples == ((2,) if channels in (2, 4) else ())  # unassociated
    assert_reads_as(path, a)


# ----------------------------------------------------------------------------------------------
# bounded work: sizes come from headers, bad files give ImageReadError


def tiff_with(a: np.ndarray, patches: dict[int, int], **kw: object) -> bytes:
    """A tifffile-written TIFF with some LONG/SHORT tag values overwritten in place."""
    data = bytearray(tiff_bytes(a, "zlib", "strips", **kw))
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        tags = tif.pages.first.tags
        for code, value in patches.items():
            tag = tags[code]
            fmt = "<" + {3: "H", 4: "I"}[int(tag.dtype)]
            struct.pack_into(fmt, data, tag.valueoffset, value)
    return bytes(data)


def no_decoding(*args: object, **kw: object) -> None:
    raise AssertionError("pixel data decoded before the size check")


@pytest.mark.parametrize("kind", ["tiff", "tiled-tiff", "bigtiff", "png-rgba16", "png-grey16"])
def test_pixel_limit_from_the_header_without_allocating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    a = noise((16, 16, 4 if kind == "png-rgba16" else 3), np.uint16)
    if kind.startswith("png"):
        if kind == "png-grey16":
            a = a[:, :, :1]
        data = bytearray(png_bytes(a, 4))
        struct.pack_into(">II", data, 16, 200_000, 300_000)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    else:
        kw: dict[str, object] = {"tile": (16, 16)} if kind == "tiled-tiff" else {}
        if kind == "bigtiff":
            kw["bigtiff"] = True
            buf = io.BytesIO()
            tifffile.imwrite(buf, a, photometric="rgb", **kw)
            data = bytearray(buf.getvalue())
            with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
                for code, value in ((256, 200_000), (257, 300_000)):
                    tag = tif.pages.first.tags[code]
                    fmt = "<" + {3: "H", 4: "I", 16: "Q"}[int(tag.dtype)]
                    struct.pack_into(fmt, data, tag.valueoffset, value)
        else:
            data = bytearray(tiff_with(a, {256: 200_000, 257: 300_000}, **kw))
    path = tmp_path / ("bomb.png" if kind.startswith("png") else "bomb.tif")
    path.write_bytes(bytes(data))
    monkeypatch.setattr(imagecodecs, "png_decode", no_decoding)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", no_decoding)
    monkeypatch.setattr(PILImage.Image, "load", no_decoding)
    tracemalloc.start()
    try:
        with pytest.raises(ImageReadError, match="200000x300000 = 60000000000 pixels") as err:
            read_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(err.value).startswith(f"{path}: ") and "above the limit" in str(err.value)
    assert peak < 4 << 20


def test_16bit_colour_png_beyond_libpng_limit_is_refused_from_the_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = bytearray(png_bytes(noise((4, 1, 3), np.uint16), 0))
    struct.pack_into(">I", data, 20, 1_000_001)  # height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    (tmp_path / "tall.png").write_bytes(bytes(data))
    monkeypatch.setattr(imagecodecs, "png_decode", no_decoding)
    with pytest.raises(ImageReadError, match="libpng reads at most 1000000"):
        read_image(tmp_path / "tall.png")


def test_bad_tiff_files_give_read_errors_naming_the_file(tmp_path: Path) -> None:
    a = noise((40, 50, 3), np.uint16)
    good = tiff_bytes(a, "zlib", "strips")
    cases = {
        "truncated": good[: len(good) // 2],
        "not a TIFF": b"II*\0" + bytes(range(256)) * 4,
        # tiles far larger than the image: a bomb in the tile buffer
        "tiles of 65536x65536": tiff_with(a, {322: 65536, 323: 65536}, tile=(16, 16)),
    }
    corrupt = bytearray(good)
    with tifffile.TiffFile(io.BytesIO(good)) as tif:
        offset, count = tif.pages.first.dataoffsets[2], tif.pages.first.databytecounts[2]
    corrupt[offset + count // 2 : offset + count // 2 + 8] = b"\xff" * 8
    cases["corrupt"] = bytes(corrupt)
    buf = io.BytesIO()
    tifffile.imwrite(
        buf, noise((3, 8, 8), np.uint16), photometric="minisblack", volumetric=True, tile=(16, 16)
    )
    cases["3-D TIFF"] = buf.getvalue()
    for expected, data in cases.items():
        path = tmp_path / "bad.tif"
        path.write_bytes(data)
        with pytest.raises(ImageReadError) as err:
            read_image(path)
        message = str(err.value)
        assert message.startswith(f"{path}: ")
        assert expected in message or (expected == "not a TIFF" and "corrupt" in message)


# ----------------------------------------------------------------------------------------------
# ICC profiles and EXIF


SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
#: a grey ICC profile header (carried as bytes: only its colour space field matters here)
GREY_ICC = struct.pack(">I", 132) + bytes(12) + b"GRAYXYZ " + bytes(12) + b"acsp" + bytes(92)


def exif_block(orientation: int = 6) -> bytes:
    exif = PILImage.Exif()
    exif[271], exif[272], exif[0x0112] = "Canon", "EOS R", orientation
    exif.get_ifd(0x8769).update({33434: 1 / 250, 36867: "2024:05:06 07:08:09", 37500: b"mk\0x"})
    exif.get_ifd(0x8825)[1] = "N"
    return exif.tobytes()


def assert_metadata(path: Path, icc: bytes | None) -> None:
    """Pillow, independently, finds the ICC profile and the EXIF (upright) in ``path``."""
    with PILImage.open(path) as im:
        assert im.info.get("icc_profile") == icc
        exif = im.getexif()
        assert (exif.get(271), exif.get(272)) == ("Canon", "EOS R")
        assert exif.get(0x0112, 1) == 1
        sub = exif.get_ifd(0x8769)
        assert (float(sub[33434]), sub[36867]) == (0.004, "2024:05:06 07:08:09")
        assert sub[37500] == b"mk\0x"  # MakerNote, undefined bytes
        assert exif.get_ifd(0x8825)[1] == "N"


@pytest.mark.parametrize("source", ["jpg", "png", "png16", "tif", "tif16", "webp"])
def test_icc_and_exif_are_carried_to_every_format_that_holds_them(
    tmp_path: Path, source: str
) -> None:
    a = noise((6, 10, 3), np.uint8)
    src = tmp_path / f"in.{source.rstrip('16')}"
    if source == "png16":
        extra = chunk(b"iCCP", b"sRGB\0\0" + zlib.compress(SRGB))
        extra += chunk(b"eXIf", exif_block()[6:])
        src.write_bytes(png_bytes(a.astype(np.uint16) * 257, 4, extra))
    elif source == "tif16":  # tifffile writes the ICC tag; the EXIF directory goes via nlsr
        src.write_bytes(tiff_bytes(a.astype(np.uint16) * 257, "lzw", "tiles", iccprofile=SRGB))
    else:
        options = {"jpg": {"quality": 100}, "webp": {"lossless": True}}.get(source, {})
        PILImage.fromarray(a).save(src, icc_profile=SRGB, exif=exif_block(), **options)
    im = read_image(src)
    assert im.icc_profile == SRGB
    if source == "tif16":
        im = replace(im, exif=exif_block())
    else:  # orientation 6 was applied, and the carried EXIF says upright
        parsed = PILImage.Exif()
        parsed.load(im.exif)
        assert im.width == 6 and parsed.get(0x0112, 1) == 1 and parsed[271] == "Canon"
    eight = im.pixels if im.pixels.dtype == np.uint8 else (im.pixels // 257).astype(np.uint8)
    for ext in (".png", ".tif", ".jpg", ".webp"):
        for deep in (False, True):
            out = tmp_path / f"out{int(deep)}{ext}"
            pixels = eight.astype(np.uint16) * 257 if deep else eight
            write_image(out, replace(im, pixels=pixels), overwrite=True)
            assert_metadata(out, SRGB)
            back = read_image(out)
            assert back.icc_profile == SRGB and back.exif is not None
            if ext != ".jpg":  # lossless; WebP holds 8 bits
                assert np.array_equal(back.pixels, pixels if ext != ".webp" else eight)
    write_image(tmp_path / "out.bmp", im)  # BMP holds neither: written without them
    assert read_image(tmp_path / "out.bmp").icc_profile is None


def test_icc_profile_of_another_colour_space_is_dropped(tmp_path: Path) -> None:
    g = noise((7, 9), np.uint8)
    PILImage.fromarray(g).save(tmp_path / "g.png", icc_profile=GREY_ICC)
    PILImage.fromarray(g).save(tmp_path / "g_rgb.png", icc_profile=SRGB)
    grey = read_image(tmp_path / "g.png")
    assert grey.grayscale and grey.icc_profile == GREY_ICC
    assert read_image(tmp_path / "g_rgb.png").icc_profile is None  # RGB profile, grey pixels
    write_image(tmp_path / "g16.png", replace(grey, pixels=grey.pixels.astype(np.uint16) * 257))
    write_image(tmp_path / "g.tif", grey)
    for name in ("g16.png", "g.tif"):
        assert read_image(tmp_path / name).icc_profile == GREY_ICC
    # an RGB image carrying a grey profile writes none
    rgb = replace(read_image(tmp_path / "g.png"), grayscale=False)
    write_image(tmp_path / "c.png", rgb)
    with PILImage.open(tmp_path / "c.png") as im:
        assert "icc_profile" not in im.info
    # CMYK pixels are converted to RGB: their CMYK profile no longer applies
    cmyk_icc = GREY_ICC[:16] + b"CMYK" + GREY_ICC[20:]
    PILImage.fromarray(noise((8, 8, 4), np.uint8), "CMYK").save(
        tmp_path / "k.jpg", icc_profile=cmyk_icc
    )
    assert read_image(tmp_path / "k.jpg").icc_profile is None


def test_nlsr_upscale_carries_icc_and_exif_from_input_to_output(tmp_path: Path) -> None:
    """The CLI's whole path: read, upscale (MATLAB bicubic here), write; metadata survives."""
    from nlsr.cli import main

    src = tmp_path / "in.jpg"
    PILImage.fromarray(noise((12, 10, 3), np.uint8)).save(src, icc_profile=SRGB, exif=exif_block())
    for ext in ("png", "tif", "jpg"):
        out = tmp_path / f"out.{ext}"
        assert main(["upscale", str(src), "-o", str(out), "--model", "bicubic"]) == 0
        assert read_image(out).pixels.shape == (20, 24, 3)  # upright (orientation 6), x2
        assert_metadata(out, SRGB)


def _quantization(data: bytes) -> dict[int, list[int]]:
    with PILImage.open(io.BytesIO(data)) as im:
        return {k: list(v) for k, v in im.quantization.items()}


def test_jpeg_and_webp_quality(tmp_path: Path) -> None:
    a = noise((24, 20, 3), np.uint8)

    def pillow_jpeg(quality: int) -> bytes:
        buf = io.BytesIO()
        PILImage.fromarray(a).save(buf, format="JPEG", quality=quality, subsampling=0)
        return buf.getvalue()

    default = write_image(tmp_path / "d.jpg", a).read_bytes()
    q40 = write_image(tmp_path / "q40.jpg", a, quality=40).read_bytes()
    assert _quantization(default) == _quantization(pillow_jpeg(95))  # the default stays 95
    assert _quantization(q40) == _quantization(pillow_jpeg(40)) != _quantization(default)
    # WebP: lossless (a VP8L bitstream) unless a quality asks for lossy VP8
    lossless = write_image(tmp_path / "l.webp", a).read_bytes()
    lossy = write_image(tmp_path / "q.webp", a, quality=75).read_bytes()
    assert lossless[:4] == lossy[:4] == b"RIFF" and lossless[12:16] == b"VP8L"
    assert lossy[12:16] == b"VP8 "
    assert np.array_equal(read_image(tmp_path / "l.webp").pixels, a)


@pytest.mark.parametrize(
    "name,quality,message",
    [
        ("a.png", 90, "quality applies to JPEG and WebP only, not PNG"),
        ("a.tif", 90, "not TIFF"),
        ("a.jpg", 0, "quality must be a whole number from 1 to 100"),
        ("a.webp", 101, "from 1 to 100"),
        ("a.jpg", 90.0, "from 1 to 100"),
        ("a.jpg", True, "from 1 to 100"),
    ],
)
def test_bad_quality_is_refused_naming_the_file(
    tmp_path: Path, name: str, quality: object, message: str
) -> None:
    from nlsr.io import ImageWriteError

    with pytest.raises(ImageWriteError, match=message) as info:
        write_image(tmp_path / name, noise((4, 4, 3), np.uint8), quality=quality)  # type: ignore[arg-type]
    assert str(info.value).startswith(str(tmp_path / name))
    assert not (tmp_path / name).exists()
