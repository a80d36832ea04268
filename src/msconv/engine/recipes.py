"""The ImageNet training recipes: the presets ``'imagenet'`` (each family's official ImageNet-1K recipe),
``'imagenet22k'`` / ``'imagenet22kto1k'`` / ``'imagenet22kto1k_384'`` (SMT-L's 22K pre-training and fine-tuning)
and ``'demo'`` (small and fast), registered with :func:`msconv.engine.config.register_presets`, and the tables of
every official recipe.

``OFFICIAL_RECIPES`` lists every preset's hyper-parameters with the official file and line they come from (the
dense tasks add theirs with ``register_recipes``: :mod:`msconv.engine.dense_recipes`; ``UNOFFICIAL_PRESETS``:
those with no official recipe), ``preset_info`` says which is which, and ``recipe_table_markdown`` renders both for
docs/guides/recipes.md. ``scripts/check_recipe_citations.py`` reads every cited line in the pinned official
checkouts and checks that the value is there.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from ..models import create_model
from .config import TrainConfig, family_of, register_presets, resolve_config
from .optim import weight_decay_groups

__all__ = [
    'OFFICIAL_RECIPES',
    'recipe_row',
    'register_recipes',
    'UNOFFICIAL_PRESETS',
    'FINETUNE_PRESETS',
    'preset_info',
    'recipe_config',
    'recipe_value',
    'recipe_table_markdown',
]

# The official ImageNet recipes (reference notes: smt.md §5, scsc.md §4.3, shiftwise.md §5); every value is listed
# with the official file and line it comes from in OFFICIAL_RECIPES below, and tests/test_recipes.py checks both.
_IMAGENET_COMMON = dict(
    epochs=300,
    opt='adamw',
    weight_decay=0.05,
    opt_eps=1e-8,
    opt_betas=(0.9, 0.999),
    sched='cosine',
    smoothing=0.1,
    cutmix=1.0,
    mixup_prob=1.0,
    mixup_switch_prob=0.5,
    mixup_mode='batch',
    auto_augment='rand-m9-mstd0.5-inc1',
    color_jitter=0.4,
    re_prob=0.25,
    re_mode='pixel',
    re_count=1,
    hflip=0.5,
    scale=(0.08, 1.0),
    interpolation='bicubic',
    ema=False,
)
# SMT: 8x128=1024 images, LR 1e-3/1e-7/1e-6 per 512, 5 warm-up epochs (prefix), clip 5, fp16 AMP, Mixup 0.2.
# Drop path per size (T 0.1, S 0.2, B 0.3, L 0.4) is set by model name in `_PER_MODEL`.
_SMT_1K = dict(
    _IMAGENET_COMMON,
    batch_size=1024,
    lr=1e-3,
    warmup_lr=1e-7,
    min_lr=1e-6,
    lr_base_size=512,
    warmup_epochs=5,
    warmup_prefix=True,
    clip_grad=5.0,
    mixup=0.2,
    drop_path=0.1,
    amp=True,
    amp_dtype='float16',
)
_PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    'imagenet': {
        'smt': _SMT_1K,
        # SCSC (Swin pipeline): 1024 images, LR 1e-3/5e-7/5e-6 per 512, 20 warm-up epochs inside a cosine that spans
        # all 300 epochs (no warm-up prefix), clip 5, Mixup 0.8, apex O1 (fp16 + loss scaling).
        'scsc': dict(
            _IMAGENET_COMMON,
            batch_size=1024,
            lr=1e-3,
            warmup_lr=5e-7,
            min_lr=5e-6,
            lr_base_size=512,
            warmup_epochs=20,
            warmup_prefix=False,
            clip_grad=5.0,
            mixup=0.8,
            drop_path=0.1,
            amp=True,
            amp_dtype='float16',
        ),
        # ShiftWise SW-T (ConvNeXt pipeline): 8x64x8 = 4096 images, absolute LR 4e-3, min 1e-6, 5 warm-up epochs,
        # no clipping, fp32, drop path 0.2, SyncBN, coarse sparsity 0.3 with SNIP per-layer densities.
        'shiftwise': dict(
            _IMAGENET_COMMON,
            batch_size=512,
            accum_steps=8,
            lr=4e-3,
            warmup_lr=0.0,
            min_lr=1e-6,
            lr_base_size=None,
            warmup_epochs=5,
            warmup_prefix=True,
            clip_grad=None,
            mixup=0.8,
            drop_path=0.2,
            amp=False,
            sync_bn=True,
            sparsity=dict(target=0.3, prune_rate=0.3, final_prune_rate=0.005, interval=100, gap=131, init='snip'),
        ),
    },
    # SMT-L ImageNet-22K pre-training (configs/smt/smt_large_224_22k.yaml; README: 8 GPUs x 128 x accumulation 4).
    'imagenet22k': {
        'smt': dict(
            _SMT_1K,
            epochs=90,
            batch_size=1024,
            accum_steps=4,
            lr=1.25e-4,
            warmup_lr=1.25e-7,
            min_lr=1.25e-6,
            warmup_epochs=5,
            drop_path=0.1,
        ),
    },
    # SMT-L 22K -> 1K fine-tuning at 224 (configs/smt/smt_large_224_22kto1k_finetune.yaml; README: 8 GPUs x 64).
    'imagenet22kto1k': {
        'smt': dict(
            _SMT_1K,
            epochs=30,
            batch_size=512,
            lr=1e-5,
            warmup_lr=1e-8,
            min_lr=1e-7,
            warmup_epochs=5,
            drop_path=0.1,
        ),
    },
    # ... and at 384 (configs/smt/smt_large_384_22kto1k_finetune.yaml: IMG_SIZE 384, TEST.CROP False).
    'imagenet22kto1k_384': {
        'smt': dict(
            _SMT_1K,
            epochs=30,
            batch_size=512,
            lr=2e-5,
            warmup_lr=2e-8,
            min_lr=2e-7,
            warmup_epochs=5,
            drop_path=0.1,
            image_size=384,
            crop_pct=1.0,
            crop_mode='squash',  # TEST.CROP False: Resize((384, 384)), no crop (data/build.py:155-158)
        ),
    },
    # Small and fast: the bundled digits at 32x32, a few epochs on CPU. Light augmentation (no flips for digits).
    'demo': {
        fam: dict(
            data='digits',
            image_size=32,
            epochs=4,
            batch_size=64,
            accum_steps=1,
            lr=2e-3,
            warmup_lr=1e-5,
            min_lr=1e-5,
            lr_base_size=None,
            warmup_epochs=0.5,
            weight_decay=0.05,
            clip_grad=5.0,
            drop_path=0.0,
            smoothing=0.1,
            mixup=0.0,
            cutmix=0.0,
            auto_augment=None,
            color_jitter=0.0,
            re_prob=0.0,
            hflip=0.0,
            scale=(0.85, 1.0),
            ratio=(0.9, 1.1),
            interpolation='bilinear',
            crop_pct=1.0,
            amp=False,
            ema=False,
            num_workers=1,
            ckpt_every=0,
            keep_last=1,
            log_every=20,
            sparsity=None,
        )
        for fam in ('smt', 'scsc', 'shiftwise')
    },
}
# Presets that fine-tune pre-trained weights: they need init_checkpoint.
FINETUNE_PRESETS = ('imagenet22kto1k', 'imagenet22kto1k_384')

# Per-model values of the 'imagenet' preset. SMT: each size's official yaml. The rest are not official recipes
# (see OFFICIAL_RECIPES['unofficial']): SCSC-Swin-S takes Swin-S's drop path, which its registered default also
# uses; CBTNet (scsc_resnet*) has no stochastic depth in the official block, so none is added.
_PER_MODEL: Dict[str, Dict[str, Dict[str, Any]]] = {
    'imagenet': {
        'smt_tiny': {'drop_path': 0.1},
        'smt_small': {'drop_path': 0.2},
        'smt_base': {'drop_path': 0.3},
        'smt_large': {'drop_path': 0.4},
        'scsc_swin_small': {'drop_path': 0.3},
        'scsc_resnet50': {'drop_path': 0.0},
        'scsc_resnet101': {'drop_path': 0.0},
        'scsc_resnet152': {'drop_path': 0.0},
    },
}


def _needs_init_checkpoint(cfg) -> Optional[str]:
    if cfg.init_checkpoint is None:
        return (
            f"preset {cfg.preset!r} fine-tunes ImageNet-22K pre-trained weights: pass init_checkpoint "
            f"(--init-checkpoint PATH), and class_map (--class-map map22kto1k.txt) when that checkpoint has the 21841 "
            f"ImageNet-22K classes"
        )
    return None


for _name, _by_family in _PRESETS.items():
    register_presets(
        _name,
        _by_family,
        per_model=_PER_MODEL.get(_name),
        other_models='smt' if _name == 'demo' else None,  # a timm model takes the SMT demo values
        check=_needs_init_checkpoint if _name in FINETUNE_PRESETS else None,
    )


# ---- the official recipes, hyper-parameter by hyper-parameter ----------------------------------------------------
# Each row: (hyper-parameter, config field or a derived name understood by `recipe_value`, official value, official
# file:line, note). A note says why msconv's value differs, and then `msconv` holds msconv's value: the table test
# (tests/test_recipes.py::test_presets_match_official_table) resolves every preset and compares it with the rows,
# and checks that docs/guides/recipes.md shows `recipe_table_markdown()`.
_SAME = object()


def recipe_row(param, field_, official, src, note=None, msconv=_SAME, models=None):
    """One row of a recipe table: ``param`` (what it is), ``field_`` (the config field or a name of
    :func:`recipe_value`; None: not a config value), the ``official`` value, ``src`` (the official ``file:line``,
    ``file:a-b``, several separated by ', ', each with an optional '(note)'), and where msconv differs, a ``note``
    and ``msconv`` (its value); ``models``: the row holds for these models only."""
    return dict(param=param, field=field_, official=official, src=src, note=note, msconv=msconv, models=models)


_row = recipe_row


_COMMON_AUG = [
    # (param, field, value, SMT config.py line, SCSC config.py line, SW main.py line)
    ('label smoothing', 'smoothing', 0.1, 55, 58, 111),
    ('Mixup prob', 'mixup_prob', 1.0, 157, 135, 136),
    ('Mixup switch prob', 'mixup_switch_prob', 0.5, 159, 137, 138),
    ('Mixup mode', 'mixup_mode', 'batch', 161, 139, 140),
    ('CutMix alpha', 'cutmix', 1.0, 153, 131, 132),
    ('RandAugment', 'auto_augment', 'rand-m9-mstd0.5-inc1', 143, 121, 109),
    ('colour jitter', 'color_jitter', 0.4, 141, 119, 107),
    ('random erasing prob', 're_prob', 0.25, 145, 123, 120),
    ('random erasing mode', 're_mode', 'pixel', 147, 125, 122),
    ('random erasing count', 're_count', 1, 149, 127, 124),
    ('interpolation', 'interpolation', 'bicubic', 23, 30, 113),
]
_OPT = [
    ('optimizer', 'opt', 'adamw', 121, 106, 80),
    ('AdamW eps', 'opt_eps', 1e-8, 123, 108, 82),
    ('weight decay', 'weight_decay', 0.05, 83, 81, 90),
]


def _common(which: int, repo_file: str) -> List[Dict[str, Any]]:
    rows = [_row(p, f, v, f"{repo_file}:{lines[which]}") for p, f, v, *lines in _OPT + _COMMON_AUG]
    return rows


_NO_WD_1D = 'no weight decay on 1-D parameters and biases'
_SMT_SHARED = [
    _row('schedule', 'sched', 'cosine', 'config.py:108'),
    _row('warm-up prefix (cosine over the epochs after it)', 'warmup_prefix', True, 'config.py:114'),
    _row('LR scaling reference batch', 'lr_base_size', 512, 'main.py:314-316'),
    _row('AdamW betas', 'opt_betas', (0.9, 0.999), 'config.py:125'),
    _row('grad clip', 'clip_grad', 5.0, 'config.py:96'),
    _row('Mixup alpha', 'mixup', 0.2, 'config.py:151'),
    _row('mixed precision (torch.cuda.amp fp16 + GradScaler)', 'amp_dtype', 'float16', 'config.py:180, main.py:180'),
    _row('EMA', 'ema', False, 'main.py (no EMA)'),
    _row(
        'per-GPU batch (BatchNorm)',
        'per_gpu_batch',
        128,
        'README.md:107-109',
        note='opt-in (--per-gpu-batch 128): by default each of N processes gets batch/N, equal on 8 GPUs',
        msconv=None,
    ),
] + _common(0, 'config.py')
# the fine-tuning command (README.md:125-128) runs 64 images per GPU
_SMT_FINETUNE_SHARED = [r for r in _SMT_SHARED if r['field'] != 'per_gpu_batch'] + [
    _row(
        'per-GPU batch (BatchNorm)',
        'per_gpu_batch',
        64,
        'README.md:125-128',
        note='opt-in (--per-gpu-batch 64): by default each of N processes gets batch/N, equal on 8 GPUs',
        msconv=None,
    )
]

OFFICIAL_RECIPES: Dict[str, Dict[str, Any]] = {
    'smt_1k': dict(
        title='SMT-T/S/B/L, ImageNet-1K from scratch',
        preset='imagenet',
        models=('smt_tiny', 'smt_small', 'smt_base', 'smt_large'),
        official=True,
        repo='AFeng-x/SMT@11e954d',
        based_on='configs/smt/smt_{tiny,small,base,large}_224.yaml, config.py, main.py, README.md (8 GPUs x 128)',
        rows=[
            _row('epochs', 'epochs', 300, 'config.py:81'),
            _row('warm-up epochs', 'warmup_epochs', 5, 'config.py:82'),
            _row('base LR (per 512 images)', 'lr', 1e-3, 'config.py:85'),
            _row('warm-up LR (per 512)', 'warmup_lr', 1e-7, 'config.py:88'),
            _row('min LR (per 512)', 'min_lr', 1e-6, 'config.py:91'),
            _row('global batch', 'global_batch', 1024, 'README.md:107-109 (8 x 128), config.py:15'),
            _row('drop path', 'drop_path', 0.1, 'configs/smt/smt_tiny_224.yaml:4', models=('smt_tiny',)),
            _row('drop path', 'drop_path', 0.2, 'configs/smt/smt_small_224.yaml:4', models=('smt_small',)),
            _row('drop path', 'drop_path', 0.3, 'configs/smt/smt_base_224.yaml:4', models=('smt_base',)),
            _row('drop path', 'drop_path', 0.4, 'configs/smt/smt_large_224.yaml:4', models=('smt_large',)),
        ]
        + _SMT_SHARED,
    ),
    'smt_large_22k': dict(
        title='SMT-L, ImageNet-22K pre-training (the 87.1 / 88.1 top-1 come from it)',
        preset='imagenet22k',
        models=('smt_large',),
        official=True,
        repo='AFeng-x/SMT@11e954d',
        based_on='configs/smt/smt_large_224_22k.yaml, config.py, README.md:117-119 (8 GPUs x 128 x accumulation 4)',
        rows=[
            _row('epochs', 'epochs', 90, 'configs/smt/smt_large_224_22k.yaml:19'),
            _row('warm-up epochs', 'warmup_epochs', 5, 'configs/smt/smt_large_224_22k.yaml:20'),
            _row('base LR (per 512 images; 1e-3 at 4096)', 'lr', 1.25e-4, 'configs/smt/smt_large_224_22k.yaml:22'),
            _row('warm-up LR (per 512)', 'warmup_lr', 1.25e-7, 'configs/smt/smt_large_224_22k.yaml:23'),
            _row('min LR (per 512)', 'min_lr', 1.25e-6, 'configs/smt/smt_large_224_22k.yaml:24'),
            _row('global batch', 'global_batch', 4096, 'README.md:117-119 (8 x 128 x 4)'),
            _row('gradient accumulation', 'accum_steps', 4, 'README.md:119'),
            _row('drop path', 'drop_path', 0.1, 'configs/smt/smt_large_224_22k.yaml:6'),
        ]
        + _SMT_SHARED,
    ),
    'smt_large_22kto1k_224': dict(
        title='SMT-L, 22K -> 1K fine-tuning at 224',
        preset='imagenet22kto1k',
        models=('smt_large',),
        official=True,
        repo='AFeng-x/SMT@11e954d',
        based_on='configs/smt/smt_large_224_22kto1k_finetune.yaml, config.py, README.md:125-128 (8 GPUs x 64), '
        'utils.py:103-108 (map22kto1k.txt head rows)',
        rows=[
            _row('epochs', 'epochs', 30, 'configs/smt/smt_large_224_22kto1k_finetune.yaml:17'),
            _row('warm-up epochs', 'warmup_epochs', 5, 'configs/smt/smt_large_224_22kto1k_finetune.yaml:18'),
            _row('base LR (per 512 images)', 'lr', 1e-5, 'configs/smt/smt_large_224_22kto1k_finetune.yaml:20'),
            _row('warm-up LR (per 512)', 'warmup_lr', 1e-8, 'configs/smt/smt_large_224_22kto1k_finetune.yaml:21'),
            _row('min LR (per 512)', 'min_lr', 1e-7, 'configs/smt/smt_large_224_22kto1k_finetune.yaml:22'),
            _row(
                'global batch',
                'global_batch',
                512,
                'README.md:125-128 (8 x 64; the README shows the fine-tuning command with the 384 config)',
            ),
            _row('drop path', 'drop_path', 0.1, 'configs/smt/smt_large_224_22kto1k_finetune.yaml:4'),
        ]
        + _SMT_FINETUNE_SHARED,
    ),
    'smt_large_22kto1k_384': dict(
        title='SMT-L, 22K -> 1K fine-tuning at 384',
        preset='imagenet22kto1k_384',
        models=('smt_large',),
        official=True,
        repo='AFeng-x/SMT@11e954d',
        based_on='configs/smt/smt_large_384_22kto1k_finetune.yaml, config.py, README.md:125-128 (8 GPUs x 64), '
        'utils.py:103-108 (map22kto1k.txt head rows)',
        rows=[
            _row('image size', 'image_size', 384, 'configs/smt/smt_large_384_22kto1k_finetune.yaml:2'),
            _row(
                'eval crop (TEST.CROP False: no crop)',
                'crop_pct',
                1.0,
                'configs/smt/smt_large_384_22kto1k_finetune.yaml:26',
            ),
            _row(
                'eval resize (TEST.CROP False: straight to 384 x 384, a squash)',
                'crop_mode',
                'squash',
                'configs/smt/smt_large_384_22kto1k_finetune.yaml:26, data/build.py:155-158',
            ),
            _row('epochs', 'epochs', 30, 'configs/smt/smt_large_384_22kto1k_finetune.yaml:19'),
            _row('warm-up epochs', 'warmup_epochs', 5, 'configs/smt/smt_large_384_22kto1k_finetune.yaml:20'),
            _row('base LR (per 512 images)', 'lr', 2e-5, 'configs/smt/smt_large_384_22kto1k_finetune.yaml:22'),
            _row('warm-up LR (per 512)', 'warmup_lr', 2e-8, 'configs/smt/smt_large_384_22kto1k_finetune.yaml:23'),
            _row('min LR (per 512)', 'min_lr', 2e-7, 'configs/smt/smt_large_384_22kto1k_finetune.yaml:24'),
            _row('global batch', 'global_batch', 512, 'README.md:125-128 (8 x 64)'),
            _row('drop path', 'drop_path', 0.1, 'configs/smt/smt_large_384_22kto1k_finetune.yaml:6'),
        ]
        + _SMT_FINETUNE_SHARED,
    ),
    'scsc_swin_tiny': dict(
        title='SCSC-Swin-T, ImageNet-1K',
        preset='imagenet',
        models=('scsc_swin_tiny',),
        official=True,
        repo='megvii-research/SCSC@94fad31',
        based_on='config.py, main.py, lr_scheduler.py, scsc_swin.py, '
        'run.sh (8 GPUs of rlaunch group research_model_v100, x 128)',
        rows=[
            _row('epochs', 'epochs', 300, 'config.py:79'),
            _row('warm-up epochs', 'warmup_epochs', 20, 'config.py:80'),
            _row('base LR (per 512 images)', 'lr', 1e-3, 'config.py:82'),
            _row('warm-up LR (per 512)', 'warmup_lr', 5e-7, 'config.py:83'),
            _row('min LR (per 512)', 'min_lr', 5e-6, 'config.py:84'),
            _row('LR scaling reference batch', 'lr_base_size', 512, 'main.py:322-324'),
            _row('global batch', 'global_batch', 1024, 'config.py:22 (128 per GPU), run.sh:3 (8 GPUs)'),
            _row('schedule', 'sched', 'cosine', 'config.py:98'),
            _row(
                'warm-up prefix (no: the cosine spans all epochs, the warm-up overwrites its start)',
                'warmup_prefix',
                False,
                'lr_scheduler.py:21-30 (t_initial=num_steps, no warmup_prefix)',
            ),
            _row('AdamW betas', 'opt_betas', (0.9, 0.999), 'config.py:110'),
            _row('grad clip', 'clip_grad', 5.0, 'config.py:86'),
            _row('Mixup alpha', 'mixup', 0.8, 'config.py:129'),
            _row(
                'drop path (the model default; config.py:56 is unused, main.py:75 builds SCSC_Swin())',
                'drop_path',
                0.1,
                'scsc_swin.py:431',
            ),
            _row(
                'mixed precision (apex O1: fp16 + dynamic loss scaling)',
                'amp_dtype',
                'float16',
                'main.py:53, main.py:81',
            ),
            _row('EMA', 'ema', False, 'main.py (no EMA)'),
            _row(
                'per-GPU batch (BatchNorm)',
                'per_gpu_batch',
                128,
                'config.py:22',
                note='opt-in (--per-gpu-batch 128): by default each of N processes gets batch/N, equal on 8 GPUs',
                msconv=None,
            ),
        ]
        + _common(1, 'config.py'),
    ),
    'shiftwise_tiny': dict(
        title='ShiftWise SW-T, ImageNet-1K',
        preset='imagenet',
        models=('shiftwise_tiny',),
        official=True,
        repo='lidc54/shift-wiseConv@2202e6b',
        based_on='README.md:45 (the training command), main.py defaults, optim_factory.py, sparse_core.py, funcs.py',
        rows=[
            _row('epochs', 'epochs', 300, 'README.md:45 (--epochs 300)'),
            _row('warm-up epochs', 'warmup_epochs', 5, 'README.md:45 (--warmup_epochs 5)'),
            _row('LR (absolute)', 'lr', 4e-3, 'README.md:45 (--lr 4e-3)'),
            _row('LR scaling', 'lr_base_size', None, 'main.py:96 (absolute, not scaled)'),
            _row('warm-up start LR', 'warmup_lr', 0.0, 'main.py:411-414, utils.py:431-439 (start_warmup_value 0)'),
            _row('min LR', 'min_lr', 1e-6, 'main.py:99'),
            _row('global batch', 'global_batch', 4096, 'README.md:45 (8 GPUs x --batch_size 64 x --update_freq 8)'),
            _row('warm-up prefix', 'warmup_prefix', True, 'utils.py:431-445 (warm-up, then a cosine over the rest)'),
            _row('AdamW betas (default)', 'opt_betas', (0.9, 0.999), 'main.py:84 (None: torch default)'),
            _row('grad clip', 'clip_grad', None, 'main.py:86'),
            _row('Mixup alpha', 'mixup', 0.8, 'main.py:130'),
            _row('drop path', 'drop_path', 0.2, 'README.md:45 (--drop_path 0.2)'),
            _row('mixed precision (off: fp32)', 'amp', False, 'main.py:197'),
            _row('EMA', 'ema', False, 'README.md:45 (--model_ema false)'),
            _row('SyncBatchNorm', 'sync_bn', True, 'backbones/SW_v2_unirep.py:72'),
            _row(
                'sparsity (fraction of small kernels pruned)', 'sparsity.target', 0.3, 'README.md:45 (--sparsity 0.3)'
            ),
            _row('prune rate', 'sparsity.prune_rate', 0.3, 'README.md:45 (--prune_rate 0.3)'),
            _row('final prune rate (cosine decay)', 'sparsity.final_prune_rate', 0.005, 'sparse_core.py:169'),
            _row('mask update interval (steps)', 'sparsity.interval', 100, 'README.md:45 (-u 100)'),
            _row('path alignment every N updates', 'sparsity.gap', 131, 'README.md:45 (--sparse_gap 131)'),
            _row('per-layer density init', 'sparsity.init', 'snip', 'README.md:45, sparse_core.py:337-376'),
            _row(
                'GRN gamma/beta weight decay (4-D there)',
                'grn_decay',
                True,
                'optim_factory.py:80 (only 1-D and biases excluded)',
            ),
            _row(
                'per-GPU batch (BatchNorm; SyncBN over the ranks)',
                'per_gpu_batch',
                64,
                'README.md:45 (--batch_size 64)',
                note='opt-in (--per-gpu-batch 64): by default each of N processes gets batch/N, equal on 8 GPUs',
                msconv=None,
            ),
            _row(
                'validation',
                None,
                'after epoch 70 only',
                'main.py:541',
                note='msconv evaluates every eval_every epochs (default 1); best/last are reported either way',
                msconv='every epoch',
            ),
        ]
        + _common(2, 'main.py'),
    ),
}

# Presets with no official recipe behind them: what they are based on and how they differ.
UNOFFICIAL_PRESETS: Dict[str, Dict[str, Any]] = {
    'scsc_swin_small': dict(
        preset='imagenet',
        based_on='the SCSC-Swin-T recipe (megvii-research/SCSC builds only SCSC-Swin-T, main.py:75)',
        rows=[_row('drop path', 'drop_path', 0.3, "Swin-S's value (the registered scsc_swin_small default)")],
    ),
    **{
        f'scsc_resnet{d}': dict(
            preset='imagenet',
            based_on='the SCSC-Swin-T recipe (megvii-research/SCSC has no ImageNet recipe for CBTNet)',
            rows=[
                _row('drop path', 'drop_path', 0.0, 'cbtnet.py:120-240 (the official block has no stochastic depth)')
            ],
        )
        for d in (50, 101, 152)
    },
    **{
        f'shiftwise_{s}': dict(
            preset='imagenet',
            based_on='the SW-T recipe (lidc54/shift-wiseConv publishes no SW-S/B/L recipe or weights)',
            rows=[_row('drop path', 'drop_path', 0.2, "SW-T's value (README.md:45)")],
        )
        for s in ('small', 'base', 'large')
    },
}


def register_recipes(recipes: Dict[str, Dict[str, Any]]) -> None:
    """Add official recipe tables (the dense tasks' presets): each as the entries of ``OFFICIAL_RECIPES``, with
    ``arch`` when the recipe is one system's (a preset whose values depend on ``--arch``)."""
    for key, rec in recipes.items():
        if key in OFFICIAL_RECIPES:
            raise ValueError(f"recipe {key!r} is registered already")
        OFFICIAL_RECIPES[key] = rec


def recipe_value(cfg: TrainConfig, name: Optional[str]) -> Any:
    """A config value by the names the recipe table uses: a field, ``global_batch`` (batch_size x accum_steps),
    ``sparsity.<option>``, or ``grn_decay`` (whether the training groups decay ShiftWise GRN parameters)."""
    if name is None:
        return None
    if name == 'global_batch':
        return cfg.batch_size * cfg.accum_steps
    if name.startswith('sparsity.'):
        return (cfg.sparsity or {}).get(name.split('.', 1)[1])
    if name == 'grn_decay':
        if family_of(cfg.model) != 'shiftwise':
            return None
        with torch.device('meta'):
            model = create_model(cfg.model)
        decayed = {
            id(p) for g in weight_decay_groups(model, cfg.weight_decay) if g['weight_decay'] > 0 for p in g['params']
        }
        grn = [p for n, p in model.named_parameters() if '.grn.' in n]
        return bool(grn) and all(id(p) in decayed for p in grn)
    if name == 'amp_dtype' and not cfg.amp:
        return None
    return getattr(cfg, name)


def recipe_config(model: str, preset: str, arch: Optional[str] = None) -> TrainConfig:
    """What ``preset`` resolves to for ``model`` (and ``arch``, a dense system), paths unchecked."""
    extra: Dict[str, Any] = {'init_checkpoint': 'pretrained.pth'} if preset in FINETUNE_PRESETS else {}
    if arch is not None:
        extra['arch'] = arch
    return resolve_config(dict(model=model, preset=preset, **extra), check_paths=False)


def _matches(rec: Dict[str, Any], preset: str, arch: Optional[str]) -> bool:
    return rec['preset'] == preset and (rec.get('arch') is None or rec['arch'] == arch)


def preset_info(model: str, preset: Optional[str], arch: Optional[str] = None) -> Dict[str, Any]:
    """Whether ``preset`` for ``model`` (and ``arch``, the dense system of a dense preset) is an official recipe,
    and what it is based on: ``{'official': bool, 'based_on': str, 'recipe': key in OFFICIAL_RECIPES or None}``."""
    if preset is None:
        return dict(official=False, based_on="no preset: the task config's defaults", recipe=None)
    base = model.split('.')[0]
    for key, rec in OFFICIAL_RECIPES.items():
        if _matches(rec, preset, arch) and base in rec['models']:
            return dict(official=True, based_on=f"{rec['repo']}: {rec['based_on']}", recipe=key)
    if base in UNOFFICIAL_PRESETS and UNOFFICIAL_PRESETS[base]['preset'] == preset:
        return dict(official=False, based_on=UNOFFICIAL_PRESETS[base]['based_on'], recipe=None)
    if preset == 'demo':
        return dict(official=False, based_on='the small CPU demo (digits, 32x32)', recipe=None)
    fam = family_of(base)
    if fam is None:
        return dict(official=False, based_on='the TrainConfig defaults (a timm model: no family preset)', recipe=None)
    official_for = sorted(
        {
            m + (f" {r['arch']}" if r.get('arch') else '')
            for r in OFFICIAL_RECIPES.values()
            if r['preset'] == preset
            for m in r['models']
            if family_of(m) == fam
        }
    )
    where = f"an official recipe only for {', '.join(official_for)}" if official_for else 'no official recipe'
    return dict(official=False, based_on=f"the {fam} family's {preset!r} preset ({where})", recipe=None)


def _fmt_value(v: Any) -> str:
    if v is None:
        return 'none'
    if isinstance(v, bool):
        return 'yes' if v else 'no'
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (tuple, list)):
        return '(' + (', '.join(_fmt_value(x) for x in v) or 'none') + ')'
    return str(v)


