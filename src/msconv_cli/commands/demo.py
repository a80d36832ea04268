"""`msconv demo`: nano SMT, SCSC-Swin and ShiftWise trained on the bundled MNIST digits on CPU, in minutes."""

from __future__ import annotations

import argparse

HELP = 'train nano SMT, SCSC-Swin and ShiftWise on the bundled digits (CPU, minutes) and print a table'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '--families', nargs='+', default=['smt', 'scsc', 'shiftwise'], help='families to train (default: all three)'
    )
    parser.add_argument('--output', default='runs/demo', help='folder for the runs and curves.png')
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
    from msconv.engine.demo import demo

    res = demo(
        families=args.families,
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
    print(f"\ntotal time {res['total_time_s']:.0f}s; curves: {res['curves']}")
    return 0 if all(not r.get('error') for r in res['rows']) else 1
