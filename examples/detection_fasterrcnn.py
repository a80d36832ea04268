"""An msconv backbone in torchvision's Faster R-CNN: ``features_only`` + a feature pyramid.

    python examples/detection_fasterrcnn.py --model smt_tiny --img-size 512

``msconv.create_backbone_fpn`` is the ``backbone`` torchvision's detectors expect (an ``out_channels`` attribute
and an ordered dict of maps): an msconv ``features_only`` trunk (timm's contract: ``feature_info.channels()`` and
``.reduction()``) whose maps at strides 8, 16 and 32 (``in_levels=(1, 2, 3)``) torchvision's
``FeaturePyramidNetwork`` brings to one width, plus a max-pooled level (``extra='pool'``), as ``FasterRCNN`` (and
``RetinaNet``, with ``extra='p6p7'``) expect. ``checkpoint_path=`` loads ImageNet weights into the trunk.
The script builds the detector, runs one training step on a synthetic image with two boxes (the losses must be
finite and give every trainable parameter a gradient) and one inference pass.
"""

from __future__ import annotations

import argparse

import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

import msconv


def build_detector(model_name: str, num_classes: int, img_size: int, **model_kwargs) -> FasterRCNN:
    backbone = msconv.create_backbone_fpn(model_name, extra='pool', in_levels=(1, 2, 3), **model_kwargs)
    levels = ['0', '1', '2', 'pool']
    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in (32, 64, 128, 256)), aspect_ratios=((0.5, 1.0, 2.0),) * len(levels)
    )
    roi_pool = MultiScaleRoIAlign(featmap_names=levels[:3], output_size=7, sampling_ratio=2)
    return FasterRCNN(
        backbone,
        num_classes=num_classes,
        rpn_anchor_generator=anchors,
        box_roi_pool=roi_pool,
        min_size=img_size,
        max_size=img_size,
    )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='smt_tiny')
    p.add_argument('--img-size', type=int, default=512)
    p.add_argument('--num-classes', type=int, default=3, help='object classes + background')
    args = p.parse_args(argv)

    torch.manual_seed(0)
    detector = build_detector(args.model, args.num_classes, args.img_size)
    s = args.img_size
    images = [torch.rand(3, s, s)]
    targets = [
        {'boxes': torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8]]) * s, 'labels': torch.tensor([1, 2])}
    ]

    detector.train()
    losses = detector(images, targets)
    total = sum(losses.values())
    total.backward()
    print('training losses:', {k: round(v.item(), 4) for k, v in losses.items()})
    assert torch.isfinite(total), losses

    detector.eval()
    with torch.no_grad():
        detections = detector(images)[0]
    print(f"inference: {len(detections['boxes'])} boxes, scores {detections['scores'][:3].tolist()}")
    return {'losses': losses, 'detections': detections, 'detector': detector}


if __name__ == '__main__':
    main()
