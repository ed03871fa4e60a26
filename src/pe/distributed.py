"""torchrun / DistributedDataParallel helpers: one process per GPU (or CPU process with gloo).

Without torchrun (no WORLD_SIZE in the environment, or WORLD_SIZE=1) everything is a no-op and
rank 0 is the only process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_rank() -> int:
    """This process's torchrun rank (0 without torchrun), valid before and after the process group."""
    return int(os.environ.get("RANK", "0"))


def init_distributed() -> DistEnv:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = env_rank()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_gather_objects(env: DistEnv, obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, …]`` on every rank (just ``[obj]`` without DDP)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(env: DistEnv, values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over ranks."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
