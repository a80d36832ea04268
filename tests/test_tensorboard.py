"""TensorBoard logging: metrics records written as scalars and read back by tensorboard's own reader (the
EventAccumulator TensorBoard's server uses)."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip('tensorboard', reason='the tensorboard extra is installed by `make venv` (msconv[all])')

from msconv.tools.tensorboard_log import TensorBoardWriter, read_scalars, write_run  # noqa: E402

RECORDS = [
    {'kind': 'train', 'step': 1, 'epoch': 0.5, 'loss': 2.5, 'lr': 1e-3, 'img_per_s': 120.0, 'time': 3.2},
    {'kind': 'train', 'step': 2, 'epoch': 1.0, 'loss': 2.0, 'lr': 2e-3, 'img_per_s': 130.0, 'bad_images': 0},
    {'kind': 'val', 'step': 2, 'epoch': 1.0, 'top1': 41.5, 'top5': 90.0, 'val_loss': 1.75, 'ema_top1': math.nan},
    {'kind': 'val', 'step': 2, 'bbox_AP': 0.125, 'note': 'text is not a scalar', 'best': True},
]


def test_records_become_scalars_that_tensorboard_reads_back(tmp_path):
    with TensorBoardWriter(tmp_path / 'tb') as writer:
        tags = writer.write(RECORDS[0])
        writer.write_all(RECORDS[1:])
    assert tags == ['train/loss', 'train/lr', 'train/img_per_s']
    scalars = read_scalars(tmp_path / 'tb')
    assert sorted(scalars) == sorted(
        ['train/loss', 'train/lr', 'train/img_per_s', 'train/bad_images']
        + ['val/top1', 'val/top5', 'val/val_loss', 'val/bbox_AP']
    )  # no epoch/time/kind, no NaN, no text or booleans
    assert scalars['train/loss'] == [(1, 2.5), (2, 2.0)]
    assert scalars['val/top1'] == [(2, 41.5)] and scalars['val/bbox_AP'] == [(2, 0.125)]
    assert [s for s, _ in scalars['train/lr']] == [1, 2] and math.isclose(scalars['train/lr'][1][1], 2e-3, rel_tol=1e-6)
    with pytest.raises(ValueError, match="integer 'step'"):
        TensorBoardWriter(tmp_path / 'tb2').write({'kind': 'train', 'loss': 1.0})


def test_a_run_folder_converts_and_a_resume_purges_the_later_steps(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in RECORDS))
    assert read_scalars(write_run(run))['train/loss'] == [(1, 2.5), (2, 2.0)]
    with pytest.raises(FileNotFoundError, match='metrics.jsonl'):
        write_run(tmp_path)
    # a resumed run from step 1 rewrites step 2: the crashed run's step 2 is dropped
    with TensorBoardWriter(tmp_path / 'resumed') as w:
        w.write_all(RECORDS[:2])
    with TensorBoardWriter(tmp_path / 'resumed', purge_step=2) as w:
        w.write({'kind': 'train', 'step': 2, 'loss': 1.5})
    assert read_scalars(tmp_path / 'resumed')['train/loss'] == [(1, 2.5), (2, 1.5)]
