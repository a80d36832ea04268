"""Training configuration: one dataclass, registered presets, YAML files, and checks before any work starts.

Precedence, lowest first: dataclass defaults < preset (the model family's values of it) < per-model values of the
preset (drop path per size) < YAML file < explicit overrides (CLI flags). ``resolve_config`` returns the merged,
validated ``TrainConfig``; ``save_config`` writes it beside the run.

Presets are registered by the modules that own them with ``register_presets``: the ImageNet recipes by
:mod:`msconv.engine.recipes`, the COCO and ADE20K ones by :mod:`msconv.engine.dense_recipes`. The task named by
``TrainConfig.task`` is looked up in :mod:`msconv.engine.registry`; this module imports no task and no trainer.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import timm
import torch
import yaml

from ..data.digits import digits_path
from ..data.loader import check_image_folder
from ..models import model_family
from ..models._registry import unknown_model_message
from .checkpoint import atomic_write_bytes
from .registry import task_class

__all__ = [
    'TrainConfig',
    'PRESETS',
    'register_presets',
    'resolve_config',
    'config_from_mapping',
    'validate_config',
    'load_yaml',
    'save_config',
    'config_yaml',
    'family_of',
    'split_global_batch',
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


_FIELDS = {f.name: f for f in fields(TrainConfig)}
_CHOICES = {
    'margin': ('arcface', 'cosface'),
    'amp_dtype': ('auto', 'bfloat16', 'float16'),
    'nan_policy': ('abort', 'skip'),
    'mixup_mode': ('batch', 'pair', 'elem'),
    're_mode': ('const', 'rand', 'pixel'),
    'interpolation': ('bilinear', 'bicubic', 'nearest', 'random'),
}

# preset name -> model family -> option values (the families' values; what each preset registered)
PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {}
# preset name -> how it applies: per_model values, the family whose values other models take, a check
_PRESET_RULES: Dict[str, Dict[str, Any]] = {}


def register_presets(
    name: str,
    by_family: Mapping[str, Mapping[str, Any]],
    *,
    per_model: Optional[Mapping[str, Mapping[str, Any]]] = None,
    other_models: Optional[str] = None,
    check: Optional[Callable[[Any], Optional[str]]] = None,
) -> None:
    """Add preset ``name``: option values for each model family ('smt', 'scsc', 'shiftwise').

    Args:
        per_model: values on top of the family's for named models (e.g. drop path per size).
        other_models: models of no msconv family (timm models) take this family's values; None: none.
        check: called with the resolved config; returns a message when the preset cannot run as configured.
    """
    if name in PRESETS:
        raise ValueError(f"preset {name!r} is registered already")
    for values in list(by_family.values()) + list((per_model or {}).values()):
        for key in values:
            _coerce(key, None)  # a misspelt option fails at registration, naming it
    PRESETS[name] = {fam: dict(values) for fam, values in by_family.items()}
    _PRESET_RULES[name] = dict(per_model=dict(per_model or {}), other_models=other_models, check=check)


def _preset_values(preset: str, model: str) -> Dict[str, Any]:
    """What ``preset`` sets for ``model``: its family's values (or those of ``other_models``), then per-model ones."""
    rules = _PRESET_RULES[preset]
    fam = family_of(model)
    if fam is not None and fam not in PRESETS[preset]:
        raise ValueError(
            f"preset {preset!r} is defined for {sorted(PRESETS[preset])} models only, not for {model!r} "
            f"(family {fam!r}); presets for it: {sorted(p for p in PRESETS if fam in PRESETS[p])}"
        )
    values = dict(PRESETS[preset].get(fam if fam is not None else rules['other_models'], {}))
    values.update(rules['per_model'].get(model.split('.')[0], {}))
    return values


def family_of(model_name: str) -> Optional[str]:
    """msconv family of a model name, or None for a plain timm model."""
    try:
        return model_family(model_name)
    except ValueError:
        return None


def load_yaml(path: Union[str, Path]) -> Dict[str, Any]:
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
    values.update(_preset_values(preset, model))
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
    if family_of(cfg.model) is None and cfg.model not in timm.list_models() and not timm.is_model(cfg.model):
        raise ValueError(unknown_model_message(cfg.model))
    task_class(cfg.task)  # a registered task, or the list of them
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
    check = _PRESET_RULES[cfg.preset]['check'] if cfg.preset in _PRESET_RULES else None
    problem = check(cfg) if check is not None else None
    _require(problem is None, problem or '')
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
                check_image_folder(root, 'train')
                check_image_folder(root, 'val')
        else:
            digits_path()
        for b in cfg.face_val_bins:
            _require(Path(b).is_file(), f"face_val_bins: {b!r} does not exist (expected a verification .bin file)")
        if cfg.init_checkpoint is not None:
            _require(Path(cfg.init_checkpoint).is_file(), f"init_checkpoint {cfg.init_checkpoint!r} does not exist")
        if cfg.class_map is not None:
            _require(Path(cfg.class_map).is_file(), f"class_map {cfg.class_map!r} does not exist")


def save_config(cfg: TrainConfig, path: Union[str, Path]) -> None:
    """Write the resolved config as YAML (atomically)."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write_bytes(Path(path), text.encode())


def config_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML text (what ``save_config`` writes and ``msconv train --print-config`` prints)."""
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
