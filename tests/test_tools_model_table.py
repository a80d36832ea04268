"""The generated model table stays in sync with the registry, docs/models.md and the README section."""

from __future__ import annotations

from pathlib import Path

import pytest

import msconv
from msconv.cli import main
from msconv.tools import model_table

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def table() -> str:
    return model_table.render()


def test_table_covers_the_registry(table):
    listed = [line.split('`')[1] for line in table.splitlines() if line.startswith('| `')]
    expected = [n for n in msconv.list_models() if not n.startswith('test_')]
    assert sorted(listed) == expected
    for name in expected:
        info = msconv.models.model_info(name)
        row = next(line for line in table.splitlines() if line.startswith(f'| `{name}` |'))
        cells = [c.strip() for c in row.strip('|').split('|')]
        assert cells[1] == info['family']
        note = f" ({info['paper_top1_note']})" if info.get('paper_top1_note') else ''
        assert cells[6] == ('-' if info['paper_top1'] is None else f"{info['paper_top1']:.1f}{note}")


def _cells(text: str, name: str):
    row = next(
        line
        for line in text.splitlines()
        if line.strip().strip('|│ ').startswith(f'`{name}`') or line.strip().strip('|│ ').startswith(f'{name} ')
    )
    return [c.strip().strip('`') for c in row.replace('│', '|').strip().strip('|').split('|')]


def test_table_numbers_match_independent_counts(table):
    """smt_tiny against the reference notes (smt.md: 11.507M parameters; 2.38G conv+linear MACs + 0.08G attention
    at 224), and its parameter count against the module's own tensors."""
    cells = _cells(table, 'smt_tiny')
    assert cells[2] == '224' and cells[3] == '11.51' and cells[5] == '0.08'
    assert abs(float(cells[4]) - (2.38 + 0.08)) <= 0.01
    import torch

    with torch.device('meta'):
        model = msconv.create_model('test_smt')
    n = sum(p.numel() for p in model.parameters())
    assert model_table.table_rows(include_test=True, names=['test_smt'])[0]['params'] == n


def test_docs_models_md_in_sync(table):
    doc = REPO / 'docs' / 'models.md'
    assert doc.is_file(), 'docs/models.md is missing: run `python -m msconv.tools.model_table --write`'
    assert doc.read_text() == model_table.doc_text(table), (
        'docs/models.md is stale: run `python -m msconv.tools.model_table --write`'
    )


def test_readme_section_in_sync(table):
    readme = (REPO / 'README.md').read_text()
    section = model_table.readme_section(readme)  # fails when the markers are missing
    assert section.strip() == table.strip(), (
        'the README model table is stale: run `python -m msconv.tools.model_table --write`'
    )


def test_update_readme_replaces_only_the_section():
    text = f'# x\nintro\n{model_table.START}\nold | table\n{model_table.END}\nrest\n'
    new = model_table.update_readme(text, '| new |\n')
    assert new == f'# x\nintro\n{model_table.START}\n| new |\n{model_table.END}\nrest\n'
    assert model_table.readme_section(new).strip() == '| new |'
    with pytest.raises(ValueError, match='markers'):
        model_table.readme_section('# no markers here\n')


def test_cli_list(capsys):
    assert main(['list', '--names']) == 0
    names = capsys.readouterr().out.split()
    assert names == [n for n in msconv.list_models() if not n.startswith('test_')]
    assert main(['list', 'test_*', '--names']) == 0
    assert capsys.readouterr().out.split() == msconv.list_models('test_*')
    assert main(['list', 'smt_tiny']) == 0
    out = capsys.readouterr().out
    assert 'params (M)' in out and 'GMACs' in out and 'paper top-1' in out
    cells = _cells(out, 'smt_tiny')
    assert cells[1:6] == ['smt', '224', '11.51', '2.46', '82.2']  # reference counts and the paper's top-1


def test_cli_list_bad_family(capsys):
    assert main(['list', '--family', 'resnet']) == 2
    assert 'family must be one of' in capsys.readouterr().err
