"""`msconv eval MODEL --checkpoint ... --data ...`: thin wrapper over ``msconv.evaluate``."""

from __future__ import annotations

import argparse

HELP = 'evaluate a checkpoint (top-1/top-5) on the bundled digits or an ImageFolder split'


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
    parser.add_argument('--amp', action='store_true', help='bf16 autocast')
    parser.add_argument(
        '--dtype',
        choices=['fp32', 'bf16', 'fp16'],
        default=None,
        help='evaluate the inference form (msconv.inference_model) with its weights in this dtype',
    )


def run(args: argparse.Namespace) -> int:
    from msconv.engine import evaluate

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
        dtype=args.dtype,
    )
    if res.get('checkpoint'):
        step = '' if res.get('step') is None else f" (step {res['step']})"
        print(f"weights: {res['checkpoint']}{step}{', EMA' if args.ema else ''}")
    form = f" ({args.dtype} inference form)" if args.dtype else ''
    print(
        f"{args.model}{form} on {args.data}/{args.split}: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  "
        f"loss {res['val_loss']:.4f}  ({res['count']} images)"
    )
    return 0
