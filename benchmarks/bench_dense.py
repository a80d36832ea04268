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
against the torchvision baseline measured in the same rounds: (MACs / s) / (baseline MACs / s).
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


def _wants(baseline: str, arch: str) -> bool:
    one_stage = arch in ('retinanet', 'atss')
    return ('retinanet' in baseline) == one_stage if arch != 'upernet' else False


if __name__ == '__main__':
    main()
