"""Image classification, the default task: ``msconv train MODEL --data ImageFolder|digits``.

Its options (``ClassificationConfig``) are timm's training recipe beyond what every task shares: label smoothing,
Mixup/CutMix, RandAugment, colour jitter, random erasing, random-resized-crop scale and ratio, the eval crop, and
``class_map`` for fine-tuning from a checkpoint with other classes. Its presets are the ImageNet recipes
(:mod:`msconv.engine.recipes`). ``msconv eval`` of its runs is :func:`msconv.engine.evaluate.evaluate`, its demo
:func:`msconv.engine.demo.demo`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from ..data.loader import build_dataset, check_image_folder
from .build import build_model
from .config import INTERPOLATIONS, TrainConfig, option, require, require_fraction, require_nonnegative
from .demo import demo as families_demo
from .evaluate import evaluate, evaluate_loader
from .registry import register_task
from .tasks import Task

__all__ = ['ClassificationConfig', 'ClassificationTask']


@dataclass
class ClassificationConfig(TrainConfig):
    """``TrainConfig`` plus the options of image classification (timm's augmentation and loss)."""

    smoothing: float = option(0.1, help='label smoothing')
    mixup: float = option(0.8, help='Mixup alpha (0: off)')
    cutmix: float = option(1.0, help='CutMix alpha (0: off)')
    mixup_prob: float = option(1.0, help='probability of mixing a batch')
    mixup_switch_prob: float = option(0.5, help='probability of CutMix instead of Mixup when both are on')
    mixup_mode: str = option('batch', choices=('batch', 'pair', 'elem'), help='what Mixup mixes together')
    auto_augment: Optional[str] = option('rand-m9-mstd0.5-inc1', help='timm auto-augment policy (None: off)')
    color_jitter: float = option(0.4, help='colour jitter strength')
    re_prob: float = option(0.25, help='random erasing probability')
    re_mode: str = option('pixel', choices=('const', 'rand', 'pixel'), help='random erasing fill')
    re_count: int = option(1, help='random erasing: regions per image')
    scale: Tuple[float, float] = option((0.08, 1.0), help='random-resized-crop area range')
    ratio: Tuple[float, float] = option((3 / 4, 4 / 3), help='random-resized-crop aspect range')
    interpolation: str = option('bicubic', choices=INTERPOLATIONS, help='resampling of the transforms')
    crop_pct: Optional[float] = option(None, help="eval centre-crop fraction (None: the model's pretrained_cfg)")
    crop_mode: str = option(
        'center',
        choices=('center', 'squash'),
        help="eval resize: 'center' (shorter side to size / crop_pct, centre crop) or 'squash' (both sides to "
        "size / crop_pct, then the centre crop; with crop_pct 1 a plain resize to size x size)",
    )
    class_map: Optional[str] = option(
        None, flag='--class-map', help='with --init-checkpoint: classifier rows to keep (e.g. map22kto1k.txt)'
    )

    def validate(self, check_paths: bool = True) -> None:
        super().validate(check_paths)
        for name in ('smoothing', 'mixup', 'cutmix', 're_prob', 'color_jitter'):
            require_nonnegative(self, name)
        for name in ('smoothing', 're_prob', 'mixup_prob', 'mixup_switch_prob'):
            require_fraction(self, name)
        require(
            self.class_map is None or self.init_checkpoint is not None,
            "class_map selects rows of the classifier of init_checkpoint: pass --init-checkpoint too",
        )
        if check_paths:
            if self.data != 'digits':
                check_image_folder(Path(self.data), 'train')
                check_image_folder(Path(self.data), 'val')
            if self.class_map is not None:
                require(Path(self.class_map).is_file(), f"class_map {self.class_map!r} does not exist")


@register_task('classification')
class ClassificationTask(Task):
    """Image classification on an ImageFolder tree or the bundled digits: (label-smoothed) cross-entropy, or soft
    targets with Mixup/CutMix (timm); top-1/top-5 and loss on the val split, for the weights and the EMA."""

    config_class = ClassificationConfig
    default_preset = 'imagenet'

    def num_classes(self) -> int:
        cfg = self.cfg
        if getattr(self, '_num_classes', None) is None:
            self._num_classes = 10 if cfg.data == 'digits' else len(check_image_folder(Path(cfg.data), 'train'))
        return self._num_classes

    def build_datasets(self, data_cfg):
        cfg, dc = self.cfg, data_cfg
        if cfg.crop_pct is None:  # the model's eval crop (recorded in the run's config.yaml)
            cfg.crop_pct = dc['crop_pct']
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

    def build_model(self, num_classes: int) -> nn.Module:
        cfg = self.cfg
        return build_model(
            cfg.model, num_classes, cfg.drop_path, cfg.model_kwargs, cfg.init_checkpoint, class_map=cfg.class_map
        )

    def build_criterion(self, num_classes: int) -> None:
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

    def plain_loss(self, output, y):
        # hard labels, no Mixup, no smoothing (-1: an unreadable image's stand-in)
        return F.cross_entropy(output.float(), y, ignore_index=-1)

    def evaluate(self, model, ema_model, val_loader, ctx):
        args = (val_loader, ctx.device, ctx.amp_dtype, ctx.channels_last, ctx.world_size, ctx.rank)
        ev = evaluate_loader(model, *args)
        rec = {'top1': ev['top1'], 'top5': ev['top5'], 'val_loss': ev['val_loss']}
        if ema_model is not None:
            rec['ema_top1'] = evaluate_loader(ema_model, *args)['top1']
        return rec

    def summary(self, rec):
        extra = f", EMA top-1 {rec['ema_top1']:.2f}%" if rec.get('ema_top1') is not None else ''
        return f"val top-1 {rec['top1']:.2f}% top-5 {rec['top5']:.2f}% loss {rec['val_loss']:.4f}{extra}"

    def recipe_line(self) -> str:
        cfg = self.cfg
        crop = 'model' if cfg.crop_pct is None else f"{cfg.crop_pct:g}"
        return (
            f"smoothing {cfg.smoothing:g}, mixup {cfg.mixup:g}, cutmix {cfg.cutmix:g}, aa {cfg.auto_augment}, re "
            f"{cfg.re_prob:g}, eval crop_pct {crop}" + (f" ({cfg.crop_mode})" if cfg.crop_mode != 'center' else '')
        )

    # outside a run ------------------------------------------------------------------------------------------
    @classmethod
    def evaluate_run(
        cls,
        model: Optional[str],
        checkpoint: Optional[str],
        data: str = 'digits',
        split: str = 'val',
        batch_size: int = 128,
        image_size: Optional[int] = None,
        device: str = 'auto',
        num_workers: int = 0,
        use_ema: bool = False,
        amp: bool = False,
        which: str = 'last',
        dtype: Optional[str] = None,
        bad_image_threshold: Optional[float] = None,
    ) -> Dict[str, Any]:
        res = evaluate(
            model,
            checkpoint=checkpoint,
            data=data,
            split=split,
            batch_size=batch_size,
            image_size=image_size,
            device=device,
            num_workers=num_workers,
            use_ema=use_ema,
            amp=amp,
            which=which,
            dtype=dtype,
            bad_image_threshold=bad_image_threshold,
        )
        return dict(res, model=model, data=data, split=split, dtype=dtype, use_ema=use_ema)

    @classmethod
    def format_evaluation(cls, res: Dict[str, Any]) -> str:
        lines = []
        if res.get('checkpoint'):
            step = '' if res.get('step') is None else f" (step {res['step']})"
            best = ''
            if res.get('which') == 'best' and res.get('best_top1') is not None:
                best = f", best evaluation: top-1 {res['best_top1']:.2f}% at epoch {res['best_epoch']:.3g}"
            unverified = (
                ' (not verified: a bare weights file carries no checksum; run-folder checkpoints are hash-checked)'
                if res.get('verified') is False
                else ''
            )
            lines.append(f"weights: {res['checkpoint']}{step}{', EMA' if res['use_ema'] else ''}{best}{unverified}")
        if res.get('preprocessing'):
            lines.append(f"preprocessing: {res['preprocessing']}")
        form = f" ({res['dtype']} inference form)" if res['dtype'] else ''
        lines.append(
            f"{res['model']}{form} on {res['data']}/{res['split']}: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%"
            f"  loss {res['val_loss']:.4f}  ({res['count']} images{_skipped(res)})"
        )
        return '\n'.join(lines)

    @classmethod
    def demo(
        cls,
        families: Sequence[str] = ('smt', 'scsc', 'shiftwise'),
        output: str = 'runs/demo',
        epochs: Optional[int] = None,
        max_steps: Optional[int] = None,
        threads: Optional[int] = 1,
        progress: bool = True,
        device: str = 'cpu',
    ) -> Dict[str, Any]:
        res = families_demo(
            families=families,
            output=output,
            epochs=epochs,
            max_steps=max_steps,
            threads=threads,
            progress=progress,
            device=device,
        )
        res['summary'] = f"total time {res['total_time_s']:.0f}s; curves: {res['curves']}"
        res['ok'] = all(not r.get('error') for r in res['rows'])
        return res


def _skipped(res: Dict[str, Any]) -> str:
    """', N unusable files left out' of an evaluation result (named in the warnings), or ''."""
    n = res.get('skipped_files') or 0
    return f", {n} unusable file{'s' if n != 1 else ''} left out (named above)" if n else ''
