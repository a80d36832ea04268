"""Evaluation of the dense models: COCO box / mask AP with pycocotools, and mIoU / aAcc with single-scale or
multi-scale + flip inference (mmsegmentation's ``whole`` and ``slide`` modes).

* :func:`evaluate_coco(model, dataset)`: runs a detector from :func:`msconv.dense.create_detector` over a
  :class:`msconv.data.coco.CocoDetection` (with ``detection_eval_transforms``: images at their own size) and scores
  the detections with ``pycocotools.cocoeval.COCOeval`` against the dataset's annotations. Returns
  ``{'bbox': {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'}, 'segm': {...}}`` (fractions in [0, 1]).
* :func:`predict_segmentation(model, image, ...)`: class probabilities of one image (rescaled to the test scale
  (2048, 512) times each ratio, optionally flipped, ``whole`` or ``slide`` inference, logits resized back and
  softmaxed, averaged over the augmentations as mmseg's ``aug_test``).
* :func:`evaluate_segmentation(model, dataset, ...)`: mIoU (mean over classes present in prediction or label),
  mAcc and aAcc (pixel accuracy), ignoring the ignore index. ``ratios=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
  flip=True`` is the papers' multi-scale + flip setting.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .._extras import require
from ..data.ade import IGNORE_INDEX, rescale_size
from ..data.coco import collate_detection

__all__ = [
    'evaluate_coco',
    'coco_results',
    'coco_eval',
    'predict_segmentation',
    'evaluate_segmentation',
    'segmentation_metrics',
    'MS_RATIOS',
]

MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
_COCO_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batches(dataset, indices: Sequence[int], batch_size: int, num_workers: int, collate):
    """Batches of ``dataset[indices]``: in this process, or decoded by a DataLoader's worker processes."""
    if num_workers == 0:
        for start in range(0, len(indices), batch_size):
            yield collate([dataset[i] for i in indices[start : start + batch_size]])
        return
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, list(indices)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
    )
    yield from loader


def _check_loop_args(batch_size: Any, num_workers: Any) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")


