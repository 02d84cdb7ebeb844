"""nlsr.io: every format and mode, the 16-bit PNG/TIFF paths, EXIF orientation, bad files and
atomic writes. References: Pillow's own decoders, a naive PNG encoder written here from the
PNG specification, and closed-form expectations."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
from PIL import Image as PILImage
from PIL import ImageOps

import nlsr.io as nio
from nlsr.io import Image, ImageReadError, ImageWriteError, read_image, write_image

RNG = np.random.default_rng(1234)
#: Adam7 passes (x0, y0, dx, dy), from the PNG specification
ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2)]
ADAM7.append((0, 1, 1, 2))


def smooth(h: int, w: int, c: int, dtype: type = np.uint8) -> np.ndarray:
    """A smooth image plus noise (exercises every PNG filter choice)."""
    top = np.iinfo(dtype).max
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 3 + y * 5 + 40 * k) % 200 for k in range(c)], axis=2) / 255
    a = base * top + RNG.integers(0, max(2, top // 40), (h, w, c))
    return np.clip(a, 0, top).astype(dtype)


def chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def chunks(data: bytes) -> list[tuple[bytes, bytes, int]]:
    """(type, body, crc) of every chunk, parsed independently of nlsr."""
    out, pos = [], 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        ctype, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        out.append((ctype, body, crc))
        pos += 12 + n
    return out


def paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def naive_png(arr: np.ndarray, filters: list[int], interlace: bool, extra: bytes = b"") -> bytes:
    """PNG encoder straight from the specification, byte by byte: row filter i uses
    ``filters[i % len(filters)]``; Adam7 interlacing optional."""
    h, w, c = arr.shape
    depth = 16 if arr.dtype == np.uint16 else 8
    bpp = c * depth // 8
    ctype = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    subs = [arr[y0::dy, x0::dx] for x0, y0, dx, dy in ADAM7] if interlace else [arr]
    raw, k = bytearray(), 0
    for sub in subs:
        if sub.size == 0:
            continue
        prior = bytes(sub.shape[1] * bpp)
        for row in sub:
            line = row.astype(">u2").tobytes() if depth == 16 else row.tobytes()
            f = filters[k % len(filters)]
            k += 1
            out = bytearray([f])
            for i, x in enumerate(line):
                a = line[i - bpp] if i >= bpp else 0
                b = prior[i]
                cc = prior[i - bpp] if i >= bpp else 0
                pred = [0, a, b, (a + b) // 2, paeth(a, b, cc)][f]
                out.append((x - pred) % 256)
            raw += out
            prior = line
    ihdr = struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, int(interlace))
    body = chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", zlib.compress(bytes(raw)))
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b"")


def exif_block(orientation: int) -> bytes:
    exif = PILImage.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


# ----------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("ext", [".png", ".tif", ".bmp", ".webp"])
@pytest.mark.parametrize("channels", [0, 1, 2, 3, 4])
def test_lossless_8bit_round_trip(tmp_path: Path, ext: str, channels: int) -> None:
    a = smooth(13, 17, max(channels, 1))
    if channels == 0:
        a = a[:, :, 0]
    path = tmp_path / f"x{ext}"
    if ext == ".bmp" and channels in (2, 4):
        with pytest.raises(ImageWriteError, match="alpha"):
            write_image(path, a)
        assert list(tmp_path.iterdir()) == []
        return
    assert write_image(path, a) == path
    im = read_image(path)
    c = max(channels, 1)
    colour = a.reshape(13, 17, -1)[:, :, : 3 if c >= 3 else 1]
    assert im.pixels.dtype == np.uint8 and im.pixels.shape == (13, 17, 3)
    assert im.pixels.flags.writeable
    assert np.array_equal(im.pixels, np.broadcast_to(colour, (13, 17, 3)))
    if ext != ".webp":  # WebP has no grey mode: grey comes back as equal RGB channels
        assert im.grayscale == (c <= 2)
    if c in (2, 4):
        assert np.array_equal(im.alpha, a[:, :, -1])
    else:
        assert im.alpha is None
    assert im.path == path


def test_jpeg_round_trip_is_close_and_grey_stays_grey(tmp_path: Path) -> None:
    a = smooth(32, 40, 3)
    write_image(tmp_path / "c.jpg", a)
    write_image(tmp_path / "g.jpeg", a[:, :, 1])
    c, g = read_image(tmp_path / "c.jpg"), read_image(tmp_path / "g.jpeg")
    assert np.abs(c.pixels.astype(int) - a).mean() < 3 and not c.grayscale
    assert g.grayscale and np.abs(g.pixels[:, :, 0].astype(int) - a[:, :, 1]).mean() < 3
    with PILImage.open(tmp_path / "g.jpeg") as im:
        assert im.mode == "L"
    with pytest.raises(ImageWriteError, match="alpha"):
        write_image(tmp_path / "a.jpg", smooth(4, 4, 4))


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_png_round_trip_and_structure(tmp_path: Path, channels: int) -> None:
    a = RNG.integers(0, 65536, (19, 23, channels), dtype=np.uint16)
    path = write_image(tmp_path / "deep.png", a)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    parsed = chunks(data)
    assert parsed[0][0] == b"IHDR" and parsed[-1][0] == b"IEND"
    assert all(zlib.crc32(t + b) == crc for t, b, crc in parsed)
    w, h, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", parsed[0][1])
    assert (w, h, depth, ctype) == (23, 19, 16, {1: 0, 2: 4, 3: 2, 4: 6}[channels])
    assert (comp, filt, interlace) == (0, 0, 0)
    im = read_image(path)
    assert im.pixels.dtype == np.uint16 and im.grayscale == (channels <= 2)
    colour = a[:, :, :3] if channels >= 3 else np.repeat(a[:, :, :1], 3, axis=2)
    assert np.array_equal(im.pixels, colour)
    if channels in (2, 4):
        assert np.array_equal(im.alpha, a[:, :, -1])
    # Pillow reads 16-bit colour PNGs by keeping the high byte, grey exactly as I;16
    with PILImage.open(path) as pim:
        ref = np.asarray(pim)
    if channels == 1:
        assert np.array_equal(ref, a[:, :, 0])
    elif channels in (3, 4):
        assert np.array_equal(ref, (a >> 8).astype(np.uint8))


def test_pillow_written_16bit_grey_png_is_read_exactly(tmp_path: Path) -> None:
    g = smooth(41, 37, 1, np.uint16)[:, :, 0]
    PILImage.fromarray(g).save(tmp_path / "g.png")  # Pillow's adaptive filters (incl. Paeth)
    im = read_image(tmp_path / "g.png")
    assert im.grayscale and im.pixels.dtype == np.uint16
    assert np.array_equal(im.pixels[:, :, 0], g)


@pytest.mark.parametrize(
    "dtype,channels",
    [(np.uint8, c) for c in (1, 2, 3, 4)] + [(np.uint16, c) for c in (2, 3, 4)],
)
def test_adaptively_filtered_png_files_are_read_exactly(
    tmp_path: Path, dtype: type, channels: int
) -> None:
    """8-bit files from Pillow's encoder, 16-bit ones from libpng's with every filter allowed:
    both choose filters per row, Paeth among them."""
    a = smooth(45, 52, channels, dtype)
    if dtype == np.uint8:
        mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
        buf = io.BytesIO()
        PILImage.fromarray(a[:, :, 0] if channels == 1 else a, mode).save(buf, "PNG")
        data = buf.getvalue()
    else:
        data = imagecodecs.png_encode(a, filter=imagecodecs.PNG.FILTER.ALL)
    row = 1 + 52 * channels * a.itemsize
    filters = np.frombuffer(
        zlib.decompress(b"".join(b for t, b, _ in chunks(data) if t == b"IDAT")), np.uint8
    ).reshape(45, row)[:, 0]
    assert len(set(filters.tolist())) >= 2  # the file really mixes filter types
    (tmp_path / "a.png").write_bytes(data)
    im = read_image(tmp_path / "a.png")
    colour = a[:, :, :3] if channels >= 3 else np.repeat(a[:, :, :1], 3, axis=2)
    assert im.pixels.dtype == dtype and np.array_equal(im.pixels, colour)
    if channels in (2, 4):
        assert np.array_equal(im.alpha, a[:, :, -1])


@pytest.mark.parametrize("interlace", [False, True])
@pytest.mark.parametrize(
    "dtype,channels",
    [(np.uint8, 3), (np.uint16, 3), (np.uint16, 4), (np.uint16, 2), (np.uint16, 1)],
)
def test_png_decoder_against_naive_encoder_every_filter(
    tmp_path: Path, interlace: bool, dtype: type, channels: int
) -> None:
    a = smooth(11, 13, channels, dtype)
    data = naive_png(a, filters=[4, 3, 1, 2, 0, 4, 4, 3], interlace=interlace)
    (tmp_path / "n.png").write_bytes(data)
    im = read_image(tmp_path / "n.png")
    colour = a[:, :, :3] if channels >= 3 else np.repeat(a[:, :, :1], 3, axis=2)
    assert im.pixels.dtype == dtype and np.array_equal(im.pixels, colour)
    if channels in (2, 4):
        assert np.array_equal(im.alpha, a[:, :, -1])
    if dtype == np.uint8:  # Pillow's own decoder agrees on the same bytes
        with PILImage.open(tmp_path / "n.png") as pim:
            assert np.array_equal(np.asarray(pim), a)


def test_16bit_png_transparency_key_becomes_alpha(tmp_path: Path) -> None:
    a = RNG.integers(0, 65536, (6, 7, 3), dtype=np.uint16)
    a[2, 3] = (1000, 2000, 3000)
    trns = chunk(b"tRNS", struct.pack(">HHH", 1000, 2000, 3000))
    (tmp_path / "t.png").write_bytes(naive_png(a, [1], False, extra=trns))
    im = read_image(tmp_path / "t.png")
    expected = np.full((6, 7), 65535, np.uint16)
    expected[2, 3] = 0
    assert np.array_equal(im.alpha, expected) and np.array_equal(im.pixels, a)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_tiff_round_trip(tmp_path: Path, channels: int) -> None:
    a = RNG.integers(0, 65536, (21, 18, channels), dtype=np.uint16)
    path = write_image(tmp_path / "deep.tiff", a)
    im = read_image(path)
    assert im.pixels.dtype == np.uint16 and im.grayscale == (channels <= 2)
    assert np.array_equal(im.pixels[:, :, 0], a[:, :, 0])
    if channels >= 3:
        assert np.array_equal(im.pixels, a[:, :, :3])
        with PILImage.open(path) as pim:  # Pillow decodes the file too (keeping 8 bits)
            assert np.array_equal(np.asarray(pim)[:, :, :3], (a[:, :, :3] >> 8).astype(np.uint8))
    if channels in (2, 4):
        assert np.array_equal(im.alpha, a[:, :, -1])


def test_16bit_to_8bit_formats_rounds_v_over_257(tmp_path: Path) -> None:
    v = np.arange(0, 65536, 7, dtype=np.uint16)[:4096].reshape(64, 64)
    write_image(tmp_path / "g.bmp", v)
    got = read_image(tmp_path / "g.bmp").pixels[:, :, 0].astype(int)
    assert np.array_equal(got, np.floor(v / 257 + 0.5).astype(int))


def test_grayscale_image_is_written_with_one_channel(tmp_path: Path) -> None:
    g = smooth(8, 9, 1)[:, :, 0]
    img = Image(np.repeat(g[:, :, None], 3, axis=2), alpha=g[::-1].copy(), grayscale=True)
    write_image(tmp_path / "la.png", img)
    deep = Image(np.repeat(g[:, :, None].astype(np.uint16) * 257, 3, axis=2), grayscale=True)
    write_image(tmp_path / "l16.png", deep)
    write_image(tmp_path / "rgba.png", Image(smooth(8, 9, 3), alpha=g))
    with PILImage.open(tmp_path / "la.png") as a, PILImage.open(tmp_path / "rgba.png") as c:
        assert a.mode == "LA" and c.mode == "RGBA"
    assert chunks((tmp_path / "l16.png").read_bytes())[0][1][8:10] == bytes([16, 0])


# ----------------------------------------------------------------------------------------------
# modes


def save(tmp_path: Path, name: str, im: PILImage.Image, **kw: object) -> Path:
    path = tmp_path / name
    im.save(path, **kw)
    return path


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    rgb = PILImage.fromarray(smooth(10, 12, 3))
    pal = rgb.quantize(16)
    plain = read_image(save(tmp_path, "p.png", pal))
    assert plain.alpha is None and not plain.grayscale
    assert np.array_equal(plain.pixels, np.asarray(pal.convert("RGB")))
    trans = read_image(save(tmp_path, "pt.png", pal, transparency=3))
    idx = np.asarray(pal)
    assert np.array_equal(trans.alpha, np.where(idx == 3, 0, 255))
    grey = PILImage.fromarray(idx.astype(np.uint8) * 10)
    lt = read_image(save(tmp_path, "lt.png", grey, transparency=30))
    assert lt.grayscale and np.array_equal(lt.alpha, np.where(idx == 3, 0, 255))


def test_cmyk_jpeg_and_1bit_and_16bit_tiff(tmp_path: Path) -> None:
    cmyk = PILImage.fromarray(smooth(16, 16, 4), "CMYK")
    path = save(tmp_path, "c.jpg", cmyk, quality=95)
    with PILImage.open(path) as im:
        assert im.mode == "CMYK"
        ref = np.asarray(im.convert("RGB"))
    got = read_image(path)
    assert not got.grayscale and got.alpha is None and np.array_equal(got.pixels, ref)
    bits = PILImage.fromarray(smooth(8, 8, 1)[:, :, 0] > 100)
    one = read_image(save(tmp_path, "b.png", bits))
    assert one.grayscale and set(np.unique(one.pixels)) <= {0, 255}
    g16 = smooth(9, 7, 1, np.uint16)[:, :, 0]
    tif = read_image(save(tmp_path, "g.tif", PILImage.fromarray(g16)))
    assert tif.pixels.dtype == np.uint16 and np.array_equal(tif.pixels[:, :, 0], g16)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(tmp_path: Path, orientation: int) -> None:
    a = smooth(6, 10, 3)
    path = save(tmp_path, "o.png", PILImage.fromarray(a), exif=exif_block(orientation))
    with PILImage.open(path) as im:
        ref = np.asarray(ImageOps.exif_transpose(im))
    assert np.array_equal(read_image(path).pixels, ref)
    # the same orientation inside a 16-bit PNG (own decoder) gives the same geometry
    deep = a.astype(np.uint16) * 257
    extra = chunk(b"eXIf", exif_block(orientation))
    (tmp_path / "o16.png").write_bytes(naive_png(deep, [0], False, extra=extra))
    assert np.array_equal(read_image(tmp_path / "o16.png").pixels, ref.astype(np.uint16) * 257)


# ----------------------------------------------------------------------------------------------
# bad files


def huge_png(width: int, height: int, depth: int = 8) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def expect_read_error(path: Path, pattern: str, **kw: object) -> None:
    with pytest.raises(ImageReadError, match=pattern) as err:
        read_image(path, **kw)
    assert str(err.value).startswith(f"{path}: ")


def test_unreadable_inputs_raise_read_errors_naming_the_file(tmp_path: Path) -> None:
    good = io.BytesIO()
    PILImage.fromarray(smooth(40, 40, 3)).save(good, "PNG")
    (tmp_path / "trunc.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path / "text.png").write_text("not an image at all\n")
    (tmp_path / "empty.png").write_bytes(b"")
    deep = write_image(tmp_path / "deep.png", smooth(20, 20, 3, np.uint16)).read_bytes()
    (tmp_path / "trunc16.png").write_bytes(deep[: len(deep) - 40])
    bad_crc = bytearray(deep)
    bad_crc[40] ^= 0xFF  # inside IDAT
    (tmp_path / "crc16.png").write_bytes(bytes(bad_crc))
    jpg = io.BytesIO()
    PILImage.fromarray(smooth(64, 64, 3)).save(jpg, "JPEG")
    (tmp_path / "trunc.jpg").write_bytes(jpg.getvalue()[:300])
    expect_read_error(tmp_path / "missing.png", "no such file")
    expect_read_error(tmp_path, "folder")
    expect_read_error(tmp_path / "empty.png", "empty file")
    expect_read_error(tmp_path / "text.png", "not a supported image")
    expect_read_error(tmp_path / "trunc.png", "truncated")
    expect_read_error(tmp_path / "trunc16.png", "truncated")
    expect_read_error(tmp_path / "crc16.png", "CRC")
    expect_read_error(tmp_path / "trunc.jpg", "truncated")


@pytest.mark.parametrize("depth", [8, 16])
def test_pixel_limit_is_checked_on_the_header_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, depth: int
) -> None:
    (tmp_path / "bomb.png").write_bytes(huge_png(100_000, 100_000, depth))

    def no_decoding(*args: object, **kw: object) -> None:
        raise AssertionError("pixel data decoded before the size check")

    monkeypatch.setattr(imagecodecs, "png_decode", no_decoding)
    monkeypatch.setattr(PILImage.Image, "load", no_decoding)
    monkeypatch.setattr(PILImage.Image, "convert", no_decoding)
    expect_read_error(tmp_path / "bomb.png", "100000x100000 = 10000000000 pixels, above the limit")


def test_pixel_limit_argument_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_image(tmp_path / "x.png", smooth(10, 12, 3))
    expect_read_error(path, "above the limit of 119", max_pixels=119)
    assert read_image(path, max_pixels=120).width == 12
    assert read_image(path, max_pixels=None).height == 10
    monkeypatch.setenv("NLSR_MAX_PIXELS", "119")  # read at every call
    expect_read_error(path, "above the limit of 119")
    assert nio.default_max_pixels() == 119
    monkeypatch.setenv("NLSR_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match="NLSR_MAX_PIXELS"):
        read_image(path)
    monkeypatch.delenv("NLSR_MAX_PIXELS")
    assert nio.default_max_pixels() == nio.DEFAULT_MAX_PIXELS == 100_000_000


# ----------------------------------------------------------------------------------------------
# writing


def test_write_refuses_to_overwrite_and_is_atomic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_image(tmp_path / "o.png", smooth(5, 5, 3))
    before = path.read_bytes()
    with pytest.raises(ImageWriteError, match="already exists") as err:
        write_image(path, smooth(6, 6, 3))
    assert str(err.value).startswith(f"{path}: ")
    assert path.read_bytes() == before
    write_image(path, smooth(6, 6, 3), overwrite=True)
    assert read_image(path).width == 6

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(ImageWriteError, match="No space left"):
        write_image(tmp_path / "new.png", smooth(5, 5, 3))
    with pytest.raises(ImageWriteError, match="No space left"):
        write_image(path, smooth(7, 7, 3), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]  # no partial, no temp file
    assert read_image(path).width == 6


def test_write_rejects_bad_requests(tmp_path: Path) -> None:
    a = smooth(4, 4, 3)
    with pytest.raises(ImageWriteError, match="unknown image extension"):
        write_image(tmp_path / "x.gif", a)
    with pytest.raises(ImageWriteError, match="does not exist"):
        write_image(tmp_path / "nope" / "x.png", a)
    with pytest.raises(ImageWriteError, match="uint8 or uint16"):
        write_image(tmp_path / "x.png", a.astype(np.float32))
    with pytest.raises(ImageWriteError, match="HxWxC"):
        write_image(tmp_path / "x.png", np.zeros((4, 4, 5), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_image_validation() -> None:
    with pytest.raises(ValueError, match="HxWx3"):
        Image(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8 or uint16"):
        Image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="alpha"):
        Image(np.zeros((4, 4, 3), np.uint8), alpha=np.zeros((4, 5), np.uint8))
