"""`msconv demo`: nano SMT, SCSC-Swin and ShiftWise trained on the bundled MNIST digits on CPU, in minutes;
``--task``: the demo of another task (detection, segmentation: Mask R-CNN, RetinaNet or UperNet fine-tuned from the
nano SMT on digits canvases). Each task runs its own demo (``msconv.engine.tasks.run_demo``)."""

from __future__ import annotations

import argparse

HELP = 'train nano SMT, SCSC-Swin and ShiftWise on the bundled digits (CPU, minutes); --task for the dense systems'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # defaults None: an option not given is left to the task's demo, which refuses options it does not take
    parser.add_argument(
        '--task',
        default='classification',
        help="'classification' (default: the three nano families), 'detection' (Mask R-CNN and RetinaNet on "
        "digits canvases, box AP50; --archs atss sparse_rcnn for the other two) or 'segmentation' (UperNet, mIoU)",
    )
    parser.add_argument('--families', nargs='+', default=None, help='classification: the families (default: all three)')
    parser.add_argument(
        '--archs',
        nargs='+',
        default=None,
        help='dense tasks: a subset of mask_rcnn retinanet atss sparse_rcnn / upernet',
    )
    parser.add_argument(
        '--pretrained',
        default=None,
        help='dense tasks: the nano SMT backbone (weights file or classification run folder; default runs/demo/smt, '
        'pre-trained first when absent)',
    )
    parser.add_argument('--output', default=None, help='folder for the runs (default runs/demo, runs/demo_dense)')
    parser.add_argument('--epochs', type=int, default=None, help='classification: override the epochs of every run')
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
    from msconv.engine.tasks import run_demo  # deferred: the engine loads torch (`msconv --help` does not)

    res = run_demo(
        args.task,
        families=args.families,
        archs=args.archs,
        pretrained=args.pretrained,
        output=args.output,
        epochs=args.epochs,
        max_steps=args.max_steps,
        threads=args.threads,
        progress=args.progress,
        device=args.device,
    )
    print()
    print(res['table'])
    if res['interrupted']:
        print('interrupted')
        return 130
    print(f"\n{res['summary']}")
    return 0 if res['ok'] else 1
