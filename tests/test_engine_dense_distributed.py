"""torchrun with dense tasks: 2 gloo processes on CPU train a micro RetinaNet to the result of one process.

RetinaNet's losses are normalised per image (focal and box losses divided by each image's foreground count, then
averaged over images), so the mean of two ranks' gradients equals the single-process gradient. The micro backbone
has BatchNorm, whose batch statistics differ per rank without SyncBatchNorm (CUDA-only in torch: the run asks for
``--sync-bn`` and prints that it keeps BatchNorm): the run uses ``norm_eval`` (mmdet's: BatchNorm layers use their
running statistics). One fixed training scale keeps every
batch the same padded size on both sides; SGD rather than AdamW for the reason test_engine_distributed gives.
"""

from __future__ import annotations

import pytest
from conftest import assert_trained_alike, run_training

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
    '--sync-bn',  # asked for: on CPU the processes keep BatchNorm and say so
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
    proc, b, rec_ddp = run_training(common, tmp_path, 'ddp', nproc=2, timeout=600)
    assert "sync_bn: torch's SyncBatchNorm runs on CUDA only; this cpu run of 2 processes keeps plain BatchNorm" in (
        proc.stdout
    )
    va_single, va_ddp = assert_trained_alike((a, rec_single), (b, rec_ddp), steps=3)
    # the evaluation (each rank detects on its share, the results gathered) gives the same AP
    for key in ('bbox_AP', 'bbox_AP50'):
        assert va_single[key] == pytest.approx(va_ddp[key]), key
