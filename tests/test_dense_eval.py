"""Dense evaluation: COCO AP and mIoU / aAcc on oracle models with known answers, slide vs whole inference,
multi-scale + flip, and a tiny end-to-end run (digits set on disk -> loaders -> micro model -> metrics)."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from msconv.data.ade import (
    ADESegmentation,
    collate_segmentation,
    segmentation_eval_transforms,
    segmentation_train_transforms,
)
from msconv.data.coco import CocoDetection, collate_detection, detection_eval_transforms, detection_train_transforms
from msconv.data.dense_digits import build_digits_ade, build_digits_coco
from msconv.dense import create_detector, create_segmenter, evaluate_coco, evaluate_segmentation, predict_segmentation
from msconv.dense.evaluation import segmentation_metrics


class _Oracle(nn.Module):
    """A 'detector' answering with the ground truth of the dataset (optionally shifted), in call order."""

    def __init__(self, dataset, shift: float = 0.0, with_masks: bool = True):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.answers = []
        for i in range(len(dataset)):
            _, t = dataset[i]
            out = dict(
                boxes=t['boxes'].as_subclass(torch.Tensor) + shift,
                labels=t['labels'],
                scores=torch.linspace(0.9, 0.5, len(t['labels'])),
            )
            if with_masks:
                out['masks'] = torch.roll(t['masks'].float(), int(shift), dims=2)[:, None]
            self.answers.append(out)
        self.calls = 0
        self.roi_heads = type('H', (), {'has_mask': staticmethod(lambda: with_masks)})()

    def forward(self, images):
        out = self.answers[self.calls : self.calls + len(images)]
        self.calls += len(images)
        return out


@pytest.fixture(scope='module')
def coco_val(tmp_path_factory):
    img_dir, ann = build_digits_coco(
        tmp_path_factory.mktemp('coco'), 'val', n_images=6, canvas=(64, 96), digit_size=(20, 48), seed=3
    )
    return CocoDetection(img_dir, ann, detection_eval_transforms())


def test_coco_ap_of_oracle_is_one(coco_val):
    metrics = evaluate_coco(_Oracle(coco_val), coco_val, batch_size=4)
    assert set(metrics) == {'bbox', 'segm'}
    for kind in ('bbox', 'segm'):
        assert metrics[kind]['AP'] == pytest.approx(1.0) and metrics[kind]['AP50'] == pytest.approx(1.0)
    shifted = evaluate_coco(_Oracle(coco_val, shift=6.0), coco_val)
    assert shifted['bbox']['AP'] < 0.9 and shifted['segm']['AP'] < 0.9
    assert set(evaluate_coco(_Oracle(coco_val, with_masks=False), coco_val)) == {'bbox'}
    with pytest.raises(ValueError, match='iou_types'):
        evaluate_coco(_Oracle(coco_val), coco_val, iou_types=('keypoints',))
    in_workers = evaluate_coco(_Oracle(coco_val, shift=6.0), coco_val, num_workers=1)
    assert in_workers == shifted
    with pytest.raises(ValueError, match='num_workers'):
        evaluate_coco(_Oracle(coco_val), coco_val, num_workers=-1)


class _ColourSegmenter(nn.Module):
    """Per-pixel 'segmenter': class = round(red * (K - 1)); logits are one-hot * 10 (flip-equivariant)."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        cls = (x[:, 0] * (self.k - 1)).round().long().clamp(0, self.k - 1)
        return F.one_hot(cls, self.k).permute(0, 3, 1, 2).float() * 10


class _ListDataset:
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_segmentation_metrics_by_hand():
    inter = torch.tensor([2.0, 0.0, 3.0], dtype=torch.float64)
    union = torch.tensor([4.0, 0.0, 3.0], dtype=torch.float64)
    area = torch.tensor([3.0, 0.0, 3.0], dtype=torch.float64)
    m = segmentation_metrics(inter, union, area)
    assert m['mIoU'] == pytest.approx((0.5 + 1.0) / 2) and math.isnan(m['IoU'][1])
    assert m['aAcc'] == pytest.approx(5 / 6) and m['mAcc'] == pytest.approx((2 / 3 + 1) / 2)


