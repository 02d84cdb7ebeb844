"""The benchmark loop: degrade every HR image of a set, super-resolve it, score PSNR/SSIM on Y.

Every step follows the published protocol (``docs`` of the shared material): modcrop, MATLAB
bicubic LR (or the official LR files), input in [0, 1], output clamped, scaled by 255 and
rounded, metrics on the Y channel with ``scale`` pixels cropped from every border.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from nlsr.data import DatasetError, benchmark_images, official_lr_path
from nlsr.inference import DEFAULT_SEED, check_seed, forward, select_device, to_array, to_tensor
from nlsr.io import read_image, write_image
from nlsr.metrics import psnr, ssim
from nlsr.models.descriptor import ModelDescriptor
from nlsr.models.resolve import resolve_model
from nlsr.resize import DEGRADATIONS, degrade, modcrop

__all__ = ["EvalResult", "ImageScore", "evaluate", "lr_image", "score_image"]


@dataclass
class ImageScore:
    """PSNR (dB) and SSIM of one image of a set."""

    name: str
    psnr: float
    ssim: float


@dataclass
class EvalResult:
    """Mean and per-image scores of one model on one set at one scale and degradation."""

    model: str
    dataset: str
    scale: int
    degradation: str
    psnr: float
    ssim: float
    per_image: list[ImageScore] = field(default_factory=list)
    #: How the scores were obtained (noise_sigma, official_lr, chop, self_ensemble, tile).
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON layout: the fields above, ``per_image`` as a list of dicts; an infinite
        PSNR (identical images) becomes ``null``."""
        return {
            "model": self.model,
            "dataset": self.dataset,
            "scale": self.scale,
            "degradation": self.degradation,
            **self.settings,
            "psnr": _finite(self.psnr),
            "ssim": self.ssim,
            "per_image": [
                {"name": s.name, "psnr": _finite(s.psnr), "ssim": s.ssim} for s in self.per_image
            ],
        }


def _finite(value: float) -> float | None:
    """``value``, or None where JSON has no number for it (inf)."""
    return value if math.isfinite(value) else None


def _model_for(model: nn.Module | ModelDescriptor | str, scale: int) -> ModelDescriptor:
    """The model to run, described; the string ``"bicubic"`` builds the baseline."""
    if isinstance(model, str):
        if model != "bicubic":
            raise ValueError(
                f"model {model!r}: evaluate() takes an nn.Module or the string 'bicubic' "
                "(load networks with nlsr.load)"
            )
        return resolve_model(model, scale, pretrained=False)
    if not isinstance(model, nn.Module | ModelDescriptor):
        raise ValueError(f"model must be an nn.Module or 'bicubic', got {type(model).__name__}")
    return resolve_model(model, scale)


