"""Make ``src/nlsr/assets/sample.png``: a procedural 256x256 RGB test card for ``nlsr upscale``.

Four quadrants with the structures super-resolution is judged on: a zone plate (every spatial
frequency up to Nyquist), checkerboards and stripes of several periods and angles, smooth
gradients with anti-aliased discs and a ring, and a tiled brick texture. Deterministic: NumPy
only, no external images. Run from the repository root: ``python scripts/make_sample.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nlsr.io import write_image

SIZE = 256
HALF = SIZE // 2
OUT = Path(__file__).resolve().parents[1] / "src" / "nlsr" / "assets" / "sample.png"


def zone_plate(n: int) -> np.ndarray:
    """cos(pi r^2 / n): local frequency r / n cycles per pixel, Nyquist at the edges' middles."""
    y, x = np.mgrid[0:n, 0:n] - (n - 1) / 2
    phase = np.pi * (x * x + y * y) / n
    return np.stack([0.5 + 0.5 * np.cos(phase + shift) for shift in (0.0, 0.8, 1.6)], axis=2)


def checks_and_stripes(n: int) -> np.ndarray:
    """Left: checkerboards of period 16, 8 and 4 px; right: stripes at 0, 30 and 60 degrees."""
    y, x = np.mgrid[0:n, 0:n]
    out = np.zeros((n, n, 3))
    band = n // 3
    for i, period in enumerate((16, 8, 4)):
        rows = slice(i * band, n if i == 2 else (i + 1) * band)
        check = ((x[rows] // (period // 2) + y[rows] // (period // 2)) % 2).astype(float)
        angle = np.deg2rad(30 * i)
        along = x[rows] * np.cos(angle) + y[rows] * np.sin(angle)
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * along / 6)
        left = x[rows] < n // 2
        out[rows, :, 0] = np.where(left, check, stripes)
        out[rows, :, 1] = np.where(left, 1 - check * 0.7, stripes * 0.8)
        out[rows, :, 2] = np.where(left, check * 0.5, 1 - stripes)
    return out


def gradients_and_shapes(n: int) -> np.ndarray:
    """Smooth colour gradients with anti-aliased discs and a ring drawn over them."""
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / n
    img = np.stack([x, y, 1 - 0.5 * (x + y)], axis=2)
    shapes = [((0.3, 0.3), 0.18, (0.95, 0.85, 0.1)), ((0.7, 0.65), 0.22, (0.1, 0.3, 0.8))]
    for (cy, cx), radius, colour in shapes:
        d = np.hypot(y - cy, x - cx) * n
        cover = np.clip(radius * n - d + 0.5, 0, 1)[:, :, None]  # one-pixel anti-aliased edge
        img = img * (1 - cover) + np.array(colour) * cover
    d = np.hypot(y - 0.72, x - 0.25) * n
    ring = np.clip(2.0 - np.abs(d - 0.15 * n), 0, 1)[:, :, None]
    return img * (1 - ring)


def bricks(n: int) -> np.ndarray:
    """Running-bond bricks (16x8 px, mortar 1 px) with a deterministic per-brick shade."""
    y, x = np.mgrid[0:n, 0:n]
    row = y // 8
    shifted = x + (row % 2) * 8
    col = shifted // 16
    mortar = (y % 8 == 0) | (shifted % 16 == 0)
    shade = ((row * 7 + col * 13) % 5) / 10.0
    brick = np.stack([0.55 + shade * 0.6, 0.25 + shade * 0.3, 0.2 + shade * 0.2], axis=2)
    grain = 0.04 * np.sin(x * 1.7 + y * 0.9)[:, :, None]
    return np.where(mortar[:, :, None], 0.85, brick + grain)


def make() -> np.ndarray:
    """The 256x256x3 uint8 test card."""
    img = np.zeros((SIZE, SIZE, 3))
    img[:HALF, :HALF] = zone_plate(HALF)
    img[:HALF, HALF:] = checks_and_stripes(HALF)
    img[HALF:, :HALF] = gradients_and_shapes(HALF)
    img[HALF:, HALF:] = bricks(HALF)
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    print(write_image(OUT, make(), overwrite=True))
