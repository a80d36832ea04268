"""Mask R-CNN's mask targets, loss and full-image pasting as mmdetection 2.x computes them.

* **Targets** (mmdet ``mask_target`` / ``BitmapMasks.crop_and_resize``): each positive RoI's ground-truth mask is
  RoI-aligned to 28 x 28 with ``aligned=True`` and adaptive sampling (mmcv's ``RoIAlign``), after clipping the
  RoI to the mask, and binarised at 0.5. torchvision's ``project_masks_on_boxes`` samples with ``aligned=False``
  and keeps the soft values.
* **Loss**: binary cross-entropy with logits of the RoI's ground-truth class channel, averaged over every pixel of
  every positive RoI (torchvision's and mmdet's ``mask_cross_entropy``).
* **Pasting** (mmdet ``FCNMaskHead._do_paste_mask``): each 28 x 28 probability map is sampled bilinearly
  (``grid_sample``, ``align_corners=False``, zeros outside) at the centres of the image pixels its box covers;
  a pixel is in the mask when its probability is >= 0.5 (``mask_thr_binary``). torchvision's
  ``paste_masks_in_image`` pads the map by one cell, resizes it to the integer box size and places it at integer
  offsets: the same masks within about a pixel, but not the same pixels. :func:`paste_masks` returns the sampled
  probabilities, so that ``masks >= 0.5`` is mmdet's binary mask.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

__all__ = ['mask_targets', 'mask_loss', 'paste_masks']


def mask_targets(gt_masks: torch.Tensor, boxes: torch.Tensor, matched_idxs: torch.Tensor, size: int) -> torch.Tensor:
    """Binary (N, size, size) targets: ``gt_masks[matched_idxs]`` (M, H, W) cropped to ``boxes`` (N, 4) by an
    aligned RoIAlign and thresholded at 0.5 (mmdet ``crop_and_resize(..., binarize=True)``)."""
    h, w = gt_masks.shape[-2:]
    boxes = boxes.detach().to(torch.float32).clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    matched_idxs = matched_idxs.to(boxes.device)
    rois = torch.cat([torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None], boxes], dim=1)
    sampled = roi_align(gt_masks[matched_idxs][:, None].to(rois.dtype), rois, (size, size), 1.0, 0, True)[:, 0]
    return (sampled >= 0.5).to(boxes.dtype)


def mask_loss(
    mask_logits: torch.Tensor,
    proposals: List[torch.Tensor],
    gt_masks: List[torch.Tensor],
    gt_labels: List[torch.Tensor],
    mask_matched_idxs: List[torch.Tensor],
) -> torch.Tensor:
    """mmdet's mask loss with torchvision's ``maskrcnn_loss`` signature: ``mask_logits`` (N, K+1, M, M) of the
    positive RoIs ``proposals`` (per image), their matched ground-truth indices and the images' gt masks / labels."""
    size = mask_logits.shape[-1]
    labels = [gl[idx] for gl, idx in zip(gt_labels, mask_matched_idxs)]
    targets = [mask_targets(m, p, i, size) for m, p, i in zip(gt_masks, proposals, mask_matched_idxs)]
    labels_all = torch.cat(labels, dim=0)
    targets_all = torch.cat(targets, dim=0)
    if targets_all.numel() == 0:
        return mask_logits.sum() * 0
    logits = mask_logits[torch.arange(labels_all.shape[0], device=labels_all.device), labels_all]
    return F.binary_cross_entropy_with_logits(logits, targets_all)


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, image_shape: Tuple[int, int]) -> torch.Tensor:
    """(N, 1, M, M) probabilities pasted into (N, 1, H, W) maps over ``boxes`` (N, 4) the mmdet way; pixels outside
    each box's reach are 0. ``>= 0.5`` gives mmdet's binary masks."""
    h, w = int(image_shape[0]), int(image_shape[1])
    n = masks.shape[0]
    out = masks.new_zeros((n, 1, h, w))
    if n == 0:
        return out
    boxes = boxes.to(masks.dtype)
    for i in range(n):  # mmdet on the CPU: one mask at a time, over the pixels its box reaches
        x0, y0, x1, y1 = boxes[i]
        xa = max(int(torch.floor(x0).item()) - 1, 0)
        ya = max(int(torch.floor(y0).item()) - 1, 0)
        xb = min(int(torch.ceil(x1).item()) + 1, w)
        yb = min(int(torch.ceil(y1).item()) + 1, h)
        if xb <= xa or yb <= ya:
            continue
        ys = torch.arange(ya, yb, device=masks.device, dtype=torch.float32) + 0.5
        xs = torch.arange(xa, xb, device=masks.device, dtype=torch.float32) + 0.5
        ys = (ys - y0) / (y1 - y0) * 2 - 1
        xs = (xs - x0) / (x1 - x0) * 2 - 1
        ys = torch.where(torch.isinf(ys), torch.zeros_like(ys), ys)  # a zero-height box (mmdet sets inf to 0)
        xs = torch.where(torch.isinf(xs), torch.zeros_like(xs), xs)
        grid = torch.stack([xs[None, :].expand(len(ys), -1), ys[:, None].expand(-1, len(xs))], dim=-1)
        sampled = F.grid_sample(masks[i : i + 1].float(), grid[None], align_corners=False)
        out[i, :, ya:yb, xa:xb] = sampled[0].to(out.dtype)
    return out
