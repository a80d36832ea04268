"""Sparse R-CNN: end-to-end detection with learnable proposals (Sun et al., CVPR 2021), as the SMT configs build it
in mmdetection 2.x (``detection/configs/sparse_rcnn_smt_s_fpn.py`` + ``sparse_rcnn_ressa_mstrain_3x_coco.py``;
SMT-B: ``sparse_rcnn_smt_b_fpn.py``).

torchvision has no Sparse R-CNN; this module composes its parts (``nn.MultiheadAttention``, ``BoxCoder``,
``box_convert``, ``generalized_box_iou`` / ``generalized_box_iou_loss``, ``sigmoid_focal_loss``, the R-CNN transform)
with msconv's mmdet RoIAlign (:class:`~msconv.dense.poolers.AlignedRoIAlign`) and scipy's
``linear_sum_assignment`` into the config's system:

* FPN over C2-C5 (256 channels), no extra level (``num_outs=4``);
* ``num_proposals`` learnable boxes (normalised cx, cy, w, h; mmdet's initialisation: the whole image) and
  features (``EmbeddingRPNHead``): 300 in the 3x config (the 1x base config: 100);
* six stages of the dynamic instance interactive head (``DIIHead``): self-attention over the proposal features
  (8 heads, residual, LayerNorm); RoIAlign 7x7 (``sampling_ratio=2``, ``aligned=True``, mmdet's level rule) of the
  current boxes; dynamic instance interaction (:class:`DynamicConv`: two per-proposal 1x1 convs, 256 -> 64 -> 256,
  whose weights a linear layer generates from the proposal feature, each followed by LayerNorm + ReLU, then a
  linear layer over the 7x7 map) added to the feature (LayerNorm); a 2048-wide FFN (residual, LayerNorm); one
  fc + LayerNorm + ReLU before the classifier (sigmoid, K columns) and three before the box regressor, whose deltas
  (``DeltaXYWHBBoxCoder`` stds 0.5 / 0.5 / 1 / 1, not clipped) refine the boxes; the next stage takes the refined
  boxes (detached) and the new features;
* training, each stage (weight 1): a Hungarian matching (``linear_sum_assignment``) of the proposals to the ground
  truths at cost 2 x focal (``FocalLossCost``) + 5 x L1 of the boxes normalised by the image size + 2 x (-GIoU);
  sigmoid focal loss (weight 2) over every proposal, L1 of the normalised boxes (weight 5) and GIoU loss (weight 2)
  over the matched ones, each divided by the number of matched proposals of the batch (averaged over the processes);
* test: the last stage's scores (sigmoid), the best ``num_proposals`` (proposal, class) pairs of each image with
  their boxes; no NMS.

Initialisation as mmdet's: Xavier-uniform for every weight matrix of the heads, classifier bias at prior 0.01,
regressor bias 0, the other biases torch's defaults (attention biases 0).

Interface as the other detectors: ``model(images, targets)`` in train mode -> ``{'s0.loss_classifier',
's0.loss_box_reg', 's0.loss_giou', ..., 's5.loss_giou'}``, ``model(images)`` in eval mode -> a list of
``{'boxes', 'scores', 'labels'}`` (labels 1..K, sorted by score).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from .._extras import require
from .losses import mean_over_processes
from .poolers import AlignedRoIAlign

__all__ = ['DynamicConv', 'DIIHead', 'HungarianMatcher', 'SparseRCNN']

SPARSE_STDS = (0.5, 0.5, 1.0, 1.0)


class DynamicConv(nn.Module):
    """Dynamic instance interaction (mmdet ``DynamicConv``): each proposal's feature generates the weights of two 1x1
    convs applied to its own RoI features.

    ``forward(proposal_feat (N, C), roi_feat (N, C, S, S)) -> (N, C)``.
    """

    def __init__(self, channels: int = 256, feat_channels: int = 64, roi_size: int = 7) -> None:
        super().__init__()
        self.channels, self.feat_channels = channels, feat_channels
        self.dynamic_layer = nn.Linear(channels, 2 * channels * feat_channels)
        self.norm_in = nn.LayerNorm(feat_channels)
        self.norm_out = nn.LayerNorm(channels)
        self.fc_layer = nn.Linear(channels * roi_size**2, channels)
        self.fc_norm = nn.LayerNorm(channels)

    def forward(self, proposal_feat: torch.Tensor, roi_feat: torch.Tensor) -> torch.Tensor:
        c, f = self.channels, self.feat_channels
        x = roi_feat.flatten(2).transpose(1, 2)  # (N, S*S, C)
        params = self.dynamic_layer(proposal_feat)
        w_in = params[:, : c * f].view(-1, c, f)
        w_out = params[:, -c * f :].view(-1, f, c)
        x = F.relu(self.norm_in(torch.bmm(x, w_in)))  # (N, S*S, F)
        x = F.relu(self.norm_out(torch.bmm(x, w_out)))  # (N, S*S, C)
        return F.relu(self.fc_norm(self.fc_layer(x.flatten(1))))


def _fcs(channels: int, n: int) -> nn.Sequential:
    layers: List[nn.Module] = []
    for _ in range(n):
        layers += [nn.Linear(channels, channels, bias=False), nn.LayerNorm(channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class DIIHead(nn.Module):
    """One stage of Sparse R-CNN (mmdet ``DIIHead``, dropout 0 as the configs).

    ``forward(roi_feat (B*P, C, S, S), proposal_feat (B, P, C))`` -> class logits (B, P, K), box deltas (B, P, 4),
    the new proposal features (B, P, C).
    """

    def __init__(
        self,
        num_classes: int,
        channels: int = 256,
        feedforward_channels: int = 2048,
        num_heads: int = 8,
        dynamic_channels: int = 64,
        roi_size: int = 7,
        num_cls_fcs: int = 1,
        num_reg_fcs: int = 3,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels must be a multiple of {num_heads} (attention heads), got {channels}")
        self.attention = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.attention_norm = nn.LayerNorm(channels)
        self.instance_interactive_conv = DynamicConv(channels, dynamic_channels, roi_size)
        self.instance_interactive_conv_norm = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(
            nn.Linear(channels, feedforward_channels), nn.ReLU(inplace=True), nn.Linear(feedforward_channels, channels)
        )
        self.ffn_norm = nn.LayerNorm(channels)
        self.cls_fcs = _fcs(channels, num_cls_fcs)
        self.fc_cls = nn.Linear(channels, num_classes)
        self.reg_fcs = _fcs(channels, num_reg_fcs)
        self.fc_reg = nn.Linear(channels, 4)
        for p in self.parameters():  # mmdet DIIHead.init_weights
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.constant_(self.fc_cls.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(self.fc_reg.bias)

    def forward(
        self, roi_feat: torch.Tensor, proposal_feat: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, p, c = proposal_feat.shape
        x = proposal_feat + self.attention(proposal_feat, proposal_feat, proposal_feat, need_weights=False)[0]
        x = self.attention_norm(x).reshape(b * p, c)
        x = self.instance_interactive_conv_norm(x + self.instance_interactive_conv(x, roi_feat))
        x = self.ffn_norm(x + self.ffn(x))
        logits = self.fc_cls(self.cls_fcs(x)).view(b, p, -1)
        deltas = self.fc_reg(self.reg_fcs(x)).view(b, p, 4)
        return logits, deltas, x.view(b, p, c)


class HungarianMatcher:
    """mmdet ``HungarianAssigner`` with the configs' costs: ``cls_weight`` x ``FocalLossCost`` (alpha 0.25, gamma 2,
    eps 1e-12) + ``l1_weight`` x L1 of the boxes divided by the image's (w, h, w, h) + ``giou_weight`` x (-GIoU).

    ``__call__(logits (P, K), boxes (P, 4) XYXY, gt_boxes (G, 4), gt_labels (G,) in 0..K-1, whwh (4,))`` -> the
    matched proposal and ground-truth indices (min(P, G) pairs, proposals increasing).
    """

    def __init__(
        self,
        cls_weight: float = 2.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        eps: float = 1e-12,
    ) -> None:
        self.cls_weight, self.l1_weight, self.giou_weight = cls_weight, l1_weight, giou_weight
        self.alpha, self.gamma, self.eps = alpha, gamma, eps

    @torch.no_grad()
    def __call__(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        whwh: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        linear_sum_assignment = require('scipy.optimize', "Sparse R-CNN's Hungarian matching").linear_sum_assignment
        empty = torch.zeros(0, dtype=torch.int64, device=logits.device)
        if len(gt_boxes) == 0 or len(boxes) == 0:
            return empty, empty
        prob = logits.sigmoid()
        neg = -(1 - prob + self.eps).log() * (1 - self.alpha) * prob.pow(self.gamma)
        pos = -(prob + self.eps).log() * self.alpha * (1 - prob).pow(self.gamma)
        cls_cost = (pos - neg)[:, gt_labels]
        l1_cost = torch.cdist(boxes / whwh, gt_boxes / whwh, p=1)
        giou_cost = -generalized_box_iou(boxes, gt_boxes)
        cost = self.cls_weight * cls_cost + self.l1_weight * l1_cost + self.giou_weight * giou_cost
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        return torch.as_tensor(rows, device=logits.device), torch.as_tensor(cols, device=logits.device)


class SparseRCNN(nn.Module):
    """Sparse R-CNN: backbone + FPN, learnable proposals, :class:`DIIHead` stages (see the module docstring).

    Args:
        backbone: FPN backbone with four levels at strides 4-32.
        stages: the :class:`DIIHead` of each stage (six in the configs).
        transform: torchvision's R-CNN transform (normalisation, test-time resize, batching).
        num_proposals: learnable proposals (300 in the 3x config).
        channels: proposal feature width (the FPN width, 256).
        roi_sampling_ratio: RoIAlign samples per bin side (2).
        stage_loss_weights: per stage (1 each).
        cls_loss_weight, l1_loss_weight, giou_loss_weight: 2.0, 5.0, 2.0 (and the matching costs).
    """

    def __init__(
        self,
        backbone: nn.Module,
        stages: List[DIIHead],
        transform: GeneralizedRCNNTransform,
        num_proposals: int = 300,
        channels: int = 256,
        roi_sampling_ratio: int = 2,
        stage_loss_weights: Optional[List[float]] = None,
        cls_loss_weight: float = 2.0,
        l1_loss_weight: float = 5.0,
        giou_loss_weight: float = 2.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.transform = transform
        self.proposal_boxes = nn.Embedding(num_proposals, 4)  # (cx, cy, w, h) / (W, H, W, H)
        self.proposal_features = nn.Embedding(num_proposals, channels)
        nn.init.constant_(self.proposal_boxes.weight[:, :2], 0.5)
        nn.init.constant_(self.proposal_boxes.weight[:, 2:], 1.0)
        self.stages = nn.ModuleList(stages)
        self.roi_pool = AlignedRoIAlign(['0', '1', '2', '3'], output_size=7, sampling_ratio=roi_sampling_ratio)
        self.box_coder = det_utils.BoxCoder(weights=tuple(1.0 / s for s in SPARSE_STDS))
        self.stage_loss_weights = list(stage_loss_weights or [1.0] * len(stages))
        self.cls_loss_weight, self.l1_loss_weight, self.giou_loss_weight = (
            cls_loss_weight,
            l1_loss_weight,
            giou_loss_weight,
        )
        self.matcher = HungarianMatcher(cls_loss_weight, l1_loss_weight, giou_loss_weight)

    @property
    def num_proposals(self) -> int:
        return self.proposal_boxes.num_embeddings

    def initial_proposals(self, image_sizes: List[Tuple[int, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The learnable proposals of each image: boxes (B, P, 4) in pixels and features (B, P, C)."""
        w = self.proposal_boxes.weight
        whwh = torch.tensor([[s[1], s[0], s[1], s[0]] for s in image_sizes], dtype=w.dtype, device=w.device)
        boxes = box_convert(w, 'cxcywh', 'xyxy')[None] * whwh[:, None]
        feats = self.proposal_features.weight[None].expand(len(image_sizes), -1, -1)
        return boxes, feats

    def run_stage(
        self,
        t: int,
        features: Dict[str, torch.Tensor],
        boxes: torch.Tensor,
        feats: torch.Tensor,
        image_sizes: List[Tuple[int, int]],
        roi_feat: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage ``t`` on (B, P, 4) boxes and (B, P, C) features -> class logits, refined boxes (not detached), new
        features. ``roi_feat``: the pooled features, if already at hand."""
        b, p = boxes.shape[:2]
        if roi_feat is None:
            roi_feat = self.roi_pool(features, list(boxes), image_sizes)  # (B*P, C, 7, 7)
        logits, deltas, feats = self.stages[t](roi_feat, feats)
        refined = self.box_coder.decode_single(deltas.reshape(-1, 4), boxes.reshape(-1, 4)).view(b, p, 4)
        return logits, refined, feats

    def stage_loss(
        self, logits: torch.Tensor, boxes: torch.Tensor, targets: List[Dict[str, torch.Tensor]], whwh: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Focal, L1 and GIoU losses of one stage (unweighted by the stage), matched per image."""
        gt_classes = torch.zeros_like(logits)
        pred, target, scale = [], [], []
        for i, tgt in enumerate(targets):
            labels = tgt['labels'] - 1
            rows, cols = self.matcher(logits[i].detach(), boxes[i].detach(), tgt['boxes'], labels, whwh[i])
            gt_classes[i, rows, labels[cols]] = 1.0
            pred.append(boxes[i, rows])
            target.append(tgt['boxes'][cols].to(boxes.dtype))
            scale.append(whwh[i].expand(len(rows), 4))
        pred, target, scale = torch.cat(pred), torch.cat(target), torch.cat(scale)
        # mmdet divides by the matched count averaged over the processes (at least 1 here: mmdet trains on images
        # with objects only, where it would divide by ~1e-7)
        norm = max(mean_over_processes(float(len(pred)), logits.device), 1.0)
        cls = self.cls_loss_weight * sigmoid_focal_loss(logits.flatten(0, 1), gt_classes.flatten(0, 1), reduction='sum')
        if len(pred) == 0:
            zero = boxes.sum() * 0
            return cls / norm, zero, zero
        l1 = self.l1_loss_weight * F.l1_loss(pred / scale, target / scale, reduction='sum')
        giou = self.giou_loss_weight * generalized_box_iou_loss(pred, target, reduction='sum')
        return cls / norm, l1 / norm, giou / norm

    def postprocess_detections(self, logits: torch.Tensor, boxes: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        """The best ``num_proposals`` (proposal, class) scores of each image, sorted, with their boxes."""
        num_classes = logits.shape[-1]
        scores = logits.sigmoid().flatten(1)  # (B, P*K)
        detections = []
        for s, b in zip(scores, boxes):
            top, idx = s.topk(self.num_proposals)
            detections.append({'boxes': b[idx // num_classes], 'scores': top, 'labels': idx % num_classes + 1})
        return detections

    def forward(
        self, images: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None
    ) -> Union[Dict[str, torch.Tensor], List[Dict[str, torch.Tensor]]]:
        if self.training and targets is None:
            raise ValueError("targets must be given in training mode (a list of dicts with 'boxes' and 'labels')")
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        image_list, targets = self.transform(images, targets)
        sizes = image_list.image_sizes
        features = self.backbone(image_list.tensors)
        boxes, feats = self.initial_proposals(sizes)
        whwh = boxes.new_tensor([[s[1], s[0], s[1], s[0]] for s in sizes])
        losses: Dict[str, torch.Tensor] = {}
        logits = boxes
        for t in range(len(self.stages)):
            logits, refined, feats = self.run_stage(t, features, boxes, feats, sizes)
            if self.training:
                w = self.stage_loss_weights[t]
                cls, l1, giou = self.stage_loss(logits, refined, targets, whwh)
                losses.update(
                    {f's{t}.loss_classifier': w * cls, f's{t}.loss_box_reg': w * l1, f's{t}.loss_giou': w * giou}
                )
            boxes = refined.detach()
        if self.training:
            return losses
        detections = self.postprocess_detections(logits, boxes)
        return self.transform.postprocess(detections, sizes, original_sizes)
