"""``benchmarks/bench_dense.py --phases --macs``: the per-MAC ratio phase by phase against the torchvision baseline
(where a detector's per-MAC gap comes from) and the post-processing line that says what each detector's ``rest``
phase did; the figures themselves are timings and are not asserted."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO


def _script():
    spec = importlib.util.spec_from_file_location('bench_dense_script', REPO / 'benchmarks' / 'bench_dense.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows():
    base = dict(
        model='tv:retinanet_resnet50_fpn',
        vs=None,
        baseline=True,
        detections=49,
        infer_per_mac_ratio=float('nan'),
        phases={
            'backbone': (0.5, 20e9),
            'fpn': (0.1, 4e9),
            'head': (0.7, 35e9),
            'anchors': (0.001, 0.0),
            'rest': (0.011, 0.0),
        },
    )
    ours = dict(
        model='smt_small:retinanet',
        vs='tv:retinanet_resnet50_fpn',
        baseline=False,
        detections=0,
        infer_per_mac_ratio=0.97,
        phases={
            'backbone': (0.8, 28e9),
            'fpn': (0.05, 3e9),
            'head': (0.7, 35e9),
            'anchors': (0.001, 0.0),
            'rest': (0.010, 0.0),
        },
    )
    return [ours, base]


def test_phase_ratios_are_per_mac_speeds_against_the_baseline_phase():
    ratios = _script().phase_ratios(_rows())
    assert list(ratios) == ['smt_small:retinanet']  # the baseline has no baseline
    ours = ratios['smt_small:retinanet']
    assert ours['backbone'] == pytest.approx((28e9 / 0.8) / (20e9 / 0.5))  # 0.875: slower per MAC
    assert ours['fpn'] == pytest.approx((3e9 / 0.05) / (4e9 / 0.1))  # 1.5
    assert ours['head'] == pytest.approx(1.0)
    assert 'anchors' not in ours and 'rest' not in ours  # no MACs: no per-MAC ratio
    assert ours['total'] == 0.97


def test_phase_ratios_skip_rows_without_phases_or_baseline():
    rows = _rows()
    del rows[1]['phases']
    assert _script().phase_ratios(rows) == {}
    rows = _rows()
    rows[0]['vs'] = None
    assert _script().phase_ratios(rows) == {}


def test_format_phase_ratios_lists_phases_and_what_post_processing_did():
    text = _script().format_phase_ratios(_rows())
    lines = text.splitlines()
    assert lines[0].split() == ['model', 'vs', 'phase', 'per-MAC', 'ratio']
    backbone = next(line for line in lines if ' backbone ' in line)
    assert backbone.split()[-1] == '0.88'
    assert any(line.split()[-2:] == ['total', '0.97'] for line in lines)
    assert lines[-1] == (
        'post-processing (phase rest): smt_small:retinanet 0 detections, 10 ms; '
        'tv:retinanet_resnet50_fpn 49 detections, 11 ms'
    )


def test_format_phase_ratios_shows_a_missing_total_as_a_dash():
    rows = _rows()
    rows[0]['infer_per_mac_ratio'] = math.nan
    total = next(line for line in _script().format_phase_ratios(rows).splitlines() if ' total ' in line)
    assert total.split()[-1] == '-'


@pytest.mark.slow  # ~10 s: torchvision's R50-FPN RetinaNet beside a micro SMT one, in a subprocess
def test_bench_dense_prints_phase_ratios_on_a_micro_run():
    proc = subprocess.run(
        [sys.executable, 'benchmarks/bench_dense.py', '--small', '--archs', 'retinanet', '--phases', '--macs']
        + ['--threads', '1', '--iters', '1'],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, 'PYTHONPATH': str(REPO / 'src')},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert 'per-MAC ratio' in out and 'test_smt:retinanet' in out
    assert any(
        line.split()[:3] == ['test_smt:retinanet', 'tv:retinanet_resnet50_fpn', 'backbone'] for line in out.splitlines()
    )
    assert 'post-processing (phase rest): test_smt:retinanet' in out
