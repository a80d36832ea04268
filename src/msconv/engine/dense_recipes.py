"""Training presets of the dense tasks, registered with :func:`msconv.engine.config.register_presets` when this
module loads, and their official tables (added to :data:`msconv.engine.recipes.OFFICIAL_RECIPES`, rendered in
docs/guides/recipes.md):

* ``coco_3x``: the SMT 3x configs (Mask R-CNN, Cascade Mask R-CNN, RetinaNet, ATSS, Sparse R-CNN; 36 epochs,
  multi-scale 480-800 with the crop branch) and ShiftwiseConv's Cascade Mask R-CNN 3x;
* ``coco_1x``: SMT's Mask R-CNN 1x (12 epochs, single scale 1333x800);
* ``ade20k_160k``: the SMT and ShiftwiseConv UperNet configs (160000 steps, 512 crops).

The values depend on the system (``arch``): each family's values are those of its default system, and the other
systems' differences are registered per ``arch`` (``register_presets(per_option=...)``); drop path per size is
registered per model (SMT-B: 0.3 where its configs say so; its Sparse R-CNN config keeps 0.2, registered for
``smt_base`` and that ``arch``). Every value is listed with its official file and line
in ``DENSE_RECIPES`` (AFeng-x/SMT at 11e954d, lidc54/shift-wiseConv at 2202e6b, the ``_base_`` files of the
mmdetection 2.28.2 / mmsegmentation 0.30.0 wheels, mmcv 1.7.2); ``tests/test_recipes.py`` resolves every preset
against them. SCSC has no official dense recipe: its backbones get SMT's values, labelled as not official.

How the mmcv schedules map onto the trainer (timm schedulers, per optimizer step): ``sched='multistep'`` with
``lr_milestones`` (epochs) and ``decay_rate=0.1``; ``sched='poly'`` with ``decay_rate=1.0`` (the power) over
``total_iters``; ``warmup_iters`` of linear warm-up from ``lr x warmup_ratio`` (whatever ``--lr`` is), not a prefix
(the milestones and the poly decay count from step 0, as mmcv's). One difference: mmcv multiplies the *decayed*
poly lr by the warm-up factor, timm warms up linearly to the peak lr; over the first 1500 of 160000 steps the two
differ by under 1%. Weight decay and learning-rate scales follow each config's optimizer constructor
(:meth:`msconv.engine.dense_tasks._DenseTask.param_groups`, checked parameter by parameter against the official
constructors by ``tests/test_dense_optimizer.py``).
"""

from __future__ import annotations

from typing import Any, Dict, List

from .config import register_presets
from .recipes import recipe_row, register_recipes

__all__ = ['DENSE_PRESETS', 'DENSE_RECIPES']

SMT_REPO, SW_REPO = 'AFeng-x/SMT@11e954d', 'lidc54/shift-wiseConv@2202e6b'

# What every dense preset sets beside the shared defaults: AdamW with an absolute learning rate, 16 images per step,
# no gradient clipping (grad_clip=None), fp32. (The dense tasks have no Mixup, label smoothing or timm augmentation
# options: their pipelines have their own.)
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
    hflip=0.5,
)
# mmcv's DefaultOptimizerConstructor: every parameter decays (biases and norms too) but the custom_keys ones
_MMCV_DECAY = dict(wd_exclude_1d=False, wd_exclude_keys=[])
# the ShiftwiseConv configs' LearningRateDecayOptimizerConstructor: no decay for 1-D parameters and biases
_SW_DECAY = dict(wd_exclude_1d=True, wd_exclude_keys=[])

# mmdet 2.x schedule_1x.py underneath every COCO config: step policy, linear warm-up 500 steps from lr x 0.001
_COCO: Dict[str, Any] = dict(
    _DENSE_COMMON,
    weight_decay=0.05,
    sched='multistep',
    decay_rate=0.1,
    warmup_iters=500,
    warmup_ratio=0.001,
    det_max_size=1333,
    eval_every=1,
    ckpt_every=2000,
)
_COCO_3X = dict(_COCO, epochs=36, lr_milestones=[27, 33], det_scales=list(range(480, 801, 32)), det_crop=True)
_COCO_1X = dict(_COCO, epochs=12, lr_milestones=[8, 11], det_scales=[800], det_crop=False)

