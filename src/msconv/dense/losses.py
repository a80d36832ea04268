"""Loss normalisation shared by the dense detectors.

mmdetection divides a batch's summed losses by a count (positive anchors, matched queries, centre-ness targets)
averaged over the processes (``reduce_mean``), so that the mean of the processes' gradients is the gradient of one
process holding the whole batch. :func:`mean_over_processes` is that average (the value itself in one process).
"""

from __future__ import annotations

import torch

__all__ = ['mean_over_processes']


def mean_over_processes(value: float, device: torch.device) -> float:
    """mmdet's ``reduce_mean``: the mean of ``value`` over the processes of the default group (itself alone)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor(value, dtype=torch.float64 if device.type == 'cpu' else torch.float32, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()
