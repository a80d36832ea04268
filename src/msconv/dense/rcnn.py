"""Mask R-CNN's RPN and RoI heads with the L1 box losses of the official SMT Mask R-CNN config, and the Cascade
config's RPN that leaves anchors crossing the image border out of training.

torchvision's ``RegionProposalNetwork`` and ``RoIHeads`` train box regression with smooth-L1 (beta 1/9); the
config (``mask_rcnn_smt_*_fpn.py``) uses ``L1Loss`` for both the RPN and the box head. These subclasses change
that (the L1 sum over positive samples divided by the number of sampled anchors / RoIs: mmdet's ``avg_factor``;
torchvision's own normalization) and follow mmdet 2.x where torchvision differs:

* the mask loss trains on aligned, binarised targets (:func:`msconv.dense.masks.mask_loss`);
* detections keep boxes of any size (mmdet's ``multiclass_nms``; torchvision drops those under 0.01 pixel);
* :class:`MMDetTransform` pastes the 28 x 28 masks into the image the mmdet way (:func:`msconv.dense.masks.
  paste_masks`).

Sampling, matching, class-specific regression of the gt class and the rest of inference are torchvision's.
:func:`init_box_head_`, :func:`init_box_predictor_` and :func:`init_mask_predictor_` give the heads mmdet's
initialisation (Xavier-uniform fcs, classifier N(0, 0.01), box regressor N(0, 0.001), zero biases; the mask
deconv and logits Kaiming-normal (fan out) with zero biases).

:class:`BorderRegionProposalNetwork` follows mmdet's ``allowed_border`` (0 in the Cascade configs): anchors
reaching more than that many pixels beyond the (unpadded) image are left out of the RPN's matching (each ground
truth's best anchor is its best inside one) and loss; proposals still come from every anchor.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import boxes as box_ops

from .masks import mask_loss, paste_masks

__all__ = [
    'L1RegionProposalNetwork',
    'L1RoIHeads',
    'BorderRegionProposalNetwork',
    'MMDetTransform',
    'l1_box_loss',
    'init_box_head_',
    'init_box_predictor_',
    'init_mask_predictor_',
]


def init_box_head_(head: nn.Module) -> None:
    """mmdet's box-head init: Xavier-uniform fully connected layers with zero bias (convs keep Kaiming)."""
    for m in head.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def init_box_predictor_(predictor: nn.Module) -> None:
    """mmdet ``BBoxHead``: classifier N(0, 0.01), regressor N(0, 0.001), zero biases (torchvision's
    ``FastRCNNPredictor``: ``cls_score`` / ``bbox_pred``)."""
    for layer, std in ((predictor.cls_score, 0.01), (predictor.bbox_pred, 0.001)):
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)


def init_mask_predictor_(predictor: nn.Module) -> None:
    """mmdet ``FCNMaskHead``: upsampling deconv and mask logits Kaiming-normal (fan out, ReLU), zero biases."""
    for layer in (predictor.conv5_mask, predictor.mask_fcn_logits):
        nn.init.kaiming_normal_(layer.weight, mode='fan_out', nonlinearity='relu')
        nn.init.zeros_(layer.bias)


class MMDetTransform(GeneralizedRCNNTransform):
    """torchvision's R-CNN transform whose test-time mask pasting is mmdet's (``masks >= 0.5`` = mmdet's masks)."""

    def postprocess(self, result, image_shapes, original_image_sizes):
        if self.training:
            return result
        for pred, im_s, o_im_s in zip(result, image_shapes, original_image_sizes):
            pred['boxes'] = resize_boxes(pred['boxes'], im_s, o_im_s)
            if 'masks' in pred:
                pred['masks'] = paste_masks(pred['masks'], pred['boxes'], o_im_s)
        return result


def l1_box_loss(box_regression: torch.Tensor, labels: torch.Tensor, regression_targets: torch.Tensor) -> torch.Tensor:
    """L1 between the gt-class regression of each positive RoI (label > 0) and its target, summed, divided by the
    number of sampled RoIs. ``box_regression`` (N, K*4), ``labels`` (N,), ``regression_targets`` (N, 4)."""
    pos = torch.where(labels > 0)[0]
    deltas = box_regression.reshape(box_regression.shape[0], -1, 4)[pos, labels[pos]]
    return F.l1_loss(deltas, regression_targets[pos], reduction='sum') / max(labels.numel(), 1)


