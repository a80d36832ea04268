"""Training presets of the dense tasks: the official COCO 3x and ADE20K 160k recipes (``preset='coco_3x'`` /
``'ade20k_160k'``), registered with :func:`msconv.engine.config.register_presets` when this module loads.

Facts, per official file (AFeng-x/SMT at 1efac6e; lidc54/shift-wiseConv as quoted in ``shared/reference``):

COCO 3x (``detection/configs/*_3x_coco.py``; mmdetection 2.x ``_base_/schedules/schedule_1x.py`` underneath):

* ``optimizer = dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05)``:
  cascade_mask_rcnn_ressa_mstrain_480-800_giou_4conv1f_adamw_3x_coco.py:112, retinanet_ressa_fpn_mstrain_480-800_
  3x_coco.py:55. The Mask R-CNN 3x config (mask_rcnn_smt_b_fpn_mstrain-poly_3x_coco.py:80-81) keeps lr 1e-4
  commented out and trains with 2e-4 (pass ``--lr 2e-4`` to follow it); ShiftwiseConv's Cascade config uses 1e-4.
* ``lr_config = dict(step=[27, 33])`` and ``runner = dict(type='EpochBasedRunner', max_epochs=36)``: the same
  files, lines 113-114 / 56-57 / 87-88. The step policy and the warm-up come from mmdet's schedule_1x.py:
  ``warmup='linear', warmup_iters=500, warmup_ratio=0.001`` and ``optimizer_config = dict(grad_clip=None)``.
* 2 images per GPU on 8 GPUs (``samples_per_gpu=2``, mask_rcnn_smt_b_fpn_mstrain-poly_3x_coco.py:74;
  retinanet_ressa...:49): a global batch of 16, and the learning rate is absolute (mmdet does not rescale it).
* fp16 is commented out in every config (``# fp16 = None``): training runs in fp32 (``--amp`` to change).
* Backbone drop path: SMT-S/B 0.2 (mask_rcnn_smt_s_fpn.py:11; the B poly config says 0.3, :16), SW-T 0.4.

ADE20K 160k (``segmentation/configs/upernet_smt_512x512_160k_ade20k.py``; mmseg ``schedule_160k.py``):

* ``optimizer = dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01)``: line 18.
* ``lr_config = dict(policy='poly', warmup='linear', warmup_iters=1500, warmup_ratio=1e-6, power=1.0,
  min_lr=0.0, by_epoch=False)``: lines 20-24. 160000 iterations (``IterBasedRunner``, schedule_160k.py).
* ``data=dict(samples_per_gpu=2)`` on 8 GPUs: line 27, a global batch of 16.
* ShiftwiseConv (``upernet_sw_tiny_512_160k_ade20k_ss.py:L22-66``): AdamW lr 1e-4, weight decay 0.05, the same
  poly schedule and warm-up, 4 GPUs x 4 images (16), drop path 0.4.

How they map onto the trainer (timm schedulers, per optimizer step): ``sched='multistep'`` with
``lr_milestones=[27, 33]`` (epochs) and ``decay_rate=0.1``; ``sched='poly'`` with ``decay_rate=1.0`` (the power)
over ``total_iters``; ``warmup_iters`` of linear warm-up from ``warmup_lr = lr x warmup_ratio``, not a prefix (the
milestones and the poly decay count from step 0, as mmcv's). One difference: mmcv multiplies the *decayed* poly lr
by the warm-up factor, timm warms up linearly to the peak lr; over the first 1500 of 160000 steps the two differ
by under 1%. Weight decay: timm leaves norms, biases and ``no_weight_decay()`` out of the decay (the SMT Mask
R-CNN config exempts norms only; the other configs exempt nothing). SCSC has no official dense recipe: its
backbones get SMT's.
"""

from __future__ import annotations

from typing import Any, Dict

from .config import register_presets

__all__ = ['DENSE_PRESETS']

# What every dense preset sets beside the shared defaults: an absolute learning rate, 16 images per step, no gradient
# clipping (grad_clip=None), fp32. (The dense tasks have no Mixup, label smoothing or timm augmentation options:
# their pipelines have their own.)
_DENSE_COMMON: Dict[str, Any] = dict(
    opt='adamw',
    opt_eps=1e-8,
    opt_betas=(0.9, 0.999),
    lr_base_size=None,
    batch_size=16,
    accum_steps=1,
    clip_grad=None,
    amp=False,
    ema=False,
    warmup_epochs=0.0,
    min_lr=0.0,
)

_COCO_3X: Dict[str, Any] = dict(
    _DENSE_COMMON,
    arch='mask_rcnn',
    epochs=36,
    lr=1e-4,
    weight_decay=0.05,
    sched='multistep',
    lr_milestones=[27, 33],
    decay_rate=0.1,
    warmup_iters=500,
    warmup_lr=1e-4 * 0.001,
    det_scales=None,
    det_max_size=1333,
    det_crop=True,
    eval_every=1,
    ckpt_every=2000,
)

_ADE_160K: Dict[str, Any] = dict(
    _DENSE_COMMON,
    arch='upernet',
    epochs=1,  # replaced by total_iters
    total_iters=160_000,
    lr=6e-5,
    weight_decay=0.01,
    sched='poly',
    decay_rate=1.0,
    warmup_iters=1500,
    warmup_lr=6e-5 * 1e-6,
    seg_scale=(2048, 512),
    seg_ratio_range=(0.5, 2.0),
    seg_crop=(512, 512),
    seg_num_classes=150,
    seg_reduce_zero_label=True,
    eval_every=13,  # ADE20K: 20210 images / 16 = 1263 steps per epoch; 13 epochs ~ the configs' 16000 iterations
    ckpt_every=16_000,
)

DENSE_PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    'coco_3x': {
        'smt': dict(_COCO_3X, drop_path=0.2),
        'scsc': dict(_COCO_3X, drop_path=0.2),
        'shiftwise': dict(_COCO_3X, arch='cascade_mask_rcnn', drop_path=0.4),
    },
    'ade20k_160k': {
        'smt': dict(_ADE_160K, drop_path=0.2),
        'scsc': dict(_ADE_160K, drop_path=0.2),
        'shiftwise': dict(_ADE_160K, lr=1e-4, warmup_lr=1e-4 * 1e-6, weight_decay=0.05, drop_path=0.4),
    },
}

register_presets('coco_3x', DENSE_PRESETS['coco_3x'], task='detection')
register_presets('ade20k_160k', DENSE_PRESETS['ade20k_160k'], task='segmentation')
