"""`msconv profile MODEL [MODEL...]`: parameters, MACs (conv/linear and attention) and activations."""

from __future__ import annotations

import argparse
import json

HELP = 'count parameters, MACs (conv+linear and attention matmuls) and activations of a forward pass'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        'models', nargs='+', metavar='MODEL', help='msconv model name, or any timm model (optionally prefixed timm:)'
    )
    parser.add_argument('--img-size', type=int, default=224, help='input height and width (default 224)')
    parser.add_argument('--in-chans', type=int, default=3, help='input channels (default 3)')
    parser.add_argument('--batch-size', type=int, default=1, help='images per forward pass (default 1)')
    parser.add_argument('--json', action='store_true', help='print one JSON object per model instead of a table')


def run(args: argparse.Namespace) -> int:
    # deferred: msconv loads torch (`msconv --help` and argument errors do not)
    from msconv.tools._common import build_model
    from msconv.tools._table import print_table
    from msconv.tools.profile import profile

    if args.img_size < 1 or args.in_chans < 1:
        raise ValueError(f"--img-size and --in-chans must be positive, got {args.img_size} and {args.in_chans}")
    size = (args.in_chans, args.img_size, args.img_size)
    rows = []
    for name in args.models:
        kwargs = {'in_chans': args.in_chans} if args.in_chans != 3 else {}
        model = build_model(name, meta=True, **kwargs)
        stats = profile(model, input_size=size, batch_size=args.batch_size)
        rows.append((name, stats))
    if args.json:
        for name, stats in rows:
            print(json.dumps({'model': name, **{k: v for k, v in stats.items()}}))
        return 0
    other = any(s['macs_other'] for _, s in rows)  # e.g. kernels built from weights alone on every call
    columns = ['model', 'params (M)', 'GMACs total', 'GMACs conv+linear', 'GMACs attention']
    columns += ['GMACs other'] * other + ['activations (M)']
    table = []
    for name, s in rows:
        row = [
            name,
            f"{s['params'] / 1e6:.2f}",
            f"{s['macs'] / 1e9:.3f}",
            f"{s['macs_conv_linear'] / 1e9:.3f}",
            f"{s['macs_attention'] / 1e9:.3f}",
        ]
        row += [f"{s['macs_other'] / 1e9:.3f}"] * other + [f"{s['activations'] / 1e6:.2f}"]
        table.append(row)
    print_table(
        f"forward pass, input {args.batch_size}x{size[0]}x{size[1]}x{size[2]} (MACs = FLOPs / 2, operators in "
        f"their reference form)",
        columns,
        table,
    )
    return 0