_SMT_3X: Dict[str, Dict[str, Any]] = {
    'mask_rcnn': dict(
        lr=2e-4,
        wd_exclude_1d=False,
        wd_exclude_keys=['absolute_pos_embed', 'relative_position_bias_table', 'norm'],
        sync_bn=False,
    ),
    'cascade_mask_rcnn': dict(lr=1e-4, sync_bn=True, **_MMCV_DECAY),
    'retinanet': dict(lr=1e-4, sync_bn=False, **_MMCV_DECAY),
    'atss': dict(lr=1e-4, sync_bn=False, **_MMCV_DECAY),
    # AdamW at torch's betas, weight decay 1e-4, gradients clipped at norm 1 (sparse_rcnn_smt_s_fpn.py:98-99)
    'sparse_rcnn': dict(lr=2.5e-5, weight_decay=1e-4, clip_grad=1.0, sync_bn=False, **_MMCV_DECAY),
}
_SMT_1X = dict(lr=2e-4, wd_exclude_1d=False, wd_exclude_keys=['norm'], sync_bn=False)

_ADE_160K: Dict[str, Any] = dict(
    _DENSE_COMMON,
    arch='upernet',
    epochs=1,  # replaced by total_iters
    total_iters=160_000,
    sched='poly',
    decay_rate=1.0,
    warmup_iters=1500,
    warmup_ratio=1e-6,
    seg_scale=(2048, 512),
    seg_ratio_range=(0.5, 2.0),
    seg_crop=(512, 512),
    seg_num_classes=150,
    seg_reduce_zero_label=True,
)

DENSE_PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    'coco_3x': {
        'smt': dict(_COCO_3X, arch='mask_rcnn', drop_path=0.2, **_SMT_3X['mask_rcnn']),
        'scsc': dict(_COCO_3X, arch='mask_rcnn', drop_path=0.2, **_SMT_3X['mask_rcnn']),
        'shiftwise': dict(
            _COCO_3X,
            arch='cascade_mask_rcnn',
            lr=1e-4,
            lr_base_size=16,  # auto_scale_lr(enable=True, base_batch_size=16)
            layer_decay=0.8,
            layer_decay_layers=12,
            sync_bn=True,
            drop_path=0.4,
            **_SW_DECAY,
        ),
    },
    'coco_1x': {
        'smt': dict(_COCO_1X, arch='mask_rcnn', drop_path=0.2, **_SMT_1X),
        'scsc': dict(_COCO_1X, arch='mask_rcnn', drop_path=0.2, **_SMT_1X),
    },
    'ade20k_160k': {
        'smt': dict(
            _ADE_160K,
            lr=6e-5,
            weight_decay=0.01,
            sync_bn=True,
            eval_every_iters=16_000,
            ckpt_every=16_000,
            seg_eval_mode='whole',
            drop_path=0.2,
            **_MMCV_DECAY,
        ),
        'shiftwise': dict(
            _ADE_160K,
            lr=1e-4,
            weight_decay=0.05,
            layer_decay=1.0,
            layer_decay_layers=9,
            sync_bn=True,
            eval_every_iters=4000,
            ckpt_every=8000,
            seg_eval_mode='slide',
            seg_slide_crop=(512, 512),
            seg_slide_stride=(341, 341),
            drop_path=0.4,
            **_SW_DECAY,
        ),
    },
}
DENSE_PRESETS['ade20k_160k']['scsc'] = DENSE_PRESETS['ade20k_160k']['smt']
# SMT-B's Sparse R-CNN keeps drop path 0.2 (sparse_rcnn_smt_b_fpn.py:18), where its other systems have 0.3
_PER_ARCH = {'arch': {'smt': _SMT_3X, 'scsc': _SMT_3X, 'smt_base': {'sparse_rcnn': {'drop_path': 0.2}}}}

register_presets(
    'coco_3x',
    DENSE_PRESETS['coco_3x'],
    task='detection',
    per_option=_PER_ARCH,
    per_model={'smt_base': {'drop_path': 0.3}},
)
register_presets('coco_1x', DENSE_PRESETS['coco_1x'], task='detection')
register_presets(
    'ade20k_160k', DENSE_PRESETS['ade20k_160k'], task='segmentation', per_model={'smt_base': {'drop_path': 0.3}}
)


# ---- the official recipes, hyper-parameter by hyper-parameter ----------------------------------------------------
_row = recipe_row
_MMDET = 'mmdet:_base_/'  # the mmdetection 2.28.2 wheel's .mim/configs/_base_
_MMSEG = 'mmseg:_base_/'
_MMCV = 'mmcv:runner/'  # mmcv 1.7.2
_SCHEDULE_1X = _MMDET + 'schedules/schedule_1x.py'
_SMT_DET, _SMT_SEG = 'detection/configs/', 'segmentation/configs/'
_SW_DET, _SW_SEG = 'downstream/detection/configs/', 'downstream/segmentation/configs/'
_EPS = _row('AdamW eps', 'opt_eps', 1e-8, 'torch.optim.AdamW default (the configs set none)')
_EMA = _row('EMA', 'ema', False, 'no EMA hook in the configs')
_FP32 = 'the configs leave fp16 commented out'


