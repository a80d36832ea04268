"""`msconv list [PATTERN] [--family F]`: the registered msconv models."""

from __future__ import annotations

import argparse

HELP = 'list the registered msconv models (glob PATTERN, --family); --markdown prints the model table'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('pattern', nargs='?', default=None, help="glob on the model name, e.g. 'smt_*'")
    parser.add_argument('--family', default=None, help='smt, shiftwise or scsc')
    parser.add_argument('--all', action='store_true', help='include the tiny test_* models')
    parser.add_argument(
        '--markdown',
        action='store_true',
        help="print the Markdown model table (params and MACs at each model's input size, paper top-1, paper)",
    )
    parser.add_argument('--names', action='store_true', help='print the names only, one per line')


def run(args: argparse.Namespace) -> int:
    from msconv.models import list_models  # deferred: msconv loads torch (`msconv --help` and argument errors do not)

    if args.markdown:
        from msconv.tools.model_table import render  # deferred: as msconv above

        print(render(include_test=args.all), end='')
        return 0
    names = list_models(args.pattern or '*', family=args.family)
    if args.pattern is None and not args.all:
        names = [n for n in names if not n.startswith('test_')]
    if args.names:
        print('\n'.join(names))
        return 0
    # deferred: as msconv above
    import timm

    from msconv.tools._table import print_table
    from msconv.tools.model_table import table_rows

    rows = []
    for r in table_rows(include_test=True, names=names):
        tags = [t.split('.', 1)[1] for t in timm.list_pretrained(f"{r['model']}.*")]
        top1 = '-' if r['paper_top1'] is None else f"{r['paper_top1']:.1f}"
        rows.append(
            (
                r['model'],
                r['family'],
                str(r['input_size'][1]),
                f"{r['params'] / 1e6:.2f}",
                f"{r['macs'] / 1e9:.2f}",
                top1,
                ', '.join(tags) or '-',
            )
        )
    print_table(
        f'{len(rows)} msconv models (params and MACs at the input size, counted on the meta device)',
        ('model', 'family', 'input', 'params (M)', 'GMACs', 'paper top-1 (%)', 'pretrained tags'),
        rows,
        left=(0, 1, 6),
    )
    return 0
