"""torchrun plumbing shared by training and batch upscaling: ranks, process group, collectives.

Launched by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``) a command joins a process group; launched plainly it runs as the single rank 0
and every helper here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the number of processes, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, reports and writes what is written once."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: must be a whole number (set by torchrun)") from None


def launched() -> bool:
    """Whether torchrun (or an equivalent launcher) started more than one process."""
    return _env_int("WORLD_SIZE", 1) > 1


def setup(
    device_for: Callable[[int], torch.device],
    *,
    backend: str | None = None,
    timeout: timedelta | None = None,
) -> DistInfo:
    """Join the torchrun process group if there is one, on the device ``device_for(local_rank)``.

    ``backend``: NCCL on CUDA and Gloo otherwise unless given; ``timeout``: how long a collective
    waits for the slowest rank (None: PyTorch's default)."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = device_for(local_rank)
    if world_size > 1 and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if device.type == "cuda" else "gloo"
        options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            if backend == "nccl":
                options["device_id"] = device
        dist.init_process_group(backend, **options)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def teardown(info: DistInfo, *, wait: bool = True) -> None:
    """Leave the process group, after a final barrier so no rank exits early (``wait``; not
    after an error, when the other ranks may never reach it)."""
    if info.distributed and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank."""
    if info.distributed:
        dist.barrier()


def all_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over ranks (the tensor itself with one process)."""
    if not info.distributed:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / info.world_size


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True if ``flag`` is true on any rank (so every rank stops at the same step)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` in rank order (a one-element list with one process)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
