"""MATLAB-exact imresize, modcrop and the BI/BD/DN degradations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import BENCHMARK, require
from PIL import Image

from nlsr.resize import degrade, imresize, modcrop

# ---------------------------------------------------------------------------------------------
# A naive per-pixel reference, written straight from MATLAB's description (no vectorisation).


def _cubic(x: float) -> float:
    ax = abs(x)
    if ax <= 1:
        return 1.5 * ax**3 - 2.5 * ax**2 + 1
    if ax <= 2:
        return -0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2
    return 0.0


def _mirror(j: int, n: int) -> int:
    """1-based index j reflected into [1, n] with symmetric padding (edge pixel repeated)."""
    period = 2 * n
    j = (j - 1) % period
    return j + 1 if j < n else period - j


def _naive_1d(line: list[float], out_len: int, scale: float) -> list[float]:
    n = len(line)
    width = 4.0 / scale if scale < 1 else 4.0
    out = []
    for i in range(1, out_len + 1):
        u = i / scale + 0.5 * (1 - 1 / scale)
        taps = range(math.floor(u - width / 2), math.floor(u - width / 2) + math.ceil(width) + 2)
        if scale < 1:
            w = [scale * _cubic(scale * (u - j)) for j in taps]
        else:
            w = [_cubic(u - j) for j in taps]
        total = sum(w)
        out.append(sum(wk / total * line[_mirror(j, n) - 1] for wk, j in zip(w, taps, strict=True)))
    return out


def _naive_imresize(img: np.ndarray, scale: float, integer: bool) -> np.ndarray:
    """Height pass then width pass, rounding half up and clipping between them if integer."""
    h, w = img.shape
    oh, ow = math.ceil(h * scale), math.ceil(w * scale)

    def fix(v: float) -> float:
        return float(math.floor(min(max(v, 0.0), 255.0) + 0.5)) if integer else v

    a = img.astype(np.float64).tolist()
    cols = [_naive_1d([a[r][c] for r in range(h)], oh, scale) for c in range(w)]
    mid = [[fix(cols[c][r]) for c in range(w)] for r in range(oh)]
    out = [[fix(v) for v in _naive_1d(mid[r], ow, scale)] for r in range(oh)]
    return np.array(out)


@pytest.mark.parametrize("scale", [2, 3, 4, 0.5, 1 / 3, 0.25, 0.6, 1.5])
def test_imresize_matches_naive_reference_float(scale: float) -> None:
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, size=(9, 7))
    got = imresize(img, scale)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, _naive_imresize(img, scale, integer=False), atol=1e-9)


@pytest.mark.parametrize("scale", [2, 3, 0.5, 1 / 3, 0.25])
def test_imresize_matches_naive_reference_uint8(scale: float) -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(11, 8), dtype=np.uint8)
    got = imresize(img, scale)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, _naive_imresize(img, scale, integer=True))


def test_rounding_between_passes_matters() -> None:
    """Without the intermediate rounding some pixels differ: the test above can tell."""
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, size=(40, 40), dtype=np.uint8)
    unrounded = np.floor(np.clip(imresize(img.astype(np.float64), 0.5), 0, 255) + 0.5)
    assert (imresize(img, 0.5) != unrounded).any()


def test_channels_are_independent_and_grayscale_works() -> None:
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, size=(13, 10, 3), dtype=np.uint8)
    out = imresize(rgb, 1 / 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], imresize(rgb[..., c], 1 / 3))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("scale", [0.5, 1 / 3, 0.25, 2, 3, 4])
def test_constant_image_stays_constant(dtype: type, scale: float) -> None:
    img = np.full((17, 12, 3), 201, dtype=dtype)
    out = imresize(img, scale)
    assert out.shape == (math.ceil(17 * scale), math.ceil(12 * scale), 3)
    np.testing.assert_allclose(out, 201, atol=1e-9)


@pytest.mark.parametrize(
    ("shape", "scale", "expected"),
    [
        ((7, 5), 0.5, (4, 3)),
        ((10, 11), 1 / 3, (4, 4)),
        ((5, 3), 4, (20, 12)),
        ((9, 9), 0.25, (3, 3)),
    ],
)
def test_output_size_is_ceil(shape: tuple[int, int], scale: float, expected: tuple) -> None:
    assert imresize(np.zeros(shape, np.uint8), scale).shape == expected


def test_output_shape_argument() -> None:
    img = np.arange(48, dtype=np.float64).reshape(6, 8)
    assert imresize(img, output_shape=(3, 5)).shape == (3, 5)
    np.testing.assert_array_equal(imresize(img, output_shape=(12, 16)), imresize(img, 2))


def test_uint16_stays_uint16_and_clips() -> None:
    img = np.zeros((8, 8), np.uint16)
    img[:, 4:] = 65535
    out = imresize(img, 2)
    assert out.dtype == np.uint16
    assert out.min() == 0 and out.max() == 65535  # bicubic overshoot is clipped


def test_imresize_rejects_bad_arguments() -> None:
    img = np.zeros((4, 4), np.uint8)
    with pytest.raises(ValueError, match="exactly one"):
        imresize(img)
    with pytest.raises(ValueError, match="scale"):
        imresize(img, -2)
    with pytest.raises(ValueError, match="dtype"):
        imresize(img.astype(np.int32), 2)
    with pytest.raises(ValueError, match="shape"):
        imresize(np.zeros((2, 2, 2, 2)), 2)


def test_modcrop() -> None:
    img = np.arange(7 * 10 * 3).reshape(7, 10, 3)
    assert modcrop(img, 3).shape == (6, 9, 3)
    assert modcrop(img, 2).shape == (6, 10, 3)
    np.testing.assert_array_equal(modcrop(img, 4), img[:4, :8])
    with pytest.raises(ValueError):
        modcrop(img, 0)


# ---------------------------------------------------------------------------------------------
# degradations


def _naive_bd(hr: np.ndarray, s: int) -> np.ndarray:
    """7x7 Gaussian (sigma 1.6) with replicated borders by explicit loops, rounded, then every
    s-th pixel starting at s // 2 (MATLAB nearest imresize at 1/s)."""
    x = np.arange(-3, 4)
    k = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * 1.6**2))
    k /= k.sum()
    h, w = hr.shape
    out = np.zeros((h, w))
    for r in range(h):
        for c in range(w):
            acc = 0.0
            for dr in range(-3, 4):
                for dc in range(-3, 4):
                    rr, cc = min(max(r + dr, 0), h - 1), min(max(c + dc, 0), w - 1)
                    acc += k[dr + 3, dc + 3] * hr[rr, cc]
            out[r, c] = math.floor(acc + 0.5)
    return out[s // 2 :: s, s // 2 :: s].astype(np.uint8)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bd_matches_naive_reference(scale: int) -> None:
    rng = np.random.default_rng(4)
    hr = rng.integers(0, 256, size=(12 * scale // 2 + 1, 5 * scale), dtype=np.uint8)
    got = degrade(hr, scale, "BD")
    assert got.shape == (hr.shape[0] // scale, hr.shape[1] // scale)
    np.testing.assert_array_equal(got, _naive_bd(modcrop(hr, scale), scale))


def test_bi_is_modcrop_then_imresize_and_grayscale_matches_rgb() -> None:
    rng = np.random.default_rng(5)
    gray = rng.integers(0, 256, size=(23, 17), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    np.testing.assert_array_equal(degrade(gray, 3), imresize(gray[:21, :15], 1 / 3))
    for kind in ("BI", "BD"):
        np.testing.assert_array_equal(degrade(rgb, 2, kind)[..., 1], degrade(gray, 2, kind))


def test_dn_noise_is_seeded_and_has_the_right_strength() -> None:
    hr = np.full((240, 240, 3), 128, np.uint8)
    a = degrade(hr, 2, "DN", noise_sigma=10, seed=7)
    assert a.dtype == np.uint8 and a.shape == (120, 120, 3)
    np.testing.assert_array_equal(a, degrade(hr, 2, "DN", noise_sigma=10, seed=7))
    assert (a != degrade(hr, 2, "DN", noise_sigma=10, seed=8)).any()
    noise = a.astype(np.float64) - 128
    assert abs(noise.mean()) < 0.2
    assert abs(noise.std() - 10) < 0.2
    assert np.array_equal(noise, np.round(noise))  # integers: rounded after adding the noise


def test_dn_clips_to_uint8() -> None:
    hr = np.full((40, 40), 250, np.uint8)
    out = degrade(hr, 2, "DN", noise_sigma=30, seed=0)
    assert out.max() == 255 and out.dtype == np.uint8


def test_degrade_rejects_bad_arguments() -> None:
    hr = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="noise_sigma"):
        degrade(hr, 2, "DN")
    with pytest.raises(ValueError, match="only to DN"):
        degrade(hr, 2, "BI", noise_sigma=5)
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade(hr, 2, "XY")
    with pytest.raises(ValueError, match="uint8 or uint16"):
        degrade(hr.astype(np.float32), 2)
    with pytest.raises(ValueError, match="scale"):
        degrade(hr, 1.5)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# the official LR files


def test_reproduces_all_official_lr_files_bit_for_bit() -> None:
    """Every official Set5/Set14 LR_bicubic file (5 + 14 images x 3 scales) from its HR."""
    require(BENCHMARK / "Set5" / "LR_bicubic")
    files = sorted(BENCHMARK.glob("Set*/LR_bicubic/X*/*.png"))
    assert len(files) == 57
    mismatched = []
    for lr_path in files:
        scale = int(lr_path.parent.name[1:])
        name = lr_path.stem[: -len(f"x{scale}")]
        hr = np.asarray(Image.open(lr_path.parents[2] / "HR" / f"{name}.png").convert("RGB"))
        official = np.asarray(Image.open(lr_path).convert("RGB"))
        mine = degrade(hr, scale)
        if mine.shape != official.shape or not np.array_equal(mine, official):
            mismatched.append(lr_path.relative_to(BENCHMARK))
    assert mismatched == [], f"{len(files) - len(mismatched)}/57 match; differ: {mismatched}"
