"""`msconv demo`: nano SMT, SCSC-Swin and ShiftWise trained on the bundled MNIST digits on CPU, in minutes;
``--task detection|segmentation``: Mask R-CNN, RetinaNet or UperNet fine-tuned from the nano SMT on digits canvases."""

from __future__ import annotations

import argparse

HELP = 'train nano SMT, SCSC-Swin and ShiftWise on the bundled digits (CPU, minutes); --task for the dense systems'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '--task',
        default='classification',
        choices=['classification', 'detection', 'segmentation'],
        help="'classification' (default: the three nano families), 'detection' (Mask R-CNN and RetinaNet on "
        "digits canvases, box AP50) or 'segmentation' (UperNet, mIoU)",
    )
    parser.add_argument(
        '--families', nargs='+', default=['smt', 'scsc', 'shiftwise'], help='families to train (default: all three)'
    )
    parser.add_argument(
        '--archs', nargs='+', default=None, help='dense tasks: a subset of mask_rcnn retinanet / upernet'
    )
    parser.add_argument(
        '--pretrained',
        default=None,
        help='dense tasks: the nano SMT backbone (weights file or classification run folder; default runs/demo/smt, '
        'pre-trained first when absent)',
    )
    parser.add_argument('--output', default=None, help='folder for the runs (default runs/demo, runs/demo_dense)')
    parser.add_argument('--epochs', type=int, default=None, help='override the epochs of every run')
    parser.add_argument('--max-steps', type=int, default=None, help='stop every run after this many steps')
    parser.add_argument(
        '--threads',
        type=int,
        default=1,
        help='torch CPU threads for the model (default 1; the data worker uses another core)',
    )
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--no-progress', dest='progress', action='store_false')


def run(args: argparse.Namespace) -> int:
    common = dict(max_steps=args.max_steps, threads=args.threads, progress=args.progress, device=args.device)
    if args.task != 'classification':
        from msconv.engine.demo import dense_demo

        res = dense_demo(
            task=args.task,
            archs=args.archs,
            output=args.output or 'runs/demo_dense',
            pretrained=args.pretrained,
            **common,
        )
    else:
        from msconv.engine.demo import demo

        res = demo(families=args.families, output=args.output or 'runs/demo', epochs=args.epochs, **common)
    print()
    print(res['table'])
    if res['interrupted']:
        print('interrupted')
        return 130
    if args.task != 'classification':
        print(f"\ntotal time {res['total_time_s']:.0f}s (data {res['data_time_s']:.0f}s); backbone {res['backbone']}")
        return 0
    print(f"\ntotal time {res['total_time_s']:.0f}s; curves: {res['curves']}")
    return 0 if all(not r.get('error') for r in res['rows']) else 1
