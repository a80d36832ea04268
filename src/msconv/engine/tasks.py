"""Training tasks as strategy objects: everything that differs between tasks, behind one interface.

The trainer owns what every task shares (optimizer and schedule, AMP, accumulation, DDP, EMA, NaN guards,
checkpoint files, records, resume); a ``Task`` answers the task-specific questions at six points:

1. data:        ``num_classes()``, then ``build_datasets(data_cfg)`` -> (train set, val set or None);
2. model:       ``build_model(num_classes)`` (what the optimizer trains) and ``backbone(model)`` (what is
                exported and counted);
3. loss:        ``build_criterion(num_classes)``, ``to_device(x, y, device, channels_last)`` (batches built by
                ``collate_fn``), ``prepare_batch(x, y)`` (e.g. Mixup), ``forward(model, x, y)`` under autocast and
                ``loss(output, y)`` in float32; ``schedule(...)`` may reshape the learning-rate schedule;
4. evaluation:  ``evaluate(model, ema_model, val_loader, ctx)`` -> metric fields of a 'val' record, and
                ``summary(record)`` for the log line;
5. checkpoint:  ``checkpoint_weights(model, ema_model)`` -> {file stem: state dict} and
                ``load_checkpoint_weights(...)``, its inverse.

``TASKS`` maps ``TrainConfig.task`` to a class; ``register_task`` adds one. Detection and segmentation
(:mod:`msconv.engine.dense_tasks`) plug in here: their datasets return targets other than class indices, their
``collate_fn``/``to_device``/``forward``/``loss`` take them, and their ``evaluate`` returns their own metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .build import build_model
from .registry import TASKS, register_task, task_class

__all__ = ['Task', 'ClassificationTask', 'FaceTask', 'FaceModel', 'RunContext', 'TASKS', 'register_task', 'create_task']


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

    name = ''
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
        return build_model(
            cfg.model, num_classes, cfg.drop_path, cfg.model_kwargs, cfg.init_checkpoint, class_map=cfg.class_map
        )

    def backbone(self, model: nn.Module) -> nn.Module:
        return model

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

    # schedule -------------------------------------------------------------------------------------------------
    def schedule(
        self, sched_kwargs: Dict[str, Any], total_steps: int, steps_per_epoch: int
    ) -> Tuple[Dict[str, Any], int]:
        """``timm.scheduler.create_scheduler_v2`` keywords and the run's optimizer steps, as the trainer derived
        them from the config's epochs; a task may change both (iteration-based recipes)."""
        return sched_kwargs, total_steps

    # evaluation -----------------------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, ema_model: Optional[nn.Module], val_loader, ctx: RunContext) -> Dict[str, Any]:
        raise NotImplementedError

    def summary(self, record: Dict[str, Any]) -> str:
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


def create_task(cfg) -> Task:
    """The task object of a run: the class registered as ``cfg.task``, given the config."""
    return task_class(cfg.task)(cfg)


@register_task('classification')
class ClassificationTask(Task):
    """Image classification on an ImageFolder tree or the bundled digits: (label-smoothed) cross-entropy, or soft
    targets with Mixup/CutMix (timm); top-1/top-5 and loss on the val split, for the weights and the EMA."""

    def num_classes(self) -> int:
        cfg = self.cfg
        if getattr(self, '_num_classes', None) is None:
            from ..data.loader import check_image_folder

            self._num_classes = 10 if cfg.data == 'digits' else len(check_image_folder(Path(cfg.data), 'train'))
        return self._num_classes

    def build_datasets(self, data_cfg):
        from ..data.loader import build_dataset

        cfg, dc = self.cfg, data_cfg
        train_set = build_dataset(cfg, 'train', dc['size'], dc['mean'], dc['std'])
        val_set = build_dataset(cfg, 'val', dc['size'], dc['mean'], dc['std'])
        n = self.num_classes()
        if len(train_set.classes) != n:
            raise ValueError(
                f"data {cfg.data!r}: train/ has {n} classes but the dataset reports {len(train_set.classes)}"
            )
        if list(val_set.classes) != list(train_set.classes):
            raise ValueError(
                f"data {cfg.data!r}: val/ classes {list(val_set.classes)} differ from train/ classes "
                f"{list(train_set.classes)}"
            )
        return train_set, val_set

    def build_criterion(self, num_classes: int) -> None:
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        cfg = self.cfg
        if cfg.mixup > 0 or cfg.cutmix > 0:  # label smoothing folded into the soft targets
            self.mixup_fn = Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                prob=cfg.mixup_prob,
                switch_prob=cfg.mixup_switch_prob,
                mode=cfg.mixup_mode,
                label_smoothing=cfg.smoothing,
                num_classes=num_classes,
            )
            self.criterion = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    def prepare_batch(self, x, y):
        return self.mixup_fn(x, y) if self.mixup_fn is not None else (x, y)

    def evaluate(self, model, ema_model, val_loader, ctx):
        from .evaluate import evaluate_loader

        args = (val_loader, ctx.device, ctx.amp_dtype, ctx.channels_last, ctx.world_size, ctx.rank)
        ev = evaluate_loader(model, *args)
        rec = {'top1': ev['top1'], 'top5': ev['top5'], 'val_loss': ev['val_loss']}
        if ema_model is not None:
            rec['ema_top1'] = evaluate_loader(ema_model, *args)['top1']
        return rec

    def summary(self, rec):
        extra = f", EMA top-1 {rec['ema_top1']:.2f}%" if rec.get('ema_top1') is not None else ''
        return f"val top-1 {rec['top1']:.2f}% top-5 {rec['top5']:.2f}% loss {rec['val_loss']:.4f}{extra}"


