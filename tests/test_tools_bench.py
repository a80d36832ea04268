"""msconv.tools.bench: result rows, ratios against an interleaved baseline, reparam, memory accounting, CLI."""

from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn as nn

from msconv.cli import main
from msconv.tools.bench import _peak_step_memory, benchmark
from msconv.tools.profile import profile

FAST = dict(batch_size=2, img_size=32, num_warm_iter=1, num_bench_iter=2, repeats=2)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)
        self.num_classes = 10
        self.reparameterized = False

    def reparameterize(self) -> None:  # fold the BN into the conv, as inference forms do
        w = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        self.conv.weight.data *= w[:, None, None, None]
        self.conv.bias.data = (self.conv.bias.data - self.bn.running_mean) * w + self.bn.bias
        self.bn = nn.Identity()
        self.reparameterized = True

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def test_rows_and_baseline_ratio():
    rows = benchmark([TinyNet()], baseline='timm:test_resnet', **FAST)
    assert [r['model'] for r in rows] == ['timm:test_resnet', 'TinyNet']
    base, tiny = rows
    assert base['baseline'] and base['infer_ratio'] == 1.0 and base['train_ratio'] == 1.0
    for r in rows:
        for key in ('infer_img_s', 'train_img_s', 'infer_mem_mb', 'train_mem_mb'):
            assert r[key] > 0 and math.isfinite(r[key])
        assert r['infer_step_ms'] == pytest.approx(1000 * 2 / r['infer_img_s'])
    assert tiny['gmacs'] * 1e9 == profile(TinyNet(), input_size=(3, 32, 32))['macs']
    assert base['params_m'] == pytest.approx(0.469688)
    # train memory includes the gradients (params are float32)
    assert tiny['train_mem_mb'] * 2**20 >= 4 * sum(p.numel() for p in TinyNet().parameters())


def test_interleaved_runs_median_and_ratio_from_scripted_timings(monkeypatch):
    """Each timed run returns a scripted rate: the baseline's runs 10, 30, 20 img/s (median 20), TinyNet's 50, 5, 40
    (median 40); runs alternate between the models; the ratio is 40 / 20."""
    from msconv.tools import bench as bench_module

    script = {'timm:test_resnet': iter([10.0, 30.0, 20.0]), 'TinyNet': iter([50.0, 5.0, 40.0])}
    calls = []

    def timed(self, step, iters):
        calls.append((self.name, iters))
        return next(script[self.name])

    monkeypatch.setattr(bench_module._Subject, 'timed', timed)
    base, tiny = benchmark(
        [TinyNet()],
        baseline='timm:test_resnet',
        train=False,
        batch_size=2,
        img_size=32,
        num_warm_iter=0,
        num_bench_iter=6,
        repeats=3,
    )
    assert calls == [('timm:test_resnet', 2), ('TinyNet', 2)] * 3
    assert (base['infer_img_s'], tiny['infer_img_s']) == (20.0, 40.0)
    assert (base['infer_ratio'], tiny['infer_ratio']) == (1.0, 2.0)
    assert tiny['infer_step_ms'] == 50.0 and math.isnan(tiny['train_ratio'])


