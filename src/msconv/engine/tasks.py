"""Training tasks as strategy objects: everything that differs between tasks, behind one interface.

The trainer owns what every task shares (optimizer and schedule, AMP, accumulation, DDP, EMA, NaN guards,
checkpoint files, records, resume) and asks a ``Task`` the task-specific questions at five points of a run:

1. data:        ``num_classes()``, then ``build_datasets(data_cfg)`` -> (train set, val set or None);
2. model:       ``build_model(num_classes)`` (what the optimizer trains) and ``backbone(model)`` (what is
                exported and counted); ``param_groups(model)`` (weight decay and learning-rate scale per
                parameter), with ``grad_checkpointing`` ``set_grad_checkpointing(model)`` and, under torchrun on
                CUDA with ``sync_bn``, ``convert_sync_batchnorm(model)``;
3. loss:        ``build_criterion(num_classes)``, ``to_device(x, y, device, channels_last)`` (batches built by
                ``collate_fn``), ``prepare_batch(x, y)`` (e.g. Mixup), ``forward(model, x, y)`` under autocast and
                ``loss(output, y)`` in float32 (``plain_loss``: without batch mixing, for SNIP's scores);
                ``schedule(...)`` may reshape the learning-rate schedule;
4. evaluation:  after the optimizer steps where ``eval_due(step, steps_per_epoch)`` (default: every
                ``eval_every`` epochs) and at the end, ``evaluate(model, ema_model, val_loader, ctx)`` -> metric
                fields of a 'val' record,
                ``summary(record)`` for the log line, ``headline_metrics`` for the end of ``msconv train``;
5. checkpoint:  ``checkpoint_weights(model, ema_model)`` -> {file stem: state dict} and
                ``load_checkpoint_weights(...)``, its inverse.

Outside a run, the class answers for its task: ``config_class`` (the task's config: ``TrainConfig`` plus its own
section, with the ``msconv train`` flags of its options), ``default_preset`` and ``own_presets_only`` (which
presets it takes), ``recipe_line`` (its part of the printed recipe), ``evaluate_run`` / ``format_evaluation``
(``msconv eval`` of one of its runs) and ``demo`` (``msconv demo --task``).

A task module registers its class with ``@register_task(name)`` (:mod:`msconv.engine.registry`); the built-in ones
are :mod:`~msconv.engine.classification`, :mod:`~msconv.engine.face` and :mod:`~msconv.engine.dense_tasks`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn

from .build import build_model
from .checkpoint import find_run_config
from .config import TrainConfig, load_yaml
from .optim import weight_decay_groups
from .registry import TASKS, register_task, task_class

__all__ = [
    'Task',
    'RunContext',
    'TASKS',
    'register_task',
    'create_task',
    'task_of_run',
    'evaluate_run',
    'run_demo',
]


@dataclass
class RunContext:
    """What a task needs to know about the run when it evaluates."""

    device: torch.device
    amp_dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    world_size: int = 1
    rank: int = 0
    local_batch_size: int = 64
    print: Callable[[str], None] = field(default=print)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class Task:
    """The task-specific half of a training run (see the module docstring for the call order)."""

    name = ''  # set by register_task
    config_class: Type[TrainConfig] = TrainConfig  # the task's config: TrainConfig + the task's own options
    default_preset: Optional[str] = 'imagenet'  # the preset of a run that names none (None: the config defaults)
    own_presets_only = False  # True: only the presets registered for this task (register_presets(task=...))
    headline_metrics: Tuple[str, ...] = ()  # evaluation fields `msconv train` prints when the run ends
    collate_fn: Optional[Callable] = None  # the loaders' collate (None: torch's default, stacked tensors)

    def __init__(self, cfg):
        self.cfg = cfg
        self.criterion: Optional[nn.Module] = None
        self.mixup_fn = None

    # data -----------------------------------------------------------------------------------------------------
    def num_classes(self) -> int:
        raise NotImplementedError

    def build_datasets(self, data_cfg: Dict[str, Any]) -> Tuple[Any, Optional[Any]]:
        raise NotImplementedError

    # model ----------------------------------------------------------------------------------------------------
    def build_model(self, num_classes: int) -> nn.Module:
        cfg = self.cfg
        return build_model(cfg.model, num_classes, cfg.drop_path, cfg.model_kwargs, cfg.init_checkpoint)

    def backbone(self, model: nn.Module) -> nn.Module:
        return model

    def param_groups(self, model: nn.Module) -> List[Dict[str, Any]]:
        """The optimizer's parameter groups: ``params`` and ``weight_decay``, and ``lr_scale`` where a group's
        learning rate is a multiple of the schedule's (timm's schedulers apply it). Default: timm's weight decay
        groups (:func:`msconv.engine.optim.weight_decay_groups`)."""
        return weight_decay_groups(model, self.cfg.weight_decay)

    def set_grad_checkpointing(self, model: nn.Module, enable: bool = True) -> None:
        """Gradient checkpointing of the part of ``model`` that holds most activations (``grad_checkpointing``):
        by default the backbone's stages, through timm's ``set_grad_checkpointing`` (a classifier, a face model's
        trunk, a dense system's ``features_only`` backbone), with the BatchNorm statistics updated once a step
        (:func:`keep_batchnorm_statistics_once`). ``ValueError`` naming the module that lacks it."""
        backbone = self.backbone(model)
        setter = getattr(backbone, 'set_grad_checkpointing', None)
        if setter is None:
            raise ValueError(
                f"grad_checkpointing: the backbone of this {self.name!r} run ({type(backbone).__name__}) has no "
                f"set_grad_checkpointing (timm's models and every msconv model have one)"
            )
        setter(enable)
        if enable:
            keep_batchnorm_statistics_once(backbone)

    def convert_sync_batchnorm(self, model: nn.Module) -> nn.Module:
        """``model`` with the BatchNorm layers that synchronise over the processes as SyncBatchNorm (asked for by
        ``sync_bn`` under torchrun on CUDA). Default: every BatchNorm layer."""
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    # loss -----------------------------------------------------------------------------------------------------
    def build_criterion(self, num_classes: int) -> None:
        self.criterion = nn.CrossEntropyLoss()

    def to_device(self, x: Any, y: Any, device: torch.device, channels_last: bool = False) -> Tuple[Any, Any]:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def prepare_batch(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x)

    def loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.criterion(output.float(), y)

    def plain_loss(self, output: Any, y: Any) -> torch.Tensor:
        """The loss of a batch as it comes from the loader, without batch mixing or smoothing (the SNIP scores of
        ShiftWise sparsity are taken from it)."""
        return self.loss(output, y)

    # schedule -------------------------------------------------------------------------------------------------
    def schedule(
        self, sched_kwargs: Dict[str, Any], total_steps: int, steps_per_epoch: int
    ) -> Tuple[Dict[str, Any], int]:
        """``timm.scheduler.create_scheduler_v2`` keywords and the run's optimizer steps, as the trainer derived
        them from the config's epochs; a task may change both (iteration-based recipes)."""
        return sched_kwargs, total_steps

    # evaluation -----------------------------------------------------------------------------------------------
    def eval_due(self, step: int, steps_per_epoch: int) -> bool:
        """Whether the trainer evaluates after optimizer step ``step`` (it also does after the last one): at the
        end of every ``eval_every``-th epoch."""
        return step % steps_per_epoch == 0 and (step // steps_per_epoch) % self.cfg.eval_every == 0

    def evaluate(self, model: nn.Module, ema_model: Optional[nn.Module], val_loader, ctx: RunContext) -> Dict[str, Any]:
        raise NotImplementedError

    def summary(self, record: Dict[str, Any]) -> str:
        return ''

    def recipe_line(self) -> str:
        """The task's own options in the recipe the trainer prints when a run starts ('' for none)."""
        return ''

    # checkpoint payload ---------------------------------------------------------------------------------------
    def checkpoint_weights(self, model: nn.Module, ema_model: Optional[nn.Module]) -> Dict[str, Dict]:
        weights = {'model': self.backbone(model).state_dict()}
        if ema_model is not None:
            weights['ema'] = self.backbone(ema_model).state_dict()
        return weights

    def load_checkpoint_weights(
        self, model: nn.Module, ema_model: Optional[nn.Module], weights: Dict[str, Dict]
    ) -> None:
        self.backbone(model).load_state_dict(weights['model'])
        if ema_model is not None:
            if 'ema' in weights:
                self.backbone(ema_model).load_state_dict(weights['ema'])
            else:  # a checkpoint from a run without EMA: the EMA starts from the weights
                self.backbone(ema_model).load_state_dict(self.backbone(model).state_dict())

    # outside a run --------------------------------------------------------------------------------------------
    @classmethod
    def evaluate_run(cls, model: Optional[str], checkpoint: Optional[str], **options: Any) -> Dict[str, Any]:
        """``msconv eval``: evaluate ``checkpoint`` (weights of this task's run) with ``options``."""
        raise ValueError(f"msconv eval: task {cls.name!r} has no evaluation of a saved run")

    @classmethod
    def format_evaluation(cls, result: Dict[str, Any]) -> str:
        """The lines ``msconv eval`` prints for ``evaluate_run``'s result."""
        return '\n'.join(f"{k}: {v}" for k, v in result.items())

    @classmethod
    def demo(cls, **options: Any) -> Dict[str, Any]:
        """``msconv demo --task NAME``: a small run of this task on the bundled digits; returns ``table`` (text),
        ``summary`` (a line), ``interrupted`` and ``ok``."""
        raise ValueError(f"msconv demo: task {cls.name!r} has no demo")


def _statistics(module: nn.Module) -> List[torch.Tensor]:
    """The running statistics of ``module`` if it is a BatchNorm layer, and of its BatchNorm children."""
    return [
        t
        for c in (module, *module.children())
        if isinstance(c, nn.modules.batchnorm._BatchNorm) and c.track_running_stats and c.running_mean is not None
        for t in (c.running_mean, c.running_var, c.num_batches_tracked)
    ]


def _save_statistics(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: in a backward pass (a recomputation), keep the statistics and put them back when the backward
    pass ends (not after this forward: torch stops a recomputation once it has the tensors it needs)."""
    if not module.training or torch._C._current_graph_task_id() == -1 or '_msconv_saved' in module.__dict__:
        return
    module._msconv_saved = [t.clone() for t in _statistics(module)]

    @torch.no_grad()
    def restore() -> None:
        for t, s in zip(_statistics(module), module.__dict__.pop('_msconv_saved')):
            t.copy_(s)

    torch.autograd.Variable._execution_engine.queue_callback(restore)


def keep_batchnorm_statistics_once(module: nn.Module) -> None:
    """Gradient checkpointing runs each checkpointed segment's forward again in the backward pass, and a BatchNorm
    in training mode would move its running statistics a second time (timm's ``checkpoint_seq`` does: the model then
    evaluates with other statistics than without checkpointing). Every BatchNorm layer of ``module``, and every
    module that holds some, puts their statistics back at the end of a backward pass in which it ran (the holder too:
    a fused form, such as ShiftWiseConv's training form, updates them without calling the layer; the layer too: a
    segment may call it outside its holder's forward); the recomputed output, from the batch's statistics, and the
    gradients are unchanged."""
    for m in module.modules():
        if _statistics(m) and not getattr(m, '_msconv_statistics_once', False):
            m.register_forward_pre_hook(_save_statistics)
            m._msconv_statistics_once = True


def create_task(cfg) -> Task:
    """The task object of a run: the class registered as ``cfg.task``, given the config."""
    return task_class(cfg.task)(cfg)


def task_of_run(checkpoint: Optional[Union[str, Path]]) -> Type[Task]:
    """The task class of the run ``checkpoint`` (a run folder, a checkpoint folder or a file in one) belongs to,
    from its ``config.yaml``; 'classification' for weights outside a run folder (or no checkpoint)."""
    cfg_path = find_run_config(Path(checkpoint)) if checkpoint is not None else None
    name = load_yaml(cfg_path).get('task') if cfg_path is not None else None
    return task_class(name or TrainConfig.task)


def _takes(function: Callable, options: Dict[str, Any], what: str) -> Dict[str, Any]:
    """``options`` less those that are None; ``ValueError`` naming any that ``function`` does not take."""
    options = {k: v for k, v in options.items() if v is not None}
    params = inspect.signature(function).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        extra = sorted(set(options) - set(params))
        if extra:
            raise ValueError(f"option(s) {extra} do not apply to {what}")
    return options


def evaluate_run(
    model: Optional[str], checkpoint: Optional[Union[str, Path]] = None, **options: Any
) -> Tuple[Type[Task], Dict[str, Any]]:
    """``msconv eval``: the task of ``checkpoint``'s run evaluates it with ``options`` (those that are not None);
    returns the task class (its ``format_evaluation`` prints the result) and the result. An option the task does
    not take raises ``ValueError`` naming it."""
    task = task_of_run(checkpoint)
    options = _takes(task.evaluate_run, options, f"the evaluation of a {task.name!r} run")
    return task, task.evaluate_run(model, None if checkpoint is None else str(checkpoint), **options)


def run_demo(task: str = TrainConfig.task, **options: Any) -> Dict[str, Any]:
    """``msconv demo --task``: the demo of ``task`` with ``options`` (those that are not None); an option its demo
    does not take raises ``ValueError`` naming it."""
    cls = task_class(task)
    return cls.demo(**_takes(cls.demo, options, f"the demo of task {task!r}"))
