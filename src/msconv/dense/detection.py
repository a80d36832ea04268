"""COCO detectors with msconv backbones: Mask R-CNN, Cascade Mask R-CNN and RetinaNet, as in the SMT and
ShiftwiseConv papers' official mmdetection 2.x configs, built on torchvision's detection models; ATSS and Sparse
R-CNN, the SMT paper's other two systems, in :mod:`msconv.dense.atss` and :mod:`msconv.dense.sparse_rcnn`.

``create_detector(backbone, arch, num_classes)`` returns a torchvision-style detector:

* ``model(images, targets)`` in train mode -> dict of losses (sum them to train). ``images`` is a list of float
  (3, H, W) tensors in [0, 1] (the model normalizes with the ImageNet mean/std and pads to a multiple of 32);
  ``targets`` a list of dicts with ``boxes`` (N, 4) XYXY float, ``labels`` (N,) int64 in 1..num_classes and, for
  the mask models, ``masks`` (N, H, W) uint8.
* ``model(images)`` in eval mode -> list of dicts with ``boxes``, ``labels`` (1..num_classes), ``scores`` and
  ``masks`` (N, 1, H, W) probabilities for the mask models, in the coordinates of the given images.

Training images are resized by the data pipeline (``msconv.data.coco.detection_train_transforms``: the configs'
multi-scale 480-800 resize / crop and flips), so the model does not resize them again; evaluation images are
resized by the model to the test scale (shorter side ``min_size=800``, longer at most ``max_size=1333``) and the
predictions are mapped back to the input image.

What follows each config (``detection/configs/*_smt_s_fpn.py`` in AFeng-x/SMT and
``downstream/detection/configs/cascade_mask_rcnn_sw_*`` in lidc54/shift-wiseConv):

* **mask_rcnn**: FPN 256 with 5 levels (P6 max-pool), RPN with 3 anchors per location (sizes 32-512, ratios
  0.5/1/2), 2000 pre-NMS per level and 1000 post-NMS proposals in training and test, NMS 0.7; RoIAlign 7x7 and
  14x14 with adaptive sampling; ``Shared2FCBBoxHead`` (two 1024 fcs), class-specific regression with stds
  (0.1, 0.1, 0.2, 0.2); 512 RoIs at 25% positives; ``FCNMaskHead`` with 4 convs; test score 0.05, NMS 0.5, 100
  detections.
* **cascade_mask_rcnn**: the same RPN (2000 post-NMS proposals in training, smooth-L1 loss, border-crossing
  anchors ignored) and three stages (see :mod:`msconv.dense.cascade`): IoU 0.5/0.6/0.7, ``Shared4Conv1FC`` heads
  with BatchNorm, GIoU loss, one mask head per stage.
* **retinanet**: FPN over C3-C5 plus P6/P7 convs on C5, 9 anchors per location (3 scales x 3 ratios, base 4x
  stride), 4 stacked convs per branch, focal loss (alpha 0.25, gamma 2), IoU 0.5/0.4 assignment, L1 box loss.

Mask R-CNN trains its RPN and box head with the config's L1 losses (:mod:`msconv.dense.rcnn`; ``box_loss=
'smooth_l1'`` gives torchvision's). The Cascade RPN leaves border-crossing anchors out of training
(``allowed_border=0``), as its config. Where torchvision's parts compute differently from mmdetection 2.x, the
systems follow mmdet (checked against the official configs run in mmdet 2.28.2: ``tests/test_dense_reference.py``):
unrounded anchors at the configured strides and mmdet's low-quality matches (:mod:`msconv.dense.anchors`),
RoIAlign with ``aligned=True`` and mmdet's level rule (:mod:`msconv.dense.poolers`), aligned binary mask targets
and mmdet's mask pasting (:mod:`msconv.dense.masks`), P7 on P6 without ReLU, RetinaNet losses over the batch's
positives, mmdet's initialisation of the FPN and heads. What remains of torchvision's: the R-CNN regression layers
carry a background block (4 x 1024 + 4 parameters, never read), and the RPN drops proposals under 1e-3 pixel where
mmdet drops those of zero size. Official mmdet checkpoints convert with
:func:`msconv.dense.convert.convert_official_dense`.

Interface for the engine's task strategy: ``build_model = create_detector``; datasets and collate from
:mod:`msconv.data.coco`; ``loss = sum(model(images, targets).values())``; ``evaluate_coco`` from
:mod:`msconv.dense.evaluation`.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import boxes as box_ops
from torchvision.ops import sigmoid_focal_loss

from .anchors import MaxIoUMatcher, retinanet_anchor_generator, rpn_anchor_generator
from .cascade import CASCADE_IOUS, CASCADE_LOSS_WEIGHTS, CASCADE_STDS, CascadeRoIHeads, CascadeStage
from .losses import mean_over_processes
from .necks import BackboneWithFPN, create_backbone
from .poolers import AlignedRoIAlign
from .rcnn import (
    BorderRegionProposalNetwork,
    L1RegionProposalNetwork,
    L1RoIHeads,
    MMDetTransform,
    init_box_head_,
    init_box_predictor_,
    init_mask_predictor_,
)

__all__ = [
    'create_detector',
    'DETECTOR_ARCHS',
    'MASK_ARCHS',
    'RetinaNetDetector',
    'MaskRCNNDetector',
    'CascadeMaskRCNN',
    'IMAGENET_MEAN',
    'IMAGENET_STD',
    'config_drop_path_rate',
]

DETECTOR_ARCHS = ('mask_rcnn', 'cascade_mask_rcnn', 'retinanet', 'atss', 'sparse_rcnn')
MASK_ARCHS = ('mask_rcnn', 'cascade_mask_rcnn')  # the detectors that train on instance masks
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# drop_path_rate of the official dense configs, per backbone family (SMT-S/B: 0.2; SW-T: 0.4)
_CONFIG_DROP_PATH = {'smt': 0.2, 'shiftwise': 0.4}


def config_drop_path_rate(model_name: str) -> Optional[float]:
    """The backbone drop-path rate of the official dense configs for this family (None: the model's default)."""
    from msconv.models._registry import _MODEL_FAMILY

    family = _MODEL_FAMILY.get(model_name.split('.')[0])
    return _CONFIG_DROP_PATH.get(family)


# The configs' RPN (both R-CNNs): IoU 0.7/0.3 assignment, 256 anchors per image at 1:1, 2000 proposals before NMS
# at 0.7 in training, 1000 at test; the proposals kept after NMS differ per detector.
_RPN_ASSIGNER = dict(
    fg_iou_thresh=0.7,
    bg_iou_thresh=0.3,
    batch_size_per_image=256,
    positive_fraction=0.5,
    pre_nms_top_n=dict(training=2000, testing=1000),
    nms_thresh=0.7,
)


class RetinaNetDetector(RetinaNet):
    """torchvision's RetinaNet with labels 1..K in and out, as the R-CNNs (its classifier has K columns, as
    mmdet's sigmoid RetinaHead; torchvision indexes the columns by label, so labels are shifted by one), and
    mmdet's loss normalisation: the focal and L1 box losses summed over every image of the batch and divided by
    the number of positive anchors per process, averaged over the processes (mmdet's ``reduce_mean``; at least 1),
    where torchvision divides each image's sum by its own positives and averages over the images. The mean of
    the processes' gradients is then the gradient of one process holding the whole batch."""

    def compute_loss(self, targets, head_outputs, anchors):
        matched_idxs = []
        for anchors_per_image, targets_per_image in zip(anchors, targets):
            if targets_per_image['boxes'].numel() == 0:
                matched_idxs.append(torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64))
                continue
            quality = box_ops.box_iou(targets_per_image['boxes'], anchors_per_image)
            matched_idxs.append(self.proposal_matcher(quality))
        cls_logits, box_regression = head_outputs['cls_logits'], head_outputs['bbox_regression']
        box_coder = self.head.regression_head.box_coder
        focal, l1, num_pos = cls_logits.sum() * 0, box_regression.sum() * 0, 0
        for tgt, logits, deltas, anchors_i, matched in zip(targets, cls_logits, box_regression, anchors, matched_idxs):
            fg = torch.where(matched >= 0)[0]
            num_pos += fg.numel()
            gt_classes = torch.zeros_like(logits)
            gt_classes[fg, tgt['labels'][matched[fg]]] = 1.0
            valid = matched != self.proposal_matcher.BETWEEN_THRESHOLDS
            focal = focal + sigmoid_focal_loss(logits[valid], gt_classes[valid], reduction='sum')
            if fg.numel():
                target = box_coder.encode_single(tgt['boxes'][matched[fg]], anchors_i[fg])
                l1 = l1 + F.l1_loss(deltas[fg], target, reduction='sum')
        norm = mean_over_processes(float(num_pos), cls_logits.device)
        return {'classification': focal / max(norm, 1.0), 'bbox_regression': l1 / max(norm, 1.0)}

    def forward(self, images: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        if targets is not None:
            targets = [{**t, 'labels': t['labels'] - 1} for t in targets]
        out = super().forward(images, targets)
        if self.training:
            return out
        return [{**d, 'labels': d['labels'] + 1} for d in out]


class MaskRCNNDetector(GeneralizedRCNN):
    """(Mask) R-CNN: torchvision's two-stage skeleton, RPN and RoI heads (with the config's L1 box losses by
    default, :mod:`msconv.dense.rcnn`)."""


class CascadeMaskRCNN(GeneralizedRCNN):
    """Cascade (Mask) R-CNN: torchvision's two-stage skeleton with :class:`CascadeRoIHeads`."""


def _check_num_classes(num_classes: Any) -> int:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(
            f"num_classes must be a positive int (object classes, without background), got {num_classes!r}"
        )
    return num_classes


def _check_sizes(min_size: Any, max_size: Any) -> Tuple[int, int]:
    if not isinstance(min_size, int) or min_size < 1:
        raise ValueError(f"min_size must be a positive int (test shorter side), got {min_size!r}")
    if not isinstance(max_size, int) or max_size < min_size:
        raise ValueError(f"max_size must be an int >= min_size ({min_size}), got {max_size!r}")
    return min_size, max_size


def create_detector(
    backbone: str,
    arch: str = 'mask_rcnn',
    num_classes: int = 80,
    *,
    checkpoint_path: Optional[Union[str, os.PathLike]] = None,
    drop_path_rate: Optional[float] = None,
    min_size: int = 800,
    max_size: int = 1333,
    with_masks: bool = True,
    rois_per_image: int = 512,
    test_proposals: int = 1000,
    box_loss: str = 'l1',
    channels: int = 256,
    fc_channels: Optional[int] = None,
    head_norm: bool = False,
    num_proposals: Optional[int] = None,
    **backbone_kwargs: Any,
) -> nn.Module:
    """A COCO detector of the papers on an msconv backbone (see the module docstring for the interface).

    Args:
        backbone: msconv model name, e.g. ``'smt_small'``, ``'shiftwise_tiny'`` (``'test_smt'`` for tests).
        arch: ``'mask_rcnn'``, ``'cascade_mask_rcnn'``, ``'retinanet'``, ``'atss'`` (:mod:`msconv.dense.atss`) or
            ``'sparse_rcnn'`` (:mod:`msconv.dense.sparse_rcnn`).
        num_classes: object classes without background (80 for COCO).
        checkpoint_path: ImageNet checkpoint of the backbone (official or msconv format).
        drop_path_rate: backbone stochastic depth; default: the configs' value for the family (SMT 0.2, SW 0.4).
        min_size, max_size: test-time resize (shorter side, longer-side cap); training images are not resized.
        with_masks: the R-CNNs' mask branch (``False`` gives Faster / Cascade R-CNN).
        rois_per_image: RoIs sampled per image for each R-CNN stage in training (512 in the configs).
        test_proposals: RPN proposals kept per image at test time (1000 in the configs; also the RetinaNet and
            ATSS pre-NMS top-k per level). Smaller values only make CPU tests and demos cheaper.
        box_loss: Mask R-CNN's RPN and box-head regression loss: ``'l1'`` (the config) or ``'smooth_l1'``
            (torchvision's, beta 1/9). Cascade uses the config's smooth-L1 RPN and GIoU heads, RetinaNet L1.
        channels, fc_channels: width of the FPN and of every head's convs (256 in the configs; ATSS: a multiple of
            32, its GroupNorm groups; Sparse R-CNN: also the proposal features, a multiple of its 8 attention heads),
            and of the R-CNN box heads' fully connected layers (default 1024) or Sparse R-CNN's FFN (default 2048).
            Smaller values only for CPU tests and demos.
        head_norm: RetinaNet only: GroupNorm (32 groups) after each head conv, torchvision's RetinaNet v2 head; the
            configs' RetinaHead has none (the default). Faster to train from few images (the digits demo).
        num_proposals: Sparse R-CNN only: learnable proposals, also the detections per image (default 300, the 3x
            config's; its 1x base config has 100).
        **backbone_kwargs: further backbone keyword arguments (e.g. ``out_norm``).
    """
    if arch not in DETECTOR_ARCHS:
        raise ValueError(f"arch must be one of {DETECTOR_ARCHS}, got {arch!r}")
    num_classes = _check_num_classes(num_classes)
    if fc_channels is None:
        fc_channels = 2048 if arch == 'sparse_rcnn' else 1024
    if num_proposals is None:
        num_proposals = 300
    for name, value in (('channels', channels), ('fc_channels', fc_channels), ('num_proposals', num_proposals)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if box_loss not in ('l1', 'smooth_l1'):
        raise ValueError(f"box_loss must be 'l1' or 'smooth_l1', got {box_loss!r}")
    for name, value in (('rois_per_image', rois_per_image), ('test_proposals', test_proposals)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    min_size, max_size = _check_sizes(min_size, max_size)
    if drop_path_rate is None and isinstance(backbone, str):
        drop_path_rate = config_drop_path_rate(backbone)
    body = create_backbone(backbone, checkpoint_path=checkpoint_path, drop_path_rate=drop_path_rate, **backbone_kwargs)
    common = dict(
        min_size=min_size,
        max_size=max_size,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        _skip_resize=True,
    )

    if arch == 'atss':
        from .atss import ATSS, ATSSHead, atss_anchor_generator

        fpn = BackboneWithFPN(body, in_levels=(1, 2, 3), out_channels=channels, extra='p6p7_on_output')
        return ATSS(
            fpn,
            ATSSHead(channels, num_classes, num_levels=5),
            atss_anchor_generator(),
            MMDetTransform(**common),
            topk_candidates=test_proposals,
        )

    if arch == 'sparse_rcnn':
        from .sparse_rcnn import DIIHead, SparseRCNN

        fpn = BackboneWithFPN(body, in_levels=(0, 1, 2, 3), out_channels=channels, extra=None)
        stages = [DIIHead(num_classes, channels, feedforward_channels=fc_channels) for _ in range(6)]
        return SparseRCNN(fpn, stages, MMDetTransform(**common), num_proposals=num_proposals, channels=channels)

    if arch == 'retinanet':
        fpn = BackboneWithFPN(body, in_levels=(1, 2, 3), out_channels=channels, extra='p6p7')
        anchors = retinanet_anchor_generator()
        head = None
        if head_norm:
            from functools import partial

            from torchvision.models.detection.retinanet import RetinaNetHead

            norm = partial(nn.GroupNorm, min(32, channels))
            head = RetinaNetHead(channels, anchors.num_anchors_per_location()[0], num_classes, norm_layer=norm)
        return RetinaNetDetector(
            fpn,
            num_classes=num_classes,
            anchor_generator=anchors,
            head=head,
            score_thresh=0.05,
            nms_thresh=0.5,
            detections_per_img=100,
            proposal_matcher=MaxIoUMatcher(0.5, 0.4, min_pos_iou=0.0),
            topk_candidates=test_proposals,
            **common,
        )

    fpn = BackboneWithFPN(body, in_levels=(0, 1, 2, 3), out_channels=channels, extra='pool')
    levels = ['0', '1', '2', '3']
    box_pool = AlignedRoIAlign(levels, output_size=7, sampling_ratio=0)
    mask_pool = AlignedRoIAlign(levels, output_size=14, sampling_ratio=0) if with_masks else None

    if arch == 'mask_rcnn':
        rpn_cls, heads_cls = (
            (L1RegionProposalNetwork, L1RoIHeads) if box_loss == 'l1' else (RegionProposalNetwork, RoIHeads)
        )
        rpn = rpn_cls(
            rpn_anchor_generator(),
            RPNHead(channels, 3),
            post_nms_top_n=dict(training=1000, testing=test_proposals),
            **_RPN_ASSIGNER,
        )
        heads = heads_cls(
            box_pool,
            TwoMLPHead(channels * 7 * 7, fc_channels),
            FastRCNNPredictor(fc_channels, num_classes + 1),
            fg_iou_thresh=0.5,
            bg_iou_thresh=0.5,
            batch_size_per_image=rois_per_image,
            positive_fraction=0.25,
            bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
            score_thresh=0.05,
            nms_thresh=0.5,
            detections_per_img=100,
            mask_roi_pool=mask_pool,
            mask_head=MaskRCNNHeads(channels, [channels] * 4, 1) if with_masks else None,
            mask_predictor=MaskRCNNPredictor(channels, channels, num_classes + 1) if with_masks else None,
        )
        rpn.proposal_matcher = MaxIoUMatcher(0.7, 0.3, min_pos_iou=0.3)
        _init_rcnn_heads(heads.box_head, heads.box_predictor, heads.mask_predictor)
        return MaskRCNNDetector(fpn, rpn, heads, MMDetTransform(**common))

    # cascade_mask_rcnn
    rpn = BorderRegionProposalNetwork(
        rpn_anchor_generator(),
        RPNHead(channels, 3),
        post_nms_top_n=dict(training=2000, testing=test_proposals),
        allowed_border=0.0,
        **_RPN_ASSIGNER,
    )
    stages = []
    for _ in CASCADE_IOUS:
        stages.append(
            CascadeStage(
                FastRCNNConvFCHead((channels, 7, 7), [channels] * 4, [fc_channels], norm_layer=nn.BatchNorm2d),
                FastRCNNPredictor(fc_channels, num_classes + 1),
                MaskRCNNHeads(channels, [channels] * 4, 1) if with_masks else None,
                MaskRCNNPredictor(channels, channels, num_classes + 1) if with_masks else None,
            )
        )
    heads = CascadeRoIHeads(
        box_pool,
        stages,
        mask_pool,
        CASCADE_IOUS,
        CASCADE_STDS,
        CASCADE_LOSS_WEIGHTS,
        batch_size_per_image=rois_per_image,
        positive_fraction=0.25,
        giou_loss_weight=10.0,
        score_thresh=0.05,
        nms_thresh=0.5,
        detections_per_img=100,
    )
    rpn.proposal_matcher = MaxIoUMatcher(0.7, 0.3, min_pos_iou=0.3)
    for stage in heads.stages:
        _init_rcnn_heads(stage.box_head, stage.box_predictor, stage.mask_predictor)
    return CascadeMaskRCNN(fpn, rpn, heads, MMDetTransform(**common))


def _init_rcnn_heads(box_head: nn.Module, box_predictor: nn.Module, mask_predictor: Optional[nn.Module]) -> None:
    init_box_head_(box_head)
    init_box_predictor_(box_predictor)
    if mask_predictor is not None:
        init_mask_predictor_(mask_predictor)
