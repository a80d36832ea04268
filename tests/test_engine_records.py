"""What people read: progress lines off a terminal, one epoch numbering, curves with the right panels and legends."""

from __future__ import annotations

import io
import re

import pytest
from test_engine_train import TINY, make_image_folder

from msconv.engine import train
from msconv.engine.metrics import Progress, draw_curves

pytestmark = pytest.mark.usefixtures('one_thread')


def test_progress_off_a_terminal_prints_complete_lines_every_n_steps():
    out = io.StringIO()
    p = Progress(25, start_step=0, every=10, description='smt_tiny', stream=out)
    for step in range(1, 26):
        p.update(step, loss=0.5, epoch=1 + (step - 1) // 10)
    p.close()
    lines = out.getvalue().splitlines()
    assert [re.search(r'step (\d+)/25', line).group(1) for line in lines] == ['10', '20', '25']
    for line, epoch, pct in zip(lines, (1, 2, 3), ('40%', '80%', '100%')):
        assert line.startswith('smt_tiny step') and f'epoch {epoch}' in line and f'({pct})' in line
        assert re.search(r'elapsed \d+:\d\d:\d\d  ETA \d+:\d\d:\d\d$', line), line
    assert lines[-1].endswith('ETA 0:00:00')
    # a resumed run counts its ETA from where it started, and disabled progress prints nothing
    quiet = io.StringIO()
    Progress(25, start_step=20, every=10, enabled=False, stream=quiet).update(25)
    assert quiet.getvalue() == ''


def test_one_epoch_numbering_in_the_log_and_the_progress_lines(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'imgs')  # 48 images, batch 8: 6 steps per epoch
    train(dict(TINY, data=str(data), output=str(tmp_path), name='e', max_steps=9, log_every=3, progress=True))
    out = capsys.readouterr().out
    progress = re.findall(r'step (\d+)/9 \(\d+%\)  loss \S+  lr \S+  img_s \S+  epoch (\d+)', out)
    assert progress == [('3', '1'), ('6', '1'), ('9', '2')], out
    assert 'epoch 1: val top-1' in out  # the completed first epoch
    assert 'epoch 2 (3/6 steps): val top-1' in out  # the partial second one, not "epoch 1"


def test_curves_put_losses_and_accuracies_in_their_panels_with_a_legend():
    recs = [dict(kind='train', step=s, loss=2.0 / s) for s in (1, 2, 3, 4)]
    recs += [
        dict(kind='val', step=2, top1=50.0, ema_top1=40.0, val_loss=1.5),
        dict(kind='val', step=4, top1=80.0, ema_top1=70.0, val_loss=0.7),
    ]
    fig = draw_curves(recs, title='t')
    ax_loss, ax_acc = fig.axes
    lines = {
        ax: {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
        for ax in (ax_loss, ax_acc)
    }
    assert lines[ax_loss] == {'train loss': ([1, 2, 3, 4], [2.0, 1.0, 2.0 / 3, 0.5]), 'val loss': ([2, 4], [1.5, 0.7])}
    assert lines[ax_acc] == {'val top-1': ([2, 4], [50.0, 80.0]), 'EMA val top-1': ([2, 4], [40.0, 70.0])}
    for ax in (ax_loss, ax_acc):
        assert [t.get_text() for t in ax.get_legend().get_texts()] == list(lines[ax])
    assert ax_loss.get_ylabel() == 'loss' and ax_acc.get_ylabel() == 'accuracy (%)'
    # several runs: one colour each, labelled by run
    fig = draw_curves([dict(r, run='smt') for r in recs] + [dict(r, run='scsc') for r in recs])
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ['smt: train loss', 'smt: val loss', 'scsc: train loss', 'scsc: val loss']
    import matplotlib.pyplot as plt

    plt.close('all')


def test_a_new_task_plugs_in_without_touching_the_trainer(tmp_path, capsys):
    """A task registered from outside (digit parity: 2 classes from the digits) gets its data, model size, loss,
    metrics and log line into a run through the Task interface alone."""
    import json

    import torch
    from torch.utils.data import Dataset

    from msconv.data.loader import build_dataset
    from msconv.engine.checkpoint import list_checkpoints, load_checkpoint
    from msconv.engine.classification import ClassificationConfig
    from msconv.engine.evaluate import evaluate_loader
    from msconv.engine.tasks import TASKS, Task, register_task

    class Parity(Dataset):
        classes = ['even', 'odd']

        def __init__(self, ds):
            self.ds = ds

        def __len__(self):
            return 256  # a small share of the digits keeps the run short

        def __getitem__(self, i):
            x, y = self.ds[i]
            return x, y % 2

    calls = []

    @register_task('parity')
    class ParityTask(Task):
        config_class = ClassificationConfig  # its data are classification's: the same transforms and options

        def num_classes(self):
            return 2

        def build_datasets(self, dc):
            return tuple(
                Parity(build_dataset(self.cfg, split, dc['size'], dc['mean'], dc['std'])) for split in ('train', 'val')
            )

        def loss(self, output, y):
            calls.append(tuple(output.shape))
            return torch.nn.functional.cross_entropy(output.float(), y)

        def evaluate(self, model, ema_model, val_loader, ctx):
            return {'parity_acc': evaluate_loader(model, val_loader, ctx.device)['top1']}

        def summary(self, rec):
            return f"parity accuracy {rec['parity_acc']:.1f}%"

    try:
        res = train(dict(TINY, task='parity', data='digits', output=str(tmp_path), name='p', max_steps=3))
    finally:
        TASKS.pop('parity')
    assert res['status'] == 'finished' and calls == [(8, 2)] * 3
    weights = load_checkpoint(list_checkpoints(tmp_path / 'p')[-1])[0]['model']
    assert weights['head.fc.weight'].shape[0] == 2
    val = [
        json.loads(line)
        for line in (tmp_path / 'p' / 'metrics.jsonl').read_text().splitlines()
        if json.loads(line)['kind'] == 'val'
    ]
    assert len(val) == 1 and isinstance(val[0]['parity_acc'], float) and 'top1' not in val[0]
    assert f"epoch 1 (3/32 steps): parity accuracy {val[0]['parity_acc']:.1f}%" in capsys.readouterr().out
