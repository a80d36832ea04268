"""The dense systems' speed at the papers' input sizes beside torchvision's R50-FPN detectors (weights=None).

    PYTHONPATH=src python benchmarks/bench_dense.py [--backbones smt_small] [--threads 2] [--iters 2] [--train]
    PYTHONPATH=src python benchmarks/bench_dense.py --small   # micro backbones on small images (a smoke run)
    PYTHONPATH=src python benchmarks/bench_dense.py --archs mask_rcnn retinanet --sizes 512 800 1333 1280x800 --macs

Detection at 1280x800 (COCO), segmentation at 2048x512 (ADE20K), batch 1, inference end to end (resize,
backbone, neck, heads, post-processing) under ``torch.inference_mode``; every model timed interleaved call by
call (``msconv.tools.dense_bench``), the median reported. Ratios: each msconv detector against the torchvision
baseline of its kind measured in the same rounds (RetinaNet vs retinanet_resnet50_fpn, the R-CNNs vs
maskrcnn_resnet50_fpn); UperNet has no torchvision counterpart. Peak memory is the tensor memory one step
allocates above what was live before it. Prints the machine line (CPU, ISA, torch, threads).

``--phases`` adds where each detector's time and MACs go (backbone, FPN, RPN, RoI pooling, heads, the rest).
``--sizes`` runs the detectors at other image sizes (``N`` for N x N, ``WxH``; each model is built with that test
scale, so the image is not resized) and ``--macs`` counts the MACs of each inference call (convolutions, linears and
attention matmuls, as they run: RoI heads on this call's proposals and detections) and prints the speed per MAC
against the torchvision baseline measured in the same rounds: (MACs / s) / (baseline MACs / s). With both,
``--phases --macs`` also prints that ratio phase by phase (a phase's GMAC/s over the baseline's in the same phase):
where a per-MAC gap comes from.

How the comparison is made even: both detectors see the same image, normalized and padded to a multiple of 32 by
their own transforms (1333 -> 1344); each one's MACs are counted as it runs (torchvision's RetinaNet has 91 classes,
msconv's 80: the counts, not the heads, differ); random weights from seed 0 give each a fixed number of detections
(torchvision's more), so its post-processing (phase ``rest``: score threshold, top-k, box decoding, NMS) does more
work; ``--phases`` times it apart, and the line after the phase table prints both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CPU_TIME_HELP, clock_for, machine_line  # noqa: E402

from msconv.tools.dense_bench import (  # noqa: E402
    DENSE_BASELINES,
    bench_dense,
    format_dense_bench,
    format_dense_phases,
)


def _size(text: str):
    w, sep, h = text.lower().partition('x')
    try:
        return (int(h), int(w)) if sep else (int(w), int(w))  # (H, W)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is N or WxH (e.g. 512, 1280x800), got {text!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--backbones', nargs='+', default=['smt_small'])
    parser.add_argument('--archs', nargs='+', default=['mask_rcnn', 'cascade_mask_rcnn', 'retinanet', 'upernet'])
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--iters', type=int, default=2, help='timed calls per model (after one warm-up call)')
    parser.add_argument('--train', action='store_true', help='also time one SGD training step')
    parser.add_argument('--small', action='store_true', help='test_smt on 160x128 / 128x64 images (smoke run)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--sizes', nargs='+', type=_size, default=None, help='detection image sizes: N or WxH')
    parser.add_argument('--macs', action='store_true', help='count MACs and print the speed per MAC')
    parser.add_argument('--cpu-time', action='store_true', help=CPU_TIME_HELP)
    parser.add_argument(
        '--phases', action='store_true', help='also time and count each part of the detectors (backbone, FPN, ...)'
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbones = ['test_smt'] if args.small else args.backbones
    sizes = [None] if args.sizes is None else [{'detection': s} for s in args.sizes]
    if args.small:
        sizes = [{'detection': (128, 160), 'segmentation': (64, 128)}]
    baselines = [b for b in DENSE_BASELINES if any(_wants(b, a) for a in args.archs)]
    print(f"machine: {machine_line(args.threads)}")
    note = '; micro smoke run' if args.small else ''
    clock = 'CPU time' if args.cpu_time else 'wall time'
    print(f"batch 1, {args.iters} timed calls per model, interleaved, median {clock}{note}")
    for size in sizes:
        rows = bench_dense(
            [f"{b}:{a}" for b in backbones for a in args.archs],
            baselines=baselines,
            device=args.device,
            size=size,
            train=args.train,
            num_warm_iter=1,
            num_bench_iter=args.iters,
            macs=args.macs,
            clock=clock_for(args.cpu_time),
            phases=args.phases,
        )
        print(format_dense_bench(rows), flush=True)
        if args.phases:
            print(format_dense_phases(rows), flush=True)
            if args.macs:
                print(format_phase_ratios(rows), flush=True)


def phase_ratios(rows) -> dict:
    """Per-MAC ratio of each detector against its baseline, phase by phase: ``{model: {phase: ratio}}``, the ratio
    being (phase MACs / phase seconds) / (the baseline's same phase MACs / seconds), for the phases with MACs and time
    in both (``rest``, post-processing, has no MACs: see :func:`rest_line`), plus ``'total'`` (the whole call's
    per-MAC ratio from the same rows)."""
    by_name = {r['model']: r for r in rows}
    out = {}
    for r in rows:
        base = by_name.get(r.get('vs'))
        if base is None or 'phases' not in r or 'phases' not in base:
            continue
        ratios = {}
        for phase, (sec, macs) in r['phases'].items():
            b_sec, b_macs = base['phases'].get(phase, (0.0, 0.0))
            if sec > 0 and macs > 0 and b_sec > 0 and b_macs > 0:
                ratios[phase] = (macs / sec) / (b_macs / b_sec)
        ratios['total'] = r['infer_per_mac_ratio']
        out[r['model']] = ratios
    return out


def rest_line(row, base) -> str:
    """What each detector's post-processing did and cost: detections and the ``rest`` phase's milliseconds."""
    rest = lambda r: r['phases'].get('rest', (float('nan'), 0.0))[0] * 1e3  # noqa: E731
    return (
        f"post-processing (phase rest): {row['model']} {row['detections']:.0f} detections, {rest(row):.0f} ms; "
        f"{base['model']} {base['detections']:.0f} detections, {rest(base):.0f} ms"
    )


def format_phase_ratios(rows) -> str:
    """A plain-text table of :func:`phase_ratios`, followed by each detector's :func:`rest_line`."""
    by_name = {r['model']: r for r in rows}
    lines = [('model', 'vs', 'phase', 'per-MAC ratio')]
    notes = []
    for model, ratios in phase_ratios(rows).items():
        row = by_name[model]
        for phase, ratio in ratios.items():
            lines.append((model, row['vs'], phase, '-' if ratio != ratio else f'{ratio:.2f}'))
        notes.append(rest_line(row, by_name[row['vs']]))
    widths = [max(len(str(x)) for x in col) for col in zip(*lines)]
    fmt = lambda row: '  '.join(str(x).ljust(w) for x, w in zip(row, widths))  # noqa: E731
    return '\n'.join([fmt(lines[0]), fmt(['-' * w for w in widths])] + [fmt(x) for x in lines[1:]] + notes)


def _wants(baseline: str, arch: str) -> bool:
    one_stage = arch in ('retinanet', 'atss')
    return ('retinanet' in baseline) == one_stage if arch != 'upernet' else False


if __name__ == '__main__':
    main()
