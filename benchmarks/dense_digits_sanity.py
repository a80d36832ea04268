"""Time-boxed CPU sanity runs of the dense systems on the offline digits sets (no engine, no pre-training).

    PYTHONPATH=src python benchmarks/dense_digits_sanity.py detection --arch mask_rcnn --seconds 420
    PYTHONPATH=src python benchmarks/dense_digits_sanity.py segmentation --seconds 300

Writes the COCO- / ADE-format digits sets to --root, trains the micro ``test_smt`` backbone from scratch with slim
heads (FPN/heads 64 channels, fc 256; UperNet 64, aux 32) for --seconds on one thread, and prints the held-out
metrics (COCO AP/AP50; mIoU/aAcc single scale and multi-scale + flip). A starting point for the digits demo,
which is to fine-tune backbones pre-trained by the classification demo instead.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from msconv.data.ade import (
    ADESegmentation,
    collate_segmentation,
    segmentation_eval_transforms,
    segmentation_train_transforms,
)
from msconv.data.coco import CocoDetection, collate_detection, detection_eval_transforms, detection_train_transforms
from msconv.data.dense_digits import build_digits_ade, build_digits_coco
from msconv.dense import MS_RATIOS, create_detector, create_segmenter, evaluate_coco, evaluate_segmentation


def detection(args) -> None:
    img_dir, ann = build_digits_coco(f"{args.root}/coco", 'train', n_images=400)
    val_dir, val_ann = build_digits_coco(f"{args.root}/coco", 'val', n_images=50, seed=1)
    train = CocoDetection(
        img_dir, ann, detection_train_transforms(scales=(112, 128, 144), max_size=200, crop=False), filter_empty=True
    )
    val = CocoDetection(val_dir, val_ann, detection_eval_transforms())
    model = create_detector(
        args.backbone,
        args.arch,
        10,
        min_size=128,
        max_size=200,
        rois_per_image=64,
        test_proposals=100,
        channels=64,
        fc_channels=256,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.05)
    t0, step = time.time(), 0
    while time.time() - t0 < args.seconds:
        images, targets = collate_detection([train[i] for i in random.sample(range(len(train)), 4)])
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
    metrics = evaluate_coco(model, val, batch_size=4)
    print(
        f"{args.arch}: {step} steps in {time.time() - t0:.0f}s; "
        + '; '.join(f"{k} AP {v['AP']:.3f} AP50 {v['AP50']:.3f}" for k, v in metrics.items())
    )


def segmentation(args) -> None:
    root = build_digits_ade(f"{args.root}/ade", 'training', n_images=400)
    build_digits_ade(root, 'validation', n_images=50, seed=1)
    train = ADESegmentation(
        root, 'training', segmentation_train_transforms(scale=(256, 128), crop_size=(128, 128)), num_classes=11
    )
    val = ADESegmentation(root, 'validation', segmentation_eval_transforms(), num_classes=11)
    model = create_segmenter(args.backbone, 'upernet', 11, channels=64, aux_channels=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    t0, step = time.time(), 0
    while time.time() - t0 < args.seconds:
        images, masks = collate_segmentation([train[i] for i in random.sample(range(len(train)), 8)])
        loss = sum(model.loss(images, masks).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
    ss = evaluate_segmentation(model, val, 11, scale=(256, 128))
    ms = evaluate_segmentation(model, val, 11, scale=(256, 128), ratios=MS_RATIOS, flip=True)
    print(
        f"upernet: {step} steps in {time.time() - t0:.0f}s; mIoU {ss['mIoU']:.3f} aAcc {ss['aAcc']:.3f}; "
        f"ms+flip mIoU {ms['mIoU']:.3f} aAcc {ms['aAcc']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('task', choices=['detection', 'segmentation'])
    parser.add_argument('--arch', default='mask_rcnn', choices=['mask_rcnn', 'cascade_mask_rcnn', 'retinanet'])
    parser.add_argument('--backbone', default='test_smt')
    parser.add_argument('--seconds', type=float, default=300.0)
    parser.add_argument('--root', default='/tmp/msconv_dense_digits')
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(args.threads)
    (detection if args.task == 'detection' else segmentation)(args)


if __name__ == '__main__':
    main()