class L1RegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with an L1 anchor regression loss."""

    def compute_loss(
        self,
        objectness: torch.Tensor,
        pred_bbox_deltas: torch.Tensor,
        labels: List[torch.Tensor],
        regression_targets: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        pos, neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos, dim=0))[0]
        neg = torch.where(torch.cat(neg, dim=0))[0]
        sampled = torch.cat([pos, neg], dim=0)
        labels = torch.cat(labels, dim=0)
        regression_targets = torch.cat(regression_targets, dim=0)
        box_loss = F.l1_loss(pred_bbox_deltas[pos], regression_targets[pos], reduction='sum') / max(sampled.numel(), 1)
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        return objectness_loss, box_loss


class L1RoIHeads(RoIHeads):
    """torchvision's box + mask RoI heads with an L1 box regression loss and mmdet's mask loss; detections of any
    size are kept."""

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        """torchvision's, without its removal of boxes under 0.01 pixel (mmdet's ``multiclass_nms``)."""
        num_classes = class_logits.shape[-1]
        counts = [len(p) for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals).split(counts)
        pred_scores = F.softmax(class_logits, -1).split(counts)
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, shape in zip(pred_boxes, pred_scores, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)[:, 1:].reshape(-1, 4)
            labels = torch.arange(1, num_classes, device=scores.device).expand(len(scores), -1).reshape(-1)
            scores = scores[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels

    def forward(
        self,
        features: Dict[str, torch.Tensor],
        proposals: List[torch.Tensor],
        image_shapes: List[Tuple[int, int]],
        targets: Optional[List[Dict[str, torch.Tensor]]] = None,
    ):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        labels_all = torch.cat(labels, dim=0)
        losses = {
            'loss_classifier': F.cross_entropy(class_logits, labels_all),
            'loss_box_reg': l1_box_loss(box_regression, labels_all, torch.cat(regression_targets, dim=0)),
        }
        if self.has_mask():
            pos = [torch.where(lab > 0)[0] for lab in labels]
            mask_proposals = [p[i] for p, i in zip(proposals, pos)]
            mask_logits = self.mask_predictor(
                self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes))
            )
            losses['loss_mask'] = mask_loss(
                mask_logits,
                mask_proposals,
                [t['masks'] for t in targets],
                [t['labels'] for t in targets],
                [m[i] for m, i in zip(matched_idxs, pos)],
            )
        return [], losses


class BorderRegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN whose training ignores anchors crossing the image border by more than ``allowed_border``
    pixels (mmdet ``allowed_border``; negative values keep every anchor, as torchvision)."""

    def __init__(self, *args, allowed_border: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.allowed_border = allowed_border
        self._image_sizes: Optional[List[Tuple[int, int]]] = None

    def forward(self, images, features, targets=None):
        self._image_sizes = images.image_sizes  # read by assign_targets_to_anchors during this call
        try:
            return super().forward(images, features, targets)
        finally:
            self._image_sizes = None

    def assign_targets_to_anchors(self, anchors: List[torch.Tensor], targets: List[Dict[str, torch.Tensor]]):
        if self._image_sizes is None or self.allowed_border < 0:
            return super().assign_targets_to_anchors(anchors, targets)
        b = self.allowed_border
        labels, matched_gt_boxes = [], []
        for a, t, (h, w) in zip(anchors, targets, self._image_sizes):
            inside = (a[:, 0] >= -b) & (a[:, 1] >= -b) & (a[:, 2] < w + b) & (a[:, 3] < h + b)
            # mmdet matches the inside anchors only (a ground truth's best anchor is its best inside one)
            lab_in, gt_in = super().assign_targets_to_anchors([a[inside]], [t])
            lab = a.new_full((len(a),), -1.0)  # the sampler draws neither positives nor negatives outside
            lab[inside] = lab_in[0]
            gt = a.new_zeros((len(a), 4))
            gt[inside] = gt_in[0]
            labels.append(lab)
            matched_gt_boxes.append(gt)
        return labels, matched_gt_boxes
