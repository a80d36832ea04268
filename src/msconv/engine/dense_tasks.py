"""Detection and segmentation as engine tasks: ``msconv train MODEL --task detection|segmentation``.

Each task answers the trainer's questions (:mod:`msconv.engine.tasks`) with the library of :mod:`msconv.dense`:

=================  ===============================================  ===============================================
step               ``DetectionTask`` ('detection')                  ``SegmentationTask`` ('segmentation')
=================  ===============================================  ===============================================
data (``--data``)  a COCO folder: ``annotations/instances_{s}.json``  an ADE20K folder: ``images/{training,
                   + ``{s}/`` for s = train2017/val2017 (or          validation}/`` + ``annotations/...``
                   train/val); ``digits``: the digits COCO set      ``digits``: the digits ADE set (11 classes)
model (``--arch``) ``create_detector(model, arch, K)``: mask_rcnn,  ``create_segmenter(model, 'upernet', K)``
                   cascade_mask_rcnn, retinanet, atss, sparse_rcnn
batches            lists of images and target dicts (masks for the  stacked crops and (B, H, W) label maps
                   mask models only)
loss               sum of the detector's loss dict                  decode + 0.4 x auxiliary cross-entropy
evaluation         COCO box (and mask) AP, AP50, AP75, APs/m/l      mIoU / mAcc / aAcc, single scale (+ multi-scale
                                                                    and flip with ``seg_eval_ms``/``seg_eval_flip``)
checkpoint         the whole detector (``model`` / ``ema``)         the whole segmenter
=================  ===============================================  ===============================================

Model sizes and pipelines come from the config (``DetectionConfig`` / ``SegmentationConfig``: the options both
share, in ``DenseConfig``, and each one's own): ``model_kwargs`` go to the backbone (e.g. a nano SMT),
``dense_kwargs`` to ``create_detector`` / ``create_segmenter`` (e.g. ``min_size``, ``channels``),
``init_checkpoint`` is the backbone's ImageNet (or classification-run) checkpoint, ``drop_path`` its stochastic
depth. Recipes: ``preset='coco_3x'`` (default) / ``'coco_1x'`` and ``'ade20k_160k'``
(:mod:`msconv.engine.dense_recipes`), the only presets these tasks take, each following the config of the system
asked for; the optimizer's groups follow the configs' constructors (``param_groups``) and SyncBN the configs'
SyncBN (``convert_sync_batchnorm``). ``msconv eval`` of a run: ``evaluate_dense``; ``msconv demo --task``: the
systems fine-tuned from the nano SMT on digits canvases (``demo_runs``, run by :func:`msconv.engine.demo.dense_demo`).

Distributed evaluation: each rank runs the detector on its share of the val images and the COCO results are
gathered before scoring, so every rank reports the same AP; segmentation is scored on rank 0 and broadcast.
Exact single- vs multi-process equivalence of training holds where the maths is per image or normalised over the
processes: RetinaNet's, ATSS's and Sparse R-CNN's losses are sums over the batch divided by counts averaged over
the processes; the R-CNNs sample anchors and RoIs with each rank's own random stream, and BatchNorm (in the
backbones and the UperNet heads) needs SyncBatchNorm (CUDA) or ``norm_eval`` to be rank-independent.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from ..data.ade import (
    ADESegmentation,
    collate_segmentation,
    segmentation_eval_transforms,
    segmentation_train_transforms,
)
from ..data.coco import (
    TRAIN_SCALES,
    CocoDetection,
    collate_detection,
    detection_eval_transforms,
    detection_train_transforms,
)
from ..data.dense_digits import build_digits_ade, build_digits_coco
from ..data.skips import EVAL_THRESHOLD_HINT
from ..dense import (
    DETECTOR_ARCHS,
    MASK_ARCHS,
    MS_RATIOS,
    SEGMENTER_ARCHS,
    create_detector,
    create_segmenter,
    evaluate_segmentation,
)
from ..dense.evaluation import coco_eval, coco_results
from ..dense.sync_bn import convert_sync_batchnorm
from . import dense_recipes  # noqa: F401  (registers the presets 'coco_3x' and 'ade20k_160k')
from .checkpoint import find_run_config, latest_good_checkpoint, load_checkpoint
from .config import TrainConfig, family_of, load_yaml, option, require, resolve_config
from .demo import dense_demo
from .distributed import resolve_device
from .optim import layer_decay_groups, shiftwise_layer_id, weight_decay_groups
from .registry import register_task, task_class
from .tasks import RunContext, Task, evaluate_run, task_of_run

__all__ = [
    'DenseConfig',
    'DetectionConfig',
    'SegmentationConfig',
    'DetectionTask',
    'SegmentationTask',
    'find_coco_split',
    'digits_dense_root',
    'evaluate_dense',
]

# digits sets written for ``--data digits`` (the demo writes its own, sized for its targets)
_DIGITS_SIZES = dict(n_train=400, n_val=50, canvas=(128, 128), digit_size=(36, 72))


@dataclass
class DenseConfig(TrainConfig):
    """``TrainConfig`` plus the options detection and segmentation share (their pipelines and mmcv's schedules)."""

    dense_kwargs: Dict[str, Any] = option(
        factory=dict, help='create_detector / create_segmenter keywords (e.g. min_size, channels)'
    )
    eval_max_images: Optional[int] = option(None, help='evaluate on the first N val images only')
    norm_eval: bool = option(False, help="BatchNorm layers in eval mode while training (mmdet's norm_eval)")
    warmup_iters: Optional[int] = option(None, help='warm-up length in optimizer steps (replaces warmup_epochs)')
    total_iters: Optional[int] = option(None, help='schedule length in optimizer steps (replaces epochs)')
    lr_milestones: Optional[List[float]] = option(
        None, help="sched 'multistep': epochs at which the lr is multiplied by decay_rate"
    )
    decay_rate: float = option(0.1, help="the multistep factor, or the power of sched 'poly'")
    warmup_ratio: Optional[float] = option(
        None, help="the warm-up starts at lr x warmup_ratio (mmcv's warmup_ratio; sets warmup_lr)"
    )
    eval_every_iters: Optional[int] = option(None, help='evaluate every N optimizer steps (replaces eval_every)')
    wd_exclude_1d: bool = option(
        True,
        help="no weight decay for 1-D parameters and biases (timm's rule, the ShiftwiseConv configs); false: every "
        "parameter decays but those of wd_exclude_keys (mmcv's default constructor, the SMT configs)",
    )
    wd_exclude_keys: List[str] = option(
        factory=list, help="no weight decay for parameters whose name contains one of these (mmcv's custom_keys)"
    )
    layer_decay: Optional[float] = option(
        None, help='layer-wise lr decay rate over a ShiftWise backbone (the SW configs: 0.8 for Cascade, 1 for UperNet)'
    )
    layer_decay_layers: int = option(12, help="layer_decay: the constructor's num_layers (SW configs: 12; UperNet 9)")

    def __post_init__(self) -> None:
        # mmcv's warm-up starts at warmup_ratio x the learning rate, whatever the learning rate is
        if isinstance(self.warmup_ratio, (int, float)) and isinstance(self.lr, (int, float)):
            self.warmup_lr = self.lr * self.warmup_ratio

    def validate(self, check_paths: bool = True) -> None:
        super().validate(check_paths)
        require(
            self.warmup_ratio is None or (isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio <= 1),
            f"warmup_ratio must be a fraction in [0, 1] or None, got {self.warmup_ratio!r}",
        )
        require(
            self.eval_every_iters is None or (isinstance(self.eval_every_iters, int) and self.eval_every_iters >= 1),
            f"eval_every_iters must be a positive integer or None, got {self.eval_every_iters!r}",
        )
        require(
            isinstance(self.wd_exclude_keys, (list, tuple)) and all(isinstance(k, str) for k in self.wd_exclude_keys),
            f"wd_exclude_keys must be a list of strings, got {self.wd_exclude_keys!r}",
        )
        require(
            self.layer_decay is None or (isinstance(self.layer_decay, (int, float)) and 0 < self.layer_decay <= 1),
            f"layer_decay must be in (0, 1] or None, got {self.layer_decay!r}",
        )
        require(
            self.layer_decay is None or family_of(self.model) == 'shiftwise',
            f"layer_decay follows the ShiftwiseConv configs' layer ids and needs a shiftwise_* backbone, not "
            f"{self.model!r} (set layer_decay to None)",
        )
        require(
            isinstance(self.layer_decay_layers, int) and self.layer_decay_layers >= 3,
            f"layer_decay_layers must be an integer >= 3, got {self.layer_decay_layers!r}",
        )
        require(
            isinstance(self.dense_kwargs, dict),
            f"dense_kwargs must be a mapping of builder keywords, got {self.dense_kwargs!r}",
        )
        require(
            self.total_iters is None or (isinstance(self.total_iters, int) and self.total_iters >= 1),
            f"total_iters must be a positive integer, got {self.total_iters!r}",
        )
        require(
            self.warmup_iters is None or (isinstance(self.warmup_iters, int) and self.warmup_iters >= 0),
            f"warmup_iters must be an integer >= 0, got {self.warmup_iters!r}",
        )


@dataclass
class DetectionConfig(DenseConfig):
    """``TrainConfig`` plus the options of COCO detection / instance segmentation."""

    arch: str = option('mask_rcnn', choices=DETECTOR_ARCHS, flag='--arch', help='the detector')
    det_scales: Optional[List[int]] = option(None, help='training shorter sides (None: 480..800 step 32)')
    det_max_size: int = option(1333, help='training longer-side cap')
    det_crop: bool = option(True, help="the 3x configs' resize + crop branch")


@dataclass
class SegmentationConfig(DenseConfig):
    """``TrainConfig`` plus the options of ADE20K-format semantic segmentation."""

    arch: str = option('upernet', choices=SEGMENTER_ARCHS, flag='--arch', help='the segmenter')
    seg_scale: Tuple[int, int] = option((2048, 512), help='rescale scale (train, x ratio) and test scale')
    seg_ratio_range: Tuple[float, float] = option((0.5, 2.0), help='training rescale ratio range')
    seg_crop: Tuple[int, int] = option((512, 512), help='training crop')
    seg_num_classes: int = option(150, help='classes (ADE20K: 150)')
    seg_reduce_zero_label: bool = option(True, help='label 0 is "other" and ignored (ADE20K)')
    seg_eval_ms: bool = option(False, help='also report multi-scale + flip mIoU at each evaluation')
    seg_eval_flip: bool = option(True, help='the multi-scale evaluation also averages the flipped images')
    seg_eval_mode: str = option(
        'whole', choices=('whole', 'slide'), help="evaluation: the whole image, or 'slide' windows (crop, stride)"
    )
    seg_slide_crop: Tuple[int, int] = option((512, 512), help="seg_eval_mode 'slide': the window")
    seg_slide_stride: Tuple[int, int] = option((341, 341), help="seg_eval_mode 'slide': the stride")


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


def digits_dense_root(output: Union[str, Path], task: Union[str, Type['_DenseTask']]) -> Path:
    """The digits set of ``task`` ('detection': COCO files, 'segmentation': ADE20K files) under
    ``output/_digits``, written once.

    Written to a temporary folder and renamed into place, so concurrent ranks never see half a set."""
    cls = task_class(task) if isinstance(task, str) else task
    root = Path(output) / '_digits' / cls.digits_folder
    if (root / '.complete').is_file():
        return root
    tmp = root.parent / f".tmp-{cls.digits_folder}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    cls.write_digits(tmp, **_DIGITS_SIZES)
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
    """What detection and segmentation share: their own presets, whole-model checkpoints, the schedule hook,
    ``msconv eval`` of a run and the digits demo."""

    default_preset = ''
    own_presets_only = True
    digits_folder = ''  # where --data digits and the demo write this task's digits set
    # the demo: arch -> the metric and target it reaches, and the engine run's overrides (msconv.engine.demo)
    demo_runs: Dict[str, Dict[str, Any]] = {}
    demo_digits: Dict[str, Any] = {}  # this task's own geometry of the demo's digits canvases

    def __init__(self, cfg):
        super().__init__(cfg)
        self.arch = cfg.arch
        self.val_set = None

    @staticmethod
    def write_digits(root: Path, n_train: int, n_val: int, **geometry) -> Path:
        """Write a digits set of this task's format under ``root`` (``msconv.data.dense_digits``)."""
        raise NotImplementedError

    def _root(self) -> Path:
        cfg = self.cfg
        return digits_dense_root(cfg.output, type(self)) if cfg.data == 'digits' else Path(cfg.data)

    def _backbone_kwargs(self) -> Dict[str, Any]:
        cfg = self.cfg
        return dict(
            checkpoint_path=cfg.init_checkpoint,
            drop_path_rate=cfg.drop_path,
            **cfg.model_kwargs,
            **cfg.dense_kwargs,
        )

    def param_groups(self, model: nn.Module) -> List[Dict[str, Any]]:
        """Weight decay as the run's config says (``wd_exclude_1d``, ``wd_exclude_keys``: timm's or mmcv's rule) and,
        with ``layer_decay``, the ShiftwiseConv configs' layer-wise learning-rate scales."""
        cfg = self.cfg
        groups = weight_decay_groups(model, cfg.weight_decay, cfg.wd_exclude_1d, cfg.wd_exclude_keys)
        if cfg.layer_decay is None:
            return groups
        net = self.backbone(model).model  # the ShiftWiseNet inside timm's feature wrapper
        layer_of = {id(p): shiftwise_layer_id(n, cfg.layer_decay_layers) for n, p in net.named_parameters()}
        return layer_decay_groups(groups, layer_of, cfg.layer_decay, cfg.layer_decay_layers)

    def convert_sync_batchnorm(self, model: nn.Module) -> nn.Module:
        """SyncBatchNorm where the official config of this system has SyncBN (:mod:`msconv.dense.sync_bn`)."""
        return convert_sync_batchnorm(model, self.cfg.model, self.arch)

    def eval_due(self, step: int, steps_per_epoch: int) -> bool:
        if self.cfg.eval_every_iters is not None:
            return step % self.cfg.eval_every_iters == 0
        return super().eval_due(step, steps_per_epoch)

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
            total_steps = cfg.total_iters if cfg.max_steps is None else min(cfg.total_iters, cfg.max_steps)
            kw['num_epochs'] = cfg.total_iters / steps_per_epoch
        if cfg.warmup_iters is not None:
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

    def recipe_line(self) -> str:
        cfg = self.cfg
        iters = f", {cfg.total_iters} steps" if cfg.total_iters is not None else ''
        warm = f", warm-up {cfg.warmup_iters} steps" if cfg.warmup_iters is not None else ''
        if cfg.warmup_ratio is not None:
            warm += f" from lr x {cfg.warmup_ratio:g}"
        steps = f", milestones {cfg.lr_milestones}" if cfg.lr_milestones is not None else ''
        if cfg.wd_exclude_1d:
            wd = 'no weight decay for 1-D parameters and biases'
        else:
            wd = 'weight decay on every parameter'
        if cfg.wd_exclude_keys:
            wd += f" but names containing {', '.join(cfg.wd_exclude_keys)}"
        layers = (
            ''
            if cfg.layer_decay is None
            else f", layer-wise lr decay {cfg.layer_decay:g} over {cfg.layer_decay_layers}"
        )
        every = f", evaluation every {cfg.eval_every_iters} steps" if cfg.eval_every_iters is not None else ''
        return (
            f"arch {self.arch}{iters}{warm}{steps}, decay rate {cfg.decay_rate:g}, norm_eval {cfg.norm_eval}{every}\n"
            f"  {wd}{layers}"
        )

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

    # outside a run ------------------------------------------------------------------------------------------
    @classmethod
    def _evaluate_run(
        cls, checkpoint: str, overrides: Dict[str, Any], use_ema: bool, device: str
    ) -> Tuple['_DenseTask', Dict[str, Any]]:
        """Build the run's system from its config.yaml (with ``overrides``), load the checkpoint's weights and
        evaluate on its val split."""
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
        if run.get('task') != cls.name:
            raise ValueError(f"{cfg_path}: task {run.get('task')!r} is not {cls.name!r}")
        overrides = dict(overrides, resume=None, overwrite=False, init_checkpoint=None, drop_path=0.0)
        task = cls(resolve_config(run, overrides))
        model = task.build_model(task.num_classes())
        key = 'ema' if use_ema else 'model'
        if key not in weights:
            raise ValueError(f"checkpoint {str(path)!r} holds no {key!r} weights (available: {sorted(weights)})")
        model.load_state_dict(weights[key])
        model.to(resolve_device(device))
        task.build_datasets({})
        skips = task.val_set.skips  # what the val split cannot use: named, counted, refused past the run's threshold
        skips.threshold = task.cfg.bad_image_threshold
        skips.check('val', hint=EVAL_THRESHOLD_HINT)
        rec = task.evaluate(model, None, None, RunContext(resolve_device(device)))
        skips.check('val', hint=EVAL_THRESHOLD_HINT)
        res = dict(rec, task=cls.name, arch=task.arch, checkpoint=str(path), step=int(meta['step']), use_ema=use_ema)
        return task, dict(res, **skips.metrics())

    @classmethod
    def demo(
        cls,
        archs: Optional[Sequence[str]] = None,
        output: str = 'runs/demo_dense',
        pretrained: Optional[str] = None,
        max_steps: Optional[int] = None,
        threads: Optional[int] = 1,
        progress: bool = True,
        device: str = 'cpu',
    ) -> Dict[str, Any]:
        res = dense_demo(
            task=cls.name,
            archs=archs,
            output=output,
            pretrained=pretrained,
            max_steps=max_steps,
            threads=threads,
            progress=progress,
            device=device,
        )
        res['summary'] = (
            f"total time {res['total_time_s']:.0f}s (data {res['data_time_s']:.0f}s); backbone {res['backbone']}"
        )
        res['ok'] = True
        return res


# The demo's detection runs: the digits canvases' tight ink boxes (median 26x33 px) all match best on RetinaNet's P3
# anchors (32-50 px); 84% have an anchor at IoU >= 0.5, the narrow 1s only their best one (torchvision's low-quality
# matches). No flips (hflip=0): digits are not mirror-symmetric, and with the configs' flips a flipped 2 is taught
# as a 2 that reads 5.
_DET_DEMO = dict(
    preset='coco_3x',
    batch_size=8,
    lr=1e-3,
    warmup_iters=50,  # from lr x 0.001 (the preset's warmup_ratio)
    hflip=0.0,  # digits are not mirror-symmetric (a flipped 2 reads as a 5): no flips, unlike the configs' 0.5
    det_scales=[112, 128, 144],
    det_max_size=200,
    det_crop=False,
    dense_kwargs=dict(min_size=128, max_size=128, channels=64, fc_channels=256, rois_per_image=64, test_proposals=100),
)


@register_task('detection')
class DetectionTask(_DenseTask):
    """COCO detection and instance segmentation: Mask R-CNN, Cascade Mask R-CNN, RetinaNet, ATSS or Sparse R-CNN on
    an msconv backbone (see the module docstring)."""

    config_class = DetectionConfig
    default_preset = 'coco_3x'
    headline_metrics = ('bbox_AP', 'bbox_AP50', 'segm_AP')
    digits_folder = 'coco'
    demo_runs = {
        'mask_rcnn': dict(
            metric='bbox_AP50',
            target=0.8,
            overrides=dict(_DET_DEMO, arch='mask_rcnn', epochs=4, lr_milestones=[3], eval_every=2),
        ),
        'retinanet': dict(
            metric='bbox_AP50',
            target=0.8,
            overrides=dict(
                _DET_DEMO,
                arch='retinanet',
                epochs=10,
                lr_milestones=[8],
                eval_every=2,
                # torchvision's RetinaNet v2 head (GroupNorm): the configs' plain head reached AP50 0.12 in 4 epochs
                dense_kwargs=dict(_DET_DEMO['dense_kwargs'], head_norm=True),
            ),
        ),
        # ATSS and Sparse R-CNN run when asked for (--archs atss sparse_rcnn): the default demo stays at two systems
        # the config's ATSS head as it is (GroupNorm, 64 channels: two per group)
        'atss': dict(
            metric='bbox_AP50',
            target=0.8,
            default=False,
            overrides=dict(_DET_DEMO, arch='atss', epochs=10, lr_milestones=[8], eval_every=2),
        ),
        # 20 learnable proposals (the canvases hold 1-3 digits; the configs: 100 / 300): with 100, one step of 8
        # images took 11 s on one busy core, most of it in the six stages' RoIAlign backward and dynamic convs.
        # lr 2.5e-4: 10x the config's, as the other systems' 1e-3 are 5-10x theirs (at 1e-3: AP50 0.00003 after
        # 200 steps, 0.022 at 2.5e-4). Its one-to-one matching learns to score duplicates down slowly: AP50 0.841
        # after these 1200 steps (x0.1 after 10 of 12 epochs); 0.743 after 800 (x0.1 after 7 of 8), 0.515 after 600
        # (docs/dense.md, the digits demo)
        'sparse_rcnn': dict(
            metric='bbox_AP50',
            target=0.8,
            default=False,
            overrides=dict(
                _DET_DEMO,
                arch='sparse_rcnn',
                lr=2.5e-4,
                epochs=12,
                lr_milestones=[10],
                eval_every=2,
                dense_kwargs=dict(_DET_DEMO['dense_kwargs'], num_proposals=20),
            ),
        ),
    }

    def __init__(self, cfg):
        super().__init__(cfg)
        self._train = None

    @staticmethod
    def collate_fn(batch):
        return collate_detection(batch)

    @staticmethod
    def write_digits(root: Path, n_train: int, n_val: int, **geometry) -> Path:
        build_digits_coco(root, 'train', n_images=n_train, seed=0, **geometry)
        build_digits_coco(root, 'val', n_images=n_val, seed=1, **geometry)
        return Path(root)

    def _train_set(self):
        if self._train is None:
            img_dir, ann = find_coco_split(self._root(), 'train')
            self._train = CocoDetection(
                img_dir, ann, with_masks=self.arch in MASK_ARCHS, filter_empty=True, on_error='skip'
            )
        return self._train

    def num_classes(self) -> int:
        return len(self._train_set().cat_ids)

    def build_datasets(self, data_cfg):
        cfg = self.cfg
        train = self._train_set()
        train.transforms = detection_train_transforms(
            scales=tuple(cfg.det_scales or TRAIN_SCALES),
            max_size=cfg.det_max_size,
            crop=cfg.det_crop,
            flip=cfg.hflip,
        )
        img_dir, ann = find_coco_split(self._root(), 'val')
        self.val_set = CocoDetection(
            img_dir, ann, detection_eval_transforms(), with_masks=False, on_error='skip', exclude=True
        )
        if self.val_set.cat_ids != train.cat_ids:
            raise ValueError(
                f"data {cfg.data!r}: val categories {self.val_set.cat_ids} differ from train categories {train.cat_ids}"
            )
        return train, self.val_set

    def build_model(self, num_classes: int) -> nn.Module:
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

    @classmethod
    def evaluate_run(
        cls,
        model: Optional[str],
        checkpoint: Optional[str],
        data: Optional[str] = None,
        use_ema: bool = False,
        max_images: Optional[int] = None,
        device: str = 'auto',
        bad_image_threshold: Optional[float] = None,
    ) -> Dict[str, Any]:
        """COCO box (and mask) AP of a detection run's checkpoint on its val split (``model``: the run's)."""
        overrides = dict(data=data, eval_max_images=max_images, bad_image_threshold=bad_image_threshold)
        return cls._evaluate_run(checkpoint, {k: v for k, v in overrides.items() if v is not None}, use_ema, device)[1]

    @classmethod
    def format_evaluation(cls, res: Dict[str, Any]) -> str:
        lines = [f"weights: {res['checkpoint']} (step {res['step']}){', EMA' if res.get('use_ema') else ''}"]
        for kind, label in (('bbox', 'box'), ('segm', 'mask')):
            if f"{kind}_AP" in res:
                lines.append(
                    f"{res['arch']} {label}: "
                    + '  '.join(f"{k} {res[f'{kind}_{k}']:.3f}" for k in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'))
                )
        return '\n'.join(lines + _skipped_lines(res))


def _detection_metrics(model, dataset, ctx: RunContext, max_images: Optional[int]) -> Dict[str, float]:
    """COCO AP over the val set, each rank running its share; the result lists are gathered before scoring."""
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
    """ADE20K-format semantic segmentation: UperNet on an msconv backbone (see the module docstring)."""

    config_class = SegmentationConfig
    default_preset = 'ade20k_160k'
    headline_metrics = ('mIoU', 'aAcc', 'ms_mIoU')
    digits_folder = 'ade'
    # Segmentation labels a digit's strokes dilated by 3 px: MNIST strokes are 2-3 px at 28 px, 4-8 px on the demo's
    # canvases, about one cell of the stride-4 maps the UperNet head upsamples from.
    demo_digits = dict(label_dilation=3)
    demo_runs = {
        'upernet': dict(
            metric='mIoU',
            target=0.7,
            overrides=dict(
                preset='ade20k_160k',
                arch='upernet',
                batch_size=8,
                epochs=1,
                total_iters=1000,
                lr=1e-3,
                warmup_iters=50,
                warmup_ratio=1e-3,
                weight_decay=0.01,
                seg_scale=(256, 128),
                # the test scale +-25%: the configs' 0.5-2.0 takes 128 px crops of canvases up to 256 px, where
                # digits up to 144 px are cut and lose their identity
                seg_ratio_range=(0.75, 1.25),
                seg_crop=(128, 128),
                seg_num_classes=11,
                hflip=0.0,  # digits are not mirror-symmetric: no flips in training nor in the multi-scale test
                seg_eval_ms=True,
                seg_eval_flip=False,
                eval_every_iters=1000,  # at the end
                # torch's classifier init, not mmseg's N(0, 0.01): with it this UperNet settles on the background
                # in 1000 steps (mIoU 0.10; the one departure from the configs' system in this demo)
                dense_kwargs=dict(channels=64, aux_channels=32, classifier_init='torch'),
            ),
        ),
    }

    @staticmethod
    def collate_fn(batch):
        return collate_segmentation(batch)

    @staticmethod
    def write_digits(root: Path, n_train: int, n_val: int, **geometry) -> Path:
        build_digits_ade(root, 'training', n_images=n_train, seed=0, **geometry)
        build_digits_ade(root, 'validation', n_images=n_val, seed=1, **geometry)
        return Path(root)

    def num_classes(self) -> int:
        return 11 if self.cfg.data == 'digits' else self.cfg.seg_num_classes

    def build_datasets(self, data_cfg):
        cfg = self.cfg
        root = self._root()
        common = dict(num_classes=self.num_classes(), reduce_zero_label=cfg.seg_reduce_zero_label, on_error='skip')
        tf = segmentation_train_transforms(
            scale=tuple(cfg.seg_scale),
            ratio_range=tuple(cfg.seg_ratio_range),
            crop_size=tuple(cfg.seg_crop),
            flip=cfg.hflip,
        )
        train = ADESegmentation(root, 'training', tf, **common)
        self.val_set = ADESegmentation(root, 'validation', segmentation_eval_transforms(), exclude=True, **common)
        return train, self.val_set

    def build_model(self, num_classes: int) -> nn.Module:
        return create_segmenter(self.cfg.model, self.arch, num_classes, **self._backbone_kwargs())

    def backbone(self, model):
        return model.backbone.body

    def to_device(self, x, y, device, channels_last=False):
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(device, non_blocking=True)

    def _metrics(self, model) -> Dict[str, float]:
        cfg = self.cfg
        common = dict(scale=tuple(cfg.seg_scale), max_images=cfg.eval_max_images)
        mode = dict(mode=cfg.seg_eval_mode, crop_size=tuple(cfg.seg_slide_crop), stride=tuple(cfg.seg_slide_stride))
        ss = evaluate_segmentation(model, self.val_set, self.num_classes(), **common, **mode)
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

    @classmethod
    def evaluate_run(
        cls,
        model: Optional[str],
        checkpoint: Optional[str],
        data: Optional[str] = None,
        use_ema: bool = False,
        multi_scale: Optional[bool] = None,
        max_images: Optional[int] = None,
        device: str = 'auto',
        bad_image_threshold: Optional[float] = None,
    ) -> Dict[str, Any]:
        """mIoU / mAcc / aAcc of a segmentation run's checkpoint on its val split (``multi_scale``: also multi-scale
        + flip; default: the run's ``seg_eval_ms``)."""
        overrides = dict(
            data=data, eval_max_images=max_images, seg_eval_ms=multi_scale, bad_image_threshold=bad_image_threshold
        )
        overrides = {k: v for k, v in overrides.items() if v is not None}
        task, res = cls._evaluate_run(checkpoint, overrides, use_ema, device)
        if 'ms_mIoU' in res:
            res['ms_flip'] = task.cfg.seg_eval_flip
        return res

    @classmethod
    def format_evaluation(cls, res: Dict[str, Any]) -> str:
        line = f"{res['arch']}: mIoU {res['mIoU']:.3f}  mAcc {res['mAcc']:.3f}  aAcc {res['aAcc']:.3f}"
        if 'ms_mIoU' in res:
            ms = '  '.join(f"{k} {res[f'ms_{k}']:.3f}" for k in ('mIoU', 'mAcc', 'aAcc'))
            line += f"\n{res['arch']} multi-scale{' + flip' if res.get('ms_flip', True) else ''}: {ms}"
        weights = f"weights: {res['checkpoint']} (step {res['step']}){', EMA' if res.get('use_ema') else ''}"
        return '\n'.join([weights, line] + _skipped_lines(res))


def _skipped_lines(res: Dict[str, Any]) -> List[str]:
    """The line of a dense evaluation saying what the val split could not use (named in the warnings), if any."""
    files, anns = res.get('skipped_files') or 0, res.get('skipped_annotations') or 0
    if not files and not anns:
        return []
    return [f"left out (named above): {files} unusable val file(s), {anns} unusable annotation(s)"]


def evaluate_dense(
    checkpoint: str,
    data: Optional[str] = None,
    use_ema: bool = False,
    multi_scale: Optional[bool] = None,
    max_images: Optional[int] = None,
    device: str = 'auto',
) -> Dict[str, Any]:
    """Evaluate a detection / segmentation training run (what ``msconv eval`` does for one): COCO AP or mIoU on
    its val split.

    Args:
        checkpoint: a run folder (its newest valid checkpoint) or a ``checkpoints/step-N`` folder.
        data: the dataset folder (default: the run's ``data``).
        use_ema: the EMA weights of the checkpoint.
        multi_scale: also multi-scale + flip mIoU (segmentation; default: the run's ``seg_eval_ms``).
        max_images: the first N val images only.
    """
    task = task_of_run(checkpoint)
    if not issubclass(task, _DenseTask):
        raise ValueError(f"checkpoint {str(checkpoint)!r}: task {task.name!r} is not a dense task")
    options = dict(data=data, use_ema=use_ema, multi_scale=multi_scale, max_images=max_images, device=device)
    return evaluate_run(None, checkpoint, **options)[1]
