"""torchrun / DistributedDataParallel plumbing for training: the device of each rank.

Launched by ``torchrun`` the trainer joins a process group, NCCL on CUDA and Gloo on CPU; launched
plainly it runs as the single rank 0. The generic part (ranks, process group, collectives) lives
in :mod:`nlsr.distributed`, shared with ``nlsr upscale``; it is re-exported here for the trainer.
"""

from __future__ import annotations

import torch

from nlsr import distributed as _D
from nlsr.distributed import DistInfo, all_mean, any_rank, barrier, gather, teardown
from nlsr.train.config import ConfigError

__all__ = [
    "DistInfo",
    "all_mean",
    "any_rank",
    "barrier",
    "gather",
    "resolve_device",
    "setup",
    "teardown",
]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``train.device`` -> a torch device (``auto``: the local CUDA GPU, else MPS, else CPU)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device: {name!r} requested but MPS is not available")
    return device


def setup(device_name: str) -> DistInfo:
    """Join the torchrun process group if there is one; pick this rank's device."""
    return _D.setup(lambda local_rank: resolve_device(device_name, local_rank))
