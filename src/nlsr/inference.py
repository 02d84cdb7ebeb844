"""Run a super-resolution network on an image: whole, chopped as the authors did, in seamless
tiles of bounded memory, and with the x8 self-ensemble.

Tensors are ``(N, 3, H, W)`` float in ``[0, 1]``; :func:`forward` rescales to the model's
``rgb_range`` itself. Arrays are ``HxWx3`` uint8 / uint16.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from itertools import count, product
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from nlsr.io import Image
from nlsr.models.descriptor import ModelDescriptor
from nlsr.models.resolve import resolve_model
from nlsr.tiling import ramp_weights, tile_count, tile_starts

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

__all__ = [
    "DEFAULT_SEED",
    "check_seed",
    "forward",
    "native_bf16",
    "resolve_precision",
    "select_device",
    "tile_count",
    "to_array",
    "to_tensor",
    "upscale",
]

#: LR pixels run in one batch of tiles (tiles bigger than this run one at a time).
TILE_BATCH_PIXELS = 256 * 256
#: Values of ``precision`` (see :func:`forward`): "auto" (bf16 where native, else fp32), float32
#: throughout, bfloat16 autocast, float16 autocast (CUDA only).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

#: Seed of the random draws inside a network (hash projections, k-means initialisation) when
#: none is given: the same input, model and options give the same output on every run.
DEFAULT_SEED = 0

_INT_MAX = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}


def select_device(device: str | torch.device | None = None) -> torch.device:
    """The torch device to run on: ``device`` if given and usable, else cuda > mps > cpu."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r}: not a device name ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {device!r}: Apple MPS is not available on this machine")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: unsupported device type (use cpu, cuda or mps)")
    return dev


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively, so that bf16 autocast is faster than
    float32: CUDA GPUs that support it, CPUs with AVX512-BF16 or AMX (emulated bf16 is slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def resolve_precision(described: ModelDescriptor, precision: str, device: torch.device) -> str:
    """The precision ``forward`` runs ``described`` in on ``device``: "auto" becomes "bf16" where
    the device computes bfloat16 natively and the model allows it, else "fp32"; checks the rest."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if described.bf16 and native_bf16(device) else "fp32"
    if precision != "fp32" and not described.bf16:
        raise ValueError(
            f"--precision {precision}: model {described.name} does not run in reduced precision; "
            "use fp32"
        )
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"--precision fp16 needs a CUDA device; the model is on {device.type}")
    return precision


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8/uint16 array -> (1, 3, H, W) float32 tensor in [0, 1] (v / 255 or v / 65535)."""
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(
            f"to_tensor: expected an HxWx3 array, got {getattr(pixels, 'shape', pixels)}"
        )
    if pixels.dtype not in _INT_MAX:
        raise ValueError(f"to_tensor: expected uint8 or uint16 pixels, got {pixels.dtype}")
    scaled = pixels.astype(np.float32) / np.float32(_INT_MAX[pixels.dtype])
    return torch.from_numpy(np.ascontiguousarray(scaled.transpose(2, 0, 1))).unsqueeze(0)


def to_array(t: torch.Tensor, dtype: DTypeLike = np.uint8) -> np.ndarray:
    """(1, 3, H, W) or (3, H, W) tensor in [0, 1] -> HxWx3 array: clamped, scaled to the dtype's
    maximum and rounded (half to even, as the authors' ``quantize``)."""
    dt = np.dtype(dtype)
    if dt not in _INT_MAX:
        raise ValueError(f"to_array: dtype must be uint8 or uint16, got {dt}")
    if t.dim() == 4:
        if t.shape[0] != 1:
            raise ValueError(f"to_array: expected a single image, got a batch of {t.shape[0]}")
        t = t[0]
    if t.dim() != 3:
        raise ValueError(f"to_array: expected (1, C, H, W) or (C, H, W), got {tuple(t.shape)}")
    q = t.detach().to("cpu", torch.float32).clamp(0, 1).mul_(_INT_MAX[dt]).round_()
    return q.permute(1, 2, 0).numpy().astype(dt)


# ----------------------------------------------------------------------------------------------
# forward


def forward(
    model: nn.Module | ModelDescriptor,
    lr: torch.Tensor,
    *,
    tile: int | None = None,
    overlap: int = 16,
    chop: bool = False,
    chop_min_size: int | None = None,
    chop_shave: int = 10,
    self_ensemble: bool = False,
    progress: bool = False,
    precision: str = "auto",
    seed: int | None = DEFAULT_SEED,
    on_progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Super-resolve ``lr`` (N, C, H, W) in [0, 1] -> float32 (N, C, sH, sW), not clamped, on
    ``lr``'s device (the model runs on its own device, in eval mode, under inference_mode).
    ``model`` is a module or a descriptor (:func:`nlsr.models.resolve_model`): its scale,
    ``rgb_range`` and chop threshold come from there.

    ``seed`` makes the network's random draws (the hash projections of NLSA and GLA, LCoA's
    k-means initialisation) reproducible: every model call (whole image, chop quadrant, batch of
    tiles, self-ensemble variant) first reseeds one CPU generator from ``(seed, call number)``,
    so a given input and options give the same output on every run and device, whatever else
    ran before. ``seed=None`` leaves the blocks' own ``generator`` (by default torch's global
    RNG): a fresh draw each call, as the authors' code does.

    ``precision="bf16"`` runs the model under bfloat16 autocast (convolutions in bfloat16, the
    attention kernels kept in float32), on the CPU or CUDA, for every network; ``"fp16"`` the
    same in float16, on CUDA only. Outputs then differ from float32 by about a grey level, more
    where a hashed position changes bucket (docs/performance.md). ``"auto"`` (default) is bf16
    where the device computes it natively and the model allows it, else fp32
    (:func:`resolve_precision`); evaluation passes ``"fp32"``, the published numbers.

    Modes: the whole image; ``chop``: the authors' ``forward_chop`` (four overlapping quadrants,
    recursing while a quadrant has ``chop_min_size`` pixels or more, pasted without blending);
    ``tile``: overlapping ``tile`` x ``tile`` tiles blended with a raised-cosine window over the
    ``overlap``, memory bounded by the output plus a batch of tiles. ``self_ensemble`` averages
    the 8 flip/transpose variants in float (around chop as the authors did; per tile with tiles);
    ``chop_min_size`` (default: the model's) is the chop threshold in LR pixels.
    ``on_progress(done, total)`` is called after every model call with the tiles (or pieces)
    done so far (:func:`tile_count` gives the tiles before the run).
    """
    if lr.dim() != 4:
        raise ValueError(f"forward: expected an (N, C, H, W) tensor, got shape {tuple(lr.shape)}")
    if tile is not None and chop:
        raise ValueError("tile and chop are alternatives: give one of them")
    if tile is not None and tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile}")
    if tile is not None and not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile) = [0, {tile}), got {overlap}")
    if chop_shave < 1:
        raise ValueError(f"chop_shave must be at least 1 pixel, got {chop_shave}")
    described = resolve_model(model)
    device = _model_device(described.module) or lr.device
    low = _AUTOCAST[resolve_precision(described, precision, device)]
    scale = described.scale
    min_size = described.chop_min_size if chop_min_size is None else chop_min_size
    check_seed(seed)
    plain = _runner(described, low)
    variants = range(8) if self_ensemble else range(1)
    h, w = lr.shape[-2:]
    module = described.module
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode(), _seeded_draws(module, seed) as reseed:

            def run(x: torch.Tensor) -> torch.Tensor:
                reseed()
                return plain(x)

            if tile is not None:
                rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
                with _Bar(len(rows) * len(cols), progress, "tiles", on_progress) as bar:
                    return _forward_tiles(run, lr, scale, tile, overlap, variants, bar)
            pieces = _chop_leaves(h, w, chop_shave, min_size) if chop else 1
            with _Bar(pieces * len(variants), progress, "pieces", on_progress) as bar:
                total: torch.Tensor | None = None
                for k in variants:
                    x = _transform(lr, k)
                    if chop:
                        y = _forward_chop(run, x, scale, chop_shave, min_size, bar)
                    else:
                        y = run(x)
                        bar.update(1)
                    y = _inverse(y, k).to(lr.device)
                    if total is None:  # own copy: the output may alias a model's buffers
                        total = y.clone() if self_ensemble else y
                    else:
                        total.add_(y)
                assert total is not None
                return total.div_(len(variants)) if self_ensemble else total
    finally:
        module.train(was_training)


def check_seed(seed: int | None) -> None:
    """Raise ValueError unless ``seed`` is None or an integer in [0, 2**63)."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63) or None (random), got {seed!r}")


