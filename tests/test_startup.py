"""Start-up: `import msconv` loads only what the models need (torch, timm); the engine, the tools and their
heavy dependencies (every optional extra) load where used. Timings are in benchmarks/bench_startup.py, not asserted
here; tests/test_extras.py checks that the core runs with every extra missing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

HEAVY = (
    'matplotlib',
    'onnx',
    'onnxruntime',
    'onnxscript',
    'skimage',
    'rich',
    'pycocotools',
    'mlxtend',
    'tensorboard',
    'msconv.engine',
    'msconv.tools',
    'msconv.data',
    'msconv_cli',
)


def _loaded_after(code: str):
    probe = textwrap.dedent(f'''
        import sys
        {code}
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
    ''')
    out = subprocess.run(
        [sys.executable, '-c', probe],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO / 'src')),
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_import_msconv_loads_no_engine_tools_or_heavy_extras():
    assert _loaded_after('import msconv, timm; timm.create_model("test_smt")') == '[]'


def test_lazy_names_load_their_module_on_first_use():
    loaded = _loaded_after('import msconv; msconv.train; msconv.SparsityScheduler')
    assert 'msconv.engine' in loaded and 'matplotlib' not in loaded and 'rich' not in loaded


def test_sparsity_scheduler_lives_in_the_engine():
    import msconv
    from msconv.engine.sparsity import SparsityScheduler

    assert msconv.SparsityScheduler is SparsityScheduler
    assert SparsityScheduler.__module__ == 'msconv.engine.sparsity'
    with pytest.raises(ImportError):  # layers never import upwards from the engine
        import msconv.layers.shiftwise_sparsity  # noqa: F401
