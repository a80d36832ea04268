"""Cascade R-CNN's box and mask heads (Cai & Vasconcelos, CVPR 2018; the mask variant of HTC's baseline).

torchvision has no cascade, so this module composes torchvision's own parts (``MultiScaleRoIAlign``,
``FastRCNNConvFCHead``, ``FastRCNNPredictor``, ``MaskRCNNHeads``/``MaskRCNNPredictor``, ``Matcher``,
``BalancedPositiveNegativeSampler``, ``BoxCoder``, ``generalized_box_iou_loss``) into the three
stages of the official SMT / ShiftwiseConv configs (``cascade_mask_rcnn_*_giou_4conv1f_adamw_3x``):

* stage ``t`` matches RoIs to ground truth at IoU 0.5 / 0.6 / 0.7 (no low-quality matches), samples 512 RoIs with
  25% positives (ground-truth boxes added as proposals), and decodes with target stds (0.1, 0.1, 0.2, 0.2),
  (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067), i.e. ``BoxCoder`` weights 1/std;
* the box head is ``Shared4Conv1FC`` (four 3x3 convs with BatchNorm, one 1024 fc), class-specific regression
  decoded and trained with GIoU (weight 10, summed over positives and divided by the sampled RoIs, as mmdet's
  ``avg_factor``); classification is cross-entropy; stage losses are weighted 1, 0.5, 0.25;
* each stage has its own FCN mask head (4 convs, deconv, 28x28 masks) trained on its positives (mmdet's aligned,
  binarised targets: :func:`msconv.dense.masks.mask_loss`);
* between stages, the sampled RoIs are regressed by their class (ground-truth class for positives, best
  non-background class otherwise), detached, and the ground-truth proposals are removed;
* at test time the class logits of the three stages are averaged, boxes come from the last stage's regression,
  and the mask probabilities of the three mask heads are averaged (mmdet ``CascadeRoIHead.simple_test``);
  detections of any size are kept (mmdet's ``multiclass_nms``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import boxes as box_ops
from torchvision.ops import generalized_box_iou_loss

from .masks import mask_loss

__all__ = ['CascadeStage', 'CascadeRoIHeads', 'CASCADE_IOUS', 'CASCADE_STDS', 'CASCADE_LOSS_WEIGHTS']

CASCADE_IOUS = (0.5, 0.6, 0.7)
CASCADE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
CASCADE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)


class CascadeStage(nn.Module):
    """One cascade stage: box head + predictor, and (optionally) a mask head + predictor."""

    def __init__(
        self,
        box_head: nn.Module,
        box_predictor: nn.Module,
        mask_head: Optional[nn.Module] = None,
        mask_predictor: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor

    def boxes(self, roi_features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.box_predictor(self.box_head(roi_features))  # (N, K+1), (N, (K+1)*4)

    def masks(self, roi_features: torch.Tensor) -> torch.Tensor:
        return self.mask_predictor(self.mask_head(roi_features))  # (N, K+1, 28, 28)


def _class_deltas(box_regression: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The 4 regression outputs of each RoI's class: (N, (K+1)*4) -> (N, 4)."""
    deltas = box_regression.reshape(box_regression.shape[0], -1, 4)
    return deltas[torch.arange(deltas.shape[0], device=deltas.device), labels]


