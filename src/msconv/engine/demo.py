"""``msconv.demo``: train a nano variant of each family on the bundled digits (CPU, minutes) and tabulate.

Each nano model is a registered full-size entry point shrunk with constructor keyword arguments (no extra names
are registered). Training uses the 'demo' preset: 32x32 digits, AdamW + warm-up/cosine (timm), label smoothing,
light random-resized-crop, a few epochs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

__all__ = ['DEMO_MODELS', 'demo', 'count_macs', 'format_table']

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
    """Forward multiply-accumulates for one image: ``msconv.tools.profile`` when present, else torch's counter."""
    try:
        from ..tools.profile import profile
    except ImportError:
        profile = None
    if profile is not None:
        res = profile(model, tuple(input_size))
        macs = res.get('macs') if isinstance(res, dict) else getattr(res, 'macs', None)
        if macs is not None:
            return int(macs)
    from torch.utils.flop_counter import FlopCounterMode

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
    from ..models import list_models
    from .build import build_model
    from .metrics import plot_curves, read_metrics
    from .trainer import train

    unknown = [f for f in families if f not in DEMO_MODELS]
    if unknown:
        raise ValueError(f"families must be among {sorted(DEMO_MODELS)}, got {unknown}")
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(output)
    rows, records = [], []
    interrupted = False
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
            plot=True,
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
    curves = (
        plot_curves(records, out / 'curves.png', title='msconv demo: nano models on MNIST digits') if records else None
    )
    return {
        'rows': rows,
        'curves': str(curves) if curves else None,
        'total_time_s': time.perf_counter() - t_all,
        'table': format_table(rows),
        'interrupted': interrupted,
    }
