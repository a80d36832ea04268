"""`msconv eval MODEL --checkpoint ... --data ...`: thin wrapper over the evaluation of the checkpoint's task
(``msconv.engine.tasks.evaluate_run``; a classifier: ``msconv.evaluate``)."""

from __future__ import annotations

import argparse

HELP = 'evaluate a checkpoint: top-1/top-5 of a classifier; COCO AP or mIoU of a detection/segmentation run'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # defaults None: an option not given is left to the task, which refuses options that do not apply to it
    parser.add_argument('model', help='model name, e.g. smt_tiny (a run folder names its own)')
    parser.add_argument(
        '--checkpoint',
        default=None,
        help='weights file (.safetensors/.pth), a training checkpoint folder, or a run folder (its task evaluates it)',
    )
    parser.add_argument('--data', default=None, help="'digits' (a classifier's default) or the dataset folder")
    parser.add_argument('--split', default=None, help="classifiers: 'val' (default) or 'train'")
    parser.add_argument('--batch-size', type=int, default=None, help='classifiers: default 128')
    parser.add_argument('--image-size', type=int, default=None)
    parser.add_argument('--device', default='auto')
    parser.add_argument('--workers', type=int, default=None, help='classifiers: data loader workers (default 0)')
    parser.add_argument('--ema', action='store_true', help='evaluate the EMA weights of a training checkpoint')
    parser.add_argument(
        '--which',
        choices=('last', 'best'),
        default=None,
        help="with a classification run folder as --checkpoint: its newest checkpoint ('last', default) or the "
        "weights of its best evaluation ('best')",
    )
    parser.add_argument('--amp', action='store_true', help='bf16 autocast')
    parser.add_argument('--multi-scale', action='store_true', help='segmentation runs: also multi-scale + flip mIoU')
    parser.add_argument(
        '--bad-image-threshold',
        type=float,
        default=None,
        help="the largest fraction of the split's files that may be unusable, each named (default: the run's, 0.01)",
    )
    parser.add_argument(
        '--dtype',
        choices=['fp32', 'bf16', 'fp16'],
        default=None,
        help='evaluate the inference form (msconv.inference_model) with its weights in this dtype',
    )


def run(args: argparse.Namespace) -> int:
    from msconv.engine.tasks import evaluate_run  # deferred: the engine loads torch (`msconv --help` does not)

    task, res = evaluate_run(
        args.model,
        args.checkpoint,
        data=args.data,
        split=args.split,
        batch_size=args.batch_size,
        image_size=args.image_size,
        device=args.device,
        num_workers=args.workers,
        use_ema=args.ema or None,
        which=args.which,
        amp=args.amp or None,
        multi_scale=args.multi_scale or None,
        dtype=args.dtype,
        bad_image_threshold=args.bad_image_threshold,
    )
    print(task.format_evaluation(res))
    return 0
