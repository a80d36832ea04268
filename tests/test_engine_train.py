"""The training loop: records, checkpoints, optimizer groups, NaN guards, bit-exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import msconv
from msconv.engine import NonFiniteLossError, train
from msconv.engine import trainer as trainer_module
from msconv.engine.checkpoint import CheckpointError, latest_good_checkpoint, list_checkpoints, load_checkpoint
from msconv.engine.config import resolve_config
from msconv.engine.distributed import DistInfo
from msconv.engine.trainer import _Trainer
from msconv.layers import forms

REPO = Path(__file__).resolve().parents[1]


def make_image_folder(root: Path, n_train: int = 16, n_val: int = 4, classes=('a', 'b', 'c'), size: int = 32):
    """A tiny ImageFolder tree of random-noise images whose class sets the mean colour (learnable, fast)."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    for split, n in (('train', n_train), ('val', n_val)):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((size, size, 3), np.float32)
                base[..., ci % 3] = 160
                img = np.clip(base + rng.randint(0, 96, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f'{i}.png')
    return root


pytestmark = pytest.mark.usefixtures('one_thread')  # tiny models: threads only add contention


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('imgs'))


TINY = dict(model='test_smt', preset='demo', batch_size=8, progress=False, num_workers=0, log_every=2, plot=False)


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(list_checkpoints(run_dir)[-1] / 'model.safetensors'))


def _hand_top1(run_dir, data, key):
    """Top-1 (%) of a run's newest checkpoint on ``data/val``, with no msconv data or evaluation code: PNG files
    read with PIL, normalised with the model's mean/std (32x32 images at image_size 32 and crop_pct 1: resizing
    and cropping are identities), one image at a time."""
    import numpy as np
    from PIL import Image

    weights = load_checkpoint(list_checkpoints(run_dir)[-1])[0][key]
    model = msconv.create_model('test_smt', num_classes=3)
    model.load_state_dict(weights)
    model.eval()
    mean = torch.tensor(model.pretrained_cfg['mean'])[:, None, None]
    std = torch.tensor(model.pretrained_cfg['std'])[:, None, None]
    correct = total = 0
    for label, cls in enumerate(sorted(p.name for p in (data / 'val').iterdir())):
        for f in sorted((data / 'val' / cls).iterdir()):
            x = torch.from_numpy(np.asarray(Image.open(f).convert('RGB'), np.float32) / 255).permute(2, 0, 1)
            with torch.no_grad():
                correct += int(model(((x - mean) / std)[None]).argmax(1).item() == label)
            total += 1
    return 100.0 * correct / total


def test_train_writes_records_checkpoints_and_curves(tmp_path, folder):
    res = train(
        dict(
            TINY,
            data=str(folder),
            output=str(tmp_path),
            name='r',
            plot=True,
            max_steps=6,
            ckpt_every=2,
            keep_last=2,
            ema=True,
            ema_decay=0.9,
        )
    )
    run = Path(res['run_dir'])
    assert res['status'] == 'finished' and res['steps'] == 6
    # the reported accuracies are those of the saved weights, recomputed here by hand from the image files
    assert res['top1'] == pytest.approx(_hand_top1(run, folder, 'model'))
    assert res['ema_top1'] == pytest.approx(_hand_top1(run, folder, 'ema'))
    assert [p.name for p in list_checkpoints(run)] == ['step-00000004', 'step-00000006']  # last K kept
    weights, state, meta = load_checkpoint(run / 'checkpoints' / 'step-00000006')
    assert set(weights) == {'model', 'ema'} and meta['step'] == 6 and state['step'] == 6
    assert set(state) >= {'optimizer', 'scheduler', 'scaler', 'rng', 'autotune'}
    # the autotuner's choices travel with the checkpoint (a resumed run runs the same forms): known operations only
    assert isinstance(state['autotune'], dict)
    assert all(
        k.split('|', 1)[0] in forms.TUNED and v in forms.TUNED[k.split('|', 1)[0]].candidates
        for k, v in state['autotune'].items()
    )
    # the weights load into a fresh model by name
    model = msconv.create_model(
        'test_smt', num_classes=3, checkpoint_path=run / 'checkpoints' / 'step-00000006' / 'model.safetensors'
    )
    assert model.num_classes == 3
    lines = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in lines if r['kind'] == 'train'] == [2, 4, 6]
    assert all(r['lr'] > 0 and r['img_per_s'] > 0 for r in lines if r['kind'] == 'train')
    assert (run / 'metrics.csv').read_text().startswith('kind,step,epoch,loss,lr')
    assert (run / 'curves.png').stat().st_size > 1000
    cfg = resolve_config(str(run / 'config.yaml'))
    assert cfg.model == 'test_smt' and cfg.max_steps == 6 and cfg.preset == 'demo'
    assert not any(p.name.startswith('.tmp') for p in (run / 'checkpoints').iterdir())