class CascadeRoIHeads(nn.Module):
    """The RoI heads of Cascade (Mask) R-CNN with torchvision's ``RoIHeads`` interface:
    ``forward(features, proposals, image_shapes, targets) -> (detections, losses)``.

    Labels follow torchvision: 0 is background, objects are 1..K.
    """

    def __init__(
        self,
        box_roi_pool: nn.Module,
        stages: Sequence[CascadeStage],
        mask_roi_pool: Optional[nn.Module] = None,
        iou_thresholds: Sequence[float] = CASCADE_IOUS,
        target_stds: Sequence[Sequence[float]] = CASCADE_STDS,
        stage_loss_weights: Sequence[float] = CASCADE_LOSS_WEIGHTS,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        giou_loss_weight: float = 10.0,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
    ) -> None:
        super().__init__()
        n = len(stages)
        if not (len(iou_thresholds) == len(target_stds) == len(stage_loss_weights) == n) or n < 1:
            raise ValueError(
                f"stages, iou_thresholds, target_stds and stage_loss_weights must have the same positive length, "
                f"got {n}, {len(iou_thresholds)}, {len(target_stds)}, {len(stage_loss_weights)}"
            )
        self.box_roi_pool = box_roi_pool
        self.mask_roi_pool = mask_roi_pool
        self.stages = nn.ModuleList(stages)
        self.matchers = [det_utils.Matcher(t, t, allow_low_quality_matches=False) for t in iou_thresholds]
        self.box_coders = [det_utils.BoxCoder(tuple(1.0 / s for s in stds)) for stds in target_stds]
        self.sampler = det_utils.BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.stage_loss_weights = tuple(float(w) for w in stage_loss_weights)
        self.giou_loss_weight = giou_loss_weight
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    def has_mask(self) -> bool:
        return self.mask_roi_pool is not None

    # ------------------------------------------------------------------ training
    def _sample(self, stage: int, proposals: List[torch.Tensor], targets: List[Dict[str, torch.Tensor]]):
        """Add ground truth, match at this stage's IoU, sample. Returns per image: rois, labels, matched gt
        index, and a mask of which sampled rois are ground-truth boxes."""
        matcher = self.matchers[stage]
        rois, labels, matched, is_gt = [], [], [], []
        for props, t in zip(proposals, targets):
            gt = t['boxes'].to(props.dtype)
            props = torch.cat([props, gt])
            gt_flag = torch.zeros(len(props), dtype=torch.bool, device=props.device)
            gt_flag[len(props) - len(gt) :] = True
            if gt.numel() == 0:
                idx = torch.zeros(len(props), dtype=torch.int64, device=props.device)
                lab = torch.zeros(len(props), dtype=torch.int64, device=props.device)
            else:
                m = matcher(box_ops.box_iou(gt, props))
                idx = m.clamp(min=0)
                lab = t['labels'][idx].to(torch.int64)
                lab[m == matcher.BELOW_LOW_THRESHOLD] = 0
                lab[m == matcher.BETWEEN_THRESHOLDS] = -1
            rois.append(props)
            labels.append(lab)
            matched.append(idx)
            is_gt.append(gt_flag)
        pos, neg = self.sampler(labels)
        keep = [torch.where(p | q)[0] for p, q in zip(pos, neg)]
        return (
            [r[k] for r, k in zip(rois, keep)],
            [lab[k] for lab, k in zip(labels, keep)],
            [m[k] for m, k in zip(matched, keep)],
            [g[k] for g, k in zip(is_gt, keep)],
        )

    def _box_loss(self, stage: int, class_logits, box_regression, rois, labels, matched, targets):
        labels_all = torch.cat(labels)
        loss_cls = F.cross_entropy(class_logits, labels_all)
        pos = torch.where(labels_all > 0)[0]
        if pos.numel() == 0:
            return loss_cls, box_regression.sum() * 0.0
        rois_all = torch.cat(rois)
        gt_all = torch.cat(
            [t['boxes'][m] if len(t['boxes']) else t['boxes'].new_zeros(len(m), 4) for t, m in zip(targets, matched)]
        )
        deltas = _class_deltas(box_regression[pos], labels_all[pos])
        pred = self.box_coders[stage].decode_single(deltas, rois_all[pos])
        loss_box = generalized_box_iou_loss(pred, gt_all[pos].to(pred.dtype), reduction='sum')
        return loss_cls, self.giou_loss_weight * loss_box / labels_all.numel()

    def _refine(self, stage: int, class_logits, box_regression, rois, labels, image_shapes) -> List[torch.Tensor]:
        """Regress each RoI by its class; ground-truth class for positives, best foreground class otherwise."""
        cls = torch.cat(labels) if labels is not None else None
        best = class_logits[:, 1:].argmax(dim=1) + 1
        cls = best if cls is None else torch.where(cls > 0, cls, best)
        boxes = self.box_coders[stage].decode_single(_class_deltas(box_regression, cls), torch.cat(rois))
        out = []
        for b, shape in zip(boxes.detach().split([len(r) for r in rois]), image_shapes):
            out.append(box_ops.clip_boxes_to_image(b, shape))
        return out

    def forward(
        self,
        features: Dict[str, torch.Tensor],
        proposals: List[torch.Tensor],
        image_shapes: List[Tuple[int, int]],
        targets: Optional[List[Dict[str, torch.Tensor]]] = None,
    ):
        if self.training:
            if targets is None:
                raise ValueError("targets must be given in training mode")
            return [], self._forward_train(features, proposals, image_shapes, targets)
        return self._forward_test(features, proposals, image_shapes), {}

    def _forward_train(self, features, proposals, image_shapes, targets) -> Dict[str, torch.Tensor]:
        losses: Dict[str, torch.Tensor] = {}
        for t, stage in enumerate(self.stages):
            w = self.stage_loss_weights[t]
            rois, labels, matched, is_gt = self._sample(t, [p.detach() for p in proposals], targets)
            class_logits, box_regression = stage.boxes(self.box_roi_pool(features, rois, image_shapes))
            loss_cls, loss_box = self._box_loss(t, class_logits, box_regression, rois, labels, matched, targets)
            losses[f's{t}.loss_classifier'] = w * loss_cls
            losses[f's{t}.loss_box_reg'] = w * loss_box
            if self.has_mask():
                pos = [torch.where(lab > 0)[0] for lab in labels]
                pos_rois = [r[p] for r, p in zip(rois, pos)]
                if sum(len(p) for p in pos) == 0:
                    losses[f's{t}.loss_mask'] = sum(q.sum() for q in stage.parameters()) * 0.0
                else:
                    logits = stage.masks(self.mask_roi_pool(features, pos_rois, image_shapes))
                    loss_mask = mask_loss(
                        logits,
                        pos_rois,
                        [tg['masks'] for tg in targets],
                        [tg['labels'] for tg in targets],
                        [m[p] for m, p in zip(matched, pos)],
                    )
                    losses[f's{t}.loss_mask'] = w * loss_mask
            if t + 1 < len(self.stages):
                refined = self._refine(t, class_logits, box_regression, rois, labels, image_shapes)
                proposals = [b[~g] for b, g in zip(refined, is_gt)]
        return losses

    @torch.no_grad()
    def _forward_test(self, features, proposals, image_shapes) -> List[Dict[str, torch.Tensor]]:
        rois = proposals
        logits_sum = None
        box_regression = None
        for t, stage in enumerate(self.stages):
            class_logits, box_regression = stage.boxes(self.box_roi_pool(features, rois, image_shapes))
            logits_sum = class_logits if logits_sum is None else logits_sum + class_logits
            if t + 1 < len(self.stages):
                rois = self._refine(t, class_logits, box_regression, rois, None, image_shapes)
        scores = F.softmax(logits_sum / len(self.stages), dim=-1)
        num_classes = scores.shape[-1]
        pred = self.box_coders[-1].decode(box_regression, rois).reshape(-1, num_classes, 4)  # (N, K+1, 4)
        result = []
        for boxes, sc, shape in zip(
            pred.split([len(r) for r in rois]), scores.split([len(r) for r in rois]), image_shapes
        ):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)[:, 1:].reshape(-1, 4)
            labels = torch.arange(1, num_classes, device=sc.device).expand(len(sc), -1).reshape(-1)
            sc = sc[:, 1:].reshape(-1)
            keep = torch.where(sc > self.score_thresh)[0]
            boxes, sc, labels = boxes[keep], sc[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, sc, labels, self.nms_thresh)[: self.detections_per_img]
            result.append({'boxes': boxes[keep], 'labels': labels[keep], 'scores': sc[keep]})
        if self.has_mask():
            det_boxes = [r['boxes'] for r in result]
            counts = [len(b) for b in det_boxes]
            if sum(counts) == 0:
                for r in result:
                    r['masks'] = r['boxes'].new_zeros((0, 1) + tuple(self._mask_size()))
                return result
            roi_feats = self.mask_roi_pool(features, det_boxes, image_shapes)
            probs = torch.stack([stage.masks(roi_feats).sigmoid() for stage in self.stages]).mean(0)
            labels = torch.cat([r['labels'] for r in result])
            probs = probs[torch.arange(len(labels), device=labels.device), labels][:, None]  # (N, 1, 28, 28)
            for r, p in zip(result, probs.split(counts)):
                r['masks'] = p
        return result

    def _mask_size(self) -> Tuple[int, int]:
        size = self.mask_roi_pool.output_size
        return (size * 2, size * 2) if isinstance(size, int) else (size[0] * 2, size[1] * 2)
