"""MATLAB-exact ``imresize`` (bicubic), ``modcrop`` and the benchmark degradations BI, BD, DN.

Published SR numbers are measured on LR images made by MATLAB; reproducing its arithmetic
(kernel, antialiasing, index mirroring, pass order, rounding between passes) is what lets nlsr
regenerate the official ``LR_bicubic`` files bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from functools import lru_cache

import numpy as np

__all__ = [
    "DEGRADATIONS",
    "contributions",
    "degrade",
    "imresize",
    "modcrop",
    "outscale_shape",
    "rescale_output",
    "round_half_up",
]

#: Degradation names accepted by :func:`degrade`.
DEGRADATIONS = ("BI", "BD", "DN")

_INT_MAX = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}

#: BD blur of the RCAN/DLSN test scripts: 7x7 Gaussian, sigma 1.6.
_BD_SIZE = 7
_BD_SIGMA = 1.6


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel with a = -0.5, written as MATLAB's ``cubic``."""
    absx = np.abs(x)
    absx2 = absx * absx
    absx3 = absx2 * absx
    inner = (1.5 * absx3 - 2.5 * absx2 + 1) * (absx <= 1)
    outer = (-0.5 * absx3 + 2.5 * absx2 - 4 * absx + 2) * ((absx > 1) & (absx <= 2))
    return inner + outer


def _box(x: np.ndarray) -> np.ndarray:
    """MATLAB's nearest-neighbour kernel: 1 on [-0.5, 0.5), else 0."""
    return ((x >= -0.5) & (x < 0.5)).astype(np.float64)


_KERNELS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    "cubic": (_cubic, 4.0),
    "box": (_box, 1.0),
}


