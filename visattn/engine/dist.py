"""torch.distributed helpers: a process group when launched by torchrun (``WORLD_SIZE`` > 1), NCCL on
GPU and gloo on CPU; no-ops in a single process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["barrier", "get_rank", "get_world_size", "init_distributed", "is_main", "all_reduce_sum"]


def init_distributed(device: str) -> tuple[int, int, int]:
    """(rank, world_size, local_rank); initialises the default group when torchrun set WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return get_rank(), get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
