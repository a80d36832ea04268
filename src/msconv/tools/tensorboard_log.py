"""TensorBoard event files of a training run: the scalars of its metrics records (losses, learning rate, throughput,
accuracies, AP / mIoU, the curves ``curves.png`` draws), as timm and mmdetection users watch them.

:class:`TensorBoardWriter` takes the same records ``metrics.jsonl`` holds (``{'kind': 'train'|'val', 'step': ...,
'loss': ..., 'lr': ..., 'top1': ...}``) and writes every finite number as the scalar ``<kind>/<key>`` at its
``step``; :func:`write_run` converts the records of an existing run folder. Needs the ``tensorboard`` extra
(``pip install "msconv[tensorboard]"``); then ``tensorboard --logdir runs/``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from .._extras import require

__all__ = ['TensorBoardWriter', 'write_run', 'read_scalars']

# record fields that are not curves: the x axis, bookkeeping, wall-clock time
NOT_SCALARS = frozenset({'kind', 'step', 'epoch', 'time', 'run', 'checkpoint'})


class TensorBoardWriter:
    """Scalars of metrics records into a TensorBoard event file under ``log_dir``.

    ``purge_step``: after a resume from step N, pass N + 1 so that TensorBoard drops the events the crashed run had
    written past the checkpoint (as ``MetricsLog.truncate_after`` does for ``metrics.jsonl``)."""

    def __init__(self, log_dir: Union[str, os.PathLike], purge_step: Optional[int] = None, flush_secs: int = 30):
        require('tensorboard', 'TensorBoard logging')
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(str(self.log_dir), purge_step=purge_step, flush_secs=flush_secs)

    def write(self, record: Mapping[str, Any]) -> List[str]:
        """Add the record's finite numbers as ``<kind>/<key>`` at its ``step``; returns the tags written."""
        step = record.get('step')
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"record must have an integer 'step', got {step!r}")
        kind = record.get('kind') or 'train'
        tags = []
        for key, value in record.items():
            if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            tag = f'{kind}/{key}'
            self._writer.add_scalar(tag, float(value), step)
            tags.append(tag)
        return tags

    def write_all(self, records: Iterable[Mapping[str, Any]]) -> None:
        for r in records:
            self.write(r)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> 'TensorBoardWriter':
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_run(run_dir: Union[str, os.PathLike], log_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The records of a run folder's ``metrics.jsonl`` as a TensorBoard event file in ``log_dir`` (default
    ``<run>/tensorboard``); returns ``log_dir``."""
    run_dir = Path(run_dir)
    path = run_dir / 'metrics.jsonl'
    if not path.is_file():
        raise FileNotFoundError(f"run_dir {str(run_dir)!r} holds no metrics.jsonl (not a training run folder?)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    log_dir = Path(log_dir) if log_dir is not None else run_dir / 'tensorboard'
    with TensorBoardWriter(log_dir) as writer:
        writer.write_all(records)
    return log_dir


def read_scalars(log_dir: Union[str, os.PathLike]) -> Dict[str, List[Tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of the event files in ``log_dir``, read by TensorBoard's own reader."""
    require('tensorboard', 'reading TensorBoard event files')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={'scalars': 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}
