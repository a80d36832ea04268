"""ATSS: Adaptive Training Sample Selection (Zhang et al., CVPR 2020), as the SMT configs build it in mmdetection 2.x
(``detection/configs/atss_smt_s_fpn.py`` + ``atss_ressa_mstrain_3x_coco.py``; SMT-B: ``atss_smt_b_fpn.py``).

torchvision has no ATSS; this module composes its parts (``Conv2dNormActivation``, ``BoxCoder``, ``box_iou``,
``sigmoid_focal_loss``, ``generalized_box_iou_loss``, ``batched_nms``, the R-CNN transform) with msconv's mmdet
anchors (:mod:`msconv.dense.anchors`) into the config's system:

* FPN over C3-C5 (256 channels) and P6 / P7 from stride-2 3x3 convs on the P5 output, no ReLU in between
  (``add_extra_convs='on_output'``, ``num_outs=5``; strides 8-128);
* one anchor per location, square, 8 x stride (``octave_base_scale=8``, ``scales_per_octave=1``, ``ratios=[1.0]``);
* head: four 3x3 conv + GroupNorm(32) + ReLU per branch, a 3x3 classifier (sigmoid, K columns), a 3x3 box regressor
  whose output is multiplied by a learnable scale per level, and a 3x3 centre-ness predictor on the regression
  branch; every conv N(0, 0.01), the classifier bias at prior 0.01;
* assignment (:func:`atss_assign`): per ground truth, the 9 anchors of each level whose centres are closest to
  its centre are candidates; those whose IoU reaches the mean + standard deviation of the candidates' IoUs and
  whose centre lies inside the box (by more than 0.01 px) are positive; an anchor positive for several ground
  truths goes to the one of highest IoU;
* losses (``loss`` of ``ATSSHead``): sigmoid focal loss (alpha 0.25, gamma 2) over the valid anchors divided by the
  number of positives (each image counted at least once, averaged over the processes); GIoU loss (weight 2) of the
  decoded boxes (``DeltaXYWHBBoxCoder`` stds 0.1 / 0.1 / 0.2 / 0.2) weighted by the positives' centre-ness targets
  and divided by their sum; binary cross-entropy of the centre-ness logits against
  ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` of the anchor centre in its box, over the positives;
* test: per level, the 1000 best (anchor, class) scores above 0.05, decoded and clipped to the image; scores
  multiplied by the sigmoid centre-ness; class-wise NMS at 0.6; the best 100.

Anchors outside an image's own padded extent (mmdet's ``valid_flags`` of ``pad_shape``) are left out of the
assignment and the losses, as mmdet's; ``allowed_border=-1`` keeps the others, also across the border.

Interface as the other detectors: ``model(images, targets)`` in train mode -> ``{'classification',
'bbox_regression', 'bbox_ctrness'}`` (torchvision FCOS's names), ``model(images)`` in eval mode -> a list of
``{'boxes', 'scores', 'labels'}`` with labels 1..K.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import boxes as box_ops
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss
from torchvision.ops.misc import Conv2dNormActivation

from .anchors import MMDetAnchorGenerator
from .losses import mean_over_processes

__all__ = ['ATSS', 'ATSSHead', 'atss_anchor_generator', 'atss_assign', 'centerness_target']

ATSS_STDS = (0.1, 0.1, 0.2, 0.2)
_INF = 100000000.0


def atss_anchor_generator() -> MMDetAnchorGenerator:
    """The config's anchors: one per location, ``octave_base_scale=8``, ``ratios=[1.0]``, strides 8-128."""
    return MMDetAnchorGenerator((8, 16, 32, 64, 128), (8.0,), (1.0,))


