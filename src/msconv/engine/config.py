"""Training configuration: one dataclass, per-family presets, YAML files, and checks before any work starts.

Precedence, lowest first: dataclass defaults < preset (``'imagenet'``: the family's official ImageNet-1K recipe,
``'imagenet22k'`` / ``'imagenet22kto1k'`` / ``'imagenet22kto1k_384'``: SMT-L's 22K pre-training and fine-tuning,
or ``'demo'``: small and fast) < per-model values of the preset (drop path per size) < YAML file < explicit
overrides (CLI flags). ``resolve_config`` returns the merged, validated ``TrainConfig``; ``save_config`` writes it
beside the run. ``OFFICIAL_RECIPES`` lists every preset's hyper-parameters with the official file and line they
come from (``UNOFFICIAL_PRESETS``: those with no official recipe), ``preset_info`` says which is which.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

__all__ = [
    'TrainConfig',
    'PRESETS',
    'OFFICIAL_RECIPES',
    'resolve_config',
    'config_from_mapping',
    'load_yaml',
    'save_config',
    'config_yaml',
    'family_of',
    'preset_info',
    'split_global_batch',
    'recipe_value',
    'recipe_table_markdown',
    'UNOFFICIAL_PRESETS',
]


@dataclass
class TrainConfig:
    """Every knob of ``msconv.train``. Learning rates are given for ``lr_base_size`` images per optimizer step
    and scaled linearly to the actual global batch (``batch_size * accum_steps``), as the official code does."""

    model: str = ''
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    init_checkpoint: Optional[str] = None  # weights to start from (official or msconv format)
    task: str = 'classification'  # or 'face', or any task added with msconv.engine.tasks.register_task
    preset: str = 'imagenet'

    # data
    data: str = 'digits'  # 'digits' or an ImageFolder root with train/ and val/
    image_size: Optional[int] = None  # None: the model's pretrained_cfg input size (32 for the digits)
    num_workers: int = 2
    bad_image_threshold: float = 0.01  # abort when more than this fraction of a split's images cannot be read
    # face task
    face_val_bins: List[str] = field(default_factory=list)
    embedding_size: int = 512
    margin: str = 'arcface'  # or 'cosface'
    margin_s: float = 64.0
    margin_m: float = 0.5

    # schedule and optimizer
    epochs: int = 300
    max_steps: Optional[int] = None  # stop after this many optimizer steps (the schedule still spans `epochs`)
    batch_size: int = 128  # global batch per micro-step (split over torchrun ranks)
    accum_steps: int = 1
    opt: str = 'adamw'
    lr: float = 1e-3
    warmup_lr: float = 1e-7
    min_lr: float = 1e-6
    lr_base_size: Optional[int] = 512  # None: learning rates are absolute
    weight_decay: float = 0.05
    opt_eps: float = 1e-8
    opt_betas: Tuple[float, float] = (0.9, 0.999)
    sched: str = 'cosine'
    warmup_epochs: float = 5.0
    clip_grad: Optional[float] = 5.0

    # regularisation and augmentation (timm)
    drop_path: float = 0.1
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = 'batch'
    auto_augment: Optional[str] = 'rand-m9-mstd0.5-inc1'
    color_jitter: float = 0.4
    re_prob: float = 0.25
    re_mode: str = 'pixel'
    re_count: int = 1
    hflip: float = 0.5
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = 'bicubic'
    crop_pct: Optional[float] = None  # None: the model's pretrained_cfg crop_pct

    # runtime
    device: str = 'auto'  # 'auto', 'cpu', 'cuda', 'cuda:1', ...
    amp: bool = True
    amp_dtype: str = 'auto'  # 'auto' (bf16 on CPU and on GPUs that support it, else fp16), 'bfloat16', 'float16'
    channels_last: bool = False
    ema: bool = False
    ema_decay: float = 0.9998
    ema_warmup: bool = False
    sync_bn: bool = False
    seed: int = 0
    deterministic: bool = False
    sparsity: Optional[Dict[str, Any]] = None  # ShiftWise sparse training (opt-in)

    # dense tasks ('detection', 'segmentation': msconv.engine.dense_tasks; presets in msconv.engine.dense_recipes)
    arch: Optional[str] = None  # detection: mask_rcnn | cascade_mask_rcnn | retinanet; segmentation: upernet
    dense_kwargs: Dict[str, Any] = field(default_factory=dict)  # create_detector / create_segmenter keywords
    det_scales: Optional[List[int]] = None  # training shorter sides (None: 480..800 step 32)
    det_max_size: int = 1333  # training longer-side cap
    det_crop: bool = True  # the 3x configs' resize + crop branch
    seg_scale: Tuple[int, int] = (2048, 512)  # rescale scale (train, x ratio) and test scale
    seg_ratio_range: Tuple[float, float] = (0.5, 2.0)
    seg_crop: Tuple[int, int] = (512, 512)
    seg_num_classes: int = 150
    seg_reduce_zero_label: bool = True
    seg_eval_ms: bool = False  # also report multi-scale + flip mIoU at each evaluation
    seg_eval_flip: bool = True  # the multi-scale evaluation also averages the flipped images
    eval_max_images: Optional[int] = None  # evaluate on the first N val images only
    norm_eval: bool = False  # BatchNorm layers in eval mode while training (mmdet's norm_eval)
    warmup_iters: Optional[int] = None  # warm-up length in optimizer steps (replaces warmup_epochs)
    total_iters: Optional[int] = None  # schedule length in optimizer steps (replaces epochs)
    lr_milestones: Optional[List[float]] = None  # sched 'multistep': epochs at which the lr is multiplied
    decay_rate: float = 0.1  # the multistep factor, or the power of sched 'poly'

    # output, checkpoints, safety
    output: str = 'runs'
    name: Optional[str] = None  # run folder name; default '<model>-<data>'
    ckpt_every: int = 500  # optimizer steps between checkpoints (0: only at epoch ends and on exit)
    keep_last: int = 3
    resume: Optional[str] = None  # 'auto' (latest in the run folder), a checkpoint folder, or None
    # start afresh in a run folder that holds a run (with resume='auto': only when it has no valid checkpoint)
    overwrite: bool = False
    eval_every: int = 1  # epochs
    log_every: int = 10  # steps between metric lines
    progress: bool = True
    nan_policy: str = 'abort'  # 'abort' or 'skip' a step whose loss is NaN/inf
    plot: bool = True

    # recipes (issue 16)
    # True: the warm-up comes first and the cosine spans the remaining epochs (timm, Swin, SMT); False: the cosine
    # spans all epochs and the linear warm-up replaces its first warmup_epochs (SCSC's lr_scheduler.py)
    warmup_prefix: bool = True
    # images per process per micro-step (the official per-GPU batch that BatchNorm normalises over); the global
    # batch batch_size x accum_steps is kept and gradient accumulation makes it up (None: batch_size / processes)
    per_gpu_batch: Optional[int] = None
    class_map: Optional[str] = None  # with init_checkpoint: keep these classifier rows (e.g. map22kto1k.txt)
    keep_best: bool = True  # keep the best-top-1 weights in <run>/checkpoints/best-<step> (atomic, like the others)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d


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
# Drop path per size (T 0.1, S 0.2, B 0.3, L 0.4) is set by model name in `_model_overrides`.
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
PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
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
_FINETUNE_PRESETS = ('imagenet22kto1k', 'imagenet22kto1k_384')

_FIELDS = {f.name: f for f in fields(TrainConfig)}
_CHOICES = {
    'margin': ('arcface', 'cosface'),
    'amp_dtype': ('auto', 'bfloat16', 'float16'),
    'nan_policy': ('abort', 'skip'),
    'mixup_mode': ('batch', 'pair', 'elem'),
    're_mode': ('const', 'rand', 'pixel'),
    'interpolation': ('bilinear', 'bicubic', 'nearest', 'random'),
}


def family_of(model_name: str) -> Optional[str]:
    """msconv family of a model name, or None for a plain timm model."""
    from ..models import model_family

    try:
        return model_family(model_name)
    except ValueError:
        return None


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


def _model_overrides(model_name: str, preset: str) -> Dict[str, Any]:
    return dict(_PER_MODEL.get(preset, {}).get(model_name.split('.')[0], {}))


def load_yaml(path: Union[str, Path]) -> Dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ''
        problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
        raise ValueError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {str(path)!r} is not a text (YAML) file: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of option: value, got {type(data).__name__}")
    return data


def _coerce(name: str, value: Any) -> Any:
    if name not in _FIELDS:
        import difflib

        close = difflib.get_close_matches(name, list(_FIELDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ''
        raise ValueError(f"unknown config option {name!r}{hint}")
    default = _FIELDS[name].default
    if isinstance(default, tuple) and isinstance(value, (list, tuple)):
        return tuple(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def config_from_mapping(values: Mapping[str, Any]) -> TrainConfig:
    """The options a run recorded (its ``config.yaml``) as a ``TrainConfig``: no preset beneath them, no checks."""
    return TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})


def resolve_config(
    config: Union[TrainConfig, Mapping[str, Any], str, Path, None] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    check_paths: bool = True,
) -> TrainConfig:
    """Merge defaults < preset < ``config`` (a TrainConfig, a dict or a YAML path) < ``overrides``, then validate.

    The preset is looked up for the model's family ('imagenet' presets for the three msconv families; a timm
    model gets the dataclass defaults, or the SMT demo preset with ``preset='demo'``). In a ``TrainConfig``,
    fields equal to their dataclass default count as not given. ``model`` must be given somewhere.
    """
    if isinstance(config, TrainConfig):
        # Fields left at their dataclass default count as "not given", so the preset applies beneath the rest.
        defaults = TrainConfig().to_dict()
        user: Dict[str, Any] = {k: v for k, v in config.to_dict().items() if v != defaults[k]}
    else:
        user = load_yaml(config) if isinstance(config, (str, Path)) else dict(config or {})
    overrides = {k: v for k, v in dict(overrides or {}).items() if v is not None}
    merged_user = {**user, **overrides}
    for k, v in list(merged_user.items()):
        merged_user[k] = _coerce(k, v)

    model = merged_user.get('model')
    if not model or not isinstance(model, str):
        raise ValueError("model: a model name is required, e.g. 'smt_tiny' (see `msconv list`)")
    preset = merged_user.get('preset', TrainConfig.preset)
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")

    values: Dict[str, Any] = TrainConfig().to_dict()
    fam = family_of(model)
    if fam is not None:
        if fam not in PRESETS[preset]:
            raise ValueError(
                f"preset {preset!r} is defined for {sorted(PRESETS[preset])} models only, not for {model!r} "
                f"(family {fam!r}); presets for it: {sorted(p for p in PRESETS if fam in PRESETS[p])}"
            )
        values.update(PRESETS[preset][fam])
    elif preset == 'demo':
        values.update(PRESETS['demo']['smt'])
    values.update(_model_overrides(model, preset))
    values.update(merged_user)
    values = {k: _coerce(k, v) for k, v in values.items()}
    cfg = TrainConfig(**values)
    validate_config(cfg, check_paths=check_paths)
    return cfg


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def validate_config(cfg: TrainConfig, check_paths: bool = True) -> None:
    """Reject bad values with a message that says what to fix (called before any work starts)."""
    import timm

    if family_of(cfg.model) is None and cfg.model not in timm.list_models() and not timm.is_model(cfg.model):
        from ..models._registry import unknown_model_message

        raise ValueError(unknown_model_message(cfg.model))
    from .tasks import TASKS

    _require(cfg.task in TASKS, f"task must be one of {tuple(TASKS)}, got {cfg.task!r}")
    for name, choices in _CHOICES.items():
        _require(getattr(cfg, name) in choices, f"{name} must be one of {choices}, got {getattr(cfg, name)!r}")
    for name in ('batch_size', 'accum_steps', 'epochs'):
        v = getattr(cfg, name)
        _require(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be a positive integer, got {v!r}"
        )
    _require(
        cfg.max_steps is None or (isinstance(cfg.max_steps, int) and cfg.max_steps >= 1),
        f"max_steps must be a positive integer or None, got {cfg.max_steps!r}",
    )
    _require(
        isinstance(cfg.num_workers, int) and cfg.num_workers >= 0,
        f"num_workers must be an integer >= 0, got {cfg.num_workers!r}",
    )
    for name in (
        'lr',
        'warmup_lr',
        'min_lr',
        'weight_decay',
        'drop_path',
        'smoothing',
        'mixup',
        'cutmix',
        're_prob',
        'hflip',
        'color_jitter',
        'warmup_epochs',
    ):
        v = getattr(cfg, name)
        _require(
            isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
            f"{name} must be a finite number >= 0, got {v!r}",
        )
    _require(cfg.lr > 0, f"lr must be > 0, got {cfg.lr!r}")
    _require(
        cfg.per_gpu_batch is None
        or (isinstance(cfg.per_gpu_batch, int) and not isinstance(cfg.per_gpu_batch, bool) and cfg.per_gpu_batch >= 1),
        f"per_gpu_batch must be a positive integer or None, got {cfg.per_gpu_batch!r}",
    )
    _require(
        cfg.preset not in _FINETUNE_PRESETS or cfg.init_checkpoint is not None,
        f"preset {cfg.preset!r} fine-tunes ImageNet-22K pre-trained weights: pass init_checkpoint "
        f"(--init-checkpoint PATH), and class_map (--class-map map22kto1k.txt) when that checkpoint has the 21841 "
        f"ImageNet-22K classes",
    )
    _require(
        cfg.class_map is None or cfg.init_checkpoint is not None,
        "class_map selects rows of the classifier of init_checkpoint: pass --init-checkpoint too",
    )
    _require(
        cfg.warmup_epochs < cfg.epochs,
        f"warmup_epochs ({cfg.warmup_epochs}) must be smaller than epochs ({cfg.epochs}): raise --epochs or "
        f"lower --warmup-epochs",
    )
    for name in ('drop_path', 'smoothing', 're_prob', 'hflip', 'mixup_prob', 'mixup_switch_prob'):
        v = getattr(cfg, name)
        _require(0 <= v <= 1, f"{name} must be in [0, 1], got {v!r}")
    _require(cfg.clip_grad is None or cfg.clip_grad > 0, f"clip_grad must be > 0 or None, got {cfg.clip_grad!r}")
    _require(
        cfg.lr_base_size is None or cfg.lr_base_size >= 1,
        f"lr_base_size must be a positive integer or None, got {cfg.lr_base_size!r}",
    )
    _require(
        cfg.image_size is None or (isinstance(cfg.image_size, int) and cfg.image_size >= 8),
        f"image_size must be an integer >= 8 or None, got {cfg.image_size!r}",
    )
    _require(cfg.ckpt_every >= 0, f"ckpt_every must be >= 0 (0: only at epoch ends), got {cfg.ckpt_every!r}")
    _require(
        isinstance(cfg.bad_image_threshold, (int, float)) and 0 <= cfg.bad_image_threshold <= 1,
        f"bad_image_threshold must be a fraction in [0, 1], got {cfg.bad_image_threshold!r}",
    )
    _require(cfg.keep_last >= 1, f"keep_last must be >= 1, got {cfg.keep_last!r}")
    _require(cfg.eval_every >= 1, f"eval_every must be >= 1, got {cfg.eval_every!r}")
    _require(cfg.log_every >= 1, f"log_every must be >= 1, got {cfg.log_every!r}")
    _require(0 < cfg.ema_decay < 1, f"ema_decay must be in (0, 1), got {cfg.ema_decay!r}")
    _require(isinstance(cfg.model_kwargs, dict), f"model_kwargs must be a mapping, got {cfg.model_kwargs!r}")
    _require(
        cfg.device == 'auto' or cfg.device == 'cpu' or cfg.device.startswith('cuda'),
        f"device must be 'auto', 'cpu' or 'cuda[:N]', got {cfg.device!r}",
    )
    if cfg.device.startswith('cuda'):
        import torch

        _require(torch.cuda.is_available(), f"device {cfg.device!r} was asked for but CUDA is not available")
    if cfg.task == 'face':
        _require(cfg.data != 'digits', "task 'face' needs --data PATH to a folder of identity subfolders")
        _require(cfg.embedding_size >= 2, f"embedding_size must be >= 2, got {cfg.embedding_size!r}")
    if check_paths:
        if cfg.data != 'digits':
            root = Path(cfg.data)
            _require(
                root.is_dir(),
                f"data {cfg.data!r}: no such folder. Pass an ImageFolder root (train/, val/) "
                f"or 'digits' for the bundled MNIST digits.",
            )
            if cfg.task == 'classification':
                from ..data.loader import check_image_folder

                check_image_folder(root, 'train')
                check_image_folder(root, 'val')
        else:
            from ..data.digits import digits_path

            digits_path()
        for b in cfg.face_val_bins:
            _require(Path(b).is_file(), f"face_val_bins: {b!r} does not exist (expected a verification .bin file)")
        if cfg.init_checkpoint is not None:
            _require(Path(cfg.init_checkpoint).is_file(), f"init_checkpoint {cfg.init_checkpoint!r} does not exist")
        if cfg.class_map is not None:
            _require(Path(cfg.class_map).is_file(), f"class_map {cfg.class_map!r} does not exist")


def save_config(cfg: TrainConfig, path: Union[str, Path]) -> None:
    """Write the resolved config as YAML (atomically)."""
    import yaml

    from .checkpoint import atomic_write_bytes

    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write_bytes(Path(path), text.encode())


def config_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML text (what ``save_config`` writes and ``msconv train --print-config`` prints)."""
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def split_global_batch(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """With ``per_gpu_batch`` set: keep the global batch ``batch_size * accum_steps`` (and so the scaled LR) and
    make it up from ``per_gpu_batch`` images per process per micro-step and gradient accumulation; returns the
    config with ``batch_size = per_gpu_batch * world_size`` and the matching ``accum_steps``. Unchanged otherwise.
    Raises ``ValueError`` when the global batch is not a multiple of ``per_gpu_batch * world_size``."""
    if cfg.per_gpu_batch is None:
        return cfg
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    global_batch = cfg.batch_size * cfg.accum_steps
    micro = cfg.per_gpu_batch * world_size
    if global_batch % micro:
        raise ValueError(
            f"per_gpu_batch {cfg.per_gpu_batch} x {world_size} process(es) = {micro} images per micro-step does not "
            f"divide the global batch {global_batch} (batch_size {cfg.batch_size} x accum_steps {cfg.accum_steps}); "
            f"pick a per_gpu_batch that divides {global_batch // math.gcd(global_batch, world_size)} or change "
            f"batch_size"
        )
    return dataclasses.replace(cfg, batch_size=micro, accum_steps=global_batch // micro)


# ---- the official recipes, hyper-parameter by hyper-parameter ----------------------------------------------------
# Each row: (hyper-parameter, config field or a derived name understood by `recipe_value`, official value, official
# file:line, note). A note says why msconv's value differs, and then `msconv` holds msconv's value: the table test
# (tests/test_recipes.py::test_presets_match_official_table) resolves every preset and compares it with the rows,
# and checks that docs/guides/recipes.md shows `recipe_table_markdown()`.
_SAME = object()


def _row(param, field_, official, src, note=None, msconv=_SAME, models=None):
    return dict(param=param, field=field_, official=official, src=src, note=note, msconv=msconv, models=models)


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
            _row('global batch', 'global_batch', 1024, 'README.md:107-109 (8 x 128), config.py:101'),
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
        based_on='configs/smt/smt_large_224_22kto1k_finetune.yaml, config.py, README.md:124-127 (8 GPUs x 64), '
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
                'README.md:124-127 (8 x 64; the README shows the fine-tuning command with the 384 config)',
            ),
            _row('drop path', 'drop_path', 0.1, 'configs/smt/smt_large_224_22kto1k_finetune.yaml:4'),
        ]
        + _SMT_SHARED,
    ),
    'smt_large_22kto1k_384': dict(
        title='SMT-L, 22K -> 1K fine-tuning at 384',
        preset='imagenet22kto1k_384',
        models=('smt_large',),
        official=True,
        repo='AFeng-x/SMT@11e954d',
        based_on='configs/smt/smt_large_384_22kto1k_finetune.yaml, config.py, README.md:124-127 (8 GPUs x 64), '
        'utils.py:103-108 (map22kto1k.txt head rows)',
        rows=[
            _row('image size', 'image_size', 384, 'configs/smt/smt_large_384_22kto1k_finetune.yaml:2'),
            _row(
                'eval crop (TEST.CROP False: direct resize)',
                'crop_pct',
                1.0,
                'configs/smt/smt_large_384_22kto1k_finetune.yaml:26',
            ),
            _row('epochs', 'epochs', 30, 'configs/smt/smt_large_384_22kto1k_finetune.yaml:19'),
            _row('warm-up epochs', 'warmup_epochs', 5, 'configs/smt/smt_large_384_22kto1k_finetune.yaml:20'),
            _row('base LR (per 512 images)', 'lr', 2e-5, 'configs/smt/smt_large_384_22kto1k_finetune.yaml:22'),
            _row('warm-up LR (per 512)', 'warmup_lr', 2e-8, 'configs/smt/smt_large_384_22kto1k_finetune.yaml:23'),
            _row('min LR (per 512)', 'min_lr', 2e-7, 'configs/smt/smt_large_384_22kto1k_finetune.yaml:24'),
            _row('global batch', 'global_batch', 512, 'README.md:124-127 (8 x 64)'),
            _row('drop path', 'drop_path', 0.1, 'configs/smt/smt_large_384_22kto1k_finetune.yaml:6'),
        ]
        + [r for r in _SMT_SHARED if r['field'] != 'per_gpu_batch']
        + [
            _row(
                'per-GPU batch (BatchNorm)',
                'per_gpu_batch',
                64,
                'README.md:124-127',
                note='opt-in (--per-gpu-batch 64): by default each of N processes gets batch/N, equal on 8 GPUs',
                msconv=None,
            )
        ],
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
        import torch

        from ..models import create_model
        from .optim import weight_decay_groups

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


def _recipe_config(model: str, preset: str) -> TrainConfig:
    extra = {'init_checkpoint': 'pretrained.pth'} if preset in _FINETUNE_PRESETS else {}
    return resolve_config(dict(model=model, preset=preset, **extra), check_paths=False)


def preset_info(model: str, preset: str) -> Dict[str, Any]:
    """Whether ``preset`` for ``model`` is an official recipe, and what it is based on:
    ``{'official': bool, 'based_on': str, 'recipe': key in OFFICIAL_RECIPES or None}``."""
    base = model.split('.')[0]
    for key, rec in OFFICIAL_RECIPES.items():
        if rec['preset'] == preset and base in rec['models']:
            return dict(official=True, based_on=f"{rec['repo']}: {rec['based_on']}", recipe=key)
    if base in UNOFFICIAL_PRESETS and UNOFFICIAL_PRESETS[base]['preset'] == preset:
        return dict(official=False, based_on=UNOFFICIAL_PRESETS[base]['based_on'], recipe=None)
    if preset == 'demo':
        return dict(official=False, based_on='the small CPU demo (digits, 32x32)', recipe=None)
    fam = family_of(base)
    if fam is None:
        return dict(official=False, based_on='the TrainConfig defaults (a timm model: no family preset)', recipe=None)
    official_for = sorted(
        {m for r in OFFICIAL_RECIPES.values() if r['preset'] == preset for m in r['models'] if family_of(m) == fam}
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
        return '(' + ', '.join(_fmt_value(x) for x in v) + ')'
    return str(v)


def recipe_table_markdown() -> str:
    """The recipe tables of docs/guides/recipes.md: for each official recipe, every hyper-parameter with its
    official value, the official file:line and msconv's resolved value; then the presets with no official recipe."""
    out = []
    for rec in OFFICIAL_RECIPES.values():
        out.append(f"### {rec['title']}\n")
        models = ', '.join(f"`{m}`" for m in rec['models'])
        out.append(f"Preset `{rec['preset']}` for {models}. Official: `{rec['repo']}`, {rec['based_on']}.\n")
        out.append('| hyper-parameter | official value | official file:line | msconv value |')
        out.append('|---|---|---|---|')
        cfgs = {m: _recipe_config(m, rec['preset']) for m in rec['models']}
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
        cfg = _recipe_config(model, rec['preset'])
        for row in rec['rows']:
            out.append(
                f"| `{model}` | `{rec['preset']}` | {rec['based_on']} | {row['param']}: {row['src']} | "
                f"{_fmt_value(recipe_value(cfg, row['field']))} |"
            )
    return '\n'.join(out) + '\n'


from . import dense_recipes  # noqa: E402,F401  (adds the 'coco_3x' and 'ade20k_160k' presets to PRESETS)
