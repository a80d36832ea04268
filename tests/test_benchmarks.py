"""Smoke runs of the benchmark scripts that need neither a GPU nor an official checkout (slow: ``make test-slow``).

They check the scripts still run end to end on tiny sizes and print their tables; the figures themselves are
timings and are not asserted."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def _run(args, **env):
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, 'PYTHONPATH': str(REPO / 'src'), **env},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_cpu_linear_benchmark():
    out = _run(['benchmarks/bench_cpu_linear.py', '--repeats', '3'])
    assert 'Token linears' in out and 'oneDNN' in out


def test_shiftwise_benchmarks_at_tiny_sizes():
    out = _run(
        [
            'benchmarks/bench_shiftwise_layer.py',
            '--batch',
            '1',
            '--size',
            '16',
            '--channels',
            '8',
            '--kernel',
            '13',
            '--repeats',
            '1',
        ]
    )
    assert 'dense 13x13' in out and 'targets:' in out
    out = _run(
        ['benchmarks/bench_shiftwise_model.py', '--batch', '1', '--size', '64', '--repeats', '1', '--train-batch', '1']
    )
    assert 'deploy speed-up' in out and 'training step' in out


def test_replace_kernels_benchmark_without_training():
    out = _run(
        ['benchmarks/bench_replace_kernels.py', '--skip-train', '--repeats', '1', '--batch', '2', '--size', '64']
    )
    assert '31x31' in out and 'shift-wise deployed' in out and 'load' in out


def test_gpu_kernel_benchmark_dry_run_in_the_triton_interpreter():
    out = _run(['benchmarks/bench_kernels_gpu.py', '--dry-run'], TRITON_INTERPRET='1')
    assert 'dry run:' in out


def test_bf16_benchmark_on_micro_models():
    out = _run(['benchmarks/bench_bf16.py', 'test_smt', 'test_shiftwise', '--batch', '2', '--repeats', '1'])
    assert 'bf16 vs fp32' in out and 'autocast_speedup' in out and 'test_shiftwise' in out and 'ISA:' in out
