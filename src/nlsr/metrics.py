"""PSNR and SSIM exactly as the published SR tables measure them (MATLAB protocol).

Y channel of MATLAB ``rgb2ycbcr`` (not rounded), ``crop_border`` pixels removed from every side,
float64 throughout; SSIM is Wang et al.'s ``ssim_index`` (11x11 Gaussian, sigma 1.5, 'valid').
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["psnr", "rgb_to_y", "ssim"]

#: MATLAB rgb2ycbcr luma row, for R, G, B in [0, 1]; Y = 16 + row . rgb on the 0-255 scale.
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966])
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03
_SSIM_L = 255.0
_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5


def _to_255(img: np.ndarray) -> np.ndarray:
    """float64 on the 0-255 scale: uint8 as is, uint16 divided by 257; floats taken as 0-255."""
    img = np.asarray(img)
    if img.dtype == np.uint8:
        return img.astype(np.float64)
    if img.dtype == np.uint16:
        return img.astype(np.float64) * (255.0 / 65535.0)
    if np.issubdtype(img.dtype, np.floating) or np.issubdtype(img.dtype, np.integer):
        return img.astype(np.float64)
    raise ValueError(f"unsupported image dtype {img.dtype}")


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """Luma of MATLAB ``rgb2ycbcr`` on the 0-255 scale, float64 in [16, 235], not rounded.

    ``img`` is HxWx3 uint8/uint16 (normalised by the dtype's maximum) or float on the 0-255
    scale, as MATLAB's ``double`` of an 8-bit image.
    """
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"rgb_to_y: expected an HxWx3 image, got shape {img.shape}")
    rgb = _to_255(img) / 255.0
    return 16.0 + rgb @ _Y_WEIGHTS


def _prepare(
    sr: np.ndarray, hr: np.ndarray, crop_border: int, y_channel: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes, crop the borders and convert both images to float64 (Y if asked)."""
    sr = np.asarray(sr)
    hr = np.asarray(hr)
    if sr.shape != hr.shape:
        raise ValueError(f"image shapes differ: sr {sr.shape} vs hr {hr.shape}")
    if sr.ndim not in (2, 3):
        raise ValueError(f"expected HxW or HxWxC images, got shape {sr.shape}")
    if int(crop_border) != crop_border or crop_border < 0:
        raise ValueError(f"crop_border must be a non-negative integer, got {crop_border}")
    c = int(crop_border)
    h, w = sr.shape[:2]
    if h <= 2 * c or w <= 2 * c:
        raise ValueError(f"images of shape {sr.shape} vanish after cropping {c} px per side")
    if c:
        sr = sr[c:-c, c:-c]
        hr = hr[c:-c, c:-c]
    if y_channel and sr.ndim == 3 and sr.shape[2] == 3:
        return rgb_to_y(sr), rgb_to_y(hr)
    if y_channel and sr.ndim == 3 and sr.shape[2] != 1:
        raise ValueError(f"y_channel needs RGB (HxWx3) or grayscale images, got shape {sr.shape}")
    return _to_255(sr), _to_255(hr)


def psnr(sr: np.ndarray, hr: np.ndarray, crop_border: int, y_channel: bool = True) -> float:
    """PSNR in dB (peak 255) after cropping ``crop_border`` px per side, on Y by default.

    Identical images give ``math.inf`` (zero error), which callers averaging over a set must
    expect.
    """
    a, b = _prepare(sr, hr, crop_border, y_channel)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(_SSIM_L**2 / mse)


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    """Normalised 1-D factor of MATLAB ``fspecial('gaussian', size, sigma)``."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """'valid' 2-D correlation of ``img`` with the separable kernel ``outer(g, g)``."""
    n = len(g)
    h, w = img.shape[0] - n + 1, img.shape[1] - n + 1
    rows = sum(g[k] * img[k : k + h] for k in range(n))
    return sum(g[k] * rows[:, k : k + w] for k in range(n))


def _ssim_2d(a: np.ndarray, b: np.ndarray) -> float:
    """Mean of Wang et al.'s SSIM map of two float64 HxW images on the 0-255 scale."""
    g = _gaussian_window(_SSIM_WINDOW, _SSIM_SIGMA)
    c1 = (_SSIM_K1 * _SSIM_L) ** 2
    c2 = (_SSIM_K2 * _SSIM_L) ** 2
    mu1 = _filter_valid(a, g)
    mu2 = _filter_valid(b, g)
    mu1_sq = mu1 * mu1
    mu2_sq = mu2 * mu2
    mu1_mu2 = mu1 * mu2
    sigma1_sq = _filter_valid(a * a, g) - mu1_sq
    sigma2_sq = _filter_valid(b * b, g) - mu2_sq
    sigma12 = _filter_valid(a * b, g) - mu1_mu2
    num = (2 * mu1_mu2 + c1) * (2 * sigma12 + c2)
    den = (mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2)
    return float(np.mean(num / den))


def ssim(sr: np.ndarray, hr: np.ndarray, crop_border: int, y_channel: bool = True) -> float:
    """SSIM (Wang et al. 2004) after cropping ``crop_border`` px per side, on Y by default.

    Without ``y_channel`` a multi-channel image scores the mean of its per-channel SSIMs.
    """
    a, b = _prepare(sr, hr, crop_border, y_channel)
    if min(a.shape[:2]) < _SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs at least {_SSIM_WINDOW}x{_SSIM_WINDOW} px after cropping, "
            f"got {a.shape[0]}x{a.shape[1]}"
        )
    if a.ndim == 2:
        return _ssim_2d(a, b)
    return float(np.mean([_ssim_2d(a[..., c], b[..., c]) for c in range(a.shape[2])]))
