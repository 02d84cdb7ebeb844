"""Training checkpoints: atomic writes, weights-only loading, RNG and scheduler state as plain data.

A checkpoint is one ``torch.save`` file of tensors and primitive containers, so it loads with
``torch.load(..., weights_only=True)``; it is written to a temporary file in the same folder,
fsynced and moved over the previous one with ``os.replace``, so a crash at any moment leaves
either the old or the new checkpoint, never a torn file.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nlsr.atomic import atomic_write

#: format tag stored in every training checkpoint
FORMAT = "nlsr-train-checkpoint"
VERSION = 1


class ResumeError(ValueError):
    """A run folder or training checkpoint cannot be resumed; the message names the file."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Atomically ``torch.save`` a training state made of tensors and primitive containers."""
    payload = {"format": FORMAT, "version": VERSION, **state}
    return atomic_write(path, lambda fh: torch.save(payload, fh))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint with ``weights_only=True`` onto the CPU; check its format."""
    path = Path(path)
    if not path.is_file():
        raise ResumeError(f"{path}: no training checkpoint here")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt/foreign files
        raise ResumeError(f"{path}: not a readable training checkpoint ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ResumeError(f"{path}: not an nlsr training checkpoint")
    if state.get("version") != VERSION:
        raise ResumeError(
            f"{path}: checkpoint version {state.get('version')} is not supported ({VERSION})"
        )
    return state


# ----------------------------------------------------------------------------- RNG state


def capture_rng() -> dict[str, Any]:
    """Every global RNG as plain data: Python, NumPy (legacy global), torch CPU and CUDA."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "bit_generator": str(np_state["bit_generator"]),
            "key": [int(x) for x in np_state["state"]["key"]],
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (CUDA states are restored only where devices exist)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if (
        state["cuda"]
        and torch.cuda.is_available()
        and len(state["cuda"]) == torch.cuda.device_count()
    ):
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- scheduler


def scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """``scheduler.state_dict()`` with ``Counter`` milestones turned into a plain dict."""
    state = dict(scheduler.state_dict())
    if isinstance(state.get("milestones"), Counter):
        state["milestones"] = dict(state["milestones"])
    return state


def load_scheduler_state(
    scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict[str, Any]
) -> None:
    """Inverse of :func:`scheduler_state`."""
    state = dict(state)
    if isinstance(state.get("milestones"), dict):
        state["milestones"] = Counter(state["milestones"])
    scheduler.load_state_dict(state)
