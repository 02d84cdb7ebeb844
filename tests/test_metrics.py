"""PSNR/SSIM on Y: closed forms, a naive SSIM, and the RCAN authors' MATLAB figures."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from conftest import BENCHMARK, REFERENCE, require
from PIL import Image

from nlsr.metrics import psnr, rgb_to_y, ssim
from nlsr.resize import modcrop


def _rand(shape: tuple[int, ...], seed: int, lo: int = 0, hi: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi, size=shape, dtype=np.uint8)


def test_rgb_to_y_matches_matlab_coefficients() -> None:
    px = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)
    np.testing.assert_allclose(
        rgb_to_y(px)[0], [16, 235, 16 + 65.481, 16 + 128.553, 16 + 24.966], atol=1e-12
    )
    assert rgb_to_y(px).dtype == np.float64
    # 16-bit input is normalised by its own maximum
    np.testing.assert_allclose(rgb_to_y(px.astype(np.uint16) * 257), rgb_to_y(px), atol=1e-12)


def test_psnr_closed_form_for_a_constant_offset() -> None:
    hr = _rand((20, 24, 3), 0, 10, 200)
    sr = hr + np.uint8(3)
    expected_y = 10 * math.log10(255**2 / (3 * 219 / 255) ** 2)
    assert psnr(sr, hr, crop_border=2) == pytest.approx(expected_y, abs=1e-10)
    assert psnr(sr, hr, 0, y_channel=False) == pytest.approx(20 * math.log10(255 / 3), abs=1e-10)


def test_psnr_of_identical_images_is_inf() -> None:
    hr = _rand((16, 16, 3), 1)
    assert psnr(hr, hr.copy(), 4) == math.inf


def test_crop_border_removes_the_border() -> None:
    hr = _rand((30, 30, 3), 2)
    sr = hr.copy()
    sr[:3] = 0
    sr[:, -3:] = 255
    assert psnr(sr, hr, 3) == math.inf
    assert psnr(sr, hr, 2) < 30
    assert ssim(sr, hr, 3) == pytest.approx(1.0, abs=1e-12)


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(10, 12, 3\).*\(10, 11, 3\)"):
        psnr(np.zeros((10, 12, 3), np.uint8), np.zeros((10, 11, 3), np.uint8), 0)
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(np.zeros((20, 20), np.uint8), np.zeros((20, 21), np.uint8), 0)


def test_ssim_identity_and_symmetry() -> None:
    a = _rand((40, 36, 3), 3)
    b = _rand((40, 36, 3), 4)
    assert ssim(a, a.copy(), 2) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, b, 2) == pytest.approx(ssim(b, a, 2), abs=1e-14)
    assert ssim(a, b, 2) < 0.2


def test_ssim_closed_form_for_constant_images() -> None:
    """Flat images: sigma terms vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1)."""
    a = np.full((15, 15), 100.0)
    b = np.full((15, 15), 140.0)
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 140 + c1) / (100**2 + 140**2 + c1)
    assert ssim(a, b, 0, y_channel=False) == pytest.approx(expected, abs=1e-12)


def _naive_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. ssim_index with explicit 11x11 windows ('valid' positions only)."""
    r = np.arange(-5, 6)
    win = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    win /= win.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (win * px).sum(), (win * py).sum()
            vx = (win * (px - mx) ** 2).sum()
            vy = (win * (py - my) ** 2).sum()
            cxy = (win * (px - mx) * (py - my)).sum()
            num = (2 * mx * my + c1) * (2 * cxy + c2)
            vals.append(num / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_naive_windows_on_y() -> None:
    hr = _rand((19, 23, 3), 5)
    noise = np.random.default_rng(6).normal(0, 12, hr.shape)
    sr = np.clip(hr + noise, 0, 255).round().astype(np.uint8)
    expected = _naive_ssim(rgb_to_y(hr[2:-2, 2:-2]), rgb_to_y(sr[2:-2, 2:-2]))
    assert ssim(sr, hr, 2) == pytest.approx(expected, abs=1e-10)


def test_ssim_too_small_after_crop() -> None:
    with pytest.raises(ValueError, match="11x11"):
        ssim(np.zeros((14, 14, 3), np.uint8), np.zeros((14, 14, 3), np.uint8), 2)


_LINE = re.compile(r"x(\d) \d+ (\S+)\.png: PSNR= ([\d.]+) SSIM= ([\d.]+)")


def test_reproduces_rcan_matlab_figures() -> None:
    """Every per-image PSNR/SSIM the RCAN authors' MATLAB script printed, to 1e-5."""
    ref = require(REFERENCE / "rcan-set5")
    hr_dir = require(BENCHMARK / "Set5" / "HR")
    method = None
    checked = 0
    for line in (ref / "matlab_results.txt").read_text().splitlines():
        head = re.match(r"Method_\d+: (\S+);", line)
        if head:
            method = head.group(1)
            continue
        m = _LINE.match(line)
        if not m:
            continue
        scale, stem = int(m.group(1)), m.group(2)
        hr = np.asarray(Image.open(hr_dir / f"{stem.split('_')[0]}.png").convert("RGB"))
        sr = np.asarray(Image.open(ref / method / f"x{scale}" / f"{stem}.png").convert("RGB"))
        hr = modcrop(hr, scale)
        assert abs(psnr(sr, hr, scale) - float(m.group(3))) < 1e-5, (line, psnr(sr, hr, scale))
        assert abs(ssim(sr, hr, scale) - float(m.group(4))) < 1e-5, (line, ssim(sr, hr, scale))
        checked += 1
    assert checked == 30  # RCAN and RCAN+, 5 images, x2/x3/x4