class FaceModel(nn.Module):
    """Embedding network + margin head (ArcFace/CosFace): ``forward(x, labels) -> margin logits``."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x), labels)

    def no_weight_decay(self):
        nwd = getattr(self.backbone, 'no_weight_decay', lambda: set())()
        return {f'backbone.{n}' for n in nwd}


@register_task('face')
class FaceTask(Task):
    """Face recognition (insightface practice): an embedding network trained through an ArcFace/CosFace margin
    head on a folder of identities; verification accuracy on .bin pair files. The checkpoint's ``model`` is the
    embedding network alone (loadable by name with ``num_classes=embedding_size``), ``head`` the margin head."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.bins = []

    def num_classes(self) -> int:
        from ..data.face import FaceIdentityFolder

        n = FaceIdentityFolder(self.cfg.data).num_identities
        if n < 2:
            raise ValueError(f"data {self.cfg.data!r}: face training needs at least 2 identity subfolders, found {n}")
        return n

    def build_datasets(self, data_cfg):
        # aligned crops, resized to the model's input, random horizontal flip only
        from timm.data import create_transform

        from ..data.face import FaceIdentityFolder, load_bin

        cfg, dc = self.cfg, data_cfg
        tf = create_transform(
            dc['size'],
            is_training=True,
            scale=(1.0, 1.0),
            ratio=(1.0, 1.0),
            hflip=0.5,
            color_jitter=None,
            auto_augment=None,
            interpolation=cfg.interpolation,
            mean=tuple(dc['mean']),
            std=tuple(dc['std']),
        )
        self.bins = []
        for b in cfg.face_val_bins:
            images, issame = load_bin(b, image_size=(dc['size'], dc['size']))
            self.bins.append((Path(b).stem, images, issame))
        return FaceIdentityFolder(cfg.data, transform=tf), None

    def build_model(self, num_classes: int) -> nn.Module:
        from ..layers import ArcFace, CosFace

        cfg = self.cfg
        backbone = build_model(cfg.model, cfg.embedding_size, cfg.drop_path, cfg.model_kwargs, cfg.init_checkpoint)
        head_cls = ArcFace if cfg.margin == 'arcface' else CosFace
        return FaceModel(backbone, head_cls(cfg.embedding_size, num_classes, s=cfg.margin_s, m=cfg.margin_m))

    def backbone(self, model):
        return model.backbone

    def forward(self, model, x, y):
        return model(x, y)

    def loss(self, output, y):
        return F.cross_entropy(output.float(), y)

    def evaluate(self, model, ema_model, val_loader, ctx):
        from .verification import evaluate_verification

        results = {}
        if ctx.is_main:
            for name, images, issame in self.bins:
                res = evaluate_verification(
                    model.backbone, images, issame, batch_size=ctx.local_batch_size, device=ctx.device
                )
                ctx.print(f"verification {name}: accuracy {res['accuracy']:.4f}")
                results[name] = {k: float(v) for k, v in res.items() if isinstance(v, (int, float))}
        rec: Dict[str, Any] = {'verification': results}
        accs = [r['accuracy'] for r in results.values() if 'accuracy' in r]
        if accs:
            rec['verification_acc'] = 100.0 * sum(accs) / len(accs)
        return rec

    def summary(self, rec):
        return f"verification {rec['verification']}" if rec.get('verification') else ''

    def checkpoint_weights(self, model, ema_model):
        weights = super().checkpoint_weights(model, ema_model)
        weights['head'] = model.head.state_dict()
        return weights

    def load_checkpoint_weights(self, model, ema_model, weights):
        super().load_checkpoint_weights(model, ema_model, weights)
        if 'head' in weights:
            model.head.load_state_dict(weights['head'])
            if ema_model is not None:
                ema_model.head.load_state_dict(weights['head'])