def test_optimizer_groups_and_schedule():
    cfg = resolve_config(
        dict(TINY, output='/nonexistent-unused', max_steps=1, lr=1e-3, warmup_lr=1e-6, warmup_epochs=1, epochs=3)
    )
    t = _Trainer(cfg, torch.device('cpu'), DistInfo())
    t._build()
    groups = t.optimizer.param_groups
    no_decay = {id(p) for g in groups if g['weight_decay'] == 0 for p in g['params']}
    decay = {id(p) for g in groups if g['weight_decay'] > 0 for p in g['params']}
    for name, p in t.model.named_parameters():
        expect_no_decay = p.ndim <= 1 or name.endswith('.bias') or name in t.model.no_weight_decay()
        assert (id(p) in no_decay) == expect_no_decay, name
        assert (id(p) in decay) != expect_no_decay, name
    # warm-up from warmup_lr, peak at the end of warm-up, cosine to min_lr at the end
    spe = t.steps_per_epoch
    lrs = []
    for s in (0, spe, 3 * spe):
        t.scheduler.step_update(num_updates=s)
        lrs.append(groups[0]['lr'])
    assert lrs[0] == pytest.approx(1e-6) and lrs[1] == pytest.approx(1e-3) and lrs[2] == pytest.approx(cfg.min_lr)


@pytest.mark.parametrize('policy', ['skip', 'abort'])
def test_nan_loss_never_reaches_weights_ema_or_checkpoint(tmp_path, folder, policy):
    cfg = resolve_config(
        dict(
            TINY,
            data=str(folder),
            output=str(tmp_path),
            name='nan',
            max_steps=4,
            ckpt_every=1,
            keep_last=5,
            ema=True,
            nan_policy=policy,
        )
    )
    t = _Trainer(cfg, torch.device('cpu'), DistInfo())
    calls = {'n': 0}
    orig_build = t._build

    def build():
        orig_build()
        orig = t._forward_loss

        def poisoned(x, y):
            calls['n'] += 1
            loss = orig(x, y)
            return loss * float('nan') if calls['n'] == 3 else loss

        t._forward_loss = poisoned

    t._build = build
    if policy == 'abort':
        with pytest.raises(NonFiniteLossError, match='step 3.*nan_policy'):
            t.run()
        assert [p.name for p in list_checkpoints(tmp_path / 'nan')][-1] == 'step-00000002'
        before = load_checkpoint(list_checkpoints(tmp_path / 'nan')[-1])[0]
        for k, v in t.model.state_dict().items():  # the aborted step did not touch the weights
            assert torch.equal(v, before['model'][k]), k
    else:
        res = t.run()
        assert res['skipped_steps'] == 1 and res['steps'] == 4
        w2 = load_checkpoint(tmp_path / 'nan' / 'checkpoints' / 'step-00000002')[0]
        w3 = load_checkpoint(tmp_path / 'nan' / 'checkpoints' / 'step-00000003')[0]
        for key in ('model', 'ema'):
            for k in w2[key]:
                assert torch.equal(w2[key][k], w3[key][k]), (key, k)  # the skipped step changed nothing
        assert all(torch.isfinite(v).all() for v in t.ema.module.state_dict().values() if v.is_floating_point())


_KILL_SCRIPT = textwrap.dedent('''
    import os, signal, sys, torch
    torch.set_num_threads(1)
    import msconv.engine.trainer as T
    kill_at = int(sys.argv[2])
    if kill_at != 0:
        orig = T._Trainer._optimizer_step
        def step(self, s, batches):
            if s == abs(kill_at):
                # > 0: SIGKILL mid-epoch, after the checkpoint of an earlier step, no cleanup at all;
                # < 0: SIGTERM, which the trainer turns into "finish this step, checkpoint, exit".
                os.kill(os.getpid(), signal.SIGKILL if kill_at > 0 else signal.SIGTERM)
            return orig(self, s, batches)
        T._Trainer._optimizer_step = step
    res = T.train(dict(model='test_smt', preset='demo', batch_size=8, progress=False, num_workers=0, log_every=2,
                       data=sys.argv[4], output=sys.argv[1], name='run', epochs=2, max_steps=11, ckpt_every=4,
                       keep_last=5, plot=False,
                       ema=True, ema_decay=0.9, drop_path=0.1, mixup=0.5, cutmix=1.0, re_prob=0.5,
                       auto_augment='rand-m9-mstd0.5-inc1', resume=None if sys.argv[3] == '-' else sys.argv[3]))
    print('STEPS', res['steps'])
''')


def _run_script(tmp_path, *args):
    script = tmp_path / 'kill_run.py'
    script.write_text(_KILL_SCRIPT)
    # the runs share one autotune cache: the first one's measured forms are every later one's (processes that measured
    # for themselves could choose other exact forms of SMT's training operations and differ in the last bits)
    env = dict(os.environ, PYTHONPATH=str(REPO / 'src'), MSCONV_CACHE_DIR=str(tmp_path / 'autotune'))
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


