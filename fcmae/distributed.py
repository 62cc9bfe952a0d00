"""torch.distributed set-up from environment variables; no cluster knowledge here.

The launcher (jobs/ for Slurm and submitit, or torchrun) exports RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a process without WORLD_SIZE, or with
WORLD_SIZE=1, runs without a process group.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def select_device(preference: str, local_rank: int) -> torch.device:
    """Return the device for `preference` ('auto', 'cpu' or 'cuda') and this local rank."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA device is visible; use --device cpu or auto")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device_preference: str = "auto", timeout_min: float = 30.0) -> DistEnv:
    """Join the process group described by the environment (gloo on CPU, nccl on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_preference, local_rank)
    if world_size <= 1:
        return DistEnv(0, 1, 0, device)

    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=timeout_min))
    logger.info("rank %d/%d joined the %s process group via %s:%s", rank, world_size, backend,
                os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))
    return DistEnv(rank, world_size, local_rank, device)


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum `tensor` over ranks in place and return it (no-op on one process)."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def destroy(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