def _mmdet_schedule(amp_src: str) -> List[Dict[str, Any]]:
    """The rows every COCO config takes from mmdet's schedule_1x.py and mmcv."""
    return [
        _row('LR step factor', 'decay_rate', 0.1, _MMCV + 'hooks/lr_updater.py:186 (StepLrUpdaterHook gamma)'),
        _row('warm-up steps (linear)', 'warmup_iters', 500, _SCHEDULE_1X + ':6-8'),
        _row('warm-up start (x lr)', 'warmup_ratio', 0.001, _SCHEDULE_1X + ':9'),
        _row('grad clip', 'clip_grad', None, _SCHEDULE_1X + ':3'),
        _row('LR scaling', 'lr_base_size', None, _MMDET + 'default_runtime.py:27 (auto_scale_lr enable=False)'),
        _row('evaluation (epochs)', 'eval_every', 1, _MMCV + 'hooks/evaluation.py:89 (EvalHook interval)'),
        _row('mixed precision (off: fp32)', 'amp', False, amp_src),
        _EPS,
        _EMA,
    ]


def _per_gpu(n: int, src: str) -> Dict[str, Any]:
    return _row(
        'per-GPU batch',
        'per_gpu_batch',
        n,
        src,
        note=f'opt-in (--per-gpu-batch {n}): by default each of N processes gets batch/N, equal on {16 // n} GPUs',
        msconv=None,
    )


def _smt_mmcv_decay(src: str) -> List[Dict[str, Any]]:
    return [
        _row('no weight decay for names containing', 'wd_exclude_keys', [], src + ' (no paramwise_cfg)'),
        _row(
            'no weight decay for 1-D parameters and biases',
            'wd_exclude_1d',
            False,
            _MMCV + 'optimizer/default_constructor.py:249-250 (without paramwise_cfg: one group, every parameter)',
        ),
    ]


_D3 = _SMT_DET + 'mask_rcnn_smt_b_fpn_mstrain-poly_3x_coco.py'
_D1 = _SMT_DET + 'mask_rcnn_ResSA_fpn_1x_coco.py'
_DC = _SMT_DET + 'cascade_mask_rcnn_ressa_mstrain_480-800_giou_4conv1f_adamw_3x_coco.py'
_DR = _SMT_DET + 'retinanet_ressa_fpn_mstrain_480-800_3x_coco.py'
_DA = _SMT_DET + 'atss_ressa_mstrain_3x_coco.py'
_DS = _SMT_DET + 'sparse_rcnn_ressa_mstrain_3x_coco.py'
_DS_BASE = _SMT_DET + 'sparse_rcnn_smt_s_fpn.py'
_SU = _SMT_SEG + 'upernet_smt_512x512_160k_ade20k.py'
_WC = _SW_DET + 'cascade_mask_rcnn_sw_tiny_mstrain_480-800_adamw_3x_coco_in1k.py'
_WU = _SW_SEG + 'upernet_sw_tiny_512_160k_ade20k_ss.py'
_SMT_BN = 'detection/mmdet/models/backbones/smt.py:219 (the backbone: plain nn.BatchNorm2d)'


def _ms_pipeline(src: str, scales: str, crop: str, flip: str) -> List[Dict[str, Any]]:
    """The 3x configs' training pipeline rows: 480-800 multi-scale or the crop branch, flips."""
    return [
        _row('training scales (shorter side)', 'det_scales', list(range(480, 801, 32)), f"{src}:{scales}"),
        _row('longer side cap', 'det_max_size', 1333, f"{src}:{scales}"),
        _row('crop branch (400-600, crop 384-600, 480-800)', 'det_crop', True, f"{src}:{crop}"),
        _row('flip', 'hflip', 0.5, f"{src}:{flip}"),
    ]


