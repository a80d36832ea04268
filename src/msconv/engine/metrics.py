"""Run records: metrics appended to ``metrics.csv`` and ``metrics.jsonl``, loss/accuracy curves as a PNG,
and a progress bar (rich) with loss, learning rate, throughput and ETA."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Dict, List, Optional, TextIO, Union

from .._extras import missing_extra_message, require
from .checkpoint import RunWriteError, atomic_write_bytes, os_cause

__all__ = ['MetricsLog', 'read_metrics', 'top1_summary', 'draw_curves', 'plot_curves', 'plots_missing', 'Progress']


class MetricsLog:
    """Appends one record per call to ``<run>/metrics.jsonl`` and ``<run>/metrics.csv`` (flushed each time).

    Records have a ``kind`` ('train' or 'val'); the CSV keeps a fixed column set and leaves missing values empty.
    """

    CSV_FIELDS = (
        'kind',
        'step',
        'epoch',
        'loss',
        'lr',
        'img_per_s',
        'top1',
        'top5',
        'ema_top1',
        'val_loss',
        'verification',
        'skipped_files',
        'skipped_annotations',
        'time',
    )

    def __init__(self, run_dir: Union[str, Path]):
        self.run_dir = Path(run_dir)
        self.jsonl = self.run_dir / 'metrics.jsonl'
        self.csv = self.run_dir / 'metrics.csv'

    def truncate_after(self, step: int) -> None:
        """Drop records later than ``step`` (after a resume, the steps past the checkpoint are redone)."""
        records = [r for r in read_metrics(self.run_dir) if r.get('step', 0) <= step]
        atomic_write_bytes(self.jsonl, ''.join(json.dumps(r) + '\n' for r in records).encode())
        buf = io.StringIO(newline='')
        w = csv.DictWriter(buf, fieldnames=self.CSV_FIELDS, extrasaction='ignore')
        w.writeheader()
        for r in records:
            w.writerow({k: _fmt(r.get(k)) for k in self.CSV_FIELDS})
        atomic_write_bytes(self.csv, buf.getvalue().encode())

    def append(self, record: Dict[str, Any]) -> None:
        """Append ``record`` to both files; a write the file system refuses raises ``RunWriteError`` naming the
        file, with both files cut back to what they held (no half record)."""
        sizes = {p: (p.stat().st_size if p.exists() else None) for p in (self.jsonl, self.csv)}
        path = self.jsonl
        try:
            with open(self.jsonl, 'a') as f:
                f.write(json.dumps(record) + '\n')
                f.flush()
            path = self.csv
            with open(self.csv, 'a', newline='') as f:
                w = csv.DictWriter(f, fieldnames=self.CSV_FIELDS, extrasaction='ignore')
                if sizes[self.csv] is None:
                    w.writeheader()
                w.writerow({k: _fmt(record.get(k)) for k in self.CSV_FIELDS})
        except OSError as e:
            for p, size in sizes.items():
                try:
                    if size is None:
                        p.unlink(missing_ok=True)
                    else:
                        os.truncate(p, size)
                except OSError:
                    pass
            raise RunWriteError(
                f"could not write {str(path)!r}: {os_cause(e)}; the metrics files were left as they were", e
            ) from e


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


def top1_summary(
    records: List[Dict[str, Any]], steps_per_epoch: Optional[int] = None, up_to_step: Optional[int] = None
) -> Dict[str, Optional[Dict[str, Any]]]:
    """The last and the best evaluation of a run: ``{'last': {top1, step, epoch}, 'best': {...}}`` (None when no
    evaluation has top-1). The best is the highest top-1, the earliest of equal ones (as the official scripts'
    ``max_accuracy``). ``up_to_step``: ignore later records; ``steps_per_epoch``: recompute ``epoch`` from steps."""
    vals = [r for r in records if r.get('kind') == 'val' and r.get('top1') is not None]
    if up_to_step is not None:
        vals = [r for r in vals if r['step'] <= up_to_step]

    def entry(r):
        epoch = r['step'] / steps_per_epoch if steps_per_epoch else r.get('epoch')
        return {'top1': r['top1'], 'step': r['step'], 'epoch': epoch}

    if not vals:
        return {'last': None, 'best': None}
    return {'last': entry(vals[-1]), 'best': entry(max(vals, key=lambda r: (r['top1'], -r['step'])))}


def draw_curves(records: List[Dict[str, Any]], title: str = ''):
    """A matplotlib figure of the records: losses (training and validation) in the left panel, accuracies
    (validation top-1, EMA top-1, face verification) in the right one, every line in a legend.

    ``records`` may come from several runs: give each a ``run`` key to draw one colour per run.
    """
    matplotlib = require('matplotlib', 'curves.png')  # deferred: ~0.5 s to load, only a run that plots needs it
    matplotlib.use('Agg', force=False)
    import matplotlib.pyplot as plt  # deferred: as matplotlib, after choosing its headless backend

    runs: Dict[str, List[Dict[str, Any]]] = {}
    for r in records:
        runs.setdefault(r.get('run', ''), []).append(r)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (run, recs) in enumerate(runs.items()):
        prefix, color = (f"{run}: " if run else ''), f"C{i}"
        tr = [r for r in recs if r.get('kind') == 'train' and _finite(r.get('loss'))]
        va = [r for r in recs if r.get('kind') == 'val']
        lines = [
            (ax_loss, tr, 'loss', '-', 'train loss'),
            (ax_loss, va, 'val_loss', 'o--', 'val loss'),
            (ax_acc, va, 'top1', 'o-', 'val top-1'),
            (ax_acc, va, 'ema_top1', 's:', 'EMA val top-1'),
            (ax_acc, va, 'verification_acc', 'o-', 'verification accuracy'),
        ]
        for ax, recs_, key, style, label in lines:
            points = [(r['step'], r[key]) for r in recs_ if _finite(r.get(key))]
            if points:
                ax.plot(*zip(*points), style, color=color, label=prefix + label, markersize=4)
    ax_loss.set(xlabel='optimizer step', ylabel='loss', title='loss')
    ax_acc.set(xlabel='optimizer step', ylabel='accuracy (%)', title='accuracy')
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize='small')
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def plots_missing() -> Optional[str]:
    """None when curves.png can be drawn, else the one line naming the extra that draws it (matplotlib is not
    installed); checked without importing matplotlib."""
    if find_spec('matplotlib') is None:
        return missing_extra_message('matplotlib', 'curves.png')
    return None


def plot_curves(records: List[Dict[str, Any]], path: Union[str, Path], title: str = '') -> Optional[Path]:
    """Write :func:`draw_curves` as a PNG (atomically); None when there are no records."""
    require('matplotlib', 'curves.png')
    import matplotlib.pyplot as plt  # deferred: as in draw_curves

    if not records:
        return None
    fig = draw_curves(records, title)
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunWriteError(f"could not write {str(path)!r}: {os_cause(e)}; it was left as it was", e) from e
    finally:
        plt.close(fig)
    return path


class Progress:
    """Progress over the optimizer steps of a run: loss, lr, img/s, elapsed time and ETA.

    On a terminal, a live rich bar; elsewhere (a log file, a pipe, CI) one complete line every ``every`` steps and
    at the last step, so that logs stay readable. ``enabled=False``: no progress output at all.
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        description: str = 'train',
        every: int = 10,
        stream: Optional[TextIO] = None,
    ):
        self.enabled = enabled
        self.total, self.start, self.every = total_steps, start_step, max(int(every), 1)
        self.description = description
        self.stream = stream
        self._t0 = time.perf_counter()
        self._bar = None
        out = stream if stream is not None else sys.stdout
        if not enabled or not (hasattr(out, 'isatty') and out.isatty()) or find_spec('rich') is None:
            return  # line mode; the live bar needs rich (the `progress` extra)
        # deferred: rich loads only for a live bar on a terminal (msconv.train stays light without it)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn('[bold]{task.description}'),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn('{task.fields[info]}'),
            TimeElapsedColumn(),
            TextColumn('ETA'),
            TimeRemainingColumn(),
            transient=False,
            console=Console(file=out),
        )
        self._task = self._bar.add_task(description, total=total_steps, completed=start_step, info='')
        self._bar.start()

    @staticmethod
    def _info(info: Dict[str, Any]) -> str:
        return '  '.join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())

    def update(self, step: int, **info: Any) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=self._info(info))
            return
        if step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self._t0
        done = step - self.start
        eta = _hms(elapsed / done * (self.total - step)) if done > 0 else '?'
        pct = 100.0 * step / max(self.total, 1)
        self.print(
            f"{self.description} step {step}/{self.total} ({pct:.0f}%)  {self._info(info)}  "
            f"elapsed {_hms(elapsed)}  ETA {eta}"
        )

    def print(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.console.print(msg)
        else:
            print(msg, file=self.stream if self.stream is not None else sys.stdout, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
