"""Training configuration: the options every task shares, each task's own section, registered presets, YAML
files, and checks before any work starts.

``TrainConfig`` holds what the trainer uses for every task (model, data, schedule and optimizer, runtime, run
folder). A task's config is a subclass that adds its section (``ClassificationConfig``: Mixup, label smoothing,
augmentation; ``FaceConfig``: margin head; ``DetectionConfig`` / ``SegmentationConfig``: the dense pipelines),
declared in the task's module and named by its ``Task.config_class``. The options stay one flat set of names, in
YAML files, ``--set`` and a run's ``config.yaml``.

Precedence, lowest first: the task's dataclass defaults < preset (the model family's values of it) < the preset's
values for the run's value of an option (a dense preset's per ``arch``) < per-model values of the preset (drop path
per size) < YAML file < explicit overrides (CLI flags). ``resolve_config`` returns
the merged, validated config of the run's task; ``save_config`` writes it beside the run.

Presets are registered by the modules that own them with ``register_presets``: the ImageNet recipes by
:mod:`msconv.engine.recipes`, the COCO and ADE20K ones by :mod:`msconv.engine.dense_recipes`. Tasks are looked up in
:mod:`msconv.engine.registry`; this module imports no task and no trainer.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Type, Union

import timm
import torch
import yaml

from ..data.digits import digits_path
from ..models import model_family
from ..models._registry import unknown_model_message
from .checkpoint import atomic_write_bytes
from .registry import TASKS, task_class

# the resampling names of timm's transforms
INTERPOLATIONS = ('bilinear', 'bicubic', 'nearest', 'random')

__all__ = [
    'TrainConfig',
    'INTERPOLATIONS',
    'option',
    'require',
    'require_nonnegative',
    'require_fraction',
    'own_options',
    'task_flags',
    'PRESETS',
    'register_presets',
    'preset_task',
    'resolve_config',
    'config_from_mapping',
    'validate_config',
    'load_yaml',
    'save_config',
    'config_yaml',
    'family_of',
    'split_global_batch',
]


def option(
    default: Any = dataclasses.MISSING,
    *,
    factory: Optional[Callable[[], Any]] = None,
    help: str = '',
    choices: Optional[Sequence[Any]] = None,
    flag: Optional[str] = None,
    repeat: bool = False,
) -> Any:
    """A config field that says what it is: ``help`` (shown by ``msconv tasks``), the values it accepts
    (``choices``, checked by ``validate``) and, for a task's own options, its ``msconv train`` flag (``repeat``: the
    flag may be given several times, each adding one list item)."""
    metadata = dict(help=help, choices=tuple(choices) if choices is not None else None, flag=flag, repeat=repeat)
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def require(cond: bool, message: str) -> None:
    """``ValueError(message)`` unless ``cond``: the checks of ``TrainConfig.validate`` and its task sections."""
    if not cond:
        raise ValueError(message)


@dataclass
class TrainConfig:
    """The options of ``msconv.train`` that every task shares; a task's own options are in its subclass of this
    class (``Task.config_class``). Learning rates are given for ``lr_base_size`` images per optimizer step and
    scaled linearly to the actual global batch (``batch_size * accum_steps``), as the official code does."""

    model: str = ''
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    init_checkpoint: Optional[str] = None  # weights to start from (official or msconv format)
    task: str = 'classification'  # a registered task (msconv.engine.registry; `msconv tasks` lists them)
    preset: Optional[str] = None  # None: the task's default preset (Task.default_preset)

    # data
    data: str = 'digits'  # 'digits' or the task's dataset folder (classification: an ImageFolder root)
    image_size: Optional[int] = None  # None: the model's pretrained_cfg input size (32 for the digits)
    num_workers: int = 2
    bad_image_threshold: float = 0.01  # abort when more than this fraction of a split's images cannot be read
    hflip: float = 0.5  # horizontal flip probability of the training augmentation

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
    # True: the warm-up comes first and the cosine spans the remaining epochs (timm, Swin, SMT); False: the cosine
    # spans all epochs and the linear warm-up replaces its first warmup_epochs (SCSC's lr_scheduler.py)
    warmup_prefix: bool = True
    # images per process per micro-step (the official per-GPU batch that BatchNorm normalises over); the global
    # batch batch_size x accum_steps is kept and gradient accumulation makes it up (None: batch_size / processes)
    per_gpu_batch: Optional[int] = None
    drop_path: float = 0.1  # stochastic depth of the backbone (timm)

    # runtime
    device: str = 'auto'  # 'auto', 'cpu', 'cuda', 'cuda:1', ...
    amp: bool = True
    # 'auto' (bf16 on CPU and on GPUs that support it, else fp16), 'bfloat16', 'float16'
    amp_dtype: str = option('auto', choices=('auto', 'bfloat16', 'float16'))
    channels_last: bool = False
    ema: bool = False
    ema_decay: float = 0.9998
    ema_warmup: bool = False
    sync_bn: bool = False
    # torchrun: seconds any collective may wait (None: MSCONV_DIST_TIMEOUT, else 1800)
    dist_timeout: Optional[float] = None
    seed: int = 0
    deterministic: bool = False
    sparsity: Optional[Dict[str, Any]] = None  # ShiftWise sparse training (opt-in)
    # torch.compile of the training forward (timm train.py's --torchcompile); evaluation and checkpoints use the
    # plain module, so saved weights carry no '_orig_mod.' prefix
    compile: bool = False
    # recompute each backbone stage's activations in the backward pass (timm's set_grad_checkpointing): less
    # memory, the same gradients, about a third more compute
    grad_checkpointing: bool = False

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
    nan_policy: str = option('abort', choices=('abort', 'skip'))  # 'abort' or 'skip' a step whose loss is NaN/inf
    plot: bool = True
    # scalars of every metrics record (losses, lr, throughput, evaluation) in <run>/tensorboard (the tensorboard extra)
    tensorboard: bool = False
    keep_best: bool = True  # keep the best evaluation's weights in <run>/checkpoints/best-<step> (atomic)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    def validate(self, check_paths: bool = True) -> None:
        """Reject bad values with a message that says what to fix (called before any work starts). A task's config
        extends it with the checks of its own options."""
        cfg = self
        if family_of(cfg.model) is None and cfg.model not in timm.list_models() and not timm.is_model(cfg.model):
            raise ValueError(unknown_model_message(cfg.model))
        task_class(cfg.task)  # a registered task, or the list of them
        for f in fields(cfg):
            choices = f.metadata.get('choices')
            v = getattr(cfg, f.name)
            require(choices is None or v in choices, f"{f.name} must be one of {choices}, got {v!r}")
        for name in ('batch_size', 'accum_steps', 'epochs'):
            v = getattr(cfg, name)
            require(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                f"{name} must be a positive integer, got {v!r}",
            )
        require(
            cfg.max_steps is None or (isinstance(cfg.max_steps, int) and cfg.max_steps >= 1),
            f"max_steps must be a positive integer or None, got {cfg.max_steps!r}",
        )
        require(
            isinstance(cfg.num_workers, int) and cfg.num_workers >= 0,
            f"num_workers must be an integer >= 0, got {cfg.num_workers!r}",
        )
        for name in ('lr', 'warmup_lr', 'min_lr', 'weight_decay', 'drop_path', 'hflip', 'warmup_epochs'):
            require_nonnegative(cfg, name)
        require(cfg.lr > 0, f"lr must be > 0, got {cfg.lr!r}")
        require(
            cfg.per_gpu_batch is None
            or (
                isinstance(cfg.per_gpu_batch, int)
                and not isinstance(cfg.per_gpu_batch, bool)
                and cfg.per_gpu_batch >= 1
            ),
            f"per_gpu_batch must be a positive integer or None, got {cfg.per_gpu_batch!r}",
        )
        check = _PRESET_RULES[cfg.preset]['check'] if cfg.preset in _PRESET_RULES else None
        problem = check(cfg) if check is not None else None
        require(problem is None, problem or '')
        require(
            cfg.warmup_epochs < cfg.epochs,
            f"warmup_epochs ({cfg.warmup_epochs}) must be smaller than epochs ({cfg.epochs}): raise --epochs or "
            f"lower --warmup-epochs",
        )
        for name in ('drop_path', 'hflip'):
            require_fraction(cfg, name)
        require(cfg.clip_grad is None or cfg.clip_grad > 0, f"clip_grad must be > 0 or None, got {cfg.clip_grad!r}")
        require(
            cfg.lr_base_size is None or cfg.lr_base_size >= 1,
            f"lr_base_size must be a positive integer or None, got {cfg.lr_base_size!r}",
        )
        require(
            cfg.image_size is None or (isinstance(cfg.image_size, int) and cfg.image_size >= 8),
            f"image_size must be an integer >= 8 or None, got {cfg.image_size!r}",
        )
        require(cfg.ckpt_every >= 0, f"ckpt_every must be >= 0 (0: only at epoch ends), got {cfg.ckpt_every!r}")
        require(
            isinstance(cfg.bad_image_threshold, (int, float)) and 0 <= cfg.bad_image_threshold <= 1,
            f"bad_image_threshold must be a fraction in [0, 1], got {cfg.bad_image_threshold!r}",
        )
        require(cfg.keep_last >= 1, f"keep_last must be >= 1, got {cfg.keep_last!r}")
        require(
            cfg.name is None
            or (
                isinstance(cfg.name, str)
                and not Path(cfg.name).is_absolute()
                and all(part not in ('', '.', '..') for part in cfg.name.replace(os.sep, '/').split('/'))
            ),
            f"name must be a folder name inside output (sub-folders allowed, no '..', not absolute), got {cfg.name!r}",
        )
        require(
            cfg.dist_timeout is None
            or (
                isinstance(cfg.dist_timeout, (int, float))
                and not isinstance(cfg.dist_timeout, bool)
                and cfg.dist_timeout > 0
            ),
            f"dist_timeout must be a number of seconds > 0 or None, got {cfg.dist_timeout!r}",
        )
        require(cfg.eval_every >= 1, f"eval_every must be >= 1, got {cfg.eval_every!r}")
        require(cfg.log_every >= 1, f"log_every must be >= 1, got {cfg.log_every!r}")
        require(0 < cfg.ema_decay < 1, f"ema_decay must be in (0, 1), got {cfg.ema_decay!r}")
        require(isinstance(cfg.model_kwargs, dict), f"model_kwargs must be a mapping, got {cfg.model_kwargs!r}")
        require(
            cfg.device == 'auto' or cfg.device == 'cpu' or cfg.device.startswith('cuda'),
            f"device must be 'auto', 'cpu' or 'cuda[:N]', got {cfg.device!r}",
        )
        if cfg.device.startswith('cuda'):
            require(torch.cuda.is_available(), f"device {cfg.device!r} was asked for but CUDA is not available")
        if check_paths:
            if cfg.data != 'digits':
                require(
                    Path(cfg.data).is_dir(),
                    f"data {cfg.data!r}: no such folder. Pass an ImageFolder root (train/, val/) "
                    f"or 'digits' for the bundled MNIST digits.",
                )
            else:
                digits_path()
            if cfg.init_checkpoint is not None:
                require(Path(cfg.init_checkpoint).is_file(), f"init_checkpoint {cfg.init_checkpoint!r} does not exist")


def require_nonnegative(cfg: TrainConfig, name: str) -> None:
    """Option ``name`` of ``cfg`` is a finite number >= 0."""
    v = getattr(cfg, name)
    require(
        isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, f"{name} must be a finite number >= 0, got {v!r}"
    )


def require_fraction(cfg: TrainConfig, name: str) -> None:
    """Option ``name`` of ``cfg`` is in [0, 1]."""
    v = getattr(cfg, name)
    require(0 <= v <= 1, f"{name} must be in [0, 1], got {v!r}")


def own_options(config_class: Type[TrainConfig]) -> List[dataclasses.Field]:
    """The fields a task's config class adds to ``TrainConfig``: the task's own section."""
    common = {f.name for f in fields(TrainConfig)}
    return [f for f in fields(config_class) if f.name not in common]


def _config_classes() -> List[Type[TrainConfig]]:
    return [TrainConfig] + [t.config_class for t in TASKS.values()]


def _all_options() -> Set[str]:
    return {f.name for c in _config_classes() for f in fields(c)}


def task_flags() -> List[Tuple[str, str, Dict[str, Any]]]:
    """``(flag, option, argparse keywords)`` of every registered task's own options that declare a flag; a flag
    two tasks share (the dense tasks' ``--arch``) is listed once."""
    out: Dict[str, Tuple[str, str, Dict[str, Any]]] = {}
    for task in TASKS.values():
        for f in own_options(task.config_class):
            flag = f.metadata.get('flag')
            if not flag:
                continue
            if flag in out and out[flag][1] != f.name:
                raise ValueError(f"flag {flag} is declared for both {out[flag][1]!r} and {f.name!r}")
            if f.metadata.get('repeat'):
                kwargs: Dict[str, Any] = dict(action='append', type=str)
            else:
                default = f.default if f.default is not dataclasses.MISSING else None
                kwargs = dict(type=type(default) if isinstance(default, (int, float, str)) else str)
            out.setdefault(flag, (flag, f.name, dict(kwargs, help=f"{task.name}: {f.metadata.get('help', '')}")))
    return list(out.values())


# preset name -> model family -> option values (what each preset registered)
PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {}
# preset name -> how it applies: its task, per-model values, the family whose values other models take, a check
_PRESET_RULES: Dict[str, Dict[str, Any]] = {}


def register_presets(
    name: str,
    by_family: Mapping[str, Mapping[str, Any]],
    *,
    task: Optional[str] = None,
    per_model: Optional[Mapping[str, Mapping[str, Any]]] = None,
    per_option: Optional[Mapping[str, Mapping[str, Mapping[Any, Mapping[str, Any]]]]] = None,
    other_models: Optional[str] = None,
    check: Optional[Callable[[Any], Optional[str]]] = None,
) -> None:
    """Add preset ``name``: option values for each model family ('smt', 'scsc', 'shiftwise').

    Args:
        task: the task the preset is a recipe of: it serves that task only, and a run that names the preset but
            no task is a run of it. None: a shared preset, for every task that takes shared presets; a task takes
            the options of its own config and leaves the others.
        per_model: values on top of the family's (and per_option's) for named models (e.g. drop path per size).
        per_option: ``{option: {family: {value: values}}}``: values on top of the family's for runs whose
            ``option`` has that value (the value given for the run, else the family's preset value), e.g. a dense
            preset's optimizer per ``arch``; a model name in place of the family gives that model's values for the
            option's value, applied last (e.g. SMT-B's drop path of one dense system).
        other_models: models of no msconv family (timm models) take this family's values; None: none.
        check: called with the resolved config; returns a message when the preset cannot run as configured.
    """
    if name in PRESETS:
        raise ValueError(f"preset {name!r} is registered already")
    PRESETS[name] = {fam: dict(values) for fam, values in by_family.items()}
    _PRESET_RULES[name] = dict(
        task=task,
        per_model=dict(per_model or {}),
        per_option={k: dict(v) for k, v in (per_option or {}).items()},
        other_models=other_models,
        check=check,
    )


def preset_task(preset: Optional[str]) -> Optional[str]:
    """The task ``preset`` is a recipe of, or None (a shared preset, or no such preset)."""
    return _PRESET_RULES[preset]['task'] if preset in _PRESET_RULES else None


def _check_preset(preset: str, task) -> None:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    owner = preset_task(preset)
    if owner == task.name or (owner is None and not task.own_presets_only):
        return
    own = sorted(p for p in PRESETS if preset_task(p) == task.name)
    what = f"a recipe of task {owner!r}" if owner is not None else 'a shared preset'
    message = f"task {task.name!r}: preset {preset!r} is {what}, not one of the task's own {own}"
    if task.default_preset:
        message += f"; use preset {task.default_preset!r} (--preset {task.default_preset}) and override what you need"
    raise ValueError(message)


def _preset_values(preset: str, model: str, given: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """What ``preset`` sets for ``model``: its family's values (or those of ``other_models``), then those for the
    options' values (``given``: the run's own options), then per-model ones, then the model's own per-option ones."""
    rules = _PRESET_RULES[preset]
    fam = family_of(model)
    if fam is not None and fam not in PRESETS[preset]:
        raise ValueError(
            f"preset {preset!r} is defined for {sorted(PRESETS[preset])} models only, not for {model!r} "
            f"(family {fam!r}); presets for it: {sorted(p for p in PRESETS if fam in PRESETS[p])}"
        )
    source = fam if fam is not None else rules['other_models']
    values = dict(PRESETS[preset].get(source, {}))
    for option_name, by_family in rules['per_option'].items():
        chosen = (given or {}).get(option_name, values.get(option_name))
        values.update(by_family.get(source, {}).get(chosen, {}))
    base = model.split('.')[0]
    values.update(rules['per_model'].get(base, {}))
    for option_name, by_source in rules['per_option'].items():
        chosen = (given or {}).get(option_name, values.get(option_name))
        values.update(by_source.get(base, {}).get(chosen, {}))
    unknown = sorted(set(values) - _all_options())
    if unknown:
        raise ValueError(f"preset {preset!r} sets unknown config option(s) {unknown}")
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


def _unknown(name: str) -> ValueError:
    close = difflib.get_close_matches(name, sorted(_all_options()), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ''
    return ValueError(f"unknown config option {name!r}{hint}")


def _not_of_this_task(name: str, task: str) -> ValueError:
    if name not in _all_options():
        return _unknown(name)
    owners = [t.name for t in TASKS.values() if name in {f.name for f in fields(t.config_class)}]
    return ValueError(
        f"option {name!r} belongs to task {' / '.join(map(repr, owners))}, not to this run's task {task!r}"
    )


def _coerce(config_class: Type[TrainConfig], values: Mapping[str, Any]) -> Dict[str, Any]:
    """YAML's lists as the tuples and integers as the floats the fields hold."""
    defaults = {f.name: f.default for f in fields(config_class)}
    out = {}
    for name, value in values.items():
        default = defaults[name]
        if isinstance(default, tuple) and isinstance(value, (list, tuple)):
            value = tuple(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        out[name] = value
    return out


def _split_given(values: Mapping[str, Any], config_class: Type[TrainConfig]) -> Dict[str, Any]:
    """The options of ``values`` that ``config_class`` holds; another task's options are left out (a run folder's
    config.yaml written before the tasks had their own sections records every task's options); unknown names fail."""
    own = {f.name for f in fields(config_class)}
    for name in values:
        if name not in own and name not in _all_options():
            raise _unknown(name)
    return {k: v for k, v in values.items() if k in own}


def config_from_mapping(values: Mapping[str, Any], task: Optional[str] = None) -> TrainConfig:
    """The options a run recorded (its ``config.yaml``) as the config of its task (``task``, else the one the
    mapping names): no preset beneath them, no checks; options of other tasks are left out."""
    cls = task_class(task or values.get('task') or TrainConfig.task).config_class
    return cls(**_coerce(cls, _split_given(values, cls)))


def resolve_config(
    config: Union[TrainConfig, Mapping[str, Any], str, Path, None] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    check_paths: bool = True,
) -> TrainConfig:
    """Merge defaults < preset < ``config`` (a TrainConfig, a dict or a YAML path) < ``overrides``, then validate;
    returns the config of the run's task (an instance of its ``Task.config_class``).

    The task is the one given, else the one the preset is a recipe of, else 'classification'; the preset is the
    one given, else the task's default. The preset is looked up for the model's family (a timm model gets none of
    it, or the SMT values of ``preset='demo'``). In a ``TrainConfig``, fields equal to their dataclass default count
    as not given. ``model`` must be given somewhere. ``config`` may hold other tasks' options (they are left out:
    the ``config.yaml`` of older run folders records every task's); ``overrides`` may not. An override of None is a
    value for the options that may be None (``clip_grad=None`` switches clipping off, ``max_steps=None`` lifts the
    limit) and means "not given" for the others (``batch_size=None``: the preset's).
    """
    if isinstance(config, TrainConfig):
        # Fields left at their dataclass default count as "not given", so the preset applies beneath the rest.
        defaults = type(config)().to_dict()
        given: Dict[str, Any] = {k: v for k, v in config.to_dict().items() if v != defaults[k]}
    else:
        given = load_yaml(config) if isinstance(config, (str, Path)) else dict(config or {})
    overrides = dict(overrides or {})
    merged = {**given, **{k: v for k, v in overrides.items() if v is not None}}

    model = merged.get('model')
    if not model or not isinstance(model, str):
        raise ValueError("model: a model name is required, e.g. 'smt_tiny' (see `msconv list`)")
    task = task_class(merged.get('task') or preset_task(merged.get('preset')) or TrainConfig.task)
    cls = task.config_class
    own = {f.name for f in fields(cls)}
    for name in overrides:
        if name not in own:
            raise _not_of_this_task(name, task.name)
    # None is a value of the options that may be None (clip_grad=None: no clipping), "not given" for the others
    optional = {f.name for f in fields(cls) if 'Optional' in str(f.type) or 'None' in str(f.type)}
    overrides = {k: v for k, v in overrides.items() if v is not None or k in optional}
    given = _split_given(given, cls)
    preset = merged.get('preset') or task.default_preset

    values: Dict[str, Any] = cls().to_dict()
    if preset is not None:
        _check_preset(preset, task)
        values.update({k: v for k, v in _preset_values(preset, model, merged).items() if k in own})
    values.update(given)
    values.update(overrides)
    values.update(task=task.name, preset=preset)
    cfg = cls(**_coerce(cls, values))
    cfg.validate(check_paths=check_paths)
    return cfg


def validate_config(cfg: TrainConfig, check_paths: bool = True) -> None:
    """``cfg.validate(check_paths)``: reject bad values with a message that says what to fix."""
    cfg.validate(check_paths=check_paths)


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