@contextmanager
def _seeded_draws(model: nn.Module, seed: int | None) -> Iterator[Callable[[], None]]:
    """While active, every block of ``model`` that draws random numbers (those with a
    ``generator`` attribute) draws from one CPU generator; the yielded ``reseed()`` seeds it
    from ``(seed, n)`` for the n-th call. With ``seed=None`` nothing changes."""
    blocks = [m for m in model.modules() if hasattr(m, "generator")]
    if seed is None or not blocks:
        yield lambda: None
        return
    generator = torch.Generator()  # on the CPU: the same projections on every device
    calls = count()
    saved = [m.generator for m in blocks]

    def reseed() -> None:
        state = np.random.SeedSequence([int(seed), next(calls)]).generate_state(1, np.uint64)
        generator.manual_seed(int(state[0]))

    for m in blocks:
        m.generator = generator
    try:
        yield reseed
    finally:
        for m, g in zip(blocks, saved, strict=True):
            m.generator = g


#: The autocast dtype of each resolved precision (None: no autocast).
_AUTOCAST: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def _model_device(model: nn.Module) -> torch.device | None:
    """The device of ``model``'s first parameter or buffer; None for a parameter-free model."""
    tensors = [*model.parameters(), *model.buffers()]
    return tensors[0].device if tensors else None


