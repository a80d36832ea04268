"""Mask R-CNN's RPN and RoI heads with the L1 box losses of the official SMT Mask R-CNN config, and the Cascade
config's RPN that leaves anchors crossing the image border out of training.

torchvision's ``RegionProposalNetwork`` and ``RoIHeads`` train box regression with smooth-L1 (beta 1/9); the
config (``mask_rcnn_smt_*_fpn.py``) uses ``L1Loss`` for both the RPN and the box head. These subclasses change
only that: the L1 sum over positive samples divided by the number of sampled anchors / RoIs (mmdet's
``avg_factor``; torchvision's own normalization). Everything else (sampling, matching, class-specific
regression of the gt class, mask loss, inference) is torchvision's, reused as is.

:class:`BorderRegionProposalNetwork` follows mmdet's ``allowed_border`` (0 in the Cascade configs): anchors
reaching more than that many pixels beyond the (unpadded) image are neither positives nor negatives of the RPN
loss; proposals still come from every anchor.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork

__all__ = ['L1RegionProposalNetwork', 'L1RoIHeads', 'BorderRegionProposalNetwork', 'l1_box_loss']


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
    """torchvision's box + mask RoI heads with an L1 box regression loss (inference unchanged)."""

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
            losses['loss_mask'] = maskrcnn_loss(
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
        labels, matched_gt_boxes = super().assign_targets_to_anchors(anchors, targets)
        if self._image_sizes is None or self.allowed_border < 0:
            return labels, matched_gt_boxes
        b = self.allowed_border
        for lab, a, (h, w) in zip(labels, anchors, self._image_sizes):
            outside = (a[:, 0] < -b) | (a[:, 1] < -b) | (a[:, 2] >= w + b) | (a[:, 3] >= h + b)
            lab[outside] = -1.0  # the sampler draws neither positives nor negatives among these
        return labels, matched_gt_boxes
