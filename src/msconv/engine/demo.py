"""``msconv.demo``: train a nano variant of each family on the bundled digits (CPU, minutes) and tabulate.

Each nano model is a registered full-size entry point shrunk with constructor keyword arguments (no extra names
are registered). Training uses the 'demo' preset: 32x32 digits, AdamW + warm-up/cosine (timm), label smoothing,
light random-resized-crop, a few epochs.

``dense_demo`` (``msconv demo --task detection|segmentation``) fine-tunes the nano SMT trained here as the backbone
of a dense task's systems on MNIST-digit canvases written in the task's file format: the task gives its runs
(``demo_runs``: Mask R-CNN and RetinaNet, and when asked for ATSS and Sparse R-CNN, to box AP50; UperNet to mIoU)
and its digits writer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..models import list_models
from ..tools.profile import profile
from .build import build_model
from .checkpoint import latest_good_checkpoint
from .metrics import plot_curves, plots_missing, read_metrics
from .registry import TASKS, task_class
from .trainer import train

__all__ = [
    'DEMO_MODELS',
    'demo',
    'count_macs',
    'format_table',
    'DENSE_DIGITS',
    'dense_demo',
    'pretrained_nano_backbone',
]

# family -> (entry point, nano keyword arguments, demo-config overrides)
DEMO_MODELS: Dict[str, Dict[str, Any]] = {
    'smt': dict(
        model='smt_tiny',
        model_kwargs=dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), mlp_ratios=(2, 2, 2, 2)),
        overrides=dict(epochs=5),
    ),
    'scsc': dict(
        model='scsc_swin_tiny', model_kwargs=dict(embed_dim=24, depths=(1, 1, 2, 1)), overrides=dict(epochs=5)
    ),
    'shiftwise': dict(
        model='shiftwise_tiny',
        model_kwargs=dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), kernel_sizes=(13, 11, 9, 7), small_kernel=3),
        overrides=dict(epochs=5),
    ),
}


def count_macs(model: torch.nn.Module, input_size: Sequence[int]) -> Optional[int]:
    """Forward multiply-accumulates for one image: ``msconv.tools.profile``'s count, else torch's counter."""
    res = profile(model, tuple(input_size))
    macs = res.get('macs') if isinstance(res, dict) else getattr(res, 'macs', None)
    if macs is not None:
        return int(macs)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_size))
    model.train(was_training)
    return counter.get_total_flops() // 2


def _fmt_count(n: Optional[float], unit: str = '') -> str:
    if n is None:
        return '-'
    for div, suffix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'K')):
        if n >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def format_table(rows: List[Dict[str, Any]]) -> str:
    header = ('family', 'model (nano)', 'params', 'MACs', 'val top-1', 'train img/s', 'eval img/s', 'time')
    lines = []
    for r in rows:
        if r.get('error'):
            lines.append((r['family'], r['model'], '-', '-', r['error'], '-', '-', '-'))
            continue
        lines.append(
            (
                r['family'],
                r['model'],
                _fmt_count(r['params']),
                _fmt_count(r['macs']),
                f"{r['top1']:.2f}%",
                f"{r['train_img_per_s']:.0f}",
                f"{r['eval_img_per_s']:.0f}",
                f"{r['time_s']:.0f}s",
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda row: '  '.join(str(x).ljust(w) for x, w in zip(row, widths))  # noqa: E731
    return '\n'.join([fmt(header), fmt(['-' * w for w in widths])] + [fmt(r) for r in lines])


def _eval_throughput(model: torch.nn.Module, image_size: int, batch: int = 64, reps: int = 5) -> float:
    model.eval()
    x = torch.randn(batch, 3, image_size, image_size)
    with torch.no_grad():
        model(x)
        t0 = time.perf_counter()
        for _ in range(reps):
            model(x)
        dt = time.perf_counter() - t0
    return batch * reps / dt


def demo(
    families: Sequence[str] = ('smt', 'scsc', 'shiftwise'),
    output: str = 'runs/demo',
    epochs: Optional[int] = None,
    max_steps: Optional[int] = None,
    threads: Optional[int] = 1,
    progress: bool = True,
    device: str = 'cpu',
    print_fn=print,
) -> Dict[str, Any]:
    """Train the nano variant of each family on the digits; returns rows (params, MACs, top-1, img/s) + PNG path.

    Args:
        families: any of 'smt', 'scsc', 'shiftwise'.
        epochs / max_steps: shorten the runs (for tests); by default each family's demo setting.
        threads: torch CPU threads for the model (default 1: nano models gain little from intra-op threads, and
            on a 2-core machine the second core runs the data-loading worker; None keeps torch's setting).
    """
    unknown = [f for f in families if f not in DEMO_MODELS]
    if unknown:
        raise ValueError(f"families must be among {sorted(DEMO_MODELS)}, got {unknown}")
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(output)
    rows, records = [], []
    interrupted = False
    missing = plots_missing()
    if missing:  # once for the demo, not once per run
        print_fn(f"{missing}; the demo goes on without it")
    t_all = time.perf_counter()
    for fam in families:
        spec = DEMO_MODELS[fam]
        name = spec['model']
        if name not in list_models():
            rows.append(dict(family=fam, model=name, error=f"{name} is not in this msconv build"))
            continue
        overrides = dict(spec['overrides'])
        if epochs is not None:
            overrides['epochs'] = epochs
        if max_steps is not None:
            overrides['max_steps'] = max_steps
        t0 = time.perf_counter()
        # The demo is meant to be re-run: each family's run replaces the previous demo's run of that family.
        result = train(
            model=name,
            model_kwargs=spec['model_kwargs'],
            preset='demo',
            data='digits',
            output=str(out),
            name=fam,
            progress=progress,
            device=device,
            plot=missing is None,
            overwrite=True,
            **overrides,
        )
        elapsed = time.perf_counter() - t0
        if result['status'] == 'interrupted':  # SIGTERM / Ctrl-C: the run checkpointed; stop the demo too
            interrupted = True
            break
        net = build_model(name, num_classes=10, model_kwargs=spec['model_kwargs'])
        image_size = 32
        row = dict(
            family=fam,
            model=name,
            params=sum(p.numel() for p in net.parameters()),
            macs=count_macs(net, (3, image_size, image_size)),
            top1=result['top1'],
            train_img_per_s=result['train_img_per_s'],
            eval_img_per_s=_eval_throughput(net, image_size),
            time_s=elapsed,
            run_dir=result['run_dir'],
        )
        rows.append(row)
        records += [dict(r, run=fam) for r in read_metrics(result['run_dir'])]
        print_fn(f"{fam}: val top-1 {row['top1']:.2f}% in {elapsed:.0f}s")
    curves = None
    if records and missing is None:
        curves = plot_curves(records, out / 'curves.png', title='msconv demo: nano models on MNIST digits')
    return {
        'rows': rows,
        'curves': str(curves) if curves else None,
        'total_time_s': time.perf_counter() - t_all,
        'table': format_table(rows),
        'interrupted': interrupted,
    }


# ---------------------------------------------------------------------------------------------------------------
# Dense demo: the papers' detectors and segmenter on digits canvases, from the classification demo's nano SMT.

# The digits canvases (msconv.data.dense_digits): 128x128, 1-3 digits of 36-72 px, 10 classes, close to the scale
# the backbone was pre-trained at (28 px digits in 32 px images; at stride 4-32 a 36-72 px digit spans 1-18 cells).
# A dense task adds its own geometry (``demo_digits``) and writes them in its format (``write_digits``).
DENSE_DIGITS: Dict[str, Any] = dict(canvas=(128, 128), digit_size=(36, 72), max_digits=3, n_train=800, n_val=100)


def _classification_checkpoint(path: Path) -> Optional[Path]:
    """The model weights file of a classification run folder's newest valid checkpoint, or None."""
    if not (path / 'checkpoints').is_dir():
        return None
    found = latest_good_checkpoint(path)
    return None if found is None else Path(found[0]) / 'model.safetensors'


def pretrained_nano_backbone(
    output: Union[str, Path], pretrained: Optional[Union[str, Path]] = None, progress: bool = True, print_fn=print
) -> Path:
    """Weights of the nano SMT trained by the classification demo: ``pretrained`` (a weights file or a run
    folder), else ``runs/demo/smt`` (where ``msconv demo`` leaves it), else a classification demo run now
    (``output/pretrain/smt``, a few minutes)."""
    if pretrained is not None:
        p = Path(pretrained)
        if p.is_file():
            return p
        ckpt = _classification_checkpoint(p)
        if ckpt is None:
            raise ValueError(f"pretrained {str(p)!r}: not a weights file nor a run folder with a valid checkpoint")
        return ckpt
    for run in (Path('runs/demo/smt'), Path(output) / 'pretrain' / 'smt'):
        ckpt = _classification_checkpoint(run)
        if ckpt is not None:
            print_fn(f"backbone: the classification demo's nano SMT from {ckpt}")
            return ckpt
    print_fn("backbone: no classification demo checkpoint found; pre-training the nano SMT on the digits first")
    res = demo(families=('smt',), output=str(Path(output) / 'pretrain'), threads=None, progress=progress)
    ckpt = _classification_checkpoint(Path(output) / 'pretrain' / 'smt')
    if res['interrupted'] or ckpt is None:
        raise RuntimeError('the classification pre-training run did not finish')
    return ckpt


def dense_demo(
    task: str = 'detection',
    archs: Optional[Sequence[str]] = None,
    output: str = 'runs/demo_dense',
    pretrained: Optional[str] = None,
    max_steps: Optional[int] = None,
    threads: Optional[int] = 1,
    progress: bool = True,
    device: str = 'cpu',
    print_fn=print,
) -> Dict[str, Any]:
    """Fine-tune the papers' dense systems with the nano SMT backbone on digits canvases written as COCO / ADE20K
    files (read back by the real loaders); returns rows with the metric (box AP50 / mIoU), target and times.

    The task class gives the runs: ``demo_runs`` (system -> the metric, the target, the engine run's options and
    whether it runs by default, ``default``, True unless given),
    ``demo_digits`` (its geometry of the canvases), ``write_digits(root, n_train, n_val, **geometry)`` and
    ``digits_folder``.

    Args:
        task: 'detection' (Mask R-CNN and RetinaNet; ATSS and Sparse R-CNN when named in ``archs``) or
            'segmentation' (UperNet), or any task with ``demo_runs``.
        archs: a subset of the task's systems (default: those whose ``demo_runs`` entry is not ``default=False``).
        pretrained: the backbone's weights (a file or a classification run folder); default: the classification
            demo's run (``runs/demo/smt``), pre-trained here when absent.
        max_steps: shorten each run (tests).
        threads: torch CPU threads (default 1: two threads on two busy cores run several times slower).
    """
    with_runs = [name for name, cls in TASKS.items() if getattr(cls, 'demo_runs', None)]
    if task not in with_runs:
        raise ValueError(f"task must be one of {with_runs}, got {task!r}")
    cls = task_class(task)
    archs = tuple(archs or [a for a, spec in cls.demo_runs.items() if spec.get('default', True)])
    bad = [a for a in archs if a not in cls.demo_runs]
    if bad:
        raise ValueError(f"archs for task {task!r} must be among {tuple(cls.demo_runs)}, got {bad}")
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(output)
    t_all = time.perf_counter()
    weights = pretrained_nano_backbone(out, pretrained, progress=progress, print_fn=print_fn)
    spec = DEMO_MODELS['smt']
    t0 = time.perf_counter()
    data = cls.write_digits(out / 'data' / cls.digits_folder, **DENSE_DIGITS, **cls.demo_digits)
    data_time = time.perf_counter() - t0
    rows, interrupted = [], False
    for arch in archs:
        demo_spec = cls.demo_runs[arch]
        overrides = dict(demo_spec['overrides'], task=task)
        if max_steps is not None:
            overrides['max_steps'] = max_steps
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        result = train(
            model=spec['model'],
            model_kwargs=spec['model_kwargs'],
            init_checkpoint=str(weights),
            data=str(data),
            output=str(out),
            name=arch,
            drop_path=0.0,
            num_workers=1,
            progress=progress,
            device=device,
            plot=False,
            overwrite=True,
            log_every=20,
            ckpt_every=0,
            keep_last=1,
            **overrides,
        )
        elapsed, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
        if result['status'] == 'interrupted':
            interrupted = True
            break
        ev = result['last_eval'] or {}
        value = ev.get(demo_spec['metric'])
        row = dict(
            arch=arch,
            metric=demo_spec['metric'],
            value=value,
            target=demo_spec['target'],
            met=value is not None and value >= demo_spec['target'],
            steps=result['steps'],
            train_time_s=result['train_time_s'],
            time_s=elapsed,
            cpu_s=cpu,
            run_dir=result['run_dir'],
            last_eval=ev,
        )
        rows.append(row)
        print_fn(f"{arch}: {row['metric']} {value:.3f} (target {row['target']}) in {elapsed:.0f}s")
    return {
        'task': task,
        'rows': rows,
        'backbone': str(weights),
        'data': str(data),
        'data_time_s': data_time,
        'total_time_s': time.perf_counter() - t_all,
        'table': format_dense_table(rows),
        'interrupted': interrupted,
    }


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the data workers): the run's cost on a machine it
    would have to itself, where wall time also counts the waits for other programs' work."""
    import resource  # deferred: a Unix-only module, and only the dense demo's timing reads it

    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


def format_dense_table(rows: List[Dict[str, Any]]) -> str:
    header = ('system', 'metric', 'value', 'target', 'met', 'steps', 'train time', 'run time', 'CPU time')
    lines = [
        (
            r['arch'],
            r['metric'],
            '-' if r['value'] is None else f"{r['value']:.3f}",
            f"{r['target']:.2f}",
            'yes' if r['met'] else 'no',
            str(r['steps']),
            f"{r['train_time_s']:.0f}s",
            f"{r['time_s']:.0f}s",
            f"{r['cpu_s']:.0f}s",
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda row: '  '.join(str(x).ljust(w) for x, w in zip(row, widths))  # noqa: E731
    return '\n'.join([fmt(header), fmt(['-' * w for w in widths])] + [fmt(r) for r in lines])
