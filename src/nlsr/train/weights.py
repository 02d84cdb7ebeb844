"""The weights of a run at both ends: those it starts from (``train.warm_start``,
``train.finetune_from``) and the training provenance its exported weight files carry."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nlsr.train.config import ConfigError, TrainConfig
from nlsr.train.data import LoadReport

log = logging.getLogger("nlsr.train")

#: prefix of the upsampler's tensors, re-initialised when fine-tuning to another scale
UPSAMPLER_PREFIX = "tail.0."


def _read_state_dict(path: str, key: str) -> dict[str, torch.Tensor]:
    from nlsr.checkpoint import read_state_dict

    if not Path(path).is_file():
        raise ConfigError(f"{key}: file {path} does not exist")
    state, _ = read_state_dict(path)
    return state


def load_initial_weights(model: nn.Module, cfg: TrainConfig) -> None:
    """Apply ``train.warm_start`` (every tensor, strict) or ``train.finetune_from`` (every
    tensor but the upsampler ``tail.0``, which depends on the scale)."""
    t = cfg.train
    if t.warm_start is not None:
        state = _read_state_dict(t.warm_start, "train.warm_start")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ConfigError(
                f"train.warm_start: {t.warm_start} does not fit {cfg.model.arch}: {exc}"
            ) from exc
        log.info("warm start from %s", t.warm_start)
    elif t.finetune_from is not None:
        state = _read_state_dict(t.finetune_from, "train.finetune_from")
        state = {k: v for k, v in state.items() if not k.startswith(UPSAMPLER_PREFIX)}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise ConfigError(
                f"train.finetune_from: {t.finetune_from} does not fit: {exc}"
            ) from exc
        missing = [k for k in missing if not k.startswith(UPSAMPLER_PREFIX)]
        if missing or unexpected:
            raise ConfigError(
                f"train.finetune_from: {t.finetune_from} does not fit {cfg.model.arch}: "
                f"missing {missing}, unexpected {unexpected}"
            )
        log.info(
            "fine-tuning from %s (upsampler %s* re-initialised)", t.finetune_from, UPSAMPLER_PREFIX
        )


def git_commit() -> str | None:
    """The commit of the nlsr source tree, or None when it is not a git checkout."""
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def provenance(
    cfg: TrainConfig,
    *,
    weights: str,
    step: int,
    data: LoadReport,
    best_psnr: float | None,
    best_step: int | None,
    commit: str | None,
) -> dict[str, Any]:
    """The ``training`` metadata of an exported weight file: which weights (final, best, ema)
    after how many steps, the config, the data used, the best validation score, the versions."""
    from nlsr import __version__

    return {
        "training": {
            "weights": weights,
            "iterations": step,
            "loss": "L1",  # what the loop minimises, with Adam
            "optimizer": "Adam",
            "config": cfg.to_dict(),
            "data": {
                "train_dirs": cfg.data.train_dirs,
                "images_used": data.used,
                "images_found": data.found,
                "degradation": cfg.data.degradation,
                "noise_sigma": cfg.data.noise_sigma,
            },
            "best": {
                "mean_psnr": best_psnr,
                "step": best_step,
                "sets": cfg.val.sets,
            },
            "git_commit": commit,
            "nlsr_version": __version__,
            "torch_version": torch.__version__,
        }
    }
