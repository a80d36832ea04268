"""The parts of the dense systems that follow mmdetection 2.x / mmsegmentation 0.x where torchvision differs:
anchors, RoIAlign and its levels, mask targets and pasting, RetinaNet's extra levels and loss normalisation,
UperNet's cross-entropy, initialisation, ShiftwiseConv's sparsity masks, SMT's element-wise drop path, and the
photometric distortion. Each test fails with torchvision's (or the previous) behaviour."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import roi_align

from msconv.dense import create_backbone, create_detector, create_segmenter
from msconv.dense.anchors import MMDetAnchorGenerator, retinanet_anchor_generator, rpn_anchor_generator
from msconv.dense.masks import mask_targets, paste_masks
from msconv.dense.poolers import AlignedRoIAlign, mmdet_roi_levels
from msconv.dense.segmentation import seg_cross_entropy


def test_anchors_are_mmdets_unrounded_at_configured_strides():
    gen = rpn_anchor_generator()
    base = gen.cell_anchors[0]  # stride 4, scale 8: size 32, ratios 0.5 / 1 / 2
    w, h = 32 / math.sqrt(0.5), 32 * math.sqrt(0.5)
    torch.testing.assert_close(base[0], torch.tensor([-w / 2, -h / 2, w / 2, h / 2]))  # 45.25 x 22.63, not 46 x 22
    torch.testing.assert_close(base[1], torch.tensor([-16.0, -16.0, 16.0, 16.0]))
    # a 352-pixel image: P6 has ceil(11 / 2) = 6 cells; mmdet's stride 64, not 352 // 6 = 58
    feats = [torch.zeros(1, 1, 352 // s, 352 // s) for s in (4, 8, 16, 32)] + [torch.zeros(1, 1, 6, 6)]
    anchors = gen(ImageList(torch.zeros(1, 3, 352, 352), [(352, 352)]), feats)[0]
    p6 = anchors[-36 * 3 :].reshape(6, 6, 3, 4)
    centres = (p6[0, :, 1, 0] + p6[0, :, 1, 2]) / 2
    torch.testing.assert_close(centres, torch.arange(6.0) * 64)
    retina = retinanet_anchor_generator()
    sizes = (retina.cell_anchors[0][3:6, 2] * 2).tolist()  # ratio 1, scales 4, 4 * 2^(1/3), 4 * 2^(2/3) at stride 8
    assert sizes == pytest.approx([32.0, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)], rel=1e-6)  # 40.32, 50.80 (not 40, 50)
    assert retina.num_anchors_per_location() == [9] * 5
    with pytest.raises(ValueError, match='strides'):
        MMDetAnchorGenerator((), (8,), (1.0,))


def test_roi_align_is_aligned_with_mmdet_levels():
    boxes = torch.tensor([[0, 0, 111.0, 111], [0, 0, 112, 112], [0, 0, 224, 224], [0, 0, 448, 448], [0, 0, 900, 900]])
    assert mmdet_roi_levels(boxes, 4).tolist() == [0, 1, 2, 3, 3]  # finest_scale 56
    pool = AlignedRoIAlign(['0', '1'], output_size=7, sampling_ratio=0)
    feats = {'0': torch.randn(1, 4, 32, 32), '1': torch.randn(1, 4, 16, 16)}
    box = torch.tensor([[3.3, 5.1, 40.7, 60.2]])  # sqrt(area) < 112: the finest level (stride 4)
    out = pool(feats, [box], [(128, 128)])
    rois = torch.cat([torch.zeros(1, 1), box], 1)
    torch.testing.assert_close(out, roi_align(feats['0'], rois, 7, 0.25, 0, aligned=True))
    assert not torch.allclose(out, roi_align(feats['0'], rois, 7, 0.25, 0, aligned=False), atol=1e-3)


def test_mask_targets_are_aligned_and_binary():
    gt = torch.zeros(1, 64, 64, dtype=torch.uint8)
    gt[0, 10:40, 20:50] = 1
    box = torch.tensor([[20.0, 10.0, 50.0, 40.0]])
    t = mask_targets(gt, box, torch.tensor([0]), 28)
    assert torch.equal(t, torch.ones(1, 28, 28))  # the box is the mask: every aligned sample inside it
    soft = roi_align(gt[:, None].float(), torch.cat([torch.zeros(1, 1), box], 1), 28, 1.0, 0, aligned=False)
    assert soft.min() < 0.99  # torchvision's unaligned soft targets fade at the border


def test_paste_masks_is_mmdets_grid_sample():
    """A constant mask pasted the mmdet way: bilinear samples of the 28 x 28 map at each pixel centre's place in
    the box, zero beyond the map: 1 inside, ramps of one map cell at the edges (the product at corners)."""
    probs = torch.ones(1, 1, 28, 28)
    x0, y0, x1, y1 = 10.3, 20.7, 50.2, 60.9
    pasted = paste_masks(probs, torch.tensor([[x0, y0, x1, y1]]), (80, 70))[0, 0]

    def edge(centres, lo, hi):  # map coordinate of each pixel centre; bilinear weight of the inside
        c = (centres + 0.5 - lo) / (hi - lo) * 28 - 0.5
        return torch.clamp(torch.minimum(c + 1, 28 - c), 0, 1)

    expected = edge(torch.arange(80.0), y0, y1)[:, None] * edge(torch.arange(70.0), x0, x1)[None, :]
    torch.testing.assert_close(pasted, expected, atol=1e-5, rtol=0)
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    tv = paste_masks_in_image(probs, torch.tensor([[x0, y0, x1, y1]]), (80, 70))[0, 0]
    assert not torch.equal(tv >= 0.5, expected >= 0.5)  # torchvision: integer box, one cell of padding
    assert paste_masks(probs[:0], torch.zeros(0, 4), (8, 8)).shape == (0, 1, 8, 8)


def test_retinanet_p7_from_p6_without_relu_and_fpn_init():
    model = create_detector('test_smt', 'retinanet', 3, channels=16)
    fpn = model.backbone.fpn
    x = {str(i): torch.randn(1, c, s, s) for i, (c, s) in enumerate(zip([32, 64, 128], [8, 4, 2]))}
    out = list(fpn(x).values())
    extra = fpn.extra_blocks
    p6 = extra.p6(x['2'])
    torch.testing.assert_close(out[3], p6)
    torch.testing.assert_close(out[4], extra.p7(p6))  # no ReLU before P7
    for conv in [m for m in fpn.modules() if isinstance(m, nn.Conv2d)]:
        fan_in, fan_out = conv.weight[0].numel(), conv.weight.shape[0] * conv.weight[0, 0].numel()
        assert conv.weight.abs().max() <= math.sqrt(6 / (fan_in + fan_out)) + 1e-6  # Xavier-uniform bound
        assert conv.bias.abs().max() == 0


def test_rcnn_and_upernet_heads_start_as_mmdet_and_mmseg():
    torch.manual_seed(0)
    model = create_detector('test_smt', 'mask_rcnn', 80, channels=64, fc_channels=256)
    pred = model.roi_heads.box_predictor
    assert 0.008 < pred.cls_score.weight.std() < 0.012 and 0.0008 < pred.bbox_pred.weight.std() < 0.0012
    assert pred.cls_score.bias.abs().max() == 0 and pred.bbox_pred.bias.abs().max() == 0
    fc6 = model.roi_heads.box_head.fc6.weight
    assert fc6.abs().max() <= math.sqrt(6 / sum(fc6.shape)) + 1e-6  # Xavier-uniform
    assert model.roi_heads.mask_predictor.mask_fcn_logits.bias.abs().max() == 0
    seg = create_segmenter('test_smt', 'upernet', 150, channels=64, aux_channels=32)
    head = seg.decode_head
    assert 0.008 < head.conv_seg.weight.std() < 0.012 and head.conv_seg.bias.abs().max() == 0
    w = head.fpn_bottleneck[0].weight  # Kaiming-normal, fan out, ReLU gain
    assert abs(w.std().item() / math.sqrt(2 / (w.shape[0] * 9)) - 1) < 0.05
    # the digits demo's classifiers: nn.Conv2d's own init (uniform +-1/sqrt(fan_in) = 0.125 here), bias too
    demo = create_segmenter('test_smt', 'upernet', 150, channels=64, aux_channels=32, classifier_init='torch')
    for conv in (demo.decode_head.conv_seg, demo.auxiliary_head.conv_seg):
        bound = 1 / math.sqrt(conv.weight.shape[1])
        assert conv.weight.abs().max() <= bound and conv.weight.std() > 0.5 * bound / math.sqrt(3)
        assert conv.bias.abs().max() > 0
    with pytest.raises(ValueError, match="classifier_init must be 'mmseg' or 'torch', got 'xavier'"):
        create_segmenter('test_smt', 'upernet', 150, classifier_init='xavier')


def test_retinanet_losses_are_normalised_by_the_batchs_positives():
    model = create_detector('test_smt', 'retinanet', 2, channels=16)
    anchors = [torch.tensor([[0, 0, 10, 10], [0, 0, 20, 20], [30, 30, 50, 50], [60, 60, 80, 80.0]])] * 2
    targets = [
        {
            'boxes': torch.tensor([[0, 0, 10, 10.0], [30, 30, 50, 50], [60, 60, 80, 80]]),
            'labels': torch.tensor([0, 1, 1]),
        },
        {'boxes': torch.tensor([[0, 0, 20, 20.0]]), 'labels': torch.tensor([1])},
    ]
    torch.manual_seed(0)
    head = {'cls_logits': torch.randn(2, 4, 2), 'bbox_regression': 0.1 * torch.randn(2, 4, 4)}
    losses = model.compute_loss(targets, head, anchors)
    from torchvision.ops import sigmoid_focal_loss

    # image 0: anchors 0, 2, 3 positive (anchor 1 at IoU 0.25 is negative); image 1: anchor 1 positive, anchor 0 at
    # IoU 0.25 negative, anchors 2, 3 negative: 4 positives in the batch
    cls_t = torch.zeros(2, 4, 2)
    cls_t[0, 0, 0] = cls_t[0, 2, 1] = cls_t[0, 3, 1] = cls_t[1, 1, 1] = 1
    focal = sigmoid_focal_loss(head['cls_logits'], cls_t, reduction='sum')
    torch.testing.assert_close(losses['classification'], focal / 4)
    per_image = (
        sum(sigmoid_focal_loss(head['cls_logits'][i], cls_t[i], reduction='sum') / n for i, n in ((0, 3), (1, 1))) / 2
    )
    assert not torch.allclose(losses['classification'], per_image)  # torchvision's per-image normalisation
    assert set(losses) == {'classification', 'bbox_regression'} and losses['bbox_regression'] > 0


def test_upernet_cross_entropy_averages_over_all_pixels():
    logits = torch.randn(2, 5, 8, 8)
    masks = torch.randint(0, 5, (2, 8, 8))
    masks[:, :2] = 255
    expected = F.cross_entropy(logits, masks, ignore_index=255, reduction='sum') / masks.numel()
    torch.testing.assert_close(seg_cross_entropy(logits, masks), expected)
    assert not torch.allclose(seg_cross_entropy(logits, masks), F.cross_entropy(logits, masks, ignore_index=255))


def test_shiftwise_backbone_keeps_pruned_weights_pruned(tmp_path):
    backbone = create_backbone('test_shiftwise')  # the official downstream configs: sparse=True
    assert backbone.sparse and not create_backbone('test_smt').sparse
    conv = backbone.body.model.stages[0].blocks[0].conv.weight
    state = backbone.state_dict()
    key = next(k for k in state if k.endswith('stages.0.blocks.0.conv.weight'))
    state[key][:, :5] = 0.0  # a checkpoint with pruned kernels
    backbone.load_state_dict(state)
    assert 0 < backbone.sparsity() < 0.1
    with torch.no_grad():  # an optimizer step moves every weight, the pruned ones too
        for _, p in backbone._maskable():
            p.add_(0.01)
    assert conv[:, :5].abs().min() > 0
    backbone.eval()(torch.randn(1, 3, 64, 64))
    assert conv[:, :5].abs().max() == 0 and conv[:, 5:].abs().min() > 0  # masked again by the forward
    with torch.no_grad():
        conv.add_(0.01)
    saved = backbone.state_dict()[key]
    assert saved[:, :5].abs().max() == 0  # saved masked: a reload takes the same masks
    dense = create_backbone('test_shiftwise', sparse=False)
    dense.load_state_dict(state)
    with torch.no_grad():
        dense.body.model.stages[0].blocks[0].conv.weight.add_(0.01)
    dense(torch.randn(1, 3, 64, 64))
    assert dense.body.model.stages[0].blocks[0].conv.weight[:, :5].abs().min() > 0


def test_smt_dense_drop_path_is_elementwise_dropout():
    smt = create_backbone('test_smt', drop_path_rate=0.2)
    drops = [m for m in smt.modules() if isinstance(m, nn.Dropout)]
    assert drops and max(m.p for m in drops) == pytest.approx(0.2)
    from timm.layers import DropPath

    assert not any(isinstance(m, DropPath) for m in smt.modules())
    sample = create_backbone('test_smt', drop_path_rate=0.2, drop_path_mode='sample')
    assert any(isinstance(m, DropPath) for m in sample.modules())
    assert any(isinstance(m, DropPath) for m in create_backbone('test_shiftwise', drop_path_rate=0.2).modules())
    with pytest.raises(ValueError, match='drop_path_mode'):
        create_backbone('test_smt', drop_path_mode='row')


def test_photometric_distortion_keeps_channel_order():
    from torchvision import tv_tensors

    from msconv.data.ade import PhotometricDistortion

    t = PhotometricDistortion(brightness=(1, 1), contrast=(1, 1), saturation=(1, 1), hue=(0, 0), p=1.0)
    image = tv_tensors.Image(torch.rand(3, 8, 8))
    for _ in range(5):
        torch.testing.assert_close(t(image).as_subclass(torch.Tensor), image.as_subclass(torch.Tensor))


def test_low_quality_matches_follow_mmdets_assigner():
    from msconv.dense.anchors import MaxIoUMatcher

    iou = torch.tensor(
        [
            [0.20, 0.10, 0.00, 0.00],  # a small object: best anchor at 0.2 < min_pos_iou 0.3: no positive (mmdet)
            [0.00, 0.60, 0.65, 0.00],  # best anchor 2
            [0.00, 0.00, 0.40, 0.40],  # best anchors 2 and 3 (ties): the later ground truth takes anchor 2
        ]
    )
    m = MaxIoUMatcher(0.7, 0.3, min_pos_iou=0.3)(iou)
    assert m.tolist() == [-1, -2, 2, 2]  # anchor 0: background (0.2 < 0.3), anchor 1: ignored (0.3 <= 0.6 < 0.7)
    from torchvision.models.detection._utils import Matcher

    tv = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    assert tv.tolist() == [0, -2, 1, 2]  # torchvision: anchor 0 for the small object, anchor 2 kept by its best gt
    assert MaxIoUMatcher(0.5, 0.4, min_pos_iou=0.0)(iou).tolist() == [0, 1, 2, 2]
    model = create_detector('test_smt', 'mask_rcnn', 3)
    assert isinstance(model.rpn.proposal_matcher, MaxIoUMatcher) and model.rpn.proposal_matcher.min_pos_iou == 0.3
    retina = create_detector('test_smt', 'retinanet', 3)
    assert isinstance(retina.proposal_matcher, MaxIoUMatcher) and retina.proposal_matcher.min_pos_iou == 0.0
