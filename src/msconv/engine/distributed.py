"""torchrun support: one process per device, set up from the environment torchrun exports.

The same command runs on one machine or many: ``torchrun --nproc_per_node=N [--nnodes ...] -m msconv train ...``
(docs/guides/training.md: a rendezvous endpoint, SLURM, elastic restarts). Without torchrun (no ``WORLD_SIZE`` in
the environment) everything runs in a single process.

Every collective waits at most the process-group timeout: ``dist_timeout`` seconds (``--dist-timeout``), else the
``MSCONV_DIST_TIMEOUT`` environment variable, else 30 minutes (the longest phase one process runs alone, rank 0's
evaluation of a segmentation val set or a checkpoint written to a slow file system, must fit in it). Every process
must run the same configuration: ``check_same_config`` compares them before anything else.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = [
    'DistInfo',
    'JobFailure',
    'job_failure',
    'init_distributed',
    'cleanup_distributed',
    'resolve_device',
    'check_same_config',
    'dist_timeout_seconds',
    'DEFAULT_TIMEOUT_S',
    'sync_bn_plan',
]

DEFAULT_TIMEOUT_S = 1800.0


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


def dist_timeout_seconds(timeout_s: Optional[float] = None) -> float:
    """The process-group timeout: ``timeout_s``, else ``MSCONV_DIST_TIMEOUT`` (seconds), else 30 minutes."""
    if timeout_s is not None:
        return float(timeout_s)
    env = os.environ.get('MSCONV_DIST_TIMEOUT')
    if env is None or env.strip() == '':
        return DEFAULT_TIMEOUT_S
    try:
        value = float(env)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"MSCONV_DIST_TIMEOUT must be a number of seconds > 0, got {env!r}")
    return value


def init_distributed(device: torch.device, timeout_s: Optional[float] = None) -> DistInfo:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU), every collective bounded by
    ``dist_timeout_seconds(timeout_s)``; a no-op for a single process."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ['RANK']), int(os.environ.get('LOCAL_RANK', '0'))
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, False)
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=dist_timeout_seconds(timeout_s))
    dist.init_process_group(backend=backend, timeout=timeout)
    return DistInfo(rank, world_size, local_rank, True)


def cleanup_distributed(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def check_same_config(config: Dict[str, Any], info: DistInfo, shown: int = 3) -> None:
    """Refuse to start when the processes of a torchrun job were given different configurations (``config``: this
    process's resolved options): the same ``ValueError`` on every rank, naming the options that differ and which
    ranks hold which value. Processes that disagree (another ``--max-steps`` on one rank) would otherwise put the
    collectives out of step and wait for the timeout, or train with another seed or learning rate unnoticed."""
    if not info.enabled:
        return
    configs: List[Optional[Dict[str, Any]]] = [None] * info.world_size
    dist.all_gather_object(configs, config)
    differ = []
    for name in config:
        by_value: Dict[str, List[int]] = {}
        for rank, c in enumerate(configs):
            by_value.setdefault(repr(c.get(name)), []).append(rank)
        if len(by_value) > 1:
            differ.append(
                f"{name} is "
                + ', '.join(f"{v} on rank{'s' if len(r) > 1 else ''} {_ranks(r)}" for v, r in by_value.items())
            )
    if differ:
        more = f" (and {len(differ) - shown} more options)" if len(differ) > shown else ''
        raise ValueError(
            f"the {info.world_size} processes of this job were given different configurations: "
            f"{'; '.join(differ[:shown])}{more}; every process must run the same command and config file"
        )


def _ranks(ranks: List[int]) -> str:
    return ', '.join(map(str, ranks))


class JobFailure(RuntimeError):
    """Another process of a torchrun job failed or stopped answering: a collective ended with the transport's
    error (a closed connection, the process-group timeout). ``msconv train`` prints it as one line."""


# what the gloo and NCCL transports say when the other side is gone or too late
_TRANSPORT_ERRORS = (
    'pair closure',
    'Connection closed by peer',
    'Connection reset by peer',
    'Broken pipe',
    'Timed out',
    'timed out',
    'Watchdog caught collective operation timeout',
    'NCCL communicator was aborted',
)


def job_failure(e: BaseException, info: DistInfo, timeout_s: float) -> Optional[JobFailure]:
    """The ``JobFailure`` an error of a collective stands for (None when ``e`` is something else): torch's
    ``DistError`` family, or a ``RuntimeError`` whose message is the transport's."""
    if not info.enabled or not isinstance(e, RuntimeError):
        return None
    text = str(e)
    if not isinstance(e, dist.DistError) and not any(s in text for s in _TRANSPORT_ERRORS):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
    return JobFailure(
        f"rank {info.rank}: another process of the job failed or stopped answering within the process-group timeout "
        f"of {timeout_s:g} s (--dist-timeout): {first[:300]}"
    )


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
