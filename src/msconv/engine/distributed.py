"""torchrun support: one process per device, set up from the environment torchrun exports.

The same command runs on one machine or many: ``torchrun --nproc_per_node=N [--nnodes ...] -m msconv train ...``.
Without torchrun (no ``WORLD_SIZE`` in the environment) everything runs in a single process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ['DistInfo', 'init_distributed', 'cleanup_distributed', 'resolve_device', 'sync_bn_plan']


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda':
        device = f'cuda:{local_rank}'
    return torch.device(device)


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU); a no-op for a single process."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ['RANK']), int(os.environ.get('LOCAL_RANK', '0'))
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, False)
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank, world_size, local_rank, True)


def cleanup_distributed(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def sync_bn_plan(sync_bn: bool, device: torch.device, world_size: int) -> Tuple[bool, Optional[str]]:
    """Whether a run converts its BatchNorm layers to SyncBatchNorm, and the line it prints when it does not although
    ``sync_bn`` asks for it: the conversion happens under torchrun (``world_size`` > 1) on CUDA devices; torch's
    SyncBatchNorm has no CPU kernels, so a CPU run of several processes keeps plain BatchNorm and says so. One
    process needs none (its batch statistics are the whole batch's)."""
    if not sync_bn or world_size <= 1:
        return False, None
    if device.type != 'cuda':
        return False, (
            f"sync_bn: torch's SyncBatchNorm runs on CUDA only; this {device.type} run of {world_size} processes keeps "
            f"plain BatchNorm (each process normalises over its own images; --no-sync-bn to silence)"
        )
    return True, None
