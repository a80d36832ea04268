"""torchrun scale-out: 2 gloo processes on CPU give the result of one process with the same global batch, also
when --per-gpu-batch splits it into accumulation micro-steps."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_trained_alike, run_training
from test_engine_train import make_image_folder

# test_vit (timm) has LayerNorm only: without SyncBatchNorm (CUDA-only in torch) per-rank BatchNorm statistics
# would differ from the single-process ones by design. SGD rather than AdamW: parameters whose true gradient is
# zero (the key bias of attention) get float-noise gradients that differ with the reduction order, and Adam's
# normalisation turns that noise into lr-sized updates; SGD keeps the comparison at float precision.
ARGS = [
    'train',
    'test_vit',
    '--preset',
    'demo',
    '--batch-size',
    '8',
    '--max-steps',
    '4',
    '--epochs',
    '2',
    '--no-progress',
    '--workers',
    '0',
    '--set',
    'model_kwargs={img_size: 32}',
    '--set',
    'plot=false',
    '--set',
    'log_every=1',
    '--set',
    'drop_path=0.0',
    '--set',
    'warmup_epochs=0.2',
    '--set',
    'opt=sgd',
    '--lr',
    '0.05',
]


def test_torchrun_two_gloo_processes_match_one_process(tmp_path):
    data = make_image_folder(tmp_path / 'imgs', n_train=16, n_val=5)
    common = ARGS + ['--data', str(data), '--output', str(tmp_path)]
    _, a, rec_single = run_training(common, tmp_path, 'single')
    _, b, rec_ddp = run_training(common, tmp_path, 'ddp', nproc=2)
    # the runs trained (weights moved) and logged the same losses and the same val accuracy over all 15 images
    va_single, va_ddp = assert_trained_alike((a, rec_single), (b, rec_ddp), steps=4)
    assert va_single['top1'] == pytest.approx(va_ddp['top1'])
    assert va_single['val_loss'] == pytest.approx(va_ddp['val_loss'], rel=1e-5)
    # only rank 0 wrote: one config, one metrics stream
    assert sum(1 for r in rec_ddp if r['kind'] == 'train') == 4
    # --per-gpu-batch 2 on 2 processes: 2 images per process per micro-step, 2 accumulation micro-steps make up
    # the same global batch of 8 (same images, same LR): the same weights as the single process
    pgb, c, _ = run_training(common + ['--per-gpu-batch', '2'], tmp_path, 'pgb', nproc=2)
    assert 'global batch 8 (2 per process x 2 process(es) x accumulation 2)' in pgb.stdout
    assert c[2]['step'] == 4 and (c[2]['config']['batch_size'], c[2]['config']['accum_steps']) == (4, 2)
    for k, v in a[0]['model'].items():
        torch.testing.assert_close(c[0]['model'][k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