class ATSSHead(nn.Module):
    """mmdet ``ATSSHead``: two towers of ``stacked_convs`` 3x3 conv + GroupNorm + ReLU, a classifier on the first,
    a scaled box regressor and a centre-ness predictor on the second (one anchor per location).

    ``forward(features)`` -> three lists over the levels: class logits (B, K, H, W), box deltas (B, 4, H, W)
    (already multiplied by the level's scale), centre-ness logits (B, 1, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_levels: int = 5,
        stacked_convs: int = 4,
        num_groups: int = 32,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        if in_channels % num_groups:
            raise ValueError(f"channels must be a multiple of {num_groups} (GroupNorm groups), got {in_channels}")
        norm = partial(nn.GroupNorm, num_groups)
        self.cls_convs = nn.Sequential(
            *[Conv2dNormActivation(in_channels, in_channels, 3, norm_layer=norm) for _ in range(stacked_convs)]
        )
        self.reg_convs = nn.Sequential(
            *[Conv2dNormActivation(in_channels, in_channels, 3, norm_layer=norm) for _ in range(stacked_convs)]
        )
        self.atss_cls = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.atss_reg = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.atss_centerness = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.scales = nn.ParameterList([nn.Parameter(torch.tensor(1.0)) for _ in range(num_levels)])
        for m in self.modules():  # mmdet: Normal(std=0.01) for every Conv2d, zero bias; GroupNorm 1 / 0
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.atss_cls.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: List[torch.Tensor]) -> Tuple[List[torch.Tensor], ...]:
        if len(features) != len(self.scales):
            raise ValueError(f"expected {len(self.scales)} feature levels, got {len(features)}")
        cls_logits, bbox_deltas, centerness = [], [], []
        for x, scale in zip(features, self.scales):
            cls_feat, reg_feat = self.cls_convs(x), self.reg_convs(x)
            cls_logits.append(self.atss_cls(cls_feat))
            bbox_deltas.append(self.atss_reg(reg_feat) * scale)
            centerness.append(self.atss_centerness(reg_feat))
        return cls_logits, bbox_deltas, centerness


def atss_assign(
    anchors: torch.Tensor, num_per_level: Sequence[int], gt_boxes: torch.Tensor, topk: int = 9
) -> torch.Tensor:
    """ATSS assignment of (A, 4) anchors (levels concatenated, ``num_per_level`` each) to (G, 4) ground-truth boxes:
    the index of each anchor's ground truth, -1 for background (see the module docstring). Distances and the
    per-level top-k are computed as mmdet's ``ATSSAssigner`` computes them, so that ties between equidistant anchors
    fall the same way."""
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    assigned = torch.full((num_anchors,), -1, dtype=torch.int64, device=anchors.device)
    if num_gt == 0 or num_anchors == 0:
        return assigned
    ious = box_ops.box_iou(anchors, gt_boxes)  # (A, G)
    gt_points = torch.stack(((gt_boxes[:, 0] + gt_boxes[:, 2]) / 2.0, (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2.0), dim=1)
    anchor_cx = (anchors[:, 0] + anchors[:, 2]) / 2.0
    anchor_cy = (anchors[:, 1] + anchors[:, 3]) / 2.0
    anchor_points = torch.stack((anchor_cx, anchor_cy), dim=1)
    distances = (anchor_points[:, None, :] - gt_points[None, :, :]).pow(2).sum(-1).sqrt()  # (A, G)

    candidates, start = [], 0
    for n in num_per_level:
        _, idx = distances[start : start + n].topk(min(topk, n), dim=0, largest=False)
        candidates.append(idx + start)
        start += n
    candidates = torch.cat(candidates, dim=0)  # (C, G): anchor indices
    gt_index = torch.arange(num_gt, device=anchors.device)
    candidate_ious = ious[candidates, gt_index]  # (C, G)
    threshold = candidate_ious.mean(0) + candidate_ious.std(0)
    is_pos = candidate_ious >= threshold[None, :]
    cx, cy = anchor_cx[candidates], anchor_cy[candidates]  # (C, G)
    sides = torch.stack(
        [cx - gt_boxes[:, 0], cy - gt_boxes[:, 1], gt_boxes[:, 2] - cx, gt_boxes[:, 3] - cy], dim=1
    )  # (C, 4, G)
    is_pos &= sides.min(dim=1).values > 0.01

    masked = torch.full_like(ious, -_INF)
    pos_anchor, pos_gt = candidates[is_pos], gt_index.expand_as(candidates)[is_pos]
    masked[pos_anchor, pos_gt] = ious[pos_anchor, pos_gt]
    best, arg = masked.max(dim=1)
    hit = best != -_INF
    assigned[hit] = arg[hit]
    return assigned


def centerness_target(anchors: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
    """FCOS centre-ness of each (N, 4) anchor's centre inside its (N, 4) box: sqrt(min(l, r) / max(l, r) *
    min(t, b) / max(t, b))."""
    cx = (anchors[:, 2] + anchors[:, 0]) / 2
    cy = (anchors[:, 3] + anchors[:, 1]) / 2
    left_right = torch.stack([cx - gt_boxes[:, 0], gt_boxes[:, 2] - cx], dim=1)
    top_bottom = torch.stack([cy - gt_boxes[:, 1], gt_boxes[:, 3] - cy], dim=1)
    return torch.sqrt(
        (left_right.min(dim=-1).values / left_right.max(dim=-1).values)
        * (top_bottom.min(dim=-1).values / top_bottom.max(dim=-1).values)
    )


def _flatten_levels(maps: List[torch.Tensor]) -> torch.Tensor:
    """Per-level (B, C, H, W) maps -> (B, sum H*W, C), cells row-major, levels in order (mmdet's anchor order)."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, m.shape[1]) for m in maps], dim=1)


class ATSS(nn.Module):
    """ATSS detector: backbone + FPN (:class:`~msconv.dense.necks.BackboneWithFPN`), :class:`ATSSHead`, mmdet anchors
    (see the module docstring for the maths).

    Args:
        backbone: FPN backbone with five levels at strides 8-128.
        head: :class:`ATSSHead`.
        anchor_generator: :func:`atss_anchor_generator`.
        transform: torchvision's R-CNN transform (normalisation, test-time resize, batching).
        topk: candidates per level and ground truth (9).
        score_thresh, nms_thresh, detections_per_img, topk_candidates: test (0.05, 0.6, 100, 1000 per level).
        bbox_loss_weight: weight of the GIoU loss (2.0).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: ATSSHead,
        anchor_generator: MMDetAnchorGenerator,
        transform: GeneralizedRCNNTransform,
        topk: int = 9,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
        bbox_loss_weight: float = 2.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.anchor_generator = anchor_generator
        self.transform = transform
        self.box_coder = det_utils.BoxCoder(weights=tuple(1.0 / s for s in ATSS_STDS))
        self.topk = topk
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates
        self.bbox_loss_weight = bbox_loss_weight

    # ---------------------------------------------------------------------------------------------- training
    def _valid_flags(self, sizes: List[Tuple[int, int]], image_size: Tuple[int, int]) -> torch.Tensor:
        """(sum H*W,) anchors inside the image's own extent padded to the transform's multiple (mmdet's
        ``valid_flags`` of ``pad_shape``): a cell is valid if it lies within ceil(padded side / stride)."""
        d = self.transform.size_divisible
        pad_h, pad_w = (math.ceil(s / d) * d for s in image_size)
        flags = []
        for (h, w), stride in zip(sizes, self.anchor_generator.strides):
            vh, vw = min(math.ceil(pad_h / stride), h), min(math.ceil(pad_w / stride), w)
            valid = torch.zeros(h, w, dtype=torch.bool)
            valid[:vh, :vw] = True
            flags.append(valid.reshape(-1))
        return torch.cat(flags)

    def compute_loss(
        self,
        targets: List[Dict[str, torch.Tensor]],
        cls_logits: List[torch.Tensor],
        bbox_deltas: List[torch.Tensor],
        centerness: List[torch.Tensor],
        anchors: torch.Tensor,
        image_sizes: List[Tuple[int, int]],
    ) -> Dict[str, torch.Tensor]:
        sizes = [tuple(m.shape[-2:]) for m in cls_logits]
        counts = [h * w for h, w in sizes]
        logits, deltas, ctr = _flatten_levels(cls_logits), _flatten_levels(bbox_deltas), _flatten_levels(centerness)
        level_of = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        focal = logits.sum() * 0
        num_pos_total = 0
        pos_pred, pos_target, pos_anchors, pos_ctr = [], [], [], []
        for i, (tgt, size) in enumerate(zip(targets, image_sizes)):
            valid = self._valid_flags(sizes, size).to(anchors.device)
            valid_idx = torch.where(valid)[0]
            per_level = torch.bincount(level_of[valid.cpu()], minlength=len(counts)).tolist()
            gt_boxes = tgt['boxes'].to(anchors.dtype)
            assigned = atss_assign(anchors[valid_idx], per_level, gt_boxes, self.topk)
            pos = torch.where(assigned >= 0)[0]
            num_pos_total += max(pos.numel(), 1)  # mmdet counts an image without positives once
            gt_classes = torch.zeros_like(logits[i, valid_idx])
            gt_classes[pos, tgt['labels'][assigned[pos]] - 1] = 1.0
            focal = focal + sigmoid_focal_loss(logits[i, valid_idx], gt_classes, reduction='sum')
            idx = valid_idx[pos]
            pos_pred.append(deltas[i, idx])
            pos_target.append(gt_boxes[assigned[pos]])
            pos_anchors.append(anchors[idx])
            pos_ctr.append(ctr[i, idx, 0])
        norm = max(mean_over_processes(float(num_pos_total), logits.device), 1.0)
        pred, target = torch.cat(pos_pred), torch.cat(pos_target)
        pos_anchors, pos_ctr = torch.cat(pos_anchors), torch.cat(pos_ctr)
        if pred.numel():
            ctr_target = centerness_target(pos_anchors, target)
            boxes = self.box_coder.decode_single(pred, pos_anchors)
            giou = (generalized_box_iou_loss(boxes, target, reduction='none') * ctr_target).sum()
            ctr_norm = max(mean_over_processes(float(ctr_target.sum()), logits.device), 1.0)
            box_loss = self.bbox_loss_weight * giou / ctr_norm
            ctr_loss = F.binary_cross_entropy_with_logits(pos_ctr, ctr_target, reduction='sum') / norm
        else:
            mean_over_processes(0.0, logits.device)  # every process joins the same reductions
            box_loss, ctr_loss = deltas.sum() * 0, ctr.sum() * 0
        return {'classification': focal / norm, 'bbox_regression': box_loss, 'bbox_ctrness': ctr_loss}

    # ---------------------------------------------------------------------------------------------- test
    def postprocess_detections(
        self,
        cls_logits: List[torch.Tensor],
        bbox_deltas: List[torch.Tensor],
        centerness: List[torch.Tensor],
        anchors: torch.Tensor,
        image_sizes: List[Tuple[int, int]],
    ) -> List[Dict[str, torch.Tensor]]:
        counts = [m.shape[-2] * m.shape[-1] for m in cls_logits]
        level_anchors = anchors.split(counts)
        detections = []
        for i, size in enumerate(image_sizes):
            all_boxes, all_scores, all_labels = [], [], []
            for logits, deltas, ctr, anc in zip(cls_logits, bbox_deltas, centerness, level_anchors):
                scores = logits[i].permute(1, 2, 0).reshape(-1, logits.shape[1]).sigmoid()  # (H*W, K)
                keep = scores > self.score_thresh
                kept = scores[keep]
                idx = torch.nonzero(keep)  # (M, 2): anchor, class
                kept, order = kept.sort(descending=True)  # mmdet's filter_scores_and_topk
                n = min(self.topk_candidates, idx.shape[0])
                kept, idx = kept[:n], idx[order[:n]]
                anchor_idx, labels = idx.unbind(dim=1)
                boxes = self.box_coder.decode_single(
                    deltas[i].permute(1, 2, 0).reshape(-1, 4)[anchor_idx], anc[anchor_idx]
                )
                all_boxes.append(box_ops.clip_boxes_to_image(boxes, size))
                all_scores.append(kept * ctr[i].reshape(-1).sigmoid()[anchor_idx])
                all_labels.append(labels)
            boxes, scores, labels = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            detections.append({'boxes': boxes[keep], 'scores': scores[keep], 'labels': labels[keep] + 1})
        return detections

    # ---------------------------------------------------------------------------------------------- forward
    def forward(
        self, images: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None
    ) -> Union[Dict[str, torch.Tensor], List[Dict[str, torch.Tensor]]]:
        if self.training and targets is None:
            raise ValueError("targets must be given in training mode (a list of dicts with 'boxes' and 'labels')")
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        image_list, targets = self.transform(images, targets)
        features = list(self.backbone(image_list.tensors).values())
        cls_logits, bbox_deltas, centerness = self.head(features)
        anchors = self.anchor_generator(image_list, features)[0]  # the same anchors for every image
        if self.training:
            return self.compute_loss(targets, cls_logits, bbox_deltas, centerness, anchors, image_list.image_sizes)
        detections = self.postprocess_detections(cls_logits, bbox_deltas, centerness, anchors, image_list.image_sizes)
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)
