"""Run records: metrics appended to ``metrics.csv`` and ``metrics.jsonl``, loss/accuracy curves as a PNG,
and a progress bar (rich) with loss, learning rate, throughput and ETA."""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

__all__ = ['MetricsLog', 'read_metrics', 'plot_curves', 'Progress']


class MetricsLog:
    """Appends one record per call to ``<run>/metrics.jsonl`` and ``<run>/metrics.csv`` (flushed each time).

    Records have a ``kind`` ('train' or 'val'); the CSV keeps a fixed column set and leaves missing values empty.
    """
    CSV_FIELDS = ('kind', 'step', 'epoch', 'loss', 'lr', 'img_per_s', 'top1', 'top5', 'ema_top1', 'val_loss',
                  'verification', 'bad_images', 'time')

    def __init__(self, run_dir: Union[str, Path]):
        self.run_dir = Path(run_dir)
        self.jsonl = self.run_dir / 'metrics.jsonl'
        self.csv = self.run_dir / 'metrics.csv'

    def truncate_after(self, step: int) -> None:
        """Drop records later than ``step`` (after a resume, the steps past the checkpoint are redone)."""
        from .checkpoint import atomic_write_bytes
        records = [r for r in read_metrics(self.run_dir) if r.get('step', 0) <= step]
        atomic_write_bytes(self.jsonl, ''.join(json.dumps(r) + '\n' for r in records).encode())
        buf = io.StringIO(newline='')
        w = csv.DictWriter(buf, fieldnames=self.CSV_FIELDS, extrasaction='ignore')
        w.writeheader()
        for r in records:
            w.writerow({k: _fmt(r.get(k)) for k in self.CSV_FIELDS})
        atomic_write_bytes(self.csv, buf.getvalue().encode())

    def append(self, record: Dict[str, Any]) -> None:
        with open(self.jsonl, 'a') as f:
            f.write(json.dumps(record) + '\n')
            f.flush()
        new = not self.csv.exists()
        with open(self.csv, 'a', newline='') as f:
            w = csv.DictWriter(f, fieldnames=self.CSV_FIELDS, extrasaction='ignore')
            if new:
                w.writeheader()
            w.writerow({k: _fmt(record.get(k)) for k in self.CSV_FIELDS})


def _fmt(v):
    if v is None:
        return ''
    if isinstance(v, dict):
        return json.dumps(v)
    return v


def read_metrics(run_dir: Union[str, Path]) -> List[Dict[str, Any]]:
    path = Path(run_dir) / 'metrics.jsonl'
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut by a crash
            continue
    return out


def plot_curves(records: List[Dict[str, Any]], path: Union[str, Path], title: str = '') -> Optional[Path]:
    """Training loss (per logged step) and validation top-1 (per evaluation) against the step, as a PNG.

    ``records`` may come from several runs: give each a ``run`` key to draw one line per run.
    """
    import matplotlib
    matplotlib.use('Agg', force=False)
    import matplotlib.pyplot as plt

    if not records:
        return None
    runs: Dict[str, List[Dict[str, Any]]] = {}
    for r in records:
        runs.setdefault(r.get('run', ''), []).append(r)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for run, recs in runs.items():
        tr = [r for r in recs if r.get('kind') == 'train' and r.get('loss') is not None and math.isfinite(r['loss'])]
        va = [r for r in recs if r.get('kind') == 'val']
        label = run or None
        if tr:
            ax_loss.plot([r['step'] for r in tr], [r['loss'] for r in tr], label=label)
        va_loss = [r for r in va if r.get('val_loss') is not None]
        if va_loss and not run:
            ax_loss.plot([r['step'] for r in va_loss], [r['val_loss'] for r in va_loss], 'o-', label='val')
        key = 'top1' if any(r.get('top1') is not None for r in va) else 'verification_acc'
        acc = [r for r in va if r.get(key) is not None]
        if acc:
            ax_acc.plot([r['step'] for r in acc], [r[key] for r in acc], 'o-', label=label)
    ax_loss.set_xlabel('step')
    ax_loss.set_ylabel('loss')
    ax_loss.set_title('training loss')
    ax_acc.set_xlabel('step')
    ax_acc.set_ylabel('val accuracy (%)')
    ax_acc.set_title('validation top-1')
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


class Progress:
    """A rich progress bar over the optimizer steps of a run: loss, lr, img/s and ETA (disabled: no output)."""

    def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True, description: str = 'train'):
        self.enabled = enabled
        self._bar = None
        if not enabled:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)
        self._bar = RichProgress(
            TextColumn('[bold]{task.description}'), BarColumn(), MofNCompleteColumn(),
            TextColumn('{task.fields[info]}'), TimeElapsedColumn(), TextColumn('ETA'), TimeRemainingColumn(),
            transient=False,
        )
        self._task = self._bar.add_task(description, total=total_steps, completed=start_step, info='')
        self._bar.start()

    def update(self, step: int, **info: Any) -> None:
        if self._bar is None:
            return
        text = '  '.join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
        self._bar.update(self._task, completed=step, info=text)

    def print(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.console.print(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
