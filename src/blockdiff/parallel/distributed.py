"""Process-group set-up for torchrun and plain python (one process)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed() -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world, local, device)


def all_reduce_(t: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """In-place sum over ranks (a no-op on one process)."""
    if dist.world_size > 1:
        torch.distributed.all_reduce(t)
    return t


def to_device(obj, device: torch.device):
    """A tensor, or a dataclass of tensors (nested dataclasses, dicts and None allowed), with every tensor
    on ``device``. From the host to a GPU each tensor is pinned first, so the copy is queued without the
    host waiting for the GPU's queue (a copy from pageable memory would)."""
    if isinstance(obj, torch.Tensor):
        if device.type == "cuda" and obj.device.type == "cpu":  # contiguous: pinning refuses expanded views
            return obj.contiguous().pin_memory().to(device, non_blocking=True)
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        moved = {f.name: to_device(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **moved)
    return obj  # None, numbers, strings