def test_cli_prints_no_profiler_noise(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / 'src'
    r = subprocess.run(
        [
            sys.executable,
            '-m',
            'msconv_cli',
            'bench',
            'timm:test_resnet',
            '--batch-size',
            '2',
            '--img-size',
            '32',
            '--num-warm-iter',
            '1',
            '--num-bench-iter',
            '2',
            '--repeats',
            '2',
            '--csv',
            '',
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS='1'),
    )
    assert r.returncode == 0, r.stderr
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert len(lines) == 5 and 'median of 2 interleaved runs' in lines[0], lines  # title, header, rule, row, machine
    assert lines[-1].startswith('machine: ') and 'torch' in lines[-1] and 'threads' in lines[-1]
    assert not [line for line in lines if 'profiler' in line or 'ERROR' in line or 'USDT' in line]


def test_reparam_benchmarks_inference_form_only(monkeypatch):
    from msconv.tools import bench as bench_module

    benchmarked = []
    real = bench_module.inference_model

    def recording(m, **kw):
        benchmarked.append(real(m, **kw))
        return benchmarked[-1]

    monkeypatch.setattr(bench_module, 'inference_model', recording)
    model = TinyNet()
    rows = benchmark([model], reparam=True, **FAST)
    assert not model.reparameterized, 'msconv.inference_model converts a copy'
    assert benchmarked[0].model.reparameterized and isinstance(benchmarked[0].model.bn, nn.Identity)
    assert math.isnan(rows[0]['train_img_s']) and rows[0]['infer_img_s'] > 0
    assert rows[0]['reparam'] and rows[0]['dtype'] == 'float32'
    assert rows[0]['layout'] in ('contiguous', 'channels_last')


def test_dtype_runs_every_model_and_the_baseline_in_inference_form_at_equal_dtype():
    rows = benchmark([TinyNet()], baseline='timm:test_resnet', dtype='bf16', **FAST)
    assert [r['dtype'] for r in rows] == ['bfloat16', 'bfloat16']
    base, tiny = rows
    assert base['infer_ratio'] == 1.0 and tiny['infer_ratio'] == tiny['infer_img_s'] / base['infer_img_s']
    assert all(math.isnan(r['train_img_s']) and r['infer_img_s'] > 0 for r in rows)
    assert tiny['gmacs'] * 1e9 == profile(TinyNet(), input_size=(3, 32, 32))['macs']  # counted on an fp32 copy


class DtypeRecorder(TinyNet):
    """TinyNet that records, at every forward, the dtype of its weights and of its output."""

    seen = []

    def forward(self, x):
        out = super().forward(x)
        DtypeRecorder.seen.append((self.conv.weight.dtype, out.dtype))
        return out


def test_amp_on_the_inference_form_is_autocast_with_fp32_weights():
    DtypeRecorder.seen.clear()
    row = benchmark([DtypeRecorder()], reparam=True, amp=True, **FAST)[0]
    assert row['dtype'] == 'float32' and row['amp'] == 'bfloat16' and row['infer_img_s'] > 0
    # the timed forwards ran fp32 weights under bf16 autocast (the linear head's output is bf16); one forward, the
    # MAC count (msconv.tools.profile), runs outside autocast
    runs = FAST['repeats'] * (FAST['num_warm_iter'] + FAST['num_bench_iter'])
    autocast = [s for s in DtypeRecorder.seen if s == (torch.float32, torch.bfloat16)]
    assert len(autocast) >= runs and DtypeRecorder.seen.count((torch.float32, torch.float32)) == 1
    assert len(autocast) + 1 == len(DtypeRecorder.seen)


def test_cli_dtype_vs_timm_peer_prints_ratio_and_machine(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from msconv.tools import bench as bench_module

    results = []

    def recording(*args, **kwargs):
        results.extend(benchmark(*args, **kwargs))
        return results

    monkeypatch.setattr(bench_module, 'benchmark', recording)
    args = ['bench', 'timm:test_resnet', '--vs', 'timm:test_convnext', '--dtype', 'bf16', '--threads', '1']
    args += ['--batch-size', '2', '--img-size', '32', '--num-warm-iter', '1', '--num-bench-iter', '2']
    assert main(args + ['--repeats', '2']) == 0
    assert not (tmp_path / 'bench.csv').exists(), 'bench.csv written into the current folder without --csv'
    text = capsys.readouterr().out
    assert 'bfloat16 weights' in text and 'inference form' in text and 'infer vs base' in text
    assert 'machine: ' in text and '1 threads' in text
    # the table shows the measured rows: bf16 weights, the peer's rate and its ratio to the baseline's
    base, peer = results
    assert base['baseline'] and base['model'] == 'timm:test_convnext' and peer['model'] == 'timm:test_resnet'
    assert base['dtype'] == peer['dtype'] == 'bfloat16'
    assert peer['infer_ratio'] == pytest.approx(peer['infer_img_s'] / base['infer_img_s'])
    cells = {
        c[0]: c for c in ([x.strip() for x in line.strip('|').split('|')] for line in text.splitlines()) if len(c) > 8
    }
    assert cells['timm:test_convnext (baseline)'][-2] == '1.00x'
    row = cells['timm:test_resnet']
    assert row[4] == f"{peer['infer_img_s']:.1f}" and row[-2] == f"{peer['infer_ratio']:.2f}x"
    assert row[6] == '-' and row[-1] == '-'  # no training timed in the inference form: no rate, no ratio


def test_cpu_peak_memory_is_exact_for_known_allocations():
    def step():
        a = torch.ones(2**20)  # 4 MiB
        b = torch.ones(2**21)  # 8 MiB, both live
        del a, b
        torch.ones(2**20)

    peak = _peak_step_memory(step, torch.device('cpu'))
    assert 12 * 2**20 <= peak < 12 * 2**20 + 2**16


@pytest.mark.parametrize(
    'kwargs, match',
    [
        (dict(batch_size=0), 'batch_size'),
        (dict(img_size=-1), 'img_size'),
        (dict(repeats=0), 'repeats'),
        (dict(num_bench_iter=1, repeats=2), 'num_bench_iter'),
        (dict(amp=True, amp_dtype='int8'), 'amp_dtype'),
        (dict(dtype='int8'), 'dtype must be'),
        (dict(dtype='bf16', amp=True), 'are exclusive'),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        benchmark([TinyNet()], **{**FAST, **kwargs})


def test_unknown_model_and_missing_cuda():
    with pytest.raises(ValueError, match='not an msconv model'):
        benchmark(['no_such_model_xyz'], **FAST)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='CUDA'):
            benchmark([TinyNet()], device='cuda', **FAST)


def test_cli_table_and_csv(tmp_path, capsys):
    out = tmp_path / 'b.csv'
    rc = main(
        [
            'bench',
            'timm:test_resnet',
            '--vs',
            'timm:test_resnet',
            '--batch-size',
            '2',
            '--img-size',
            '32',
            '--num-warm-iter',
            '1',
            '--num-bench-iter',
            '2',
            '--repeats',
            '2',
            '--no-train',
            '--csv',
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert 'timm:test_resnet (baseline)' in text and 'infer vs base' in text
    assert 'train' not in text.split('\n', 2)[1] and '-x' not in text  # no training columns, no '-x' cells
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 and rows[0]['baseline'] == 'True' and float(rows[1]['infer_img_s']) > 0
    assert rows[1]['train_img_s'] == 'nan'


def test_cli_bad_model_is_one_line_error(capsys):
    assert main(['bench', 'no_such_model_xyz', '--csv', '']) == 2
    assert 'not an msconv model' in capsys.readouterr().err


@pytest.mark.parametrize(
    'options',
    [dict(amp=True), dict(channels_last=True), dict(compile='eager')],
    ids=['amp-bf16', 'channels-last', 'compile-eager'],
)
def test_options_run_both_modes(options):
    row = benchmark([TinyNet()], **FAST, **options)[0]
    assert row['infer_img_s'] > 0 and row['train_img_s'] > 0
    assert row['amp'] == ('bfloat16' if options.get('amp') else 'float32')
    assert row['compile'] == options.get('compile', '')


@pytest.mark.slow
def test_timm_peers_benchmark_script_at_a_tiny_size():
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    args = ['--batch', '1', '--size', '64', '--repeats', '1', '--warmup', '0', '--pairs', 'test_smt:test_convnext']
    r = subprocess.run(
        [sys.executable, 'benchmarks/bench_timm_peers.py', *args],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=str(repo / 'src')),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'test_smt' in r.stdout and 'ratio_median' in r.stdout and 'threads' in r.stdout.splitlines()[-1]
