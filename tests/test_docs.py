"""The documentation's generated parts (scripts/mkdocs_hooks.py) and its page list; `make docs` builds the site."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
import yaml

import msconv

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def hooks():
    spec = importlib.util.spec_from_file_location('mkdocs_hooks', REPO / 'scripts' / 'mkdocs_hooks.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nav_pages(nav) -> list:
    pages = []
    for item in nav:
        for value in item.values():
            pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_page_is_in_the_nav_and_exists():
    config = yaml.safe_load((REPO / 'mkdocs.yml').read_text())
    nav = _nav_pages(config['nav'])
    on_disk = sorted(str(p.relative_to(REPO / 'docs')) for p in (REPO / 'docs').rglob('*.md'))
    assert sorted(nav) == on_disk


def test_family_pages_ask_for_their_variants():
    for family, page in (('smt', 'smt'), ('scsc', 'scsc'), ('shiftwise', 'shiftwise')):
        text = (REPO / 'docs' / 'families' / f'{page}.md').read_text()
        assert f'<!-- msconv:variants {family} -->' in text


def test_variants_table_lists_the_family(hooks):
    table = hooks.variants_table('smt')
    listed = re.findall(r'^\| `(\w+)` \|', table, re.MULTILINE)
    assert listed == ['smt_tiny', 'smt_small', 'smt_base', 'smt_large']  # by parameter count, no test_ models
    row = next(line for line in table.splitlines() if line.startswith('| `smt_tiny` |'))
    assert [c.strip() for c in row.strip('|').split('|')][1:3] == ['224', '11.51']
    with pytest.raises(ValueError, match='unknown family'):
        hooks.variants_table('nope')


def test_weights_table_gives_every_model_its_licence_and_source(hooks):
    table = hooks.weights_table()
    rows = [[c.strip() for c in line.strip('|').split('|')] for line in table.splitlines()[2:]]
    models = {r[0].strip('`').split('.')[0] for r in rows}
    assert models == {n for n in msconv.list_models() if not n.startswith('test_')}
    by_name = {r[0].strip('`'): r for r in rows}
    release = 'https://github.com/AFeng-x/SMT/releases/download/v1.0.0/'
    assert by_name['smt_tiny.in1k'][1:3] == [f'[smt_tiny.pth]({release}smt_tiny.pth)', 'MIT']
    assert by_name['smt_large.in22k'][3] == '21841'
    assert 'drive.google.com/file/d/1U4DOZv5V9_7wJdqdicjp0tCmNIdRNJOc' in by_name['shiftwise_tiny'][1]
    assert by_name['scsc_resnet50'][1:3] == ['none published', 'Apache-2.0']
    assert all(r[2] != '-' for r in rows), 'a pretrained config without a licence'


def test_weights_load_lines_run_as_written(hooks, tmp_path, monkeypatch):
    """Every line of the generated block is valid Python naming a registered model; the file line of test_smt,
    written the same way, loads a file."""
    import ast

    block = hooks.weights_load()
    code = block.split('```python\n', 1)[1].rsplit('```', 1)[0]
    tree = ast.parse(code)
    names = {c.args[0].value for c in ast.walk(tree) if isinstance(c, ast.Call) and c.args}
    assert 'smt_large.in22k_ft_in1k_384' in names and 'shiftwise_tiny' in names and 'scsc_resnet50' not in names
    assert "model = msconv.create_model('shiftwise_tiny', checkpoint_path='checkpoint.pth')" in code
    from msconv.models._weights import load_lines

    torch.save({'model': msconv.create_model('test_smt').state_dict()}, tmp_path / 'checkpoint.pth')
    monkeypatch.chdir(tmp_path)
    scope = {'msconv': msconv}
    exec('model = ' + load_lines('test_smt')['file'], scope)
    assert scope['model'].num_classes == 1000


def test_cli_reference_covers_every_command(hooks):
    from msconv_cli import build_parser

    text = hooks.cli_reference()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == '_SubParsersAction')
    for name in sub.choices:
        assert f'## msconv {name}\n' in text and f'usage: msconv {name}' in text
    assert '--max-steps' in text  # an option of `msconv demo`, from the parser itself
    blocks = re.findall(r'```text\n(.*?)```', text, re.S)
    widest = max(len(line) for b in blocks for line in b.splitlines())
    assert widest <= hooks.CLI_COLUMNS, f'a help line of {widest} characters is clipped in the content column'


def test_404_links_are_relative_to_the_site_root(hooks):
    html = '<html><head><link href="/assets/x.css"></head><a href="/models.html">m</a><a href="//cdn/x">c</a>'
    out = hooks.relative_404(html, '/')
    assert 'href="./assets/x.css"' in out and 'href="./models.html"' in out and 'href="//cdn/x"' in out
    assert "location.protocol !== 'file:'" in out and "document.write('<base href=\"/\">')" in out
    served = hooks.relative_404('<head></head><a href="/msconv/weights.html">w</a><a href="/other/">o</a>', '/msconv/')
    assert 'href="./weights.html"' in served and 'href="/other/"' in served and '<base href="/msconv/">' in served


def test_forms_tables_list_every_declared_kind_and_tuned_operation(hooks):
    from msconv.layers import forms

    kinds, tuned = hooks.forms_table('kinds'), hooks.forms_table('tuned')
    assert all(f'| {k} |' in kinds for k in forms.FORM_KINDS)
    assert all(f'| `{op}` |' in tuned for op in forms.TUNED)
    assert '`onednn` (onednn + contiguous)' in tuned and '`blas` (plain)' in tuned
    speed = (REPO / 'docs' / 'speed.md').read_text()
    assert '<!-- msconv:forms kinds -->' in speed and '<!-- msconv:forms tuned -->' in speed


def test_markers_are_replaced_and_unknown_ones_fail(hooks):
    page = 'intro\n<!-- msconv:cli -->\nend\n'
    out = hooks.on_page_markdown(page, None, None, None)
    assert '<!-- msconv:' not in out and 'usage: msconv' in out and out.startswith('intro\n')
    with pytest.raises(ValueError, match='unknown documentation marker'):
        hooks.on_page_markdown('<!-- msconv:nothing -->\n', None, None, None)
