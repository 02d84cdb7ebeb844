"""``nlsr upscale``: a folder of good and bad files, output naming, overwrite rules, options.
The default model is MATLAB bicubic, so 8-bit outputs are checked against ``imresize``."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from nlsr.cli import main
from nlsr.io import read_image, write_image
from nlsr.resize import imresize

RNG = np.random.default_rng(7)
#: what the ``nlsr`` console script runs
CONSOLE = "import sys; from nlsr.cli import main; sys.exit(main())"


def pattern(h: int, w: int, c: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([(x * 9 + y * (4 + k) + 60 * k) % 256 for k in range(c)], axis=2)
    return (a + RNG.integers(0, 16, a.shape)).clip(0, 255).astype(np.uint8)


def png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def bomb_png(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims width x height pixels; tiny payload."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            png_chunk(b"IHDR", ihdr),
            png_chunk(b"IDAT", zlib.compress(b"\0" * 1024)),
            png_chunk(b"IEND", b""),
        ]
    )


def ihdr(path: Path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) read from the PNG file itself."""
    w, h, depth, ctype = struct.unpack(">IIBB", path.read_bytes()[16:26])
    return w, h, depth, ctype


def run_cli(*args: str | Path) -> int:
    return main(["upscale", *map(str, args)])


@pytest.fixture
def mixed(tmp_path: Path) -> dict[str, np.ndarray]:
    """tmp_path/in: five bad files and six good ones (one in a sub-folder)."""
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    good = {
        "rgb.png": pattern(12, 15, 3),
        "gray.png": pattern(11, 9, 1)[:, :, 0],
        "rgba.png": pattern(10, 13, 4),
        "sub/nested.bmp": pattern(9, 8, 3),
    }
    for name, a in good.items():
        PILImage.fromarray(a).save(src / name)
    deep = (RNG.integers(0, 65536, (7, 10, 3))).astype(np.uint16)
    write_image(src / "deep.png", deep)
    good["deep.png"] = deep
    cmyk = PILImage.fromarray(pattern(16, 16, 4), "CMYK")
    cmyk.save(src / "cmyk.jpg", quality=95)
    good["cmyk.jpg"] = read_image(src / "cmyk.jpg").pixels
    full = (src / "rgb.png").read_bytes()
    (src / "truncated.png").write_bytes(full[: len(full) // 2])
    (src / "text.png").write_text("this is not a PNG\n")
    (src / "empty.png").write_bytes(b"")
    (src / "huge.png").write_bytes(bomb_png(200_000, 150_000))
    (src / "notes.txt").write_text("ignored: not an image extension\n")
    return good


def test_folder_with_bad_files(
    tmp_path: Path, mixed: dict[str, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run_cli(tmp_path / "in", "-o", out, "--device", "cpu", "--precision", "fp32") == 1
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 4
    reasons = {
        "truncated.png": "truncated",
        "text.png": "not a supported image",
        "empty.png": "empty file",
        "huge.png": "200000x150000",
    }
    for name, reason in reasons.items():
        (line,) = [e for e in errors if e.startswith(f"{tmp_path / 'in' / name}: ")]
        assert reason in line
    assert "6 ok, 4 failed" in captured.out

    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(mixed)  # nothing else: no partial or temporary files
    assert [p.name for p in out.rglob(".*")] == []

    for name in ("rgb.png", "sub/nested.bmp"):
        got = read_image(out / name)
        assert not got.grayscale and np.array_equal(got.pixels, imresize(mixed[name], 2))
    gray = read_image(out / "gray.png")
    assert gray.grayscale and ihdr(out / "gray.png")[2:] == (8, 0)
    assert np.array_equal(gray.pixels[:, :, 0], imresize(mixed["gray.png"], 2))
    rgba = read_image(out / "rgba.png")
    assert ihdr(out / "rgba.png") == (26, 20, 8, 6)
    assert np.array_equal(rgba.pixels, imresize(mixed["rgba.png"][:, :, :3], 2))
    assert np.array_equal(rgba.alpha, imresize(mixed["rgba.png"][:, :, 3], 2))
    assert ihdr(out / "deep.png") == (20, 14, 16, 2)
    deep = read_image(out / "deep.png")
    assert deep.pixels.dtype == np.uint16 and deep.alpha is None
    # 16-bit input is resized at full precision (float32 transport: at most 1 level off)
    exact = np.clip(imresize(mixed["deep.png"] / 65535, 2), 0, 1) * 65535
    assert np.abs(deep.pixels - exact).max() <= 1
    assert np.any(deep.pixels % 257)  # not merely 8-bit values scaled up
    with PILImage.open(out / "cmyk.jpg") as jpg:
        assert jpg.mode == "RGB" and jpg.size == (32, 32)
        diff = np.asarray(jpg).astype(int) - imresize(mixed["cmyk.jpg"], 2)
    assert np.abs(diff).mean() < 3


def test_existing_outputs_fail_unless_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_image(tmp_path / "a.png", pattern(6, 7, 3))
    dst = tmp_path / "b.png"
    assert run_cli(src, "-o", dst) == 0
    assert run_cli(src, "-o", dst, "--scale", "3") == 1
    assert "already exists" in capsys.readouterr().err
    assert read_image(dst).width == 14
    assert run_cli(src, "-o", dst, "--scale", "3", "--overwrite") == 0
    assert read_image(dst).width == 21
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]


def test_globs_suffix_and_never_replacing_inputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "pics" / "deeper").mkdir(parents=True)
    write_image(tmp_path / "pics" / "a.png", pattern(5, 5, 3))
    write_image(tmp_path / "pics" / "deeper" / "b.tif", pattern(4, 6, 3))
    monkeypatch.chdir(tmp_path)
    assert run_cli("pics/**/*.*", "-o", "out", "--suffix", "_x2") == 0
    assert sorted(str(p.relative_to("out")) for p in Path("out").rglob("*.*")) == [
        "a_x2.png",
        "deeper/b_x2.tif",
    ]
    assert read_image("out/deeper/b_x2.tif").pixels.shape == (8, 12, 3)
    capsys.readouterr()
    assert run_cli("pics", "-o", "pics", "--overwrite") == 1
    err = capsys.readouterr().err
    assert err.count("would replace the input") == 2
    assert read_image("pics/a.png").width == 5
    assert run_cli("missing.png", "nothing*.png", "-o", "out2") == 1
    err = capsys.readouterr().err
    assert "missing.png: no such file" in err and "nothing*.png: pattern matches no" in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tile", "8", "--chop"], "alternatives"),
        (["--tile", "8", "--overlap", "8"], "--overlap"),
        (["--model", "no-such-model"], "unknown model"),
        (["--device", "warp-drive"], "warp-drive"),
        (["--scale", "0"], "--scale"),
    ],
)
def test_bad_options_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    src = write_image(tmp_path / "a.png", pattern(4, 4, 3))
    assert run_cli(src, "-o", tmp_path / "o.png", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_architecture_without_shipped_weights_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # an empty weights folder: nothing is shipped, so an untrained network must not be used
    (tmp_path / "weights").mkdir()
    monkeypatch.setenv("NLSR_WEIGHTS_DIR", str(tmp_path / "weights"))
    src = write_image(tmp_path / "a.png", pattern(4, 4, 3))
    assert run_cli(src, "-o", tmp_path / "o.png", "--model", "dlsn") == 2
    assert "no pretrained weights for dlsn x2" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_large_inputs_are_tiled_automatically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nlsr.cli.upscale as cli
    import nlsr.inference as inference

    tiles: list[int | None] = []
    real = inference.upscale

    def spy(*args: object, **kwargs: object) -> object:
        tiles.append(kwargs["tile"])  # type: ignore[arg-type]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(inference, "upscale", spy)
    monkeypatch.setattr(cli, "AUTO_TILE_PIXELS", 100)
    monkeypatch.setattr(cli, "AUTO_TILE", 16)
    (tmp_path / "in").mkdir()
    small = write_image(tmp_path / "in" / "small.png", pattern(9, 9, 3))  # 81 px: whole image
    big = write_image(tmp_path / "in" / "big.png", pattern(30, 27, 3))  # 810 px: tiles of 16
    assert run_cli(tmp_path / "in", "-o", tmp_path / "out", "--overlap", "4") == 0
    assert sorted(tiles, key=str) == [16, None]
    tiles.clear()
    assert run_cli(big, "-o", tmp_path / "whole.png", "--tile", "0") == 0
    assert run_cli(small, "-o", tmp_path / "tiled.png", "--tile", "4", "--overlap", "1") == 0
    assert tiles == [None, 4]
    # the blended tiles stay within one grey level of the whole-image result
    tiled = read_image(tmp_path / "out" / "big.png").pixels.astype(int)
    assert np.abs(tiled - read_image(tmp_path / "whole.png").pixels).max() <= 1


def test_several_inputs_need_an_output_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = write_image(tmp_path / "a.png", pattern(4, 4, 3))
    b = write_image(tmp_path / "b.png", pattern(4, 4, 3))
    assert run_cli(a, b, "-o", tmp_path / "both.png") == 2
    assert "names an image file" in capsys.readouterr().err


def test_max_pixels_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_image(tmp_path / "a.png", pattern(10, 10, 3))
    assert run_cli(src, "-o", tmp_path / "o.png", "--max-pixels", "99") == 1
    assert "above the limit of 99" in capsys.readouterr().err
    assert run_cli(src, "-o", tmp_path / "o.png", "--max-pixels", "100") == 0


def test_weights_tiles_and_self_ensemble(tmp_path: Path) -> None:
    from nlsr.inference import upscale
    from nlsr.models import create

    torch.manual_seed(0)
    model = create("edsr", 2, n_resblocks=1, n_feats=8).eval()
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    a = pattern(20, 18, 3)
    src = write_image(tmp_path / "a.png", a)
    args = ["--tile", "8", "--overlap", "2", "--self-ensemble", "--device", "cpu"]
    args += ["--precision", "fp32"]
    assert run_cli(src, "-o", tmp_path / "o.png", "--weights", tmp_path / "tiny.pt", *args) == 0
    expected = upscale(model, a, tile=8, overlap=2, self_ensemble=True, precision="fp32")
    assert np.array_equal(read_image(tmp_path / "o.png").pixels, expected)


def test_bundled_sample_in_a_fresh_process(tmp_path: Path) -> None:
    sample = resources.files("nlsr") / "assets" / "sample.png"
    with resources.as_file(sample) as path:
        image = read_image(path)
        assert image.pixels.shape == (256, 256, 3) and not image.grayscale and image.alpha is None
        assert len(np.unique(image.pixels.reshape(-1, 3), axis=0)) > 1000  # a rich test card
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                CONSOLE,
                "upscale",
                str(path),
                "-o",
                str(tmp_path / "x.png"),
                "--precision",
                "fp32",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 0, done.stderr
    assert "1 ok, 0 failed" in done.stdout
    assert np.array_equal(read_image(tmp_path / "x.png").pixels, imresize(image.pixels, 2))


def test_outscale_is_the_model_scale_then_the_exact_resize(tmp_path: Path) -> None:
    a = pattern(9, 13, 4)  # odd sides: 3.5 x 9 = 31.5 and 3.5 x 13 = 45.5 round up
    src = write_image(tmp_path / "a.png", a)
    fp32 = ["--precision", "fp32"]
    assert run_cli(src, "-o", tmp_path / "x35.png", "--outscale", "3.5", *fp32) == 0
    got = read_image(tmp_path / "x35.png")
    assert (got.height, got.width) == (32, 46)
    # the x2 bicubic model's output, then MATLAB imresize to the rounded size, alpha as well
    for channels, out in ((a[:, :, :3], got.pixels), (a[:, :, 3], got.alpha)):
        assert np.array_equal(out, imresize(imresize(channels, 2), output_shape=(32, 46)))
    # shrinking below the model's scale: antialiased, 1.5 x 9 = 13.5 -> 14, 1.5 x 13 = 19.5 -> 20
    assert run_cli(src, "-o", tmp_path / "x15.png", "--outscale", "1.5", *fp32) == 0
    small = read_image(tmp_path / "x15.png")
    assert np.array_equal(small.pixels, imresize(imresize(a[:, :, :3], 2), output_shape=(14, 20)))
    # the model's own scale: no resize at all
    assert run_cli(src, "-o", tmp_path / "x2.png", "--outscale", "2", *fp32) == 0
    assert run_cli(src, "-o", tmp_path / "plain.png", *fp32) == 0
    assert (tmp_path / "x2.png").read_bytes() == (tmp_path / "plain.png").read_bytes()


def jpeg_tables(path: Path) -> dict[int, list[int]]:
    with PILImage.open(path) as im:
        assert im.format == "JPEG"
        return {k: list(v) for k, v in im.quantization.items()}


def test_ext_and_quality_choose_the_output_format(tmp_path: Path) -> None:
    a = pattern(12, 10, 3)
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in" / "a.png", a)
    expected = imresize(a, 2)
    fp32 = ["--precision", "fp32"]
    for q in ("90", "50"):
        assert (
            run_cli(tmp_path / "in", "-o", tmp_path / q, "--ext", "jpg", "--quality", q, *fp32) == 0
        )
    # Pillow's own encoder at that quality has the same quantisation tables
    PILImage.fromarray(expected).save(tmp_path / "ref90.jpg", quality=90, subsampling=0)
    assert jpeg_tables(tmp_path / "90" / "a.jpg") == jpeg_tables(tmp_path / "ref90.jpg")
    assert jpeg_tables(tmp_path / "90" / "a.jpg") != jpeg_tables(tmp_path / "50" / "a.jpg")
    for ext in ("webp", "tif", "png"):  # lossless: the exact pixels come back
        assert run_cli(tmp_path / "in", "-o", tmp_path / ext, "--ext", ext, *fp32) == 0
        assert np.array_equal(read_image(tmp_path / ext / f"a.{ext}").pixels, expected)
    args = ["--ext", "webp", "--quality", "60", "--suffix", "_q60", *fp32]
    assert run_cli(tmp_path / "in", "-o", tmp_path / "webp", *args) == 0
    lossy = read_image(tmp_path / "webp" / "a_q60.webp").pixels.astype(int)
    assert lossy.shape == expected.shape and 0 < np.abs(lossy - expected).mean() < 20


@pytest.mark.parametrize(
    "args,message",
    [
        (["--outscale", "0"], "--outscale must be a positive number"),
        (["--outscale", "-2"], "--outscale must be a positive number"),
        (["--outscale", "nan"], "--outscale must be a positive number"),
        (["--outscale", "two"], "--outscale: invalid float value"),
        (["--quality", "0"], "--quality must be from 1 to 100"),
        (["--quality", "101"], "--quality must be from 1 to 100"),
        (["--quality", "90"], "--quality 90: applies to JPEG and WebP output only"),
        (["--ext", "png", "--quality", "90"], "--quality 90: applies to JPEG and WebP"),
        (["--ext", "gif"], "--ext: invalid choice"),
        (["--ext", "jpg"], "--ext jpg: -o"),
        (["--precision", "fp8"], "--precision: invalid choice"),
        (["--precision", "fp16", "--device", "cpu"], "--precision fp16 needs a CUDA device"),
    ],
)
def test_bad_output_options_exit_2_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    src = write_image(tmp_path / "a.png", pattern(4, 4, 3))
    try:
        status = run_cli(src, "-o", tmp_path / "o.png", *args)
    except SystemExit as e:  # argparse's own checks (type, choices) exit at once
        status = e.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.png").exists()