DENSE_RECIPES: Dict[str, Dict[str, Any]] = {
    'smt_mask_rcnn_3x': dict(
        title='SMT-S/B Mask R-CNN 3x, COCO',
        preset='coco_3x',
        arch='mask_rcnn',
        models=('smt_small', 'smt_base'),
        official=True,
        repo=SMT_REPO,
        based_on=f"{_D3} (the one 3x Mask R-CNN config: SMT-B, whose groups_mode the backbone rejects; SMT-S keeps "
        "the backbone of its base mask_rcnn_smt_s_fpn.py), mmdet 2.28.2 schedule_1x.py / default_runtime.py",
        rows=[
            _row('optimizer', 'opt', 'adamw', f"{_D3}:81"),
            _row('LR (absolute; lr=0.0001 is commented out at :80)', 'lr', 2e-4, f"{_D3}:81"),
            _row('AdamW betas', 'opt_betas', (0.9, 0.999), f"{_D3}:81"),
            _row('weight decay', 'weight_decay', 0.05, f"{_D3}:81"),
            _row(
                'no weight decay for names containing',
                'wd_exclude_keys',
                ['absolute_pos_embed', 'relative_position_bias_table', 'norm'],
                f"{_D3}:82-84",
            ),
            _row(
                'no weight decay for 1-D parameters and biases',
                'wd_exclude_1d',
                False,
                _MMCV + 'optimizer/default_constructor.py:167 (bias_decay_mult 1)',
            ),
            _row('epochs', 'epochs', 36, f"{_D3}:88"),
            _row('LR steps (epochs)', 'lr_milestones', [27, 33], f"{_D3}:87"),
            _row('global batch', 'global_batch', 16, f"{_D3}:74, {_MMDET}default_runtime.py:26 (8 x 2)"),
            _per_gpu(2, f"{_D3}:74"),
            *_ms_pipeline(_D3, '39-41', '45-62', '34'),
            _row('drop path', 'drop_path', 0.2, _SMT_DET + 'mask_rcnn_smt_s_fpn.py:11', models=('smt_small',)),
            _row('drop path', 'drop_path', 0.3, f"{_D3}:16", models=('smt_base',)),
            _row('SyncBN', 'sync_bn', False, _SMT_BN + '; the heads have no norm'),
        ]
        + _mmdet_schedule(f"{_D3}:91-99 ({_FP32})"),
    ),
    'smt_mask_rcnn_1x': dict(
        title='SMT-S/B Mask R-CNN 1x, COCO',
        preset='coco_1x',
        arch='mask_rcnn',
        models=('smt_small', 'smt_base'),
        official=True,
        repo=SMT_REPO,
        based_on=f"{_D1} (its base mask_rcnn_ressa_fpn.py is not in the repository: the model of "
        "mask_rcnn_smt_{s,b}_fpn.py), mmdet 2.28.2 coco_instance.py / schedule_1x.py / default_runtime.py",
        rows=[
            _row('optimizer', 'opt', 'adamw', f"{_D1}:10"),
            _row('LR (absolute)', 'lr', 2e-4, f"{_D1}:10"),
            _row('AdamW betas', 'opt_betas', (0.9, 0.999), f"{_D1}:10"),
            _row('weight decay', 'weight_decay', 0.05, f"{_D1}:10"),
            _row('no weight decay for names containing', 'wd_exclude_keys', ['norm'], f"{_D1}:11"),
            _row(
                'no weight decay for 1-D parameters and biases',
                'wd_exclude_1d',
                False,
                _MMCV + 'optimizer/default_constructor.py:167 (bias_decay_mult 1)',
            ),
            _row('epochs', 'epochs', 12, _SCHEDULE_1X + ':11'),
            _row('LR steps (epochs)', 'lr_milestones', [8, 11], _SCHEDULE_1X + ':10'),
            _row('global batch', 'global_batch', 16, f"{_D1}:14, {_MMDET}default_runtime.py:26 (8 x 2)"),
            _per_gpu(2, f"{_D1}:14"),
            _row('training scale (shorter side)', 'det_scales', [800], _MMDET + 'datasets/coco_instance.py:9'),
            _row('longer side cap', 'det_max_size', 1333, _MMDET + 'datasets/coco_instance.py:9'),
            _row('crop branch', 'det_crop', False, _MMDET + 'datasets/coco_instance.py:6-15 (none)'),
            _row('flip', 'hflip', 0.5, _MMDET + 'datasets/coco_instance.py:10'),
            _row('drop path', 'drop_path', 0.2, _SMT_DET + 'mask_rcnn_smt_s_fpn.py:11', models=('smt_small',)),
            _row('drop path', 'drop_path', 0.2, _SMT_DET + 'mask_rcnn_smt_b_fpn.py:11', models=('smt_base',)),
            _row('SyncBN', 'sync_bn', False, _SMT_BN + '; the heads have no norm'),
        ]
        + _mmdet_schedule(f"{_D1} (no fp16 setting)"),
    ),
    'smt_cascade_3x': dict(
        title='SMT-S/B Cascade Mask R-CNN 3x, COCO',
        preset='coco_3x',
        arch='cascade_mask_rcnn',
        models=('smt_small', 'smt_base'),
        official=True,
        repo=SMT_REPO,
        based_on=f"{_DC} (on cascade_mask_rcnn_smt_s_fpn.py; SMT-B: cascade_mask_rcnn_smt_b_fpn.py), mmdet 2.28.2 "
        "coco_instance.py / schedule_1x.py / default_runtime.py",
        rows=[
            _row('optimizer', 'opt', 'adamw', f"{_DC}:112"),
            _row('LR (absolute)', 'lr', 1e-4, f"{_DC}:112"),
            _row('AdamW betas', 'opt_betas', (0.9, 0.999), f"{_DC}:112"),
            _row('weight decay', 'weight_decay', 0.05, f"{_DC}:112"),
            *_smt_mmcv_decay(f"{_DC}:112"),
            _row('epochs', 'epochs', 36, f"{_DC}:114"),
            _row('LR steps (epochs)', 'lr_milestones', [27, 33], f"{_DC}:113"),
            _row(
                'global batch',
                'global_batch',
                16,
                f"{_MMDET}datasets/coco_instance.py:32, {_MMDET}default_runtime.py:26 (8 x 2)",
            ),
            _per_gpu(2, _MMDET + 'datasets/coco_instance.py:32'),
            *_ms_pipeline(_DC, '80-82', '86-103', '75'),
            _row('drop path', 'drop_path', 0.2, _SMT_DET + 'cascade_mask_rcnn_smt_s_fpn.py:11', models=('smt_small',)),
            _row('drop path', 'drop_path', 0.3, _SMT_DET + 'cascade_mask_rcnn_smt_b_fpn.py:11', models=('smt_base',)),
            _row(
                'SyncBN (the box heads; the backbone keeps BatchNorm)', 'sync_bn', True, f"{_DC}:24, {_DC}:43, {_DC}:62"
            ),
        ]
        + _mmdet_schedule(f"{_DC}:116-125 ({_FP32})"),
    ),
    'smt_retinanet_3x': dict(
        title='SMT-S/B RetinaNet 3x, COCO',
        preset='coco_3x',
        arch='retinanet',
        models=('smt_small', 'smt_base'),
        official=True,
        repo=SMT_REPO,
        based_on=f"{_DR} (on retinanet_smt_s_fpn.py; SMT-B: retinanet_smt_b_fpn.py), mmdet 2.28.2 schedule_1x.py / "
        "default_runtime.py",
        rows=[
            _row('optimizer', 'opt', 'adamw', f"{_DR}:55"),
            _row('LR (absolute)', 'lr', 1e-4, f"{_DR}:55"),
            _row('AdamW betas', 'opt_betas', (0.9, 0.999), f"{_DR}:55"),
            _row('weight decay', 'weight_decay', 0.05, f"{_DR}:55"),
            *_smt_mmcv_decay(f"{_DR}:55"),
            _row('epochs', 'epochs', 36, f"{_DR}:57"),
            _row('LR steps (epochs)', 'lr_milestones', [27, 33], f"{_DR}:56"),
            _row('global batch', 'global_batch', 16, f"{_DR}:49, {_MMDET}default_runtime.py:26 (8 x 2)"),
            _per_gpu(2, f"{_DR}:49"),
            *_ms_pipeline(_DR, '18-20', '24-41', '13'),
            _row('drop path', 'drop_path', 0.2, _SMT_DET + 'retinanet_smt_s_fpn.py:11', models=('smt_small',)),
            _row('drop path', 'drop_path', 0.3, _SMT_DET + 'retinanet_smt_b_fpn.py:11', models=('smt_base',)),
            _row('SyncBN', 'sync_bn', False, _SMT_BN + '; the RetinaHead has no norm'),
        ]
        + _mmdet_schedule(f"{_DR} (no fp16 setting)"),
    ),
    'smt_atss_3x': dict(
        title='SMT-S/B ATSS 3x, COCO',
        preset='coco_3x',
        arch='atss',
        models=('smt_small', 'smt_base'),
        official=True,
        repo=SMT_REPO,
        based_on=f"{_DA} (on atss_smt_s_fpn.py; SMT-B: atss_smt_b_fpn.py), mmdet 2.28.2 coco_detection.py / "
        "schedule_1x.py / default_runtime.py",
        rows=[
            _row('optimizer', 'opt', 'adamw', f"{_DA}:53"),
            _row('LR (absolute)', 'lr', 1e-4, f"{_DA}:53"),
            _row('AdamW betas', 'opt_betas', (0.9, 0.999), f"{_DA}:53"),
            _row('weight decay', 'weight_decay', 0.05, f"{_DA}:53"),
            *_smt_mmcv_decay(f"{_DA}:53"),
            _row('epochs', 'epochs', 36, f"{_DA}:55"),
            _row('LR steps (epochs)', 'lr_milestones', [27, 33], f"{_DA}:54"),
            _row('global batch', 'global_batch', 16, f"{_DA}:50, {_MMDET}default_runtime.py:26 (8 x 2)"),
            _per_gpu(2, f"{_DA}:50"),
            *_ms_pipeline(_DA, '18-20', '24-41', '13'),
            _row('drop path', 'drop_path', 0.2, _SMT_DET + 'atss_smt_s_fpn.py:12', models=('smt_small',)),
            _row('drop path', 'drop_path', 0.3, _SMT_DET + 'atss_smt_b_fpn.py:12', models=('smt_base',)),
            _row('SyncBN', 'sync_bn', False, _SMT_BN + "; the ATSSHead's norm is GroupNorm"),
        ]
        + _mmdet_schedule(f"{_DA} (no fp16 setting)"),
    ),
    'smt_sparse_rcnn_3x': dict(
        title='SMT-S/B Sparse R-CNN 3x, COCO (300 proposals)',
        preset='coco_3x',
        arch='sparse_rcnn',
        models=('smt_small', 'smt_base'),
        official=True,
        repo=SMT_REPO,
        based_on=f"{_DS} (on sparse_rcnn_smt_s_fpn.py; SMT-B: sparse_rcnn_smt_b_fpn.py), mmdet 2.28.2 "
        "coco_detection.py / schedule_1x.py / default_runtime.py",
        rows=[
            _row('optimizer', 'opt', 'adamw', f"{_DS_BASE}:98"),
            _row('LR (absolute)', 'lr', 2.5e-5, f"{_DS_BASE}:98"),
            _row('AdamW betas', 'opt_betas', (0.9, 0.999), 'torch.optim.AdamW default (the config sets none)'),
            _row('weight decay', 'weight_decay', 1e-4, f"{_DS_BASE}:98"),
            *_smt_mmcv_decay(f"{_DS_BASE}:98"),
            _row('grad clip (L2 norm)', 'clip_grad', 1.0, f"{_DS_BASE}:99"),
            _row('epochs', 'epochs', 36, f"{_DS}:57"),
            _row('LR steps (epochs)', 'lr_milestones', [27, 33], f"{_DS}:56"),
            _row('LR step factor', 'decay_rate', 0.1, _MMCV + 'hooks/lr_updater.py:186 (StepLrUpdaterHook gamma)'),
            _row('warm-up steps (linear)', 'warmup_iters', 500, _SCHEDULE_1X + ':6-8'),
            _row('warm-up start (x lr)', 'warmup_ratio', 0.001, _SCHEDULE_1X + ':9'),
            _row(
                'global batch',
                'global_batch',
                16,
                f"{_MMDET}datasets/coco_detection.py:32, {_MMDET}default_runtime.py:26 (8 x 2)",
            ),
            _per_gpu(2, _MMDET + 'datasets/coco_detection.py:32'),
            *_ms_pipeline(_DS, '22-24', '28-48', '16'),
            _row(
                'learnable proposals, detections per image',
                None,
                300,
                f"{_DS}:3, {_DS}:5, {_DS}:7",
                note="create_detector's default num_proposals",
                msconv=300,
            ),
            _row('drop path', 'drop_path', 0.2, f"{_DS_BASE}:18", models=('smt_small',)),
            _row('drop path', 'drop_path', 0.2, _SMT_DET + 'sparse_rcnn_smt_b_fpn.py:18', models=('smt_base',)),
            _row('SyncBN', 'sync_bn', False, _SMT_BN + '; the DIIHeads use LayerNorm'),
            _row('LR scaling', 'lr_base_size', None, _MMDET + 'default_runtime.py:27 (auto_scale_lr enable=False)'),
            _row('evaluation (epochs)', 'eval_every', 1, _MMCV + 'hooks/evaluation.py:89 (EvalHook interval)'),
            _row('mixed precision (off: fp32)', 'amp', False, f"{_DS} (no fp16 setting)"),
            _row('AdamW eps', 'opt_eps', 1e-8, 'torch.optim.AdamW default (the config sets none)'),
            _EMA,
        ],
    ),
    'smt_upernet_160k': dict(
        title='SMT-S/B UperNet 160k, ADE20K',
        preset='ade20k_160k',
        arch='upernet',
        models=('smt_small', 'smt_base'),
        official=True,
        repo=SMT_REPO,
        based_on=f"{_SU} (its base upernet_ressa_s.py is not in the repository: the model of upernet_smt_s.py; "
        "SMT-B: upernet_smt_b.py), mmseg 0.30.0 ade20k.py / schedule_160k.py",
        rows=[
            _row('optimizer', 'opt', 'adamw', f"{_SU}:18"),
            _row('LR (absolute)', 'lr', 6e-5, f"{_SU}:18"),
            _row('AdamW betas', 'opt_betas', (0.9, 0.999), f"{_SU}:18"),
            _row('weight decay', 'weight_decay', 0.01, f"{_SU}:18"),
            *_smt_mmcv_decay(f"{_SU}:18 (the comment at :17 says otherwise)"),
            _row('steps', 'total_iters', 160_000, _MMSEG + 'schedules/schedule_160k.py:7'),
            _row('schedule', 'sched', 'poly', f"{_SU}:20"),
            _row('poly power', 'decay_rate', 1.0, f"{_SU}:24"),
            _row('min LR', 'min_lr', 0.0, f"{_SU}:24"),
            _row('warm-up steps (linear)', 'warmup_iters', 1500, f"{_SU}:21-22"),
            _row('warm-up start (x lr)', 'warmup_ratio', 1e-6, f"{_SU}:23"),
            _row('grad clip', 'clip_grad', None, _MMSEG + 'schedules/schedule_160k.py:3 (optimizer_config empty)'),
            _row('global batch', 'global_batch', 16, f"{_SU}:26-27 (8 x 2)"),
            _per_gpu(2, f"{_SU}:27"),
            _row('rescale (longer, shorter)', 'seg_scale', (2048, 512), _MMSEG + 'datasets/ade20k.py:10'),
            _row('rescale ratio range', 'seg_ratio_range', (0.5, 2.0), _MMSEG + 'datasets/ade20k.py:10'),
            _row('crop', 'seg_crop', (512, 512), _MMSEG + 'datasets/ade20k.py:6'),
            _row('flip', 'hflip', 0.5, _MMSEG + 'datasets/ade20k.py:12'),
            _row('classes', 'seg_num_classes', 150, f"{_SU}:9"),
            _row('evaluation', 'seg_eval_mode', 'whole', _SMT_SEG + 'upernet_smt_s.py:48'),
            _row('evaluation every (steps)', 'eval_every_iters', 16_000, _MMSEG + 'schedules/schedule_160k.py:9'),
            _row('checkpoint every (steps)', 'ckpt_every', 16_000, _MMSEG + 'schedules/schedule_160k.py:8'),
            _row('drop path', 'drop_path', 0.2, _SMT_SEG + 'upernet_smt_s.py:13', models=('smt_small',)),
            _row('drop path', 'drop_path', 0.3, _SMT_SEG + 'upernet_smt_b.py:13', models=('smt_base',)),
            _row('SyncBN (the heads; the backbone keeps BatchNorm)', 'sync_bn', True, _SMT_SEG + 'upernet_smt_s.py:2'),
            _row('mixed precision (off: fp32)', 'amp', False, f"{_SU} (no fp16 setting)"),
            _EPS,
            _EMA,
        ],
    ),
    'sw_cascade_3x': dict(
        title='SW-T Cascade Mask R-CNN 3x, COCO',
        preset='coco_3x',
        arch='cascade_mask_rcnn',
        models=('shiftwise_tiny',),
        official=True,
        repo=SW_REPO,
        based_on=f"{_WC}, its optimizer constructor downstream/detection/mmdet/core/optimizers/"
        "layer_decay_optimizer_constructor.py, mmdet 2.28.2 schedule_1x.py",
        rows=[
            _row('optimizer', 'opt', 'adamw', f"{_WC}:143"),
            _row('LR (per 16 images)', 'lr', 1e-4, f"{_WC}:144"),
            _row('LR scaling (auto_scale_lr)', 'lr_base_size', 16, f"{_WC}:150"),
            _row('AdamW betas', 'opt_betas', (0.9, 0.999), f"{_WC}:144"),
            _row('weight decay', 'weight_decay', 0.05, f"{_WC}:144"),
            _row(
                'no weight decay for 1-D parameters and biases',
                'wd_exclude_1d',
                True,
                'downstream/detection/mmdet/core/optimizers/layer_decay_optimizer_constructor.py:107-108',
            ),
            _row('layer-wise LR decay', 'layer_decay', 0.8, f"{_WC}:145"),
            _row('layer-wise LR decay: num_layers', 'layer_decay_layers', 12, f"{_WC}:147"),
            _row('epochs', 'epochs', 36, f"{_WC}:149"),
            _row('LR steps (epochs)', 'lr_milestones', [27, 33], f"{_WC}:148"),
            _row('LR step factor', 'decay_rate', 0.1, _MMCV + 'hooks/lr_updater.py:186 (StepLrUpdaterHook gamma)'),
            _row('warm-up steps (linear)', 'warmup_iters', 500, _SCHEDULE_1X + ':6-8'),
            _row('warm-up start (x lr)', 'warmup_ratio', 0.001, _SCHEDULE_1X + ':9'),
            _row('grad clip', 'clip_grad', None, f"{_WC}:152"),
            _row('global batch', 'global_batch', 16, f"{_WC}:140-141 (8 x 2)"),
            _per_gpu(2, f"{_WC}:141"),
            *_ms_pipeline(_WC, '110-112', '116-133', '105'),
            _row('drop path', 'drop_path', 0.4, f"{_WC}:25"),
            _row(
                'SyncBN (backbone and box heads)',
                'sync_bn',
                True,
                f"{_WC}:54, downstream/detection/SW_v2_unirep.py:29 (use_sync_bn)",
            ),
            _row('evaluation (epochs)', 'eval_every', 1, _MMCV + 'hooks/evaluation.py:89 (EvalHook interval)'),
            _row('mixed precision (off: fp32)', 'amp', False, f"{_WC} (no fp16 setting)"),
            _EPS,
            _EMA,
        ],
    ),
    'sw_upernet_160k': dict(
        title='SW-T UperNet 160k, ADE20K (single-scale config)',
        preset='ade20k_160k',
        arch='upernet',
        models=('shiftwise_tiny',),
        official=True,
        repo=SW_REPO,
        based_on=f"{_WU}, its optimizer constructor downstream/segmentation/mmseg/core/optimizers/"
        "layer_decay_optimizer_constructor.py, mmseg 0.30.0 ade20k.py / schedule_160k.py",
        rows=[
            _row('optimizer', 'opt', 'adamw', f"{_WU}:45"),
            _row('LR (absolute)', 'lr', 1e-4, f"{_WU}:46"),
            _row('AdamW betas', 'opt_betas', (0.9, 0.999), f"{_WU}:46"),
            _row('weight decay', 'weight_decay', 0.05, f"{_WU}:46"),
            _row(
                'no weight decay for 1-D parameters and biases',
                'wd_exclude_1d',
                True,
                'downstream/segmentation/mmseg/core/optimizers/layer_decay_optimizer_constructor.py:134-135',
            ),
            _row('layer-wise LR decay (1: none)', 'layer_decay', 1.0, f"{_WU}:50"),
            _row('layer-wise LR decay: num_layers', 'layer_decay_layers', 9, f"{_WU}:52"),
            _row('steps', 'total_iters', 160_000, f"{_WU}:54"),
            _row('schedule', 'sched', 'poly', f"{_WU}:59"),
            _row('poly power', 'decay_rate', 1.0, f"{_WU}:63"),
            _row('min LR', 'min_lr', 0.0, f"{_WU}:63"),
            _row('warm-up steps (linear)', 'warmup_iters', 1500, f"{_WU}:60-61"),
            _row('warm-up start (x lr)', 'warmup_ratio', 1e-6, f"{_WU}:62"),
            _row('grad clip', 'clip_grad', None, _MMSEG + 'schedules/schedule_160k.py:3 (optimizer_config empty)'),
            _row('global batch', 'global_batch', 16, f"{_WU}:10, {_WU}:66 (4 x 4)"),
            _per_gpu(4, f"{_WU}:66"),
            _row('rescale (longer, shorter)', 'seg_scale', (2048, 512), _MMSEG + 'datasets/ade20k.py:10'),
            _row('rescale ratio range', 'seg_ratio_range', (0.5, 2.0), _MMSEG + 'datasets/ade20k.py:10'),
            _row('crop', 'seg_crop', (512, 512), f"{_WU}:19"),
            _row('flip', 'hflip', 0.5, _MMSEG + 'datasets/ade20k.py:12'),
            _row('classes', 'seg_num_classes', 150, f"{_WU}:40"),
            _row('evaluation', 'seg_eval_mode', 'slide', f"{_WU}:42"),
            _row('slide window', 'seg_slide_crop', (512, 512), f"{_WU}:19, {_WU}:42"),
            _row('slide stride', 'seg_slide_stride', (341, 341), f"{_WU}:42"),
            _row('evaluation every (steps)', 'eval_every_iters', 4000, f"{_WU}:56"),
            _row('checkpoint every (steps)', 'ckpt_every', 8000, f"{_WU}:55"),
            _row('drop path', 'drop_path', 0.4, f"{_WU}:29"),
            _row(
                'SyncBN (backbone and heads)',
                'sync_bn',
                True,
                _SW_SEG + 'upernet_SW.py:9, downstream/segmentation/SW_v2_unirep.py:27 (use_sync_bn)',
            ),
            _row('mixed precision (off: fp32)', 'amp', False, f"{_WU} (no fp16 setting)"),
            _EPS,
            _EMA,
        ],
    ),
}

register_recipes(DENSE_RECIPES)
