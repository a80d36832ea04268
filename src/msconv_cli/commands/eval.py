"""`msconv eval MODEL --checkpoint ... --data ...`: thin wrapper over ``msconv.evaluate``."""

from __future__ import annotations

import argparse

HELP = 'evaluate a checkpoint: top-1/top-5 of a classifier; COCO AP or mIoU of a detection/segmentation run'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('model', help='model name, e.g. smt_tiny')
    parser.add_argument(
        '--checkpoint',
        default=None,
        help='weights file (.safetensors/.pth), a training checkpoint folder, or a run folder',
    )
    parser.add_argument('--data', default='digits', help="'digits' or an ImageFolder root")
    parser.add_argument('--split', default='val', help="'val' (default) or 'train'")
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--image-size', type=int, default=None)
    parser.add_argument('--device', default='auto')
    parser.add_argument('--workers', type=int, default=0)
    parser.add_argument('--ema', action='store_true', help='evaluate the EMA weights of a training checkpoint')
    parser.add_argument(
        '--which',
        choices=('last', 'best'),
        default='last',
        help="with a run folder as --checkpoint: its newest checkpoint ('last', default) or the weights of its best "
        "evaluation ('best')",
    )
    parser.add_argument('--amp', action='store_true', help='bf16 autocast')
    parser.add_argument('--multi-scale', action='store_true', help='segmentation runs: also multi-scale + flip mIoU')
    parser.add_argument(
        '--dtype',
        choices=['fp32', 'bf16', 'fp16'],
        default=None,
        help='evaluate the inference form (msconv.inference_model) with its weights in this dtype',
    )


def run(args: argparse.Namespace) -> int:
    from msconv.engine import evaluate
    from msconv.engine.dense_tasks import dense_run_task, evaluate_dense, format_dense_metrics

    if args.checkpoint is not None and dense_run_task(args.checkpoint) is not None:  # a detection/segmentation run
        res = evaluate_dense(
            args.checkpoint,
            data=None if args.data == 'digits' else args.data,
            use_ema=args.ema,
            multi_scale=args.multi_scale or None,
            device=args.device,
        )
        print(f"weights: {res['checkpoint']} (step {res['step']}){', EMA' if args.ema else ''}")
        print(format_dense_metrics(res))
        return 0
    res = evaluate(
        args.model,
        checkpoint=args.checkpoint,
        data=args.data,
        split=args.split,
        batch_size=args.batch_size,
        image_size=args.image_size,
        device=args.device,
        num_workers=args.workers,
        use_ema=args.ema,
        amp=args.amp,
        which=args.which,
        dtype=args.dtype,
    )
    if res.get('checkpoint'):
        step = '' if res.get('step') is None else f" (step {res['step']})"
        best = ''
        if res.get('which') == 'best' and res.get('best_top1') is not None:
            best = f", best evaluation: top-1 {res['best_top1']:.2f}% at epoch {res['best_epoch']:.3g}"
        print(f"weights: {res['checkpoint']}{step}{', EMA' if args.ema else ''}{best}")
    form = f" ({args.dtype} inference form)" if args.dtype else ''
    print(
        f"{args.model}{form} on {args.data}/{args.split}: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  "
        f"loss {res['val_loss']:.4f}  ({res['count']} images)"
    )
    return 0