@lru_cache(maxsize=256)
def contributions(
    in_length: int, out_length: int, scale: float, kernel: str = "cubic", antialias: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Weights ``(out_length, taps)`` and 0-based source indices of one resize pass.

    Follows MATLAB's ``contributions``: output pixel ``i`` (1-based) sits at input coordinate
    ``u = i / scale + 0.5 * (1 - 1 / scale)``; when shrinking with ``antialias`` the kernel is
    stretched by ``1 / scale`` and scaled by ``scale``; weights are normalised per output pixel;
    indices outside the image are mirrored (symmetric padding); all-zero tap columns are dropped.
    """
    func, width = _KERNELS[kernel]
    if scale < 1 and antialias:

        def h(x: np.ndarray) -> np.ndarray:
            return scale * func(scale * x)

        width = width / scale
    else:
        h = func
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    taps = math.ceil(width) + 2
    indices = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]
    weights = h(u[:, None] - indices)
    weights = weights / weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])
    indices = mirror[np.mod(indices.astype(np.int64) - 1, 2 * in_length)]
    keep = np.any(weights != 0, axis=0)
    weights = np.ascontiguousarray(weights[:, keep])
    indices = np.ascontiguousarray(indices[:, keep])
    weights.flags.writeable = False
    indices.flags.writeable = False
    return weights, indices


def round_half_up(x: np.ndarray) -> np.ndarray:
    """Round to the nearest integer, halves upwards (MATLAB ``round`` for non-negative values)."""
    r = np.floor(x)
    return r + (x - r >= 0.5)


def _to_dtype(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Clip to the range of integer ``dtype``, round half up and cast (MATLAB saturation)."""
    return round_half_up(np.clip(x, 0, _INT_MAX[dtype])).astype(dtype)


def _resize_axis(a: np.ndarray, axis: int, weights: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """One separable pass: ``out[i] = sum_k w[i, k] * a[idx[i, k]]`` accumulated in tap order.

    Buffers are reused and updated in place: the pass is bound by memory traffic.
    """
    shape = list(a.shape)
    shape[axis] = weights.shape[0]
    out = np.empty(shape)
    buf = np.empty(shape)
    wshape = [1] * a.ndim
    wshape[axis] = -1
    np.take(a, indices[:, 0], axis=axis, out=out, mode="clip")
    out *= weights[:, 0].reshape(wshape)
    for k in range(1, weights.shape[1]):
        np.take(a, indices[:, k], axis=axis, out=buf, mode="clip")
        buf *= weights[:, k].reshape(wshape)
        out += buf
    return out


def imresize(
    img: np.ndarray,
    scale: float | None = None,
    *,
    output_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """MATLAB ``imresize(img, scale, 'bicubic')`` (antialiased when shrinking), bit-exact.

    ``img`` is HxW or HxWxC. uint8/uint16 input gives the same dtype, rounded (half up) and
    clipped after each pass as MATLAB does; float input gives float64 without rounding. Give
    either ``scale`` (output ``ceil(scale * size)``) or ``output_shape`` ``(H, W)``. The pass
    with the smaller scale factor runs first (MATLAB's order): height first when they are equal.
    """
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"imresize: expected an HxW or HxWxC array, got shape {img.shape}")
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"imresize: empty image of shape {img.shape}")
    integer = img.dtype in _INT_MAX
    if not integer and not np.issubdtype(img.dtype, np.floating):
        raise ValueError(f"imresize: unsupported dtype {img.dtype} (use uint8, uint16 or float)")
    in_shape = img.shape[:2]
    if (scale is None) == (output_shape is None):
        raise ValueError("imresize: give exactly one of scale and output_shape")
    if scale is not None:
        if not scale > 0 or not math.isfinite(scale):
            raise ValueError(f"imresize: scale must be a positive number, got {scale}")
        scales = (float(scale), float(scale))
        out_shape = (math.ceil(scale * in_shape[0]), math.ceil(scale * in_shape[1]))
    else:
        assert output_shape is not None
        out_shape = (int(output_shape[0]), int(output_shape[1]))
        if min(out_shape) < 1:
            raise ValueError(f"imresize: output_shape must be positive, got {output_shape}")
        scales = (out_shape[0] / in_shape[0], out_shape[1] / in_shape[1])
    order = (0, 1) if scales[0] <= scales[1] else (1, 0)
    out = img.astype(np.float64)
    for axis in order:
        weights, indices = contributions(in_shape[axis], out_shape[axis], scales[axis])
        out = _resize_axis(out, axis, weights, indices)
        if integer:
            np.clip(out, 0, _INT_MAX[img.dtype], out=out)
            out = round_half_up(out)
    return out.astype(img.dtype) if integer else out


def outscale_shape(height: int, width: int, outscale: float) -> tuple[int, int]:
    """Size ``(H, W)`` of an ``height x width`` input upscaled by any positive ``outscale``:
    each side ``outscale * side`` rounded half up (at least 1), computed exactly from the
    float's value, so that 3.5 x 9 gives 32 (Real-ESRGAN's ``int()`` would give 31)."""
    if not (math.isfinite(outscale) and outscale > 0):
        raise ValueError(f"outscale must be a positive number, got {outscale}")
    factor = Fraction(outscale)
    h, w = (max(1, math.floor(factor * side + Fraction(1, 2))) for side in (height, width))
    return h, w


def rescale_output(sr: np.ndarray, input_shape: tuple[int, int], outscale: float) -> np.ndarray:
    """A network's output ``sr`` (HxW or HxWxC, ``scale`` x an input of ``input_shape``)
    resized with :func:`imresize` to :func:`outscale_shape` of the input: the model's integer
    scale, then the exact bicubic resize to any output scale. ``sr`` itself when it has that
    size already (``outscale`` equal to the model's scale)."""
    shape = outscale_shape(input_shape[0], input_shape[1], outscale)
    if shape == tuple(sr.shape[:2]):
        return sr
    return imresize(sr, output_shape=shape)


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop height and width down to multiples of ``scale``, keeping the top-left corner."""
    if int(scale) != scale or scale < 1:
        raise ValueError(f"modcrop: scale must be a positive integer, got {scale}")
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def _gaussian_blur_replicate(img: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """``imfilter(img, fspecial('gaussian', size, sigma), 'replicate')`` in float64.

    The normalised 2-D Gaussian is the outer product of the normalised 1-D one, so the filter
    is applied separably (rows then columns).
    """
    r = size // 2
    x = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-(x * x) / (2 * sigma * sigma))
    g /= g.sum()
    pad = [(r, r), (r, r)] + [(0, 0)] * (img.ndim - 2)
    padded = np.pad(img.astype(np.float64), pad, mode="edge")
    h, w = img.shape[:2]
    rows = sum(g[k] * padded[k : k + h] for k in range(size))
    return sum(g[k] * rows[:, k : k + w] for k in range(size))


def _nearest_indices(length: int, scale: int) -> np.ndarray:
    """0-based source indices of MATLAB ``imresize(img, 1/scale, 'nearest')`` along one axis.

    For the integer factors used in practice these are ``scale // 2 + k * scale``
    (x2: 1, 3, 5, ...; x3: 1, 4, 7, ...; x4: 2, 6, 10, ...), the pixel nearest to the centre of
    each ``scale``-wide block, which is also where the published x3 BD script samples.
    """
    weights, indices = contributions(length, math.ceil(length / scale), 1 / scale, "box", False)
    return indices[np.arange(len(indices)), np.argmax(weights, axis=1)]


def degrade(
    hr: np.ndarray,
    scale: int,
    kind: str = "BI",
    *,
    noise_sigma: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """Make the benchmark LR image from an 8/16-bit HR one (modcrop included).

    BI: MATLAB bicubic ``imresize(hr, 1/scale)``. BD: 7x7 Gaussian blur (sigma 1.6, replicate
    borders), rounded, then MATLAB nearest-neighbour subsampling (see :func:`_nearest_indices`).
    DN: BI plus Gaussian noise of std ``noise_sigma`` on the 0-255 scale drawn from
    ``numpy.random.default_rng(seed)``, rounded and clipped.
    """
    hr = np.asarray(hr)
    if hr.dtype not in _INT_MAX:
        raise ValueError(f"degrade: HR must be uint8 or uint16, got {hr.dtype}")
    if hr.ndim not in (2, 3):
        raise ValueError(f"degrade: expected an HxW or HxWxC array, got shape {hr.shape}")
    if int(scale) != scale or scale < 1:
        raise ValueError(f"degrade: scale must be a positive integer, got {scale}")
    scale = int(scale)
    kind = kind.upper()
    if kind not in DEGRADATIONS:
        raise ValueError(f"degrade: unknown degradation {kind!r}; choose from {DEGRADATIONS}")
    if noise_sigma < 0 or not math.isfinite(noise_sigma):
        raise ValueError(f"degrade: noise_sigma must be >= 0, got {noise_sigma}")
    if kind == "DN" and noise_sigma == 0:
        raise ValueError("degrade: DN needs noise_sigma > 0 (papers use 10, 15, 20, 25, 30)")
    if kind != "DN" and noise_sigma != 0:
        raise ValueError(f"degrade: noise_sigma applies only to DN, not {kind}")
    hr = modcrop(hr, scale)
    if hr.shape[0] < 1 or hr.shape[1] < 1:
        raise ValueError(f"degrade: image of shape {hr.shape} is smaller than the scale {scale}")
    if kind == "BD":
        blurred = _to_dtype(_gaussian_blur_replicate(hr, _BD_SIZE, _BD_SIGMA), hr.dtype)
        rows = _nearest_indices(hr.shape[0], scale)
        cols = _nearest_indices(hr.shape[1], scale)
        return np.ascontiguousarray(blurred[rows][:, cols])
    lr = imresize(hr, 1 / scale)
    if kind == "BI":
        return lr
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(lr.shape) * (noise_sigma * _INT_MAX[hr.dtype] / 255)
    return _to_dtype(lr + noise, hr.dtype)
