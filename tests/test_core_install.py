"""`pip install msconv` alone: the wheel's core in a fresh virtual environment outside the checkout brings no optional
package, builds and runs smt_tiny, and a feature without its extra names the extra (scripts/check_wheel.sh's first
half, which `make wheel-check` runs in CI with the second half, every extra). Slow: a fresh venv with torch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_the_core_installs_alone_and_runs_a_model(tmp_path):
    r = subprocess.run(
        ['bash', str(REPO / 'scripts' / 'check_wheel.sh'), sys.executable],
        capture_output=True,
        text=True,
        timeout=1800,
        env=dict(os.environ, WHEEL_CHECK_DIR=str(tmp_path / 'wheel-check'), WHEEL_CHECK_CORE_ONLY='1'),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert '(1, 1000)' in out and 'core checks passed' in out
    assert 'ONNX export needs onnx, which is not installed: pip install "msconv[export]"' in out
    packages = out.split('in the virtual environment:\n', 1)[1].splitlines()[0].split()
    for optional in ('onnx', 'onnxruntime', 'matplotlib', 'pycocotools', 'scikit-image', 'rich', 'mlxtend'):
        assert optional not in packages
    assert {'torch', 'torchvision', 'timm', 'safetensors', 'numpy', 'PyYAML', 'msconv'} <= set(packages)
