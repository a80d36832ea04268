"""MkDocs hooks: the generated parts of the documentation site, filled in at build time.

A page asks for generated content with a marker line, replaced before the Markdown is rendered:

- ``<!-- msconv:variants FAMILY -->``: the variants table of one family, from the model registry (params, MACs,
  paper top-1 counted as for ``docs/models.md``);
- ``<!-- msconv:weights -->``: every pretrained config of every registered model, with its licence and source;
- ``<!-- msconv:cli -->``: the ``--help`` of ``msconv`` and of each sub-command, from the argument parsers;
- ``<!-- msconv:forms kinds -->`` / ``<!-- msconv:forms tuned -->``: the kinds of fast form and the tuned
  operations, from the tables that declare them (``msconv.layers.forms.FORM_KINDS`` and ``TUNED``).

An unknown marker fails the build, so a page never ships with a marker left in it.
"""

from __future__ import annotations

import io
import os
import re
from contextlib import redirect_stdout

MARKER = re.compile(r'^<!-- msconv:(\w+)(?: (\S+))? -->$', re.MULTILINE)


def variants_table(family: str) -> str:
    from msconv.models import FAMILIES, list_models
    from msconv.tools import model_table

    if family not in FAMILIES:
        raise ValueError(f'unknown family {family!r} in a variants marker (known: {FAMILIES})')
    names = [n for n in list_models(family=family) if not n.startswith('test_')]
    lines = [
        '| Model | Input | Params (M) | GMACs | of which attention | Paper top-1 (%) |',
        '|---|---:|---:|---:|---:|---:|',
    ]
    for r in model_table.table_rows(names=names):
        top1 = model_table.format_top1(r)
        lines.append(
            f"| `{r['model']}` | {r['input_size'][1]} | {r['params'] / 1e6:.2f} | {r['macs'] / 1e9:.2f} | "
            f"{r['macs_attention'] / 1e9:.2f} | {top1} |"
        )
    return (
        '\n'.join(lines)
        + '\n\nGenerated from the registry at build time (MACs counted as in [All models](../models.md)).\n'
    )


def weights_table() -> str:
    import timm.models

    from msconv.models import list_models, model_family

    lines = ['| Model | Tag | Family | Licence | Classes | Input | Source |', '|---|---|---|---|---:|---:|---|']
    for name in list_models():
        if name.startswith('test_'):
            continue
        for key, cfg in timm.models.get_arch_pretrained_cfgs(name).items():
            tag = key.split('.', 1)[1] if '.' in key else '-'
            source = f'[release file]({cfg.url})' if cfg.url else 'no public weights (random init)'
            licence = cfg.license or '-'
            lines.append(
                f'| `{name}` | {tag} | {model_family(name)} | {licence} | {cfg.num_classes} | '
                f'{cfg.input_size[-1]} | {source} |'
            )
    return '\n'.join(lines) + '\n'


def cli_reference() -> str:
    from msconv_cli import build_parser

    old = os.environ.get('COLUMNS')
    os.environ['COLUMNS'] = '110'  # argparse wraps help to the terminal width: fix it for a reproducible page
    try:
        parser = build_parser()
        sub = next(a for a in parser._actions if a.__class__.__name__ == '_SubParsersAction')
        parts = ['## msconv\n', '```text\n' + parser.format_help() + '```\n']
        for name, p in sorted(sub.choices.items()):
            parts += [f'## msconv {name}\n', '```text\n' + p.format_help() + '```\n']
    finally:
        if old is None:
            os.environ.pop('COLUMNS', None)
        else:
            os.environ['COLUMNS'] = old
    return '\n'.join(parts)


def forms_table(which: str) -> str:
    from msconv.layers import forms

    if which == 'kinds':
        lines = ['| kind | what | needs (besides: not in `reference_forms()`) |', '|---|---|---|']
        lines += [f'| {k.name} | {k.what} | {k.needs()} |' for k in forms.FORM_KINDS.values()]
        source = '`msconv.layers.forms.FORM_KINDS`'
    elif which == 'tuned':
        lines = ['| operation | forms (plain first; what each needs) | keyed by, besides the input | where |']
        lines.append('|---|---|---|---|')
        for op in forms.TUNED.values():
            cands = ', '.join(
                f"`{name}`" + (f" ({' + '.join(needs)})" if needs else ' (plain)' if name == op.plain else '')
                for name, needs in op.candidates.items()
            )
            key = op.key + (' (its structure signature)' if op.per_module else '')
            lines.append(f'| `{op.name}` | {cands} | {key} | {op.where} |')
        source = '`msconv.layers.forms.TUNED`'
    else:
        raise ValueError(f"unknown forms table {which!r} in a forms marker (known: 'kinds', 'tuned')")
    return '\n'.join(lines) + f'\n\nGenerated at build time from {source}, where each is declared once.\n'


def _replace(match: re.Match) -> str:
    kind, arg = match.group(1), match.group(2)
    with redirect_stdout(io.StringIO()):  # keep the build log to MkDocs' own messages
        if kind == 'variants' and arg:
            return variants_table(arg)
        if kind == 'weights' and arg is None:
            return weights_table()
        if kind == 'cli' and arg is None:
            return cli_reference()
        if kind == 'forms' and arg:
            return forms_table(arg)
    raise ValueError(f'unknown documentation marker {match.group(0)!r}')


def on_page_markdown(markdown: str, page, config, files) -> str:
    return MARKER.sub(_replace, markdown)
