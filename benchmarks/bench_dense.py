"""The dense systems' speed at the papers' input sizes beside torchvision's R50-FPN detectors (weights=None).

    PYTHONPATH=src python benchmarks/bench_dense.py [--backbones smt_small] [--threads 2] [--iters 2] [--train]
    PYTHONPATH=src python benchmarks/bench_dense.py --small   # micro backbones on small images (a smoke run)

Detection at 1280x800 (COCO), segmentation at 2048x512 (ADE20K), batch 1, inference end to end (resize,
backbone, neck, heads, post-processing) under ``torch.inference_mode``; every model timed interleaved call by
call (``msconv.tools.dense_bench``), the median reported. Ratios: each msconv detector against the torchvision
baseline of its kind measured in the same rounds (RetinaNet vs retinanet_resnet50_fpn, the R-CNNs vs
maskrcnn_resnet50_fpn); UperNet has no torchvision counterpart. Peak memory is the tensor memory one step
allocates above what was live before it. Prints the machine line (CPU, ISA, torch, threads).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line  # noqa: E402

from msconv.tools.dense_bench import DENSE_BASELINES, bench_dense, format_dense_bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--backbones', nargs='+', default=['smt_small'])
    parser.add_argument('--archs', nargs='+', default=['mask_rcnn', 'cascade_mask_rcnn', 'retinanet', 'upernet'])
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--iters', type=int, default=2, help='timed calls per model (after one warm-up call)')
    parser.add_argument('--train', action='store_true', help='also time one SGD training step')
    parser.add_argument('--small', action='store_true', help='test_smt on 160x128 / 128x64 images (smoke run)')
    parser.add_argument('--device', default='cpu')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbones = ['test_smt'] if args.small else args.backbones
    size = {'detection': (128, 160), 'segmentation': (64, 128)} if args.small else None
    rows = bench_dense(
        [f"{b}:{a}" for b in backbones for a in args.archs],
        baselines=DENSE_BASELINES,
        device=args.device,
        size=size,
        train=args.train,
        num_warm_iter=1,
        num_bench_iter=args.iters,
    )
    print(f"machine: {machine_line(args.threads)}")
    note = '; micro smoke run' if args.small else ''
    print(f"batch 1, {args.iters} timed calls per model, interleaved, median{note}")
    print(format_dense_bench(rows))


if __name__ == '__main__':
    main()