def test_resume_after_sigkill_is_bit_exact(tmp_path, folder):
    # 48 training images, batch 8: 6 steps per epoch; checkpoints at steps 4, 6 (epoch end) and 8 (mid-epoch).
    ref = _run_script(tmp_path, tmp_path / 'ref', 0, '-', folder)
    assert ref.returncode == 0, ref.stderr
    killed = _run_script(tmp_path, tmp_path / 'crash', 9, '-', folder)  # dies in step 10, mid-epoch 2
    assert killed.returncode == -9, killed.stderr
    assert [p.name for p in list_checkpoints(tmp_path / 'crash' / 'run')][-1] == 'step-00000008'
    resumed = _run_script(tmp_path, tmp_path / 'crash', 0, 'auto', folder)
    assert resumed.returncode == 0, resumed.stderr
    assert 'resumed from' in resumed.stdout + resumed.stderr
    a = load_checkpoint(list_checkpoints(tmp_path / 'ref' / 'run')[-1])
    b = load_checkpoint(list_checkpoints(tmp_path / 'crash' / 'run')[-1])
    assert a[2]['step'] == b[2]['step'] == 11
    for key in ('model', 'ema'):
        assert a[0][key].keys() == b[0][key].keys()
        for k in a[0][key]:
            assert torch.equal(a[0][key][k], b[0][key][k]), (key, k)
    sa, sb = a[1]['optimizer']['state'], b[1]['optimizer']['state']
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k]))
    # SIGTERM in step 3: the trainer checkpoints step 3 and exits cleanly; resuming gives the same weights too
    termed = _run_script(tmp_path, tmp_path / 'term', -2, '-', folder)
    assert termed.returncode == 0 and 'interrupted: checkpoint saved at step 3' in termed.stdout, termed.stderr
    assert [p.name for p in list_checkpoints(tmp_path / 'term' / 'run')] == ['step-00000003']
    assert _run_script(tmp_path, tmp_path / 'term', 0, 'auto', folder).returncode == 0
    c = load_checkpoint(list_checkpoints(tmp_path / 'term' / 'run')[-1])
    for k in a[0]['model']:
        assert torch.equal(a[0]['model'][k], c[0]['model'][k]), k
    # the metrics file holds each step once
    steps = [
        json.loads(line)['step']
        for line in (tmp_path / 'crash' / 'run' / 'metrics.jsonl').read_text().splitlines()
        if json.loads(line)['kind'] == 'train'
    ]
    assert steps == sorted(set(steps))


def test_corrupt_checkpoint_is_named_and_resume_falls_back(tmp_path, folder, monkeypatch):
    TINY_F = dict(TINY, data=str(folder))
    train(dict(TINY_F, output=str(tmp_path), name='c', max_steps=4, ckpt_every=2, keep_last=3))
    run = tmp_path / 'c'
    newest = list_checkpoints(run)[-1]
    weights = newest / 'model.safetensors'
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match='model.safetensors.*truncated or corrupt'):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match='model.safetensors'):
        path, *_ = latest_good_checkpoint(run)
    assert path.name == 'step-00000002'
    (run / 'checkpoints' / 'step-00000002' / 'meta.json').write_text('{"files": ')
    with pytest.raises(CheckpointError, match='meta.json.*truncated or corrupt'):
        load_checkpoint(run / 'checkpoints' / 'step-00000002')
    # an explicit corrupt checkpoint: clear message, then the previous good one is used
    train(dict(TINY_F, output=str(tmp_path), name='d', max_steps=6, ckpt_every=2, keep_last=3))
    bad = tmp_path / 'd' / 'checkpoints' / 'step-00000006' / 'state.pt'
    bad.write_bytes(bad.read_bytes()[:100])
    restored = []
    monkeypatch.setattr(trainer_module, 'restore_autotune_choices', restored.append)
    res = train(
        dict(TINY_F, output=str(tmp_path), name='d', max_steps=6, ckpt_every=2, keep_last=3, resume=str(bad.parent))
    )
    assert res['steps'] == 6 and res['status'] == 'finished'
    # the resumed run took the autotuner's choices saved with the checkpoint it resumed from
    assert restored == [load_checkpoint(tmp_path / 'd' / 'checkpoints' / 'step-00000004')[1]['autotune']]


def test_accumulation_amp_channels_last(tmp_path, folder):
    """2 micro-batches of 4 accumulate to the update of one batch of 8 (LayerNorm model: no batch statistics);
    bf16 autocast on CPU and channels_last run and stay finite."""
    common = dict(
        TINY,
        model='test_vit',
        model_kwargs={'img_size': 32},
        data=str(folder),
        output=str(tmp_path),
        max_steps=2,
        drop_path=0.0,
        opt='sgd',
        lr=0.05,
    )
    big = train(dict(common, name='big', batch_size=8, accum_steps=1))
    acc = train(dict(common, name='acc', batch_size=4, accum_steps=2))
    assert big['steps'] == acc['steps'] == 2
    wa, wb = _weights(tmp_path / 'big'), _weights(tmp_path / 'acc')
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    amp = train(
        dict(
            TINY,
            data=str(folder),
            output=str(tmp_path),
            name='amp',
            max_steps=2,
            amp=True,
            amp_dtype='bfloat16',
            channels_last=True,
            accum_steps=2,
            batch_size=4,
        )
    )
    assert amp['status'] == 'finished' and amp['skipped_steps'] == 0
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / 'amp').values() if v.is_floating_point())