def _runner(
    described: ModelDescriptor, low: torch.dtype | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """x in [0, 1] (any device) -> float32 model output in [0, 1] on the model's device
    (under autocast to ``low``, bfloat16 or float16, when given)."""
    model, scale, rgb_range = described.module, described.scale, described.rgb_range
    device = _model_device(model)  # parameter-free: run where the input is
    floats = [t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    dtype = floats[0] if floats else torch.float32

    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device=device or x.device, dtype=dtype)
        autocast = torch.autocast(x.device.type, dtype=low) if low is not None else nullcontext()
        with autocast:
            y = model(x * rgb_range if rgb_range != 1 else x).float()
        if rgb_range != 1:
            y = y / rgb_range
        expected = (x.shape[0], scale * x.shape[2], scale * x.shape[3])
        if (y.shape[0], y.shape[2], y.shape[3]) != expected:
            raise ValueError(
                f"model {type(model).__name__} returned shape {tuple(y.shape)} for input "
                f"{tuple(x.shape)}; expected {scale}x the input size"
            )
        return y

    return run


class _Bar(tqdm):
    """The progress bar of one :func:`forward` call, which also reports ``(done, total)`` model
    pieces to ``on_progress`` after every update (a web page's progress, for instance)."""

    def __init__(
        self, total: int, show: bool, unit: str, on_progress: Callable[[int, int], None] | None
    ) -> None:
        super().__init__(total=total, disable=not show, unit=unit, desc="upscale", leave=False)
        self.pieces, self.done, self.on_progress = total, 0, on_progress

    def update(self, n: float | None = 1) -> bool | None:
        self.done += int(n or 0)
        if self.on_progress is not None:
            self.on_progress(self.done, self.pieces)
        return super().update(n)


def _transform(x: torch.Tensor, k: int) -> torch.Tensor:
    """Self-ensemble variant k (bit 0: flip W, bit 1: flip H, bit 2: transpose)."""
    if k & 1:
        x = x.flip(-1)
    if k & 2:
        x = x.flip(-2)
    if k & 4:
        x = x.transpose(-1, -2)
    return x


def _inverse(y: torch.Tensor, k: int) -> torch.Tensor:
    """Undo :func:`_transform` (the same operations in reverse order)."""
    if k & 4:
        y = y.transpose(-1, -2)
    if k & 2:
        y = y.flip(-2)
    if k & 1:
        y = y.flip(-1)
    return y


# ----------------------------------------------------------------------------------------------
# chop (EDSR-PyTorch's forward_chop)


def _chop_geometry(h: int, w: int, shave: int) -> tuple[int, int, int, int]:
    """(h_half, w_half, h_size, w_size): quadrant split point and quadrant size."""
    h_half, w_half = h // 2, w // 2
    return h_half, w_half, min(h_half + shave, h), min(w_half + shave, w)


def _chop_recurses(h: int, w: int, shave: int, min_size: int) -> bool:
    _, _, h_size, w_size = _chop_geometry(h, w, shave)
    # the second test stops the recursion on quadrants that no longer shrink (tiny min_size)
    return h_size * w_size >= min_size and (h_size, w_size) != (h, w)


def _chop_leaves(h: int, w: int, shave: int, min_size: int) -> int:
    """How many quadrants the model runs on when chopping an h x w image."""
    if not _chop_recurses(h, w, shave, min_size):
        return 4
    _, _, h_size, w_size = _chop_geometry(h, w, shave)
    return 4 * _chop_leaves(h_size, w_size, shave, min_size)


def _forward_chop(
    run: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    scale: int,
    shave: int,
    min_size: int,
    bar: tqdm,
) -> torch.Tensor:
    """Four corner quadrants of (h//2 + shave, w//2 + shave), each run (or chopped again); the
    top-left gives the output's top-left block, the others their far parts; no blending."""
    h, w = x.shape[-2:]
    h_half, w_half, h_size, w_size = _chop_geometry(h, w, shave)
    quadrants = [
        x[..., :h_size, :w_size],
        x[..., :h_size, w - w_size :],
        x[..., h - h_size :, :w_size],
        x[..., h - h_size :, w - w_size :],
    ]
    outs = []
    recurse = _chop_recurses(h, w, shave, min_size)
    for q in quadrants:
        if recurse:
            outs.append(_forward_chop(run, q, scale, shave, min_size, bar))
        else:
            outs.append(run(q))
            bar.update(1)
    H, W = scale * h, scale * w
    hh, wh, hs, ws = scale * h_half, scale * w_half, scale * h_size, scale * w_size
    out = outs[0].new_empty((*outs[0].shape[:2], H, W))
    out[..., :hh, :wh] = outs[0][..., :hh, :wh]
    out[..., :hh, wh:] = outs[1][..., :hh, ws - (W - wh) :]
    out[..., hh:, :wh] = outs[2][..., hs - (H - hh) :, :wh]
    out[..., hh:, wh:] = outs[3][..., hs - (H - hh) :, ws - (W - wh) :]
    return out


# ----------------------------------------------------------------------------------------------
# tiles


def _forward_tiles(
    run: Callable[[torch.Tensor], torch.Tensor],
    lr: torch.Tensor,
    scale: int,
    tile: int,
    overlap: int,
    variants: range,
    bar: tqdm,
) -> torch.Tensor:
    """Tiles in batches of up to TILE_BATCH_PIXELS LR pixels; each output tile is weighted and
    added into the output on ``lr``'s device (no full-size weight map is kept)."""
    n, _, h, w = lr.shape
    th, tw = min(tile, h), min(tile, w)
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    wy = ramp_weights([scale * r for r in rows], scale * th, scale * h, scale * overlap)
    wx = ramp_weights([scale * c for c in cols], scale * tw, scale * w, scale * overlap)
    grid = list(product(range(len(rows)), range(len(cols))))
    per_batch = max(1, TILE_BATCH_PIXELS // (th * tw * n))
    out: torch.Tensor | None = None
    for batch in _chunks(grid, per_batch):
        x = torch.cat([lr[..., rows[i] : rows[i] + th, cols[j] : cols[j] + tw] for i, j in batch])
        y = None
        for k in variants:
            yk = _inverse(run(_transform(x, k)), k)
            y = yk if y is None else y.add_(yk)
        assert y is not None
        if len(variants) > 1:
            y.div_(len(variants))
        y = y.to(lr.device)
        if out is None:
            out = lr.new_zeros((n, y.shape[1], scale * h, scale * w), dtype=torch.float32)
        for b, (i, j) in enumerate(batch):
            r, c = scale * rows[i], scale * cols[j]
            weight = (wy[i][:, None] * wx[j][None, :]).to(lr.device)
            out[..., r : r + scale * th, c : c + scale * tw] += y[b * n : (b + 1) * n] * weight
        bar.update(len(batch))
    assert out is not None
    return out


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ----------------------------------------------------------------------------------------------
# upscale


def upscale(
    model: nn.Module | ModelDescriptor | str,
    image: np.ndarray | Image,
    *,
    tile: int | None = None,
    overlap: int = 16,
    chop: bool = False,
    self_ensemble: bool = False,
    device: str | torch.device | None = None,
    progress: bool = False,
    scale: int | None = None,
    precision: str = "auto",
    seed: int | None = DEFAULT_SEED,
    on_progress: Callable[[int, int], None] | None = None,
    outscale: float | None = None,
) -> np.ndarray | Image:
    """Super-resolve an image array (HxW, HxWx1 grey; HxWx2 grey+alpha; HxWx3; HxWx4 RGBA;
    uint8 or uint16) or an :class:`~nlsr.io.Image`; returns the same kind, layout and dtype.

    Grey images run as RGB and come back as the rounded mean of the output channels; alpha is
    upscaled with MATLAB bicubic (:func:`nlsr.resize.imresize`). ``model`` is a module, a
    descriptor or a registered architecture's name (a new network, ``nlsr.models.create(name,
    scale or 2)``; sensible for "bicubic"). With ``device`` the model is moved there
    (``nn.Module.to``, in place); otherwise it runs where it is (a model built from a name goes
    to :func:`select_device`). ``seed``: see :func:`forward` (the default gives the same output
    on every run; None draws afresh); ``precision`` and ``on_progress``: see :func:`forward`
    (default precision "auto": bf16 where native). ``outscale``: any positive output scale, the
    model's scale followed by MATLAB-exact bicubic to ``round(outscale * side)``, halves up
    (:func:`nlsr.resize.rescale_output`); None keeps the model's scale."""
    described = resolve_model(model, scale, pretrained=False)
    if isinstance(model, str):
        described.module.eval().to(select_device(device))
    elif device is not None:
        described.module.to(select_device(device))
    pixels, alpha, gray, layout = _split(image)
    lr = to_tensor(pixels)
    if device is not None and not _has_tensors(described.module):
        lr = lr.to(select_device(device))  # a parameter-free model runs where its input is
    sr = forward(
        described,
        lr,
        tile=tile,
        overlap=overlap,
        chop=chop,
        self_ensemble=self_ensemble,
        progress=progress,
        precision=precision,
        seed=seed,
        on_progress=on_progress,
    )
    dtype = pixels.dtype
    if gray:
        colour = np.repeat(to_array(sr.mean(dim=1, keepdim=True), dtype), 3, axis=2)
    else:
        colour = to_array(sr, dtype)
    alpha_up = None
    if alpha is not None:
        from nlsr.resize import imresize

        alpha_up = imresize(alpha, output_shape=colour.shape[:2])
    if outscale is not None:
        from nlsr.resize import rescale_output

        colour = rescale_output(colour, pixels.shape[:2], outscale)
        if alpha_up is not None:
            alpha_up = rescale_output(alpha_up, pixels.shape[:2], outscale)
    if isinstance(image, Image):
        # The colour profile and EXIF metadata go on to the output (written where formats allow).
        return Image(
            colour,
            alpha_up,
            grayscale=gray,
            path=None,
            icc_profile=image.icc_profile,
            exif=image.exif,
        )
    return _join(colour, alpha_up, gray, layout)


def _has_tensors(model: nn.Module) -> bool:
    return any(True for _ in model.parameters()) or any(True for _ in model.buffers())


def _split(image: np.ndarray | Image) -> tuple[np.ndarray, np.ndarray | None, bool, int]:
    """-> (HxWx3 colour, alpha or None, grayscale, array layout: 0 HxW, else channel count)."""
    if isinstance(image, Image):
        return image.pixels, image.alpha, image.grayscale, 3
    if not isinstance(image, np.ndarray):
        raise ValueError(f"upscale: expected an Image or a NumPy array, got {type(image).__name__}")
    a = image[:, :, None] if image.ndim == 2 else image
    if a.ndim != 3 or not 1 <= a.shape[2] <= 4 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"upscale: expected an HxW or HxWxC (C = 1..4) array, got {image.shape}")
    if a.dtype not in _INT_MAX:
        raise ValueError(f"upscale: expected uint8 or uint16 pixels, got {a.dtype}")
    c = a.shape[2]
    gray = c <= 2
    colour = np.repeat(a[:, :, :1], 3, axis=2) if gray else a[:, :, :3]
    alpha = a[:, :, c - 1] if c in (2, 4) else None
    return colour, alpha, gray, 0 if image.ndim == 2 else c


def _join(colour: np.ndarray, alpha: np.ndarray | None, gray: bool, layout: int) -> np.ndarray:
    base = colour[:, :, :1] if gray else colour
    if alpha is not None:
        base = np.concatenate([base, alpha[:, :, None]], axis=2)
    return base[:, :, 0] if layout == 0 else np.ascontiguousarray(base)