@torch.no_grad()
def coco_results(
    model: nn.Module,
    dataset,
    batch_size: int = 2,
    max_images: Optional[int] = None,
    mask_threshold: float = 0.5,
    indices: Optional[Sequence[int]] = None,
    num_workers: int = 0,
) -> Tuple[List[dict], List[dict], List[Any]]:
    """Run ``model`` over ``dataset`` and return COCO result lists ``(bbox_results, segm_results, image_ids)``.

    ``indices`` selects the items (e.g. one distributed rank's share; the lists of all ranks concatenated give
    the full evaluation); ``num_workers`` decodes images in DataLoader workers.
    """
    mask_utils = require('pycocotools.mask', 'COCO evaluation')

    _check_loop_args(batch_size, num_workers)
    if indices is None:
        indices = range(len(dataset) if max_images is None else min(int(max_images), len(dataset)))
    device = _device_of(model)
    was_training = model.training
    model.eval()
    boxes_out, segm_out, image_ids = [], [], []
    try:
        for images, targets in _batches(dataset, list(indices), batch_size, num_workers, collate_detection):
            outputs = model([im.to(device) for im in images])
            for out, target in zip(outputs, targets):
                if target.get('excluded'):  # the stand-in of an unusable image (CocoDetection(exclude=True))
                    continue
                img_id = target['image_id']
                image_ids.append(img_id)
                boxes = out['boxes'].cpu()
                xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
                scores, labels = out['scores'].cpu().tolist(), out['labels'].cpu().tolist()
                cats = [dataset.cat_ids[lab - 1] for lab in labels]
                boxes_out += [
                    dict(image_id=img_id, category_id=c, bbox=b, score=s) for c, b, s in zip(cats, xywh, scores)
                ]
                if 'masks' in out and len(labels):
                    binary = (out['masks'][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
                    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
                    for rle, c, s in zip(rles, cats, scores):
                        rle['counts'] = rle['counts'].decode('ascii')
                        segm_out.append(dict(image_id=img_id, category_id=c, segmentation=rle, score=s))
    finally:
        model.train(was_training)
    return boxes_out, segm_out, image_ids


def coco_eval(coco_gt, results: List[dict], iou_type: str, image_ids: List[Any]) -> Dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl of ``results`` (COCO result dicts) against ``coco_gt`` on ``image_ids``."""
    COCOeval = require('pycocotools.cocoeval', 'COCO evaluation').COCOeval  # noqa: N806 (pycocotools' class)

    if not results:
        return {k: 0.0 for k in _COCO_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval reports -1 where a size range has no ground truth
    return {k: float(v) for k, v in zip(_COCO_NAMES, ev.stats[:6])}


def evaluate_coco(
    model: nn.Module,
    dataset,
    batch_size: int = 2,
    max_images: Optional[int] = None,
    iou_types: Sequence[str] = ('bbox', 'segm'),
    num_workers: int = 0,
) -> Dict[str, Dict[str, float]]:
    """COCO AP of ``model`` on ``dataset`` (see the module docstring). ``segm`` is scored only for mask models."""
    for t in iou_types:
        if t not in ('bbox', 'segm'):
            raise ValueError(f"iou_types must hold 'bbox' and/or 'segm', got {t!r}")
    if not hasattr(dataset, 'coco') or not hasattr(dataset, 'cat_ids'):
        raise ValueError(f"dataset must be an msconv.data.coco.CocoDetection, got {type(dataset).__name__}")
    boxes, segms, image_ids = coco_results(model, dataset, batch_size, max_images, num_workers=num_workers)
    metrics = {}
    if 'bbox' in iou_types:
        metrics['bbox'] = coco_eval(dataset.coco, boxes, 'bbox', image_ids)
    has_masks = getattr(getattr(model, 'roi_heads', None), 'has_mask', lambda: False)()
    if 'segm' in iou_types and has_masks:
        metrics['segm'] = coco_eval(dataset.coco, segms, 'segm', image_ids)
    return metrics


def _slide_logits(model: nn.Module, image: torch.Tensor, crop: Tuple[int, int], stride: Tuple[int, int]):
    """mmseg ``slide_inference``: overlapping crops, logits averaged where they overlap. (1, K, H, W)."""
    _, _, h, w = image.shape
    (ch, cw), (sh, sw) = crop, stride
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    logits, count = None, image.new_zeros((1, 1, h, w))
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, h), min(c * sw + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            out = model(image[:, :, y1:y2, x1:x2])
            if logits is None:
                logits = image.new_zeros((1, out.shape[1], h, w))
            logits[:, :, y1:y2, x1:x2] += out
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


@torch.no_grad()
def predict_segmentation(
    model: nn.Module,
    image: torch.Tensor,
    ratios: Sequence[float] = (1.0,),
    flip: bool = False,
    scale: Optional[Tuple[int, int]] = (2048, 512),
    mode: str = 'whole',
    crop_size: Tuple[int, int] = (512, 512),
    stride: Tuple[int, int] = (341, 341),
):
    """Class probabilities (K, H, W) of one float image (3, H, W) in [0, 1] (see the module docstring).

    ``scale=None`` runs at the image's own size times each ratio.
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be a float tensor (3, H, W), got {getattr(image, 'shape', type(image))}")
    if mode not in ('whole', 'slide'):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if not ratios or not all(isinstance(r, (int, float)) and r > 0 for r in ratios):
        raise ValueError(f"ratios must be positive numbers, got {ratios!r}")
    h, w = image.shape[1:]
    image = image.to(_device_of(model))[None]
    probs = None
    n = 0
    for r in ratios:
        if scale is None:
            size = (max(int(h * r + 0.5), 1), max(int(w * r + 0.5), 1))
        else:
            size = rescale_size(h, w, (int(scale[0] * r), int(scale[1] * r)))
        scaled = F.interpolate(image, size=size, mode='bilinear', align_corners=False)
        for flipped in (False, True) if flip else (False,):
            x = scaled.flip(-1) if flipped else scaled
            logits = model(x) if mode == 'whole' else _slide_logits(model, x, crop_size, stride)
            if flipped:
                logits = logits.flip(-1)
            p = F.interpolate(logits, size=(h, w), mode='bilinear', align_corners=False).softmax(dim=1)[0]
            probs = p if probs is None else probs + p
            n += 1
    return probs / n


def _first(batch):
    return batch[0]


def segmentation_metrics(intersect: torch.Tensor, union: torch.Tensor, label_area: torch.Tensor) -> Dict[str, Any]:
    """mIoU, mAcc (over classes with a union / label area; NaN classes left out, as mmseg) and aAcc."""
    iou = intersect / union  # NaN where the class is absent from both prediction and label
    acc = intersect / label_area
    return dict(
        mIoU=float(np.nanmean(iou.numpy())) if not torch.isnan(iou).all() else math.nan,
        mAcc=float(np.nanmean(acc.numpy())) if not torch.isnan(acc).all() else math.nan,
        aAcc=float(intersect.sum() / label_area.sum().clamp(min=1)),
        IoU=iou.tolist(),
    )


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    dataset,
    num_classes: int,
    ratios: Sequence[float] = (1.0,),
    flip: bool = False,
    scale: Optional[Tuple[int, int]] = (2048, 512),
    mode: str = 'whole',
    crop_size: Tuple[int, int] = (512, 512),
    stride: Tuple[int, int] = (341, 341),
    ignore_index: int = IGNORE_INDEX,
    max_images: Optional[int] = None,
    num_workers: int = 0,
) -> Dict[str, Any]:
    """mIoU / mAcc / aAcc of ``model`` over ``dataset`` items ``(image (3, H, W), mask (H, W))``; one image at a
    time (images keep their own sizes), decoded in ``num_workers`` DataLoader workers if > 0."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    _check_loop_args(1, num_workers)
    was_training = model.training
    model.eval()
    inter = torch.zeros(num_classes, dtype=torch.float64)
    union = torch.zeros(num_classes, dtype=torch.float64)
    pred_area = torch.zeros(num_classes, dtype=torch.float64)
    label_area = torch.zeros(num_classes, dtype=torch.float64)
    n = len(dataset) if max_images is None else min(int(max_images), len(dataset))
    try:
        for image, mask in _batches(dataset, list(range(n)), 1, num_workers, _first):
            mask = mask.as_subclass(torch.Tensor).long()
            valid = mask != ignore_index
            if not valid.any():  # nothing to score (e.g. the stand-in of an unusable image: exclude=True)
                continue
            pred = (
                predict_segmentation(
                    model, image.as_subclass(torch.Tensor), ratios, flip, scale, mode, crop_size, stride
                )
                .argmax(0)
                .cpu()
            )
            p, t = pred[valid], mask[valid]
            inter += torch.bincount(t[p == t], minlength=num_classes)[:num_classes].double()
            pred_area += torch.bincount(p, minlength=num_classes)[:num_classes].double()
            label_area += torch.bincount(t, minlength=num_classes)[:num_classes].double()
    finally:
        model.train(was_training)
    union = pred_area + label_area - inter
    return segmentation_metrics(inter, union, label_area)
