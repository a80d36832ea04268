"""MkDocs hooks: the generated parts of the documentation site, filled in at build time.

A page asks for generated content with a marker line, replaced before the Markdown is rendered:

- ``<!-- msconv:variants FAMILY -->``: the variants table of one family, from the model registry (params, MACs,
  paper top-1 counted as for ``docs/models.md``);
- ``<!-- msconv:weights -->``: every pretrained config of every registered model, with its licence and source;
- ``<!-- msconv:weights-load -->``: per model with weights, the line that loads them online and the one that loads
  the downloaded file;
- ``<!-- msconv:cli -->``: the ``--help`` of ``msconv`` and of each sub-command, from the argument parsers, at
  ``CLI_COLUMNS`` (the content column's width in code characters: nothing is clipped);
- ``<!-- msconv:forms kinds -->`` / ``<!-- msconv:forms tuned -->``: the kinds of fast form and the tuned
  operations, from the tables that declare them (``msconv.layers.forms.FORM_KINDS`` and ``TUNED``).

An unknown marker fails the build, so a page never ships with a marker left in it. After the build, ``404.html``
gets relative links (it sits at the site's root), so that it works when the site is opened from files.
"""

from __future__ import annotations

import io
import os
import re
from contextlib import redirect_stdout

MARKER = re.compile(r'^<!-- msconv:([\w-]+)(?: (\S+))? -->$', re.MULTILINE)


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


LICENCES = {'mit': 'MIT', 'apache-2.0': 'Apache-2.0'}


def _weights_rows():
    """(model[.tag], pretrained cfg) for every pretrained config of every registered model (no test_ models)."""
    import timm.models

    from msconv.models import list_models
    from msconv.models._weights import MANUAL_DOWNLOADS

    rows = [
        ((key if cfg.url else name), cfg)
        for name in list_models()
        if not name.startswith('test_')
        for key, cfg in timm.models.get_arch_pretrained_cfgs(name).items()
    ]
    manual = set(MANUAL_DOWNLOADS)
    return sorted(rows, key=lambda r: (not r[1].url, r[0] not in manual, r[0]))  # downloadable first


def weights_table() -> str:
    from msconv.models._weights import MANUAL_DOWNLOADS

    lines = ['| Model | Weights | Licence | Classes | Input |', '|---|---|---|---:|---:|']
    for name, cfg in _weights_rows():
        manual = MANUAL_DOWNLOADS.get(name)
        if cfg.url:
            source = f"[{cfg.url.rsplit('/', 1)[-1]}]({cfg.url})"
        elif manual:
            source = f"[{manual['where']}]({manual['url']}) (download by hand)"
        else:
            source = 'none published'
        licence = LICENCES.get(cfg.license, cfg.license or '-')
        lines.append(f'| `{name}` | {source} | {licence} | {cfg.num_classes} | {cfg.input_size[-1]} |')
    return '\n'.join(lines) + '\n'


def weights_load() -> str:
    """One code block: per model with official weights, the online line and the file line."""
    from msconv.models._weights import MANUAL_DOWNLOADS, load_lines

    out = ['```python', 'import msconv, timm']
    for name, cfg in _weights_rows():
        if not (cfg.url or name in MANUAL_DOWNLOADS):
            continue
        lines = load_lines(name)
        out += ["", f"# {name} ({LICENCES.get(cfg.license, cfg.license)})"]
        if lines['online']:
            out.append(f"model = {lines['online']}")
        out.append(f"model = {lines['file']}")
    return '\n'.join(out + ['```']) + '\n'


# Characters of code that the content column shows at the theme's widest layout (Material, 13.6 px monospace in a
# ~690 px column): argparse wraps at COLUMNS - 2.
CLI_COLUMNS = 82


def cli_reference() -> str:
    from msconv_cli import build_parser

    old = os.environ.get('COLUMNS')
    os.environ['COLUMNS'] = str(CLI_COLUMNS)  # argparse wraps help to the terminal width: the content column's
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
        if kind == 'weights-load' and arg is None:
            return weights_load()
        if kind == 'cli' and arg is None:
            return cli_reference()
        if kind == 'forms' and arg:
            return forms_table(arg)
    raise ValueError(f'unknown documentation marker {match.group(0)!r}')


def on_page_markdown(markdown: str, page, config, files) -> str:
    return MARKER.sub(_replace, markdown)


def relative_404(html: str, site_root: str = '/') -> str:
    """``404.html`` with links relative to the site's root (where the file sits): MkDocs writes them absolute
    (``/models.html``), which leads nowhere when the site is opened from files. Served over HTTP, the page may
    answer any missing path, so a ``<base>`` pointing at the site's root is set there (and only there)."""
    html = re.sub(r'(href|src)="' + re.escape(site_root) + r'(?!/)', r'\1="./', html)  # the site's root: here
    base = f"<script>if (location.protocol !== 'file:') document.write('<base href=\"{site_root}\">');</script>"
    return html.replace('<head>', '<head>\n' + base, 1)


def on_post_build(config) -> None:
    from urllib.parse import urlparse

    path = os.path.join(config['site_dir'], '404.html')
    if os.path.isfile(path):
        root = urlparse(config.get('site_url') or '/').path or '/'
        with open(path, encoding='utf-8') as f:
            html = f.read()
        with open(path, 'w', encoding='utf-8') as f:
            f.write(relative_404(html, root if root.endswith('/') else root + '/'))
