"""The generated model table stays in sync with the registry, docs/models.md and the README section."""
from __future__ import annotations

from pathlib import Path

import pytest

import msconv
from msconv.cli import main
from msconv.tools import model_table
from msconv.tools.profile import profile

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
        assert cells[5] == ('-' if info['paper_top1'] is None else f"{info['paper_top1']:.1f}")


def test_table_numbers_match_profile(table):
    name = next(n for n in msconv.list_models() if not n.startswith('test_'))
    stats = profile(name, input_size=(3, 224, 224))
    row = next(line for line in table.splitlines() if line.startswith(f'| `{name}` |'))
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert cells[2] == f"{stats['params'] / 1e6:.2f}" and cells[3] == f"{stats['macs'] / 1e9:.2f}"


def test_docs_models_md_in_sync(table):
    doc = REPO / 'docs' / 'models.md'
    assert doc.is_file(), 'docs/models.md is missing: run `python -m msconv.tools.model_table --write`'
    assert doc.read_text() == model_table.doc_text(table), \
        'docs/models.md is stale: run `python -m msconv.tools.model_table --write`'


def test_readme_section_in_sync(table):
    readme = (REPO / 'README.md').read_text()
    section = model_table.readme_section(readme)  # fails when the markers are missing
    assert section.strip() == table.strip(), \
        'the README model table is stale: run `python -m msconv.tools.model_table --write`'


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
    family = msconv.models.model_family(names[0])
    assert main(['list', '--family', family]) == 0
    out = capsys.readouterr().out
    assert names[0] in out and 'paper top-1' in out


def test_cli_list_bad_family(capsys):
    assert main(['list', '--family', 'resnet']) == 2
    assert 'family must be one of' in capsys.readouterr().err
