"""The trainer's options for the tools timm and mmdetection users already use: TensorBoard scalars (read back with
tensorboard's own reader, resume included), ``compile`` (torch.compile gives the eager run's numbers and plain
checkpoints), ``grad_checkpointing`` (the same gradients for a classifier and a dense system's backbone, fewer
activations kept) and a run without matplotlib (curves.png skipped with one line, once)."""

from __future__ import annotations

import math
import shutil
import sys

import pytest
import torch
from test_engine_train import TINY, make_image_folder

from msconv.engine import train
from msconv.engine.checkpoint import checkpoint_step, list_checkpoints
from msconv.engine.metrics import read_metrics

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('imgs'), n_train=8, n_val=2)


# 24 training images, batch 8: 3 steps an epoch
RUN = dict(TINY, epochs=2, warmup_epochs=0, log_every=1, ckpt_every=0, keep_last=3)


def test_tensorboard_scalars_are_read_back_and_a_resume_purges_the_redone_steps(tmp_path, folder):
    pytest.importorskip('tensorboard', reason='the tensorboard extra is installed by `make venv` (msconv[all])')
    from msconv.tools.tensorboard_log import read_scalars

    run = dict(RUN, data=str(folder), output=str(tmp_path), name='tb', tensorboard=True)
    first = train(**run)
    tb = tmp_path / 'tb' / 'tensorboard'
    scalars = read_scalars(tb)
    records = read_metrics(first['run_dir'])
    train_recs = [r for r in records if r['kind'] == 'train']
    assert [s for s, _ in scalars['train/loss']] == [r['step'] for r in train_recs] == list(range(1, 7))
    for tag, key in (('train/loss', 'loss'), ('train/lr', 'lr'), ('train/img_per_s', 'img_per_s')):
        for (_, value), rec in zip(scalars[tag], train_recs):
            assert math.isclose(value, rec[key], rel_tol=1e-6)  # float32 in the event file
    val = [r for r in records if r['kind'] == 'val']
    assert [s for s, _ in scalars['val/top1']] == [r['step'] for r in val] == [3, 6]
    assert {'val/top5', 'val/val_loss'} <= set(scalars)

    # resumed at step 3 (epoch 1's checkpoint) with a different lr: steps 4-6 are redone and replace the old ones
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path / 'tb')] == [3, 6]
    shutil.rmtree(list_checkpoints(tmp_path / 'tb')[-1])
    train(**dict(run, resume='auto', lr=4e-3))
    again = read_scalars(tb)
    records = read_metrics(first['run_dir'])
    assert [s for s, _ in again['train/loss']] == list(range(1, 7))  # once each: no duplicated steps
    assert [v for _, v in again['train/lr']] == pytest.approx([r['lr'] for r in records if r['kind'] == 'train'])
    assert [v for _, v in again['train/lr']][3:] != pytest.approx([v for _, v in scalars['train/lr']][3:])
    assert [s for s, _ in again['val/top1']] == [3, 6]

    # turned on at a resume: the records kept so far come first
    train(**dict(RUN, data=str(folder), output=str(tmp_path), name='late', epochs=1))
    train(**dict(RUN, data=str(folder), output=str(tmp_path), name='late', resume='auto', tensorboard=True))
    late = read_scalars(tmp_path / 'late' / 'tensorboard')
    assert [s for s, _ in late['train/loss']] == list(range(1, 7))


def test_tensorboard_without_its_extra_is_one_line_before_anything_is_written(tmp_path, folder, monkeypatch):
    monkeypatch.setitem(sys.modules, 'tensorboard', None)
    from msconv import MissingExtraError

    with pytest.raises(MissingExtraError) as e:
        train(**dict(RUN, data=str(folder), output=str(tmp_path), name='x', tensorboard=True))
    assert str(e.value) == (
        'TensorBoard logging (tensorboard / --tensorboard) needs tensorboard, which is not installed: '
        'pip install "msconv[tensorboard]"'
    )
    assert not (tmp_path / 'x').exists()