def recipe_table_markdown() -> str:
    """The recipe tables of docs/guides/recipes.md: for each official recipe, every hyper-parameter with its
    official value, the official file:line and msconv's resolved value; then the presets with no official recipe."""
    out = []
    for rec in OFFICIAL_RECIPES.values():
        out.append(f"### {rec['title']}\n")
        models = ', '.join(f"`{m}`" for m in rec['models'])
        arch = f" with `--arch {rec['arch']}`" if rec.get('arch') else ''
        out.append(f"Preset `{rec['preset']}` for {models}{arch}. Official: `{rec['repo']}`, {rec['based_on']}.\n")
        out.append('| hyper-parameter | official value | official file:line | msconv value |')
        out.append('|---|---|---|---|')
        cfgs = {m: recipe_config(m, rec['preset'], rec.get('arch')) for m in rec['models']}
        for row in rec['rows']:
            models = row['models'] or rec['models']
            if row['field'] is None:
                mine = _fmt_value(row['msconv'])
            else:
                mine = ', '.join(sorted({_fmt_value(recipe_value(cfgs[m], row['field'])) for m in models}))
            param = row['param'] + (f" ({', '.join(models)})" if row['models'] else '')
            if row['note']:
                mine += f" ({row['note']})"
            out.append(f"| {param} | {_fmt_value(row['official'])} | {row['src']} | {mine} |")
        out.append('')
    out.append('### Presets with no official recipe\n')
    out.append('| model | preset | based on | differs in | msconv value |')
    out.append('|---|---|---|---|---|')
    for model, rec in UNOFFICIAL_PRESETS.items():
        cfg = recipe_config(model, rec['preset'])
        for row in rec['rows']:
            out.append(
                f"| `{model}` | `{rec['preset']}` | {rec['based_on']} | {row['param']}: {row['src']} | "
                f"{_fmt_value(recipe_value(cfg, row['field']))} |"
            )
    return '\n'.join(out) + '\n'
