"""The command line: user errors are one line on stderr (the traceback only with --debug), conventional exit codes,
a resume command that works, and help without torch."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from test_engine_train import make_image_folder

from msconv_cli import main
from msconv_cli.commands.train import resume_command

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures('one_thread')
QUICK = ['--preset', 'demo', '--batch-size', '8', '--workers', '0', '--no-progress', '--set', 'plot=false']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('imgs'))


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO / 'src') + os.pathsep + str(REPO / 'tests'))


def test_help_and_argument_errors_import_no_torch():
    code = textwrap.dedent('''
        import sys
        from msconv_cli import main
        for argv in (['--help'], ['train', '--help'], ['train', 'test_smt', '--batch-size', 'x']):
            try:
                main(argv)
            except SystemExit:
                pass
        print('LOADED', sorted(m for m in ('torch', 'timm', 'numpy', 'msconv') if m in sys.modules))
    ''')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=_env(), timeout=60)
    assert 'LOADED []' in out.stdout, out.stdout + out.stderr
    assert 'usage: msconv train' in out.stdout and "invalid int value: 'x'" in out.stderr


def test_malformed_yaml_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('lr: [0.1\nepochs: 3\n')
    assert main(['train', 'test_smt', '--config', str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"config file '{bad}' is not valid YAML at line 2, column 7" in err
    assert 'Traceback' not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match='not valid YAML'):
        main(['--debug', 'train', 'test_smt', '--config', str(bad)])
    with pytest.raises(ValueError, match='not valid YAML'):
        main(['train', 'test_smt', '--config', str(bad), '--debug'])


def test_second_run_in_the_same_folder_is_refused_with_the_options(tmp_path, data, capsys):
    argv = ['train', 'test_smt', '--data', str(data), '--output', str(tmp_path), '--max-steps', '2', *QUICK]
    assert main(argv) == 0
    assert main(argv + ['--lr', '0.5']) == 2
    err = capsys.readouterr().err
    assert 'already holds a run' in err and '--resume auto' in err and '--overwrite' in err
    assert main(argv + ['--lr', '0.5', '--overwrite']) == 0


def test_eval_names_a_checkpoint_of_another_model(tmp_path, data, capsys):
    assert (
        main(
            [
                'train',
                'test_smt',
                '--data',
                str(data),
                '--output',
                str(tmp_path),
                '--name',
                'smt',
                '--max-steps',
                '2',
                *QUICK,
            ]
        )
        == 0
    )
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        rc = main(['eval', 'test_vit', '--checkpoint', str(tmp_path / 'smt'), '--data', str(data)])
    err = capsys.readouterr().err
    assert rc == 2 and 'Traceback' not in err
    assert "is a checkpoint of another model (it was trained as 'test_smt'), not of 'test_vit' with 3 classes" in err
    assert 'step-00000002' in err and 'keys missing' in err and 'unexpected keys' in err
    assert not [w for w in caught if 'dropped' in str(w.message)]
    # same model, another number of classes: the classifier shapes are named
    from safetensors.torch import save_file

    import msconv

    ten = tmp_path / 'ten.safetensors'
    save_file(msconv.create_model('test_smt', num_classes=10).state_dict(), str(ten))
    assert main(['eval', 'test_smt', '--checkpoint', str(ten), '--data', str(data)]) == 2
    err = capsys.readouterr().err
    assert 'shapes differ: head.fc.weight: checkpoint (10, ' in err and "with 3 classes" in err


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_random_bytes_checkpoint_is_named(tmp_path, data, capsys, suffix):
    junk = tmp_path / f'junk{suffix}'
    junk.write_bytes(os.urandom(4096).replace(b'\x80', b'\x00').replace(b'PK', b'pk'))
    assert main(['eval', 'test_smt', '--checkpoint', str(junk), '--data', str(data)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint '{junk}' is not a" in err and 'trust' not in err and 'Traceback' not in err
    assert (
        main(
            [
                'export',
                'test_smt',
                '--checkpoint',
                str(junk),
                '--trust-pickle',
                '--no-check',
                '--out',
                str(tmp_path / 'x.onnx'),
            ]
        )
        == 2
    )
    assert f"checkpoint '{junk}' is not a" in capsys.readouterr().err


def test_resume_command_reproduces_the_run():
    argv = ['train', 'smt_tiny', '--data', 'd', '--resume', '/old/step-1', '--overwrite', '--name=x', '--lr', '0.1']
    assert (
        resume_command(argv, 'out/x') == 'msconv train smt_tiny --data d --lr 0.1 --output out --name x --resume auto'
    )
    assert resume_command(['train', 'a b'], 'runs/a b-digits').endswith(
        "'a b' --output runs --name 'a b-digits' --resume auto"
    )


_TERM_SCRIPT = textwrap.dedent('''
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    import msconv.engine.trainer as T
    if sys.argv[1] == 'kill':
        orig = T._Trainer._optimizer_step
        def step(self, s, batches):
            if s == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return orig(self, s, batches)
        T._Trainer._optimizer_step = step
    from msconv_cli import main
    sys.exit(main(sys.argv[2:]))
''')


def test_sigterm_exits_143_with_a_resume_command_that_works(tmp_path, data):
    script = tmp_path / 'term.py'
    script.write_text(_TERM_SCRIPT)
    argv = ['train', 'test_smt', '--data', str(data), '--output', str(tmp_path / 'runs'), '--max-steps', '4', *QUICK]
    r = subprocess.run(
        [sys.executable, str(script), 'kill', *argv], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert r.returncode == 143, r.stdout + r.stderr
    hint = r.stdout.strip().splitlines()[-1].strip()
    assert hint.startswith('msconv train test_smt') and '--resume auto' in hint
    assert f"--output {tmp_path / 'runs'} --name test_smt-" in hint
    resumed = subprocess.run(
        [sys.executable, str(script), 'go', *shlex.split(hint)[1:]],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert 'resumed from' in resumed.stdout and 'step 3' in resumed.stdout and 'done: 4 steps' in resumed.stdout


def test_tools_name_a_checkpoint_of_another_model(tmp_path, capsys):
    from safetensors.torch import save_file

    import msconv

    smt = tmp_path / 'smt.safetensors'
    save_file(msconv.create_model('test_smt').state_dict(), str(smt))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        rc = main(['export', 'test_shiftwise', '--checkpoint', str(smt), '--no-check', '--out', str(tmp_path / 'x')])
    err = capsys.readouterr().err
    assert rc == 2 and f"checkpoint '{smt}' does not fit 'test_shiftwise'" in err and 'Traceback' not in err
    assert 'Missing key(s)' in err or 'Unexpected key(s)' in err or 'missing keys' in err


def test_an_unknown_name_counts_the_models_msconv_list_shows(capsys):
    assert main(['list', '--names']) == 0
    shown = capsys.readouterr().out.split()
    assert main(['profile', 'smt_tinyy']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'Did you mean smt_tiny' in err
    assert f"see the {len(shown)} models" in err and 'test_ micro models' in err
