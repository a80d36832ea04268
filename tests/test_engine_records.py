"""What people read: progress lines off a terminal, one epoch numbering, curves with the right panels and legends."""
from __future__ import annotations

import io
import re

import pytest

from msconv.engine import train
from msconv.engine.metrics import Progress, draw_curves
from test_engine_train import TINY, make_image_folder

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
    recs += [dict(kind='val', step=2, top1=50.0, ema_top1=40.0, val_loss=1.5),
             dict(kind='val', step=4, top1=80.0, ema_top1=70.0, val_loss=0.7)]
    fig = draw_curves(recs, title='t')
    ax_loss, ax_acc = fig.axes
    lines = {ax: {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
             for ax in (ax_loss, ax_acc)}
    assert lines[ax_loss] == {'train loss': ([1, 2, 3, 4], [2.0, 1.0, 2.0 / 3, 0.5]),
                              'val loss': ([2, 4], [1.5, 0.7])}
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
