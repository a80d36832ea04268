"""Detection and segmentation as engine tasks: ``msconv train MODEL --task detection|segmentation``.

Each task answers the trainer's questions (:mod:`msconv.engine.tasks`) with the library of :mod:`msconv.dense`:

=================  ===============================================  ===============================================
step               ``DetectionTask`` ('detection')                  ``SegmentationTask`` ('segmentation')
=================  ===============================================  ===============================================
data (``--data``)  a COCO folder: ``annotations/instances_{s}.json``  an ADE20K folder: ``images/{training,
                   + ``{s}/`` for s = train2017/val2017 (or          validation}/`` + ``annotations/...``
                   train/val); ``digits``: the digits COCO set      ``digits``: the digits ADE set (11 classes)
model (``--arch``) ``create_detector(model, arch, K)``: mask_rcnn,  ``create_segmenter(model, 'upernet', K)``
                   cascade_mask_rcnn, retinanet
batches            lists of images and target dicts                 stacked crops and (B, H, W) label maps
loss               sum of the detector's loss dict                  decode + 0.4 x auxiliary cross-entropy
evaluation         COCO box (and mask) AP, AP50, AP75, APs/m/l      mIoU / mAcc / aAcc, single scale (+ multi-scale
                                                                    and flip with ``seg_eval_ms``/``seg_eval_flip``)
checkpoint         the whole detector (``model`` / ``ema``)         the whole segmenter
=================  ===============================================  ===============================================

Model sizes and pipelines come from the config: ``model_kwargs`` go to the backbone (e.g. a nano SMT),
``dense_kwargs`` to ``create_detector`` / ``create_segmenter`` (e.g. ``min_size``, ``channels``),
``init_checkpoint`` is the backbone's ImageNet (or classification-run) checkpoint, ``drop_path`` its stochastic
depth. Recipes: ``preset='coco_3x'`` / ``'ade20k_160k'`` (:mod:`msconv.engine.dense_recipes`).

Distributed evaluation: each rank runs the detector on its share of the val images and the COCO results are
gathered before scoring, so every rank reports the same AP; segmentation is scored on rank 0 and broadcast.
Exact single- vs multi-process equivalence of training holds where the maths is per image: RetinaNet's losses are
normalised per image; the R-CNNs sample anchors and RoIs with each rank's own random stream, and BatchNorm (in
the backbones and the UperNet heads) needs SyncBatchNorm (CUDA) or ``norm_eval`` to be rank-independent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from . import dense_recipes  # noqa: F401  (registers the presets 'coco_3x' and 'ade20k_160k')
from .registry import task_class
from .tasks import RunContext, Task, register_task

__all__ = [
    'DetectionTask',
    'SegmentationTask',
    'find_coco_split',
    'digits_dense_root',
    'evaluate_dense',
    'dense_run_task',
    'format_dense_metrics',
]

_DENSE_PRESETS = ('coco_3x', 'ade20k_160k')
# digits sets written for ``--data digits`` (the demo writes its own, sized for its targets)
_DIGITS_SIZES = dict(n_train=400, n_val=50, canvas=(128, 128), digit_size=(36, 72))


def find_coco_split(root: Path, split: str) -> Tuple[Path, Path]:
    """``(image folder, instances json)`` of ``split`` ('train' or 'val') in a COCO folder: ``train2017`` /
    ``val2017`` as COCO ships them, or plain ``train`` / ``val`` (the digits sets)."""
    root = Path(root)
    tried = []
    for name in (f"{split}2017", split):
        img_dir, ann = root / name, root / 'annotations' / f"instances_{name}.json"
        if img_dir.is_dir() and ann.is_file():
            return img_dir, ann
        tried.append(f"{name}/ + annotations/instances_{name}.json")
    raise ValueError(
        f"data {str(root)!r}: not a COCO folder with a {split} split; expected {' or '.join(tried)} inside it"
    )


def digits_dense_root(output: str, kind: str) -> Path:
    """The digits COCO (``kind='coco'``) or ADE (``'ade'``) set under ``output/_digits``, written once.

    Written to a temporary folder and renamed into place, so concurrent ranks never see half a set."""
    from ..data.dense_digits import build_digits_ade, build_digits_coco

    root = Path(output) / '_digits' / kind
    if (root / '.complete').is_file():
        return root
    tmp = root.parent / f".tmp-{kind}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    s = _DIGITS_SIZES
    geometry = dict(canvas=s['canvas'], digit_size=s['digit_size'])
    if kind == 'coco':
        build_digits_coco(tmp, 'train', n_images=s['n_train'], seed=0, **geometry)
        build_digits_coco(tmp, 'val', n_images=s['n_val'], seed=1, **geometry)
    else:
        build_digits_ade(tmp, 'training', n_images=s['n_train'], seed=0, **geometry)
        build_digits_ade(tmp, 'validation', n_images=s['n_val'], seed=1, **geometry)
    (tmp / '.complete').touch()
    try:
        os.replace(tmp, root)
    except OSError:  # another process put it in place first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _freeze_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class _DenseTask(Task):
    """What detection and segmentation share: config checks, whole-model checkpoints, the schedule hook."""

    default_arch = ''
    archs: Tuple[str, ...] = ()
    preset_hint = ''

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.preset in ('imagenet', 'demo'):
            raise ValueError(
                f"task {self.name!r}: preset {cfg.preset!r} is a classification recipe; use preset "
                f"{self.preset_hint!r} (--preset {self.preset_hint}) and override what you need"
            )
        self.arch = cfg.arch or self.default_arch
        if self.arch not in self.archs:
            raise ValueError(f"arch must be one of {self.archs} for task {self.name!r}, got {self.arch!r}")
        if not isinstance(cfg.dense_kwargs, dict):
            raise ValueError(f"dense_kwargs must be a mapping of builder keywords, got {cfg.dense_kwargs!r}")
        self.val_set = None

    def _root(self, kind: str) -> Path:
        cfg = self.cfg
        return digits_dense_root(cfg.output, kind) if cfg.data == 'digits' else Path(cfg.data)

    def _backbone_kwargs(self) -> Dict[str, Any]:
        cfg = self.cfg
        return dict(
            checkpoint_path=cfg.init_checkpoint,
            drop_path_rate=cfg.drop_path,
            **cfg.model_kwargs,
            **cfg.dense_kwargs,
        )

    # batches ------------------------------------------------------------------------------------------------
    def prepare_batch(self, x, y):
        return x, y

    def forward(self, model: nn.Module, x, y) -> Dict[str, torch.Tensor]:
        if self.cfg.norm_eval:
            _freeze_batchnorm(model)
        return model(x, y)

    def loss(self, output: Dict[str, torch.Tensor], y) -> torch.Tensor:
        return sum(v.float() for v in output.values())

    # schedule -----------------------------------------------------------------------------------------------
    def schedule(self, sched_kwargs, total_steps, steps_per_epoch):
        cfg = self.cfg
        kw = dict(sched_kwargs)
        if cfg.total_iters is not None:
            if not isinstance(cfg.total_iters, int) or cfg.total_iters < 1:
                raise ValueError(f"total_iters must be a positive integer, got {cfg.total_iters!r}")
            total_steps = cfg.total_iters if cfg.max_steps is None else min(cfg.total_iters, cfg.max_steps)
            kw['num_epochs'] = cfg.total_iters / steps_per_epoch
        if cfg.warmup_iters is not None:
            if not isinstance(cfg.warmup_iters, int) or cfg.warmup_iters < 0:
                raise ValueError(f"warmup_iters must be an integer >= 0, got {cfg.warmup_iters!r}")
            # mmcv's warm-up is not a prefix: the milestones and the poly decay count from step 0
            kw.update(warmup_epochs=cfg.warmup_iters / steps_per_epoch, warmup_prefix=False)
            if cfg.total_iters is None:
                kw['num_epochs'] = cfg.epochs
        if cfg.lr_milestones is not None:
            # timm's multistep decays when t + 1 passes a milestone (one update early); half an update later puts
            # the decay on the first update of the milestone epoch, as mmcv's step policy
            kw['decay_milestones'] = [(float(m) * steps_per_epoch + 0.5) / steps_per_epoch for m in cfg.lr_milestones]
        kw['decay_rate'] = cfg.decay_rate
        return kw, total_steps

    # checkpoints: the whole dense model ---------------------------------------------------------------------
    def checkpoint_weights(self, model, ema_model):
        weights = {'model': model.state_dict()}
        if ema_model is not None:
            weights['ema'] = ema_model.state_dict()
        return weights

    def load_checkpoint_weights(self, model, ema_model, weights):
        model.load_state_dict(weights['model'])
        if ema_model is not None:
            ema_model.load_state_dict(weights.get('ema', weights['model']))


@register_task('detection')
class DetectionTask(_DenseTask):
    """COCO detection / instance segmentation (see the module docstring)."""

    default_arch = 'mask_rcnn'
    preset_hint = 'coco_3x'

    def __init__(self, cfg):
        from ..dense import DETECTOR_ARCHS

        self.archs = DETECTOR_ARCHS
        super().__init__(cfg)
        self._train = None

    @staticmethod
    def collate_fn(batch):
        from ..data.coco import collate_detection

        return collate_detection(batch)

    def _train_set(self):
        if self._train is None:
            from ..data.coco import CocoDetection

            img_dir, ann = find_coco_split(self._root('coco'), 'train')
            self._train = CocoDetection(
                img_dir, ann, with_masks=self.arch != 'retinanet', filter_empty=True, on_error='skip'
            )
        return self._train

    def num_classes(self) -> int:
        return len(self._train_set().cat_ids)

    def build_datasets(self, data_cfg):
        from ..data.coco import TRAIN_SCALES, CocoDetection, detection_eval_transforms, detection_train_transforms

        cfg = self.cfg
        train = self._train_set()
        train.transforms = detection_train_transforms(
            scales=tuple(cfg.det_scales or TRAIN_SCALES),
            max_size=cfg.det_max_size,
            crop=cfg.det_crop,
            flip=cfg.hflip,
        )
        img_dir, ann = find_coco_split(self._root('coco'), 'val')
        self.val_set = CocoDetection(img_dir, ann, detection_eval_transforms(), with_masks=False, on_error='skip')
        if self.val_set.cat_ids != train.cat_ids:
            raise ValueError(
                f"data {cfg.data!r}: val categories {self.val_set.cat_ids} differ from train categories {train.cat_ids}"
            )
        return train, self.val_set

    def build_model(self, num_classes: int) -> nn.Module:
        from ..dense import create_detector

        return create_detector(self.cfg.model, self.arch, num_classes, **self._backbone_kwargs())

    def backbone(self, model):
        return model.backbone.backbone.body

    def to_device(self, x, y, device, channels_last=False):
        images = [im.to(device, non_blocking=True) for im in x]
        targets = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in y]
        return images, targets

    def evaluate(self, model, ema_model, val_loader, ctx: RunContext) -> Dict[str, Any]:
        rec = _detection_metrics(model, self.val_set, ctx, self.cfg.eval_max_images)
        if ema_model is not None:
            ema = _detection_metrics(ema_model, self.val_set, ctx, self.cfg.eval_max_images)
            rec.update({f"ema_{k}": v for k, v in ema.items()})
        return rec

    def summary(self, rec):
        parts = [f"box AP {rec['bbox_AP']:.3f} AP50 {rec['bbox_AP50']:.3f} AP75 {rec['bbox_AP75']:.3f}"]
        if 'segm_AP' in rec:
            parts.append(f"mask AP {rec['segm_AP']:.3f} AP50 {rec['segm_AP50']:.3f}")
        if 'ema_bbox_AP' in rec:
            parts.append(f"EMA box AP {rec['ema_bbox_AP']:.3f}")
        return '; '.join(parts)


def _detection_metrics(model, dataset, ctx: RunContext, max_images: Optional[int]) -> Dict[str, float]:
    """COCO AP over the val set, each rank running its share; the result lists are gathered before scoring."""
    from ..dense.evaluation import coco_eval, coco_results

    n = len(dataset) if max_images is None else min(int(max_images), len(dataset))
    indices = list(range(ctx.rank, n, ctx.world_size))
    boxes, segms, ids = coco_results(model, dataset, batch_size=2, indices=indices)
    if ctx.world_size > 1:
        gathered = [None] * ctx.world_size
        dist.all_gather_object(gathered, (boxes, segms, ids))
        boxes = [b for g in gathered for b in g[0]]
        segms = [s for g in gathered for s in g[1]]
        ids = [i for g in gathered for i in g[2]]
    rec = {f"bbox_{k}": v for k, v in coco_eval(dataset.coco, boxes, 'bbox', ids).items()}
    if getattr(getattr(model, 'roi_heads', None), 'has_mask', lambda: False)():
        rec.update({f"segm_{k}": v for k, v in coco_eval(dataset.coco, segms, 'segm', ids).items()})
    return rec


@register_task('segmentation')
class SegmentationTask(_DenseTask):
    """ADE20K-format semantic segmentation (see the module docstring)."""

    default_arch = 'upernet'
    preset_hint = 'ade20k_160k'

    def __init__(self, cfg):
        from ..dense import SEGMENTER_ARCHS

        self.archs = SEGMENTER_ARCHS
        super().__init__(cfg)

    @staticmethod
    def collate_fn(batch):
        from ..data.ade import collate_segmentation

        return collate_segmentation(batch)

    def num_classes(self) -> int:
        return 11 if self.cfg.data == 'digits' else self.cfg.seg_num_classes

    def build_datasets(self, data_cfg):
        from ..data.ade import ADESegmentation, segmentation_eval_transforms, segmentation_train_transforms

        cfg = self.cfg
        root = self._root('ade')
        common = dict(num_classes=self.num_classes(), reduce_zero_label=cfg.seg_reduce_zero_label, on_error='skip')
        tf = segmentation_train_transforms(
            scale=tuple(cfg.seg_scale),
            ratio_range=tuple(cfg.seg_ratio_range),
            crop_size=tuple(cfg.seg_crop),
            flip=cfg.hflip,
        )
        train = ADESegmentation(root, 'training', tf, **common)
        self.val_set = ADESegmentation(root, 'validation', segmentation_eval_transforms(), **common)
        return train, self.val_set

    def build_model(self, num_classes: int) -> nn.Module:
        from ..dense import create_segmenter

        return create_segmenter(self.cfg.model, self.arch, num_classes, **self._backbone_kwargs())

    def backbone(self, model):
        return model.backbone.body

    def to_device(self, x, y, device, channels_last=False):
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(device, non_blocking=True)

    def _metrics(self, model) -> Dict[str, float]:
        from ..dense import MS_RATIOS, evaluate_segmentation

        cfg = self.cfg
        common = dict(scale=tuple(cfg.seg_scale), max_images=cfg.eval_max_images)
        ss = evaluate_segmentation(model, self.val_set, self.num_classes(), **common)
        rec = {'mIoU': ss['mIoU'], 'mAcc': ss['mAcc'], 'aAcc': ss['aAcc']}
        if cfg.seg_eval_ms:
            n = self.num_classes()
            ms = evaluate_segmentation(model, self.val_set, n, ratios=MS_RATIOS, flip=cfg.seg_eval_flip, **common)
            rec.update(ms_mIoU=ms['mIoU'], ms_mAcc=ms['mAcc'], ms_aAcc=ms['aAcc'])
        return rec

    def evaluate(self, model, ema_model, val_loader, ctx: RunContext) -> Dict[str, Any]:
        rec: Dict[str, Any] = {}
        if ctx.is_main:
            rec = self._metrics(model)
            if ema_model is not None:
                rec.update({f"ema_{k}": v for k, v in self._metrics(ema_model).items()})
        if ctx.world_size > 1:
            box = [rec]
            dist.broadcast_object_list(box, src=0)
            rec = box[0]
        return rec

    def summary(self, rec):
        line = f"mIoU {rec['mIoU']:.3f} mAcc {rec['mAcc']:.3f} aAcc {rec['aAcc']:.3f}"
        if 'ms_mIoU' in rec:
            line += f"; multi-scale{' + flip' if self.cfg.seg_eval_flip else ''} mIoU {rec['ms_mIoU']:.3f}"
        if 'ema_mIoU' in rec:
            line += f"; EMA mIoU {rec['ema_mIoU']:.3f}"
        return line


def evaluate_dense(
    checkpoint: str,
    data: Optional[str] = None,
    use_ema: bool = False,
    multi_scale: Optional[bool] = None,
    max_images: Optional[int] = None,
    device: str = 'auto',
) -> Dict[str, Any]:
    """Evaluate a detection / segmentation training run (``msconv eval``): COCO AP or mIoU on its val split.

    Args:
        checkpoint: a run folder (its newest valid checkpoint) or a ``checkpoints/step-N`` folder.
        data: the dataset folder (default: the run's ``data``).
        use_ema: the EMA weights of the checkpoint.
        multi_scale: also multi-scale + flip mIoU (segmentation; default: the run's ``seg_eval_ms``).
        max_images: the first N val images only.
    """
    from .checkpoint import find_run_config, latest_good_checkpoint, load_checkpoint
    from .config import load_yaml, resolve_config
    from .distributed import resolve_device

    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        raise ValueError(f"checkpoint {str(ckpt)!r}: expected a run folder or a checkpoints/step-N folder")
    if (ckpt / 'checkpoints').is_dir():
        found = latest_good_checkpoint(ckpt)
        if found is None:
            raise ValueError(f"checkpoint: run folder {str(ckpt)!r} holds no valid checkpoint")
        path, weights, meta = found[0], found[1], found[3]
    else:
        path = ckpt
        weights, _, meta = load_checkpoint(ckpt)
    cfg_path = find_run_config(path)
    if cfg_path is None:
        raise ValueError(f"checkpoint {str(ckpt)!r}: no config.yaml of its run found beside it")
    run = load_yaml(cfg_path)
    if not issubclass(task_class(run.get('task', 'classification')), _DenseTask):
        raise ValueError(f"{cfg_path}: task {run.get('task')!r} is not a dense task")
    overrides: Dict[str, Any] = dict(resume=None, overwrite=False, init_checkpoint=None, drop_path=0.0)
    if data is not None:
        overrides['data'] = data
    if multi_scale is not None:
        overrides['seg_eval_ms'] = bool(multi_scale)
    if max_images is not None:
        overrides['eval_max_images'] = max_images
    cfg = resolve_config(run, overrides)
    task = task_class(cfg.task)(cfg)
    model = task.build_model(task.num_classes())
    key = 'ema' if use_ema else 'model'
    if key not in weights:
        raise ValueError(f"checkpoint {str(path)!r} holds no {key!r} weights (available: {sorted(weights)})")
    model.load_state_dict(weights[key])
    model.to(resolve_device(device))
    task.build_datasets({})
    rec = task.evaluate(model, None, None, RunContext(resolve_device(device)))
    res = dict(rec, task=cfg.task, arch=task.arch, checkpoint=str(path), step=int(meta['step']))
    if 'ms_mIoU' in rec:
        res['ms_flip'] = cfg.seg_eval_flip
    return res


def dense_run_task(checkpoint: str) -> Optional[str]:
    """'detection' / 'segmentation' when ``checkpoint`` (a run or step folder) belongs to a dense run, else None."""
    from .checkpoint import find_run_config
    from .config import load_yaml

    path = Path(checkpoint)
    if not path.is_dir():
        return None
    cfg_path = find_run_config(path)
    task = load_yaml(cfg_path).get('task', 'classification') if cfg_path is not None else 'classification'
    return task if issubclass(task_class(task), _DenseTask) else None


def format_dense_metrics(res: Dict[str, Any]) -> str:
    """The metric lines ``msconv eval`` prints for a dense run."""
    if res['task'] == 'detection':
        lines = []
        for kind, label in (('bbox', 'box'), ('segm', 'mask')):
            if f"{kind}_AP" in res:
                lines.append(
                    f"{res['arch']} {label}: "
                    + '  '.join(f"{k} {res[f'{kind}_{k}']:.3f}" for k in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'))
                )
        return '\n'.join(lines)
    line = f"{res['arch']}: mIoU {res['mIoU']:.3f}  mAcc {res['mAcc']:.3f}  aAcc {res['aAcc']:.3f}"
    if 'ms_mIoU' in res:
        ms = '  '.join(f"{k} {res[f'ms_{k}']:.3f}" for k in ('mIoU', 'mAcc', 'aAcc'))
        line += f"\n{res['arch']} multi-scale{' + flip' if res.get('ms_flip', True) else ''}: {ms}"
    return line