def test_segmentation_eval_oracle_single_and_multiscale_flip():
    k = 4
    image = torch.zeros(3, 40, 60)
    mask = torch.zeros(40, 60, dtype=torch.long)
    for c, (y, x) in enumerate([(0, 0), (0, 30), (20, 0), (20, 30)]):
        image[0, y : y + 20, x : x + 30] = c / (k - 1)
        mask[y : y + 20, x : x + 30] = c
    image[1] = torch.linspace(0, 1, 60)  # asymmetric: a missing un-flip would show
    mask[:2] = 255
    ds = _ListDataset([(image, mask)])
    model = _ColourSegmenter(k)
    single = evaluate_segmentation(model, ds, k, scale=None)
    assert single['mIoU'] == pytest.approx(1.0) and single['aAcc'] == pytest.approx(1.0)
    ms = evaluate_segmentation(model, ds, k, ratios=(0.5, 0.75, 1.0, 1.5), flip=True, scale=(120, 40))
    assert ms['mIoU'] > 0.97 and ms['aAcc'] > 0.98
    assert (
        evaluate_segmentation(model, ds, k, ratios=(0.5, 0.75, 1.0, 1.5), flip=True, scale=(120, 40), num_workers=1)
        == ms
    )
    wrong = evaluate_segmentation(
        model, _ListDataset([(image, torch.where(mask == 255, mask, (mask + 1) % k))]), k, scale=None
    )
    assert wrong['aAcc'] < 0.01


def test_slide_inference_matches_whole_for_a_pixelwise_model():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 5, 1)
    image = torch.rand(3, 50, 70)
    whole = predict_segmentation(model, image, scale=None)
    slide = predict_segmentation(model, image, scale=None, mode='slide', crop_size=(32, 32), stride=(20, 20))
    torch.testing.assert_close(slide, whole)
    assert whole.shape == (5, 50, 70)
    flipped = predict_segmentation(model, image, scale=None, flip=True)
    torch.testing.assert_close(flipped, whole)  # 1x1 convs commute with flips
    with pytest.raises(ValueError, match='mode'):
        predict_segmentation(model, image, mode='tiles')
    with pytest.raises(ValueError, match=r'\(3, H, W\)'):
        predict_segmentation(model, image[None])


@pytest.mark.parametrize('arch', ['mask_rcnn', 'retinanet'])
def test_end_to_end_digits_detection(tmp_path, arch):
    """digits -> COCO files -> CocoDetection -> micro detector, two optimizer steps -> COCO AP."""
    torch.manual_seed(0)
    random.seed(0)
    img_dir, ann = build_digits_coco(tmp_path, 'train', n_images=4, canvas=(64, 64), digit_size=(20, 40), max_digits=2)
    train = CocoDetection(
        img_dir, ann, detection_train_transforms(scales=(64,), max_size=100, crop=False), filter_empty=True
    )
    val = CocoDetection(img_dir, ann, detection_eval_transforms())
    model = create_detector('test_smt', arch, 10, min_size=64, max_size=100, rois_per_image=32, test_proposals=20)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    losses = []
    for step in range(2):
        images, targets = collate_detection([train[0], train[1]])
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    metrics = evaluate_coco(model, val, batch_size=2)
    assert set(metrics) == ({'bbox', 'segm'} if arch == 'mask_rcnn' else {'bbox'})
    for values in metrics.values():
        assert set(values) == {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'}
        assert all(-1.0 <= v <= 1.0 for v in values.values())


def test_end_to_end_digits_segmentation(tmp_path):
    """digits -> ADE files -> ADESegmentation -> micro UperNet, a few steps on one batch (loss falls) -> mIoU."""
    torch.manual_seed(0)
    random.seed(0)
    root = build_digits_ade(tmp_path, 'training', n_images=4, canvas=(64, 64), digit_size=(20, 48))
    train = ADESegmentation(
        root, 'training', segmentation_train_transforms(scale=(128, 64), crop_size=(64, 64)), num_classes=11
    )
    val = ADESegmentation(root, 'training', segmentation_eval_transforms(), num_classes=11)
    model = create_segmenter('test_smt', 'upernet', 11, channels=64, aux_channels=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, masks = collate_segmentation([train[i] for i in range(4)])
    losses = []
    for _ in range(4):
        loss = sum(model.loss(images, masks).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    metrics = evaluate_segmentation(model, val, 11, scale=(128, 64))
    assert 0.0 <= metrics['mIoU'] <= 1.0 and 0.0 <= metrics['aAcc'] <= 1.0 and len(metrics['IoU']) == 11
