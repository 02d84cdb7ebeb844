"""Periodic validation of a run: its benchmark sets checked before training starts, and the
weights scored on them with the exact evaluation protocol of ``nlsr eval``."""

from __future__ import annotations

import torch
from torch import nn

from nlsr.train.config import TrainConfig


def check_val_sets(cfg: TrainConfig) -> None:
    """Raise now, not hours into the run, when a validation set cannot be found."""
    if cfg.val.every == 0:
        return
    from nlsr.data import benchmark_images

    for name in cfg.val.sets:
        benchmark_images(name, cfg.val.data_root)


def score_val_sets(
    module: nn.Module, cfg: TrainConfig, device: torch.device
) -> dict[str, dict[str, float]]:
    """``{set: {"psnr": dB, "ssim": ...}}`` of ``module`` on every ``val.sets``, in eval mode
    and without touching the global RNGs that training draws from (so that a run with
    validation follows the same steps as one without); the module's mode is restored."""
    from nlsr.evaluation import evaluate

    v, d = cfg.val, cfg.data
    devices = [device.index or 0] if device.type == "cuda" else []
    training = module.training
    scores: dict[str, dict[str, float]] = {}
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        module.eval()
        try:
            for name in v.sets:
                res = evaluate(
                    module,
                    name,
                    cfg.model.scale,
                    degradation=d.degradation,
                    noise_sigma=d.noise_sigma,
                    data_root=v.data_root,
                    max_images=v.max_images,
                    device=device,
                )
                scores[name] = {"psnr": float(res.psnr), "ssim": float(res.ssim)}
        finally:
            module.train(training)
    return scores
