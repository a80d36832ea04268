"""`msconv train / eval / demo` from the command line (in-process, tiny configurations)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_engine_train import make_image_folder

from msconv.cli import main

pytestmark = pytest.mark.usefixtures('one_thread')


def test_train_yaml_flags_precedence_then_eval(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'imgs', n_train=8, n_val=3)
    cfg = tmp_path / 'run.yaml'
    cfg.write_text(
        yaml.safe_dump(
            {'preset': 'demo', 'epochs': 9, 'batch_size': 4, 'lr': 0.5, 'mixup': 0.3, 'progress': False, 'plot': False}
        )
    )
    rc = main(
        [
            'train',
            'test_smt',
            '--config',
            str(cfg),
            '--data',
            str(data),
            '--lr',
            '0.001',
            '--max-steps',
            '2',
            '--output',
            str(tmp_path),
            '--name',
            'cli',
            '--set',
            'smoothing=0.2',
            '--ema',
            '--no-amp',
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert 'done: 2 steps' in out and 'val top-1' in out
    saved = yaml.safe_load((tmp_path / 'cli' / 'config.yaml').read_text())
    assert saved['lr'] == 0.001 and saved['epochs'] == 9 and saved['mixup'] == 0.3  # flag > YAML > preset
    assert saved['smoothing'] == 0.2 and saved['ema'] is True and saved['amp'] is False
    assert saved['model'] == 'test_smt' and saved['data'] == str(data)
    rc = main(['eval', 'test_smt', '--checkpoint', str(tmp_path / 'cli'), '--data', str(data)])
    out = capsys.readouterr().out
    assert rc == 0 and 'top-1' in out and '(9 images)' in out
    rc = main(['eval', 'test_smt', '--checkpoint', str(tmp_path / 'cli'), '--data', str(data), '--ema'])
    assert rc == 0


@pytest.mark.parametrize(
    'argv, message',
    [
        (['train', 'smt_tinyy'], 'not an msconv model'),
        (['train', 'test_smt', '--batch-size', '0'], 'batch_size must be a positive integer'),
        (['train', 'test_smt', '--data', '/does/not/exist'], 'no such folder'),
        (['train', 'test_smt', '--set', 'no_such_option=1'], "unknown config option 'no_such_option'"),
        (['train', 'test_smt', '--set', 'oops'], '--set expects KEY=VALUE'),
        (['eval', 'test_smt', '--checkpoint', '/does/not/exist.safetensors'], 'does not exist'),
    ],
)
def test_bad_input_is_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err


def test_demo_micro_run(tmp_path, capsys):
    rc = main(
        ['demo', '--families', 'smt', '--output', str(tmp_path), '--no-progress', '--epochs', '1', '--max-steps', '3']
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert 'val top-1' in out and 'smt_tiny' in out and 'MACs' in out
    assert (tmp_path / 'curves.png').is_file() and (tmp_path / 'smt' / 'metrics.csv').is_file()


@pytest.mark.slow
def test_full_demo_reaches_95_percent_for_every_family(tmp_path):
    """The README's demo: nano SMT, SCSC-Swin and ShiftWise each >= 95% val top-1 on the digits (minutes)."""
    from msconv.engine.demo import demo

    res = demo(output=str(tmp_path), progress=False)
    assert [r['family'] for r in res['rows']] == ['smt', 'scsc', 'shiftwise']
    for r in res['rows']:
        assert not r.get('error'), r
        assert r['top1'] >= 95.0, r
    assert Path(res['curves']).is_file()