def test_without_matplotlib_curves_are_skipped_with_one_line_once(tmp_path, folder, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # find_spec -> None, as when it is not installed
    res = train(**dict(RUN, data=str(folder), output=str(tmp_path), name='np', plot=True, epochs=3))
    out = capsys.readouterr().out
    line = (
        'curves.png needs matplotlib, which is not installed: pip install "msconv[plots]"; the run goes on without it'
    )
    assert [s for s in out.splitlines() if 'curves.png' in s or 'matplotlib' in s] == [line]  # once, not per epoch
    assert res['curves'] is None and not (tmp_path / 'np' / 'curves.png').exists()
    assert len(list_checkpoints(tmp_path / 'np')) == 3  # the run went on


# ------------------------------------------------------------------------------------------ gradient checkpointing
def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward pass while ``fn()`` runs (the activation memory that
    gradient checkpointing trades for recomputation)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def _grads_with_and_without(task, model, forward):
    """``{name: grad}`` of ``forward(model)``'s loss, without and with the task's gradient checkpointing, and the bytes
    kept for backward each time."""
    import copy

    results = []
    for enable in (False, True):
        net = copy.deepcopy(model)
        task.set_grad_checkpointing(net, enable)
        net.train()
        torch.manual_seed(0)
        kept, loss = _saved_bytes(lambda: forward(net))
        loss.backward()
        results.append(({n: p.grad for n, p in net.named_parameters() if p.grad is not None}, kept, net))
    (plain, plain_kept, plain_net), (ckpt, ckpt_kept, ckpt_net) = results
    # BatchNorm statistics move once a step (timm's checkpoint_seq alone moves them again in the recomputation)
    buffers = dict(ckpt_net.named_buffers())
    for name, b in plain_net.named_buffers():
        assert torch.equal(buffers[name], b), name
    return plain, ckpt, plain_kept, ckpt_kept


def _assert_same_grads(plain, ckpt):
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize('model', ['test_smt', 'test_scsc_swin', 'test_shiftwise', 'test_scsc_resnet'])
def test_grad_checkpointing_gives_a_classifier_the_same_gradients_with_fewer_activations_kept(model):
    from msconv.engine.config import resolve_config
    from msconv.engine.tasks import create_task

    task = create_task(resolve_config(dict(model=model, preset='demo', drop_path=0.0), check_paths=False))
    net = task.build_model(3)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    task.build_criterion(3)
    plain, ckpt, plain_kept, ckpt_kept = _grads_with_and_without(task, net, lambda m: task.loss(m(x), y))
    _assert_same_grads(plain, ckpt)
    assert ckpt_kept < 0.5 * plain_kept, (ckpt_kept, plain_kept)


@pytest.mark.parametrize('task_name, arch', [('detection', 'retinanet'), ('segmentation', 'upernet')])
def test_grad_checkpointing_reaches_a_dense_systems_backbone(task_name, arch):
    from msconv.engine.config import resolve_config
    from msconv.engine.tasks import create_task

    dense_kwargs = (
        dict(channels=16, aux_channels=8) if arch == 'upernet' else dict(min_size=64, max_size=64, channels=16)
    )
    cfg = dict(model='test_smt', task=task_name, arch=arch, drop_path=0.0, dense_kwargs=dense_kwargs)
    task = create_task(resolve_config(cfg, check_paths=False))
    net = task.build_model(3)
    body = task.backbone(net)
    assert body is (net.backbone.backbone.body if task_name == 'detection' else net.backbone.body)
    images = torch.rand(2, 3, 64, 64)
    if task_name == 'detection':
        boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0]])
        targets = [dict(boxes=boxes, labels=torch.tensor([1])), dict(boxes=boxes + 8, labels=torch.tensor([2]))]
        x, y = list(images), targets
    else:
        x, y = images, torch.randint(0, 3, (2, 64, 64))
    task.build_criterion(3)

    def forward(m):
        return task.loss(task.forward(m, x, y), y)

    plain, ckpt, plain_kept, ckpt_kept = _grads_with_and_without(task, net, forward)
    _assert_same_grads(plain, ckpt)
    assert ckpt_kept < plain_kept
    task.set_grad_checkpointing(net, True)
    assert all(s.grad_checkpointing for s in body.model.stages)


def test_grad_checkpointing_in_a_run_and_a_backbone_without_it_is_one_line(tmp_path, folder):
    run = dict(RUN, data=str(folder), output=str(tmp_path), epochs=1, max_steps=2)
    plain = train(**dict(run, name='plain'))
    ckpt = train(**dict(run, name='ckpt', grad_checkpointing=True))
    losses = [[r['loss'] for r in read_metrics(res['run_dir']) if r['kind'] == 'train'] for res in (plain, ckpt)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    from safetensors.torch import load_file

    saved = [load_file(str(list_checkpoints(r['run_dir'])[-1] / 'model.safetensors')) for r in (plain, ckpt)]
    for k, v in saved[0].items():  # BatchNorm statistics included
        torch.testing.assert_close(saved[1][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert ckpt['last_eval']['val_loss'] == pytest.approx(plain['last_eval']['val_loss'], rel=1e-5)
    from msconv.engine.config import resolve_config
    from msconv.engine.tasks import create_task

    task = create_task(resolve_config(dict(model='test_smt'), check_paths=False))
    with pytest.raises(ValueError, match=r"grad_checkpointing: the backbone of this 'classification' run \(Linear\)"):
        task.set_grad_checkpointing(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.slow  # inductor compiles the forward and backward graphs with the C++ compiler: ~1-2 min on 2 busy cores
def test_compile_trains_as_eager_and_saves_plain_checkpoints(tmp_path, folder):
    from safetensors.torch import load_file

    import msconv

    # SGD: AdamW's first steps move a parameter by ~lr whatever the size of its gradient, so a gradient of ~1e-9 (a
    # bias the loss hardly sees) flips sign with the last bits of the sums and the weights differ by 2 x lr
    run = dict(RUN, data=str(folder), output=str(tmp_path), epochs=1, max_steps=3, drop_path=0.0, opt='momentum')
    eager = train(**dict(run, name='eager'))
    compiled = train(**dict(run, name='compiled', compile=True))
    records = [[r for r in read_metrics(res['run_dir'])] for res in (eager, compiled)]
    losses = [[r['loss'] for r in recs if r['kind'] == 'train'] for recs in records]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-5)
    assert compiled['last_eval']['val_loss'] == pytest.approx(eager['last_eval']['val_loss'], rel=1e-4, abs=1e-5)
    weights = [load_file(str(list_checkpoints(res['run_dir'])[-1] / 'model.safetensors')) for res in (eager, compiled)]
    assert weights[1].keys() == weights[0].keys() and not any('_orig_mod' in k for k in weights[1])
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-4, atol=1e-5, msg=k)
    plain = msconv.create_model(
        'test_smt', num_classes=3, checkpoint_path=list_checkpoints(compiled['run_dir'])[-1] / 'model.safetensors'
    )
    assert not isinstance(plain, torch._dynamo.eval_frame.OptimizedModule)
    # resumed without compile: the compiled run's checkpoint is an ordinary one
    again = train(**dict(run, name='compiled', max_steps=4, epochs=2, resume='auto'))
    assert again['steps'] == 4