def _lr_image(
    hr: np.ndarray,
    hr_path: Path,
    index: int,
    scale: int,
    degradation: str,
    noise_sigma: float,
    official_lr: bool,
) -> np.ndarray:
    """The LR input: the official file, or ``degrade`` with seed ``index`` (for DN)."""
    if not official_lr:
        return degrade(hr, scale, degradation, noise_sigma=noise_sigma, seed=index)
    path = official_lr_path(hr_path, scale)
    if not path.is_file():
        raise DatasetError(f"{path}: official LR file missing (needed by official_lr=True)")
    lr = read_image(path).pixels
    expected = (hr.shape[0] // scale, hr.shape[1] // scale, 3)
    if lr.shape != expected or lr.dtype != hr.dtype:
        raise DatasetError(
            f"{path}: official LR is {lr.dtype} {lr.shape}, expected {hr.dtype} {expected} "
            f"for x{scale} of {hr_path.name}"
        )
    return lr


def _check_hr_size(hr: np.ndarray, path: Path, scale: int) -> None:
    """An HR image must keep SSIM's 11x11 window after ``scale`` px are cut from each border."""
    need = 2 * scale + 11
    if min(hr.shape[:2]) < need:
        raise DatasetError(
            f"{path}: HR image too small to score at x{scale}: {hr.shape[1]}x{hr.shape[0]} "
            f"after cropping to a multiple of {scale}, needs at least {need}x{need} ({scale} px "
            "are cut from each border, then SSIM needs 11x11)"
        )


def _save_dir(save_images: str | Path, dataset: str, scale: int, degradation: str) -> Path:
    """``<save_images>/<dataset>/x<s>`` (BI) or ``.../x<s>_<deg>``, created."""
    sub = f"x{scale}" if degradation == "BI" else f"x{scale}_{degradation}"
    out = Path(save_images) / dataset / sub
    out.mkdir(parents=True, exist_ok=True)
    return out


def lr_image(
    hr_path: Path,
    index: int,
    scale: int,
    degradation: str = "BI",
    noise_sigma: float = 0.0,
    official_lr: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The protocol's pair for image ``index`` of a sorted set: the modcropped HR image and
    its LR input (checked to be large enough to score)."""
    hr = modcrop(read_image(hr_path).pixels, scale)
    _check_hr_size(hr, hr_path, scale)
    return hr, _lr_image(hr, hr_path, index, scale, degradation, noise_sigma, official_lr)


def score_image(
    net: ModelDescriptor,
    hr_path: Path,
    index: int,
    scale: int,
    *,
    degradation: str = "BI",
    noise_sigma: float = 0.0,
    official_lr: bool = False,
    chop: bool = False,
    self_ensemble: bool = False,
    tile: int | None = None,
    seed: int | None = DEFAULT_SEED,
    precision: str = "fp32",
    device: torch.device | None = None,
) -> tuple[ImageScore, np.ndarray]:
    """Score one image of a set as :func:`evaluate` does (``index``: its place in the sorted
    set, the DN noise seed): the score and the quantised SR image that was scored. The input
    goes to ``device`` (default: the network's, the CPU for a parameter-free one)."""
    hr, lr = lr_image(hr_path, index, scale, degradation, noise_sigma, official_lr)
    tensors = [*net.module.parameters(), *net.module.buffers()]
    dev = device or (tensors[0].device if tensors else torch.device("cpu"))
    out = forward(
        net,
        to_tensor(lr).to(dev),
        tile=tile,
        chop=chop,
        self_ensemble=self_ensemble,
        seed=seed,
        precision=precision,
    )
    sr = to_array(out, hr.dtype)
    if sr.shape != hr.shape:
        raise ValueError(
            f"{hr_path.name}: model output {sr.shape} does not match the HR image {hr.shape}"
        )
    return ImageScore(hr_path.stem, psnr(sr, hr, scale), ssim(sr, hr, scale)), sr


def evaluate(
    model: nn.Module | ModelDescriptor | str,
    dataset: str,
    scale: int,
    *,
    degradation: str = "BI",
    noise_sigma: float = 0.0,
    data_root: str | Path | None = None,
    official_lr: bool = False,
    chop: bool = False,
    self_ensemble: bool = False,
    tile: int | None = None,
    device: str | torch.device | None = None,
    save_images: str | Path | None = None,
    max_images: int | None = None,
    progress: bool = False,
    seed: int | None = DEFAULT_SEED,
    precision: str = "fp32",
) -> EvalResult:
    """Score ``model`` (an nn.Module or a descriptor, moved to ``device``, or ``"bicubic"``) on
    a benchmark set; the result is named after the shipped model, else the architecture.

    Each HR image (grayscale replicated to RGB) is modcropped, degraded (``BI``/``BD``/``DN``;
    DN noise seeded with the image's index in the sorted set) or paired with its official LR
    file, super-resolved by :func:`nlsr.inference.forward`, quantised to the HR's bit depth and
    scored on Y with ``scale`` px cropped. ``save_images`` writes the SR images as PNG under
    ``<save_images>/<dataset>/x<scale>[_<deg>]/<name>.png``. ``max_images`` scores only the
    first N images of the sorted set (a quick check during training; not a published figure).
    ``seed`` seeds the network's random draws per image (:func:`nlsr.inference.forward`), so the
    scores are the same on every run and in any image order; None draws afresh every call.
    ``precision="bf16"`` runs the network under bfloat16 autocast (:func:`nlsr.inference.forward`):
    a measurement of what bf16 costs, not the papers' protocol (float32).
    """
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    scale = int(scale)
    deg = degradation.upper()
    if deg not in DEGRADATIONS:
        raise ValueError(f"degradation {degradation!r}: choose one of {', '.join(DEGRADATIONS)}")
    if official_lr and deg != "BI":
        raise ValueError(f"official_lr: the official LR files are BI, not {deg}")
    check_seed(seed)
    net = _model_for(model, scale)
    files = benchmark_images(dataset, data_root)
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        files = files[:max_images]
    dev = select_device(device)
    net.module.to(dev)
    out_dir = _save_dir(save_images, dataset, scale, deg) if save_images is not None else None
    scores: list[ImageScore] = []
    for index, path in enumerate(tqdm(files, desc=f"{dataset} x{scale}", disable=not progress)):
        score, sr = score_image(
            net,
            path,
            index,
            scale,
            degradation=deg,
            noise_sigma=noise_sigma,
            official_lr=official_lr,
            chop=chop,
            self_ensemble=self_ensemble,
            tile=tile,
            seed=seed,
            precision=precision,
            device=dev,
        )
        scores.append(score)
        if out_dir is not None:
            write_image(out_dir / f"{path.stem}.png", sr, overwrite=True)
    return EvalResult(
        model=net.name,
        dataset=dataset,
        scale=scale,
        degradation=deg,
        psnr=math.fsum(s.psnr for s in scores) / len(scores),
        ssim=math.fsum(s.ssim for s in scores) / len(scores),
        per_image=scores,
        settings={
            "noise_sigma": noise_sigma,
            "official_lr": official_lr,
            "chop": chop,
            "self_ensemble": self_ensemble,
            "tile": tile,
            "seed": seed,
            "precision": precision,
        },
    )
