"""torchrun with dense tasks: 2 gloo processes on CPU train a micro RetinaNet to the result of one process.

RetinaNet's losses are normalised per image (focal and box losses divided by each image's foreground count, then
averaged over images), so the mean of two ranks' gradients equals the single-process gradient. The micro backbone
has BatchNorm, whose batch statistics differ per rank without SyncBatchNorm (CUDA-only in torch): the run uses
``norm_eval`` (mmdet's: BatchNorm layers use their running statistics). One fixed training scale keeps every
batch the same padded size on both sides; SGD rather than AdamW for the reason test_engine_distributed gives.
"""

from __future__ import annotations

import pytest
import torch
from conftest import run_training

ARGS = [
    'train',
    'test_smt',
    '--task',
    'detection',
    '--arch',
    'retinanet',
    '--data',
    'digits',
    '--batch-size',
    '4',
    '--max-steps',
    '3',
    '--no-progress',
    '--workers',
    '0',
    '--lr',
    '0.01',
    '--drop-path',
    '0',
    '--set',
    'opt=sgd',
    '--set',
    'norm_eval=true',
    '--set',
    'warmup_iters=0',
    '--set',
    'log_every=1',
    '--set',
    'plot=false',
    '--set',
    'det_scales=[128]',
    '--set',
    'det_max_size=128',
    '--set',
    'det_crop=false',
    '--set',
    'eval_max_images=6',
    '--set',
    'dense_kwargs={min_size: 128, max_size: 128, channels: 32, test_proposals: 50}',
]


@pytest.mark.slow
def test_torchrun_two_gloo_processes_train_retinanet_as_one(tmp_path):
    common = ARGS + ['--output', str(tmp_path)]
    _, a, rec_single = run_training(common, tmp_path, 'single', timeout=600)
    _, b, rec_ddp = run_training(common, tmp_path, 'ddp', nproc=2, timeout=600)
    assert a[2]['step'] == b[2]['step'] == 3
    for k, v in a[0]['model'].items():
        torch.testing.assert_close(b[0]['model'][k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    recs = {'single': rec_single, 'ddp': rec_ddp}
    tr = {n: [r['loss'] for r in rs if r['kind'] == 'train'] for n, rs in recs.items()}
    assert len(tr['single']) == 3 and tr['single'][0] != tr['single'][-1]
    assert tr['single'] == pytest.approx(tr['ddp'], rel=1e-5)
    # the evaluation (each rank detects on its share, the results gathered) gives the same AP
    va = {n: [r for r in rs if r['kind'] == 'val'][-1] for n, rs in recs.items()}
    for key in ('bbox_AP', 'bbox_AP50'):
        assert va['single'][key] == pytest.approx(va['ddp'][key]), key
