"""The Markdown model table (name, input, params, MACs, paper top-1, paper) generated from the registry.

``render()`` builds it from what the models themselves declare: the family and paper top-1 given to
``@register_model`` (``msconv.models.model_info``), the paper link from the pretrained cfg (``paper_ids``), and
params and MACs counted by :func:`msconv.tools.profile.profile` on the meta device at the default cfg's input
size (224x224 for the ImageNet models). The README
includes it between ``<!-- model-table:start -->`` and ``<!-- model-table:end -->`` and ``docs/models.md``
holds it too; ``python -m msconv.tools.model_table --write`` regenerates both and a test keeps them in sync.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ['render', 'table_rows', 'readme_section', 'update_readme', 'doc_text', 'write', 'START', 'END']

START = '<!-- model-table:start -->'
END = '<!-- model-table:end -->'
INPUT_SIZE = (3, 224, 224)
_DOC_HEADER = (
    '# msconv models\n\n'
    'Generated from the model registry by `python -m msconv.tools.model_table --write`; do not edit by hand.\n\n'
)


def _paper_link(name: str, paper: Optional[str]) -> str:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    ids = getattr(cfg, 'paper_ids', None) if cfg is not None else None
    ids = [ids] if isinstance(ids, str) else list(ids or [])
    arxiv = next((i.split(':', 1)[1] for i in ids if i.lower().startswith('arxiv:')), None)
    title = paper or (getattr(cfg, 'paper_name', None) if cfg is not None else None) or ''
    if arxiv and title:
        return f'[{title}](https://arxiv.org/abs/{arxiv})'
    return title or '-'


def _input_size(name: str) -> tuple:
    """The default pretrained cfg's input size (3x224x224 for ImageNet models, 112x112 for face models)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    return tuple(getattr(cfg, 'input_size', None) or INPUT_SIZE)


def table_rows(include_test: bool = False, names: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """One dict per registered model (``test_*`` models left out unless ``include_test``; only ``names`` when
    given): families in ``FAMILIES`` order, by parameter count within a family."""
    from msconv.models import FAMILIES, list_models, model_info
    from msconv.tools.profile import profile

    rows: List[Dict[str, Any]] = []
    for family in FAMILIES:
        family_rows = []
        for name in list_models(family=family):
            if (name.startswith('test_') and not include_test) or (names is not None and name not in names):
                continue
            info = model_info(name)
            size = _input_size(name)
            stats = profile(name, input_size=size)
            family_rows.append(
                dict(
                    model=name,
                    family=family,
                    input_size=size,
                    params=stats['params'],
                    macs=stats['macs'],
                    macs_attention=stats['macs_attention'],
                    paper_top1=info.get('paper_top1'),
                    paper_top1_note=info.get('paper_top1_note'),
                    paper=_paper_link(name, info.get('paper')),
                )
            )
        rows += sorted(family_rows, key=lambda r: (r['params'], r['model']))
    return rows


def format_top1(row: Dict[str, Any]) -> str:
    """A row's paper top-1 as the tables show it: '-' when none, with its note (e.g. 22K pre-training)."""
    if row['paper_top1'] is None:
        return '-'
    note = row.get('paper_top1_note')
    return f"{row['paper_top1']:.1f}" + (f" ({note})" if note else '')


def render(include_test: bool = False) -> str:
    """The Markdown table (ends with a newline)."""
    lines = [
        '| Model | Family | Input | Params (M) | GMACs | of which attention | Paper top-1 (%) | Paper |',
        '|---|---|---:|---:|---:|---:|---:|---|',
    ]
    for r in table_rows(include_test):
        top1 = format_top1(r)
        lines.append(
            f"| `{r['model']}` | {r['family']} | {r['input_size'][1]} | {r['params'] / 1e6:.2f} | "
            f"{r['macs'] / 1e9:.2f} | {r['macs_attention'] / 1e9:.2f} | {top1} | {r['paper']} |"
        )
    lines.append('')
    lines.append(
        'MACs are counted with `torch.utils.flop_counter` on one forward pass at the model\'s default input size '
        '(Input x Input; MACs = FLOPs / 2), with '
        'every operator in its plain reference form (the architecture\'s cost, not a fast form\'s zero padding), '
        'and include the attention matmuls, which most model cards leave out. '
        'Paper top-1: ImageNet-1K accuracy reported by the paper for the released weights (trained on ImageNet-1K '
        'from scratch unless noted).'
    )
    return '\n'.join(lines) + '\n'


def readme_section(text: str) -> str:
    """The text between the README markers; ValueError when they are missing or out of order."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README must contain the markers {START!r} and {END!r} (in this order)")
    return text[start + len(START) : end]


def update_readme(text: str, table: str) -> str:
    readme_section(text)  # validates the markers
    return re.sub(
        re.escape(START) + '.*?' + re.escape(END), lambda _: f'{START}\n{table}{END}', text, count=1, flags=re.S
    )


def write(repo_root: Path, table: Optional[str] = None) -> List[Path]:
    """Regenerate ``docs/models.md`` and the README section (when the README has the markers)."""
    table = table if table is not None else render()
    written = []
    doc = repo_root / 'docs' / 'models.md'
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(_DOC_HEADER + table)
    written.append(doc)
    readme = repo_root / 'README.md'
    if readme.is_file() and START in readme.read_text():
        readme.write_text(update_readme(readme.read_text(), table))
        written.append(readme)
    return written


def doc_text(table: str) -> str:
    return _DOC_HEADER + table


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description='print (or --write) the msconv model table')
    parser.add_argument('--write', action='store_true', help='update docs/models.md and the README section')
    parser.add_argument('--root', default='.', help='repository root (default: the current directory)')
    args = parser.parse_args(argv)
    table = render()
    if args.write:
        for path in write(Path(args.root), table):
            print(f'wrote {path}')
    else:
        print(table, end='')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
