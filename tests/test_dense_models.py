"""Dense models: the papers' parameter counts and MACs (full size, meta device), the configs' structure, and
train / eval passes of micro systems."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import msconv
from msconv.dense import create_backbone, create_backbone_fpn, create_detector, create_segmenter
from msconv.dense.cascade import CascadeRoIHeads
from msconv.dense.necks import LastLevelP6P7OnInput, LastLevelP6P7OnOutput
from msconv.tools.dense_profile import profile_dense, profile_system

# (backbone, arch, paper params M, paper GMACs, our exact params). Papers: SMT README tables (COCO 1280x800,
# ADE20K 2048x512); ShiftwiseConv: the repository's get_flops logs (downstream/{detection,segmentation}/README.md).
PAPER = [
    ('smt_small', 'mask_rcnn', 40.0, 265.0, 42_193_333),
    ('smt_base', 'mask_rcnn', 52.0, 328.0, 51_679_733),
    ('smt_small', 'cascade_mask_rcnn', 78.0, 744.0, 80_037_249),
    ('smt_small', 'retinanet', 30.0, 247.0, 32_271_540),
    ('smt_small', 'atss', 28.0, 214.0, 30_137_114),
    ('smt_small', 'sparse_rcnn', 102.0, 171.0, 104_135_528),
    ('shiftwise_tiny', 'cascade_mask_rcnn', 86.89, 751.21, 89_211_117),
    ('smt_small', 'upernet', 50.0, 935.0, 52_345_580),
    ('smt_base', 'upernet', 62.0, 1004.0, 61_831_980),
    ('shiftwise_tiny', 'upernet', 62.51, 953.81, 62_514_776),
]
# Within 2% of the paper. The others: every SMT-S system is 2.0-2.3M above its table entry while its MACs match
# to 0.5%, i.e. the heads are the configs' and the gap is the backbone: the released SMT-S config has 22.04M
# backbone parameters (22.55M with its classifier, where the README's ImageNet table also prints 21M), so the
# SMT-S rows were counted on a smaller backbone than the one whose FLOPs they print. SW-T Cascade: the log's
# 86.89M comes from a 'tiny_flops.py' config that is not in the repository; our count follows the 3x config
# (4conv1fc heads, class-specific GIoU regression, one mask head per stage, N_path=2) whose MACs match the log to
# 0.6%; with one path per shift-wise conv (as the UperNet log's 'rep1' line) it is within 2%
# (test_shiftwise_one_path_logs).
WITHIN_2PCT = {('smt_base', 'mask_rcnn'), ('smt_base', 'upernet'), ('shiftwise_tiny', 'upernet')}
# Sparse R-CNN's gap is the same +2.1M (2.1% of its 102M)


def _build_meta(backbone: str, arch: str) -> nn.Module:
    with torch.device('meta'):
        if arch == 'upernet':
            return create_segmenter(backbone, arch, 150)
        return create_detector(backbone, arch, 80)


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize('backbone,arch,paper_m,paper_g,ours', PAPER, ids=[f"{b}-{a}" for b, a, *_ in PAPER])
def test_params_and_macs_vs_papers(backbone, arch, paper_m, paper_g, ours):
    model = _build_meta(backbone, arch)
    assert _params(model) == ours
    if (backbone, arch) in WITHIN_2PCT:
        assert abs(ours / (paper_m * 1e6) - 1) < 0.02
    else:
        assert 0.02 < ours / (paper_m * 1e6) - 1 < 0.08  # the documented gap, above the paper
    size = (3, 512, 2048) if arch == 'upernet' else (3, 1280, 800)
    stats = profile_dense(model, size)
    assert stats['params'] == ours
    # the papers' counters (mmcv hooks) see convolutions and linear layers, not attention matmuls
    assert abs(stats['macs_conv_linear'] / (paper_g * 1e9) - 1) < 0.01
    if backbone.startswith('smt'):
        assert stats['macs_attention'] > 0.07 * stats['macs']
    else:
        assert stats['macs_attention'] == 0


def test_shiftwise_one_path_logs():
    """The log's other SW-T UperNet figure (61.73M, 'rep1') is the model with one path per shift-wise conv; with
    one path the Cascade Mask R-CNN also comes within 2% of the detection log's 86.89M (which names no setting)."""
    with torch.device('meta'):
        seg = create_segmenter('shiftwise_tiny', 'upernet', 150, n_paths=1)
        det = create_detector('shiftwise_tiny', 'cascade_mask_rcnn', 80, n_paths=1)
    assert abs(_params(seg) / 61.73e6 - 1) < 0.001
    assert _params(det) == 88_423_527 and abs(_params(det) / 86.89e6 - 1) < 0.02


def test_heads_follow_configs():
    model = _build_meta('smt_small', 'mask_rcnn')
    fpn = model.backbone
    assert fpn.strides == [4, 8, 16, 32, 64] and fpn.out_channels == 256
    assert model.rpn.head.cls_logits.out_channels == 3  # 3 anchors per location
    assert model.roi_heads.box_head.fc6.in_features == 256 * 7 * 7 and model.roi_heads.box_head.fc7.out_features == 1024
    assert model.roi_heads.box_predictor.cls_score.out_features == 81
    assert model.roi_heads.box_roi_pool.sampling_ratio == 0
    assert sum(isinstance(m, nn.Conv2d) for m in model.roi_heads.mask_head.modules()) == 4
    assert model.roi_heads.box_coder.weights == (10.0, 10.0, 5.0, 5.0)

    retina = _build_meta('smt_small', 'retinanet')
    assert retina.backbone.strides == [8, 16, 32, 64, 128]
    assert isinstance(retina.backbone.fpn.extra_blocks, LastLevelP6P7OnInput)  # P7 on P6, no ReLU
    assert retina.backbone.fpn.extra_blocks.p6.in_channels == 512  # P6 on the C5 input
    assert retina.anchor_generator.num_anchors_per_location() == [9] * 5
    assert retina.head.classification_head.cls_logits.out_channels == 9 * 80

    cascade = _build_meta('smt_small', 'cascade_mask_rcnn')
    heads = cascade.roi_heads
    assert isinstance(heads, CascadeRoIHeads) and len(heads.stages) == 3
    assert [m.high_threshold for m in heads.matchers] == [0.5, 0.6, 0.7]
    assert not any(m.allow_low_quality_matches for m in heads.matchers)
    assert heads.box_coders[0].weights == (10.0, 10.0, 5.0, 5.0)
    assert heads.box_coders[1].weights == (20.0, 20.0, 10.0, 10.0)
    assert heads.stage_loss_weights == (1.0, 0.5, 0.25) and heads.giou_loss_weight == 10.0
    stage = heads.stages[0]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in stage.box_head.modules()) == 4  # Shared4Conv1FC
    assert stage.box_predictor.bbox_pred.out_features == 81 * 4  # class-specific regression

    atss = _build_meta('smt_small', 'atss')
    assert atss.backbone.strides == [8, 16, 32, 64, 128] and atss.backbone.in_levels == (1, 2, 3)
    assert isinstance(atss.backbone.fpn.extra_blocks, LastLevelP6P7OnOutput)  # P6 on the P5 output, P7 on P6
    assert atss.backbone.fpn.extra_blocks.p6.in_channels == 256
    assert atss.anchor_generator.num_anchors_per_location() == [1] * 5
    assert atss.anchor_generator.sizes[0] == (64.0,)  # 8 x stride 8, square
    norms = [m for m in atss.head.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 8 and all(m.num_groups == 32 for m in norms)  # 4 convs in each tower
    assert atss.head.atss_cls.out_channels == 80 and atss.head.atss_centerness.out_channels == 1
    assert len(atss.head.scales) == 5 and atss.box_coder.weights == (10.0, 10.0, 5.0, 5.0)
    assert (atss.topk, atss.nms_thresh, atss.score_thresh, atss.topk_candidates) == (9, 0.6, 0.05, 1000)
    assert atss.bbox_loss_weight == 2.0

    sparse = _build_meta('smt_small', 'sparse_rcnn')
    assert sparse.backbone.strides == [4, 8, 16, 32] and sparse.backbone.fpn.extra_blocks is None
    assert sparse.num_proposals == 300 and sparse.proposal_features.embedding_dim == 256
    assert len(sparse.stages) == 6 and sparse.stage_loss_weights == [1.0] * 6
    assert sparse.roi_pool.sampling_ratio == 2 and sparse.roi_pool.aligned
    assert sparse.box_coder.weights == (2.0, 2.0, 1.0, 1.0)  # stds 0.5, 0.5, 1, 1
    assert (sparse.cls_loss_weight, sparse.l1_loss_weight, sparse.giou_loss_weight) == (2.0, 5.0, 2.0)
    stage = sparse.stages[0]
    assert stage.attention.num_heads == 8 and stage.ffn[0].out_features == 2048
    assert stage.instance_interactive_conv.dynamic_layer.out_features == 2 * 256 * 64
    assert stage.instance_interactive_conv.fc_layer.in_features == 256 * 7 * 7
    assert (
        sum(isinstance(m, nn.Linear) for m in stage.cls_fcs) == 1
        and sum(isinstance(m, nn.Linear) for m in stage.reg_fcs) == 3
    )

    seg = _build_meta('smt_small', 'upernet')
    assert [s[0].output_size for s in seg.decode_head.ppm.stages] == [1, 2, 3, 6]
    assert seg.decode_head.conv_seg.in_channels == 512
    assert seg.auxiliary_head.convs[0][0].in_channels == 256  # stage 3 of SMT-S
    assert seg.auxiliary_head.conv_seg.in_channels == 256 and seg.aux_weight == 0.4


def _drop_rates(model: nn.Module):
    """Drop rates of the backbone's DropPath (per sample) or nn.Dropout (element-wise, SMT's dense code)."""
    return [
        m.drop_prob if hasattr(m, 'drop_prob') else m.p
        for m in model.modules()
        if hasattr(m, 'drop_prob') or isinstance(m, nn.Dropout)
    ]


def test_backbone_defaults_and_options(tmp_path):
    smt = create_backbone('test_smt', drop_path_rate=0.2)
    assert math.isclose(max(_drop_rates(smt)), 0.2, rel_tol=1e-6) and smt.out_norms is None
    sw = create_backbone('test_shiftwise')
    assert sw.out_norms is not None and len(sw.out_norms) == 4  # the official SW downstream output norms
    det = create_detector('test_smt', 'retinanet', 3)
    assert math.isclose(max(_drop_rates(det)), 0.2, rel_tol=1e-6)  # the configs' drop_path_rate for SMT
    seg = create_segmenter('test_shiftwise', 'upernet', 3)
    assert math.isclose(max(_drop_rates(seg)), 0.4, rel_tol=1e-6)

    fpn = create_backbone_fpn('test_smt', extra='pool')
    out = fpn(torch.rand(1, 3, 64, 96))
    assert list(out) == ['0', '1', '2', '3', 'pool']
    assert [tuple(v.shape[2:]) for v in out.values()] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]


def test_backbone_loads_imagenet_checkpoint(tmp_path):
    torch.manual_seed(0)
    classifier = msconv.create_model('test_smt', num_classes=7)
    path = tmp_path / 'cls.pth'
    torch.save(classifier.state_dict(), path)
    det = create_detector('test_smt', 'mask_rcnn', 3, checkpoint_path=path)
    seg = create_segmenter('test_smt', 'upernet', 3, checkpoint_path=path)
    ref = classifier.state_dict()
    for model in (det.backbone.backbone.body, seg.backbone.body):
        loaded = model.state_dict()
        common = [k for k in loaded if k.replace('model.', '', 1) in ref]
        assert len(common) > 20
        for k in common:
            torch.testing.assert_close(loaded[k], ref[k.replace('model.', '', 1)])


def test_bad_arguments():
    with pytest.raises(ValueError, match='arch'):
        create_detector('test_smt', 'yolo', 3)
    with pytest.raises(ValueError, match='num_classes'):
        create_detector('test_smt', 'mask_rcnn', 0)
    with pytest.raises(ValueError, match='model_name'):
        create_detector('resnet_nope', 'mask_rcnn', 3)
    with pytest.raises(ValueError, match='drop_path_rate'):
        create_segmenter('test_smt', 'upernet', 3, drop_path_rate=1.5)
    with pytest.raises(ValueError, match='arch'):
        create_segmenter('test_smt', 'deeplab', 3)
    with pytest.raises(ValueError, match='min_size'):
        create_detector('test_smt', 'retinanet', 3, min_size=0)
    with pytest.raises(ValueError, match='rois_per_image'):
        create_detector('test_smt', 'mask_rcnn', 3, rois_per_image=0)
    with pytest.raises(ValueError, match='fc_channels'):
        create_detector('test_smt', 'mask_rcnn', 3, fc_channels=0)
    with pytest.raises(ValueError, match='num_proposals'):
        create_detector('test_smt', 'sparse_rcnn', 3, num_proposals=0)
    with pytest.raises(ValueError, match='channels must be a multiple of 32'):
        create_detector('test_smt', 'atss', 3, channels=48)
    with pytest.raises(ValueError, match='channels must be a multiple of 8'):
        create_detector('test_smt', 'sparse_rcnn', 3, channels=36)
    with pytest.raises(ValueError, match='targets'):
        create_detector('test_smt', 'atss', 3, channels=32).train()([torch.rand(3, 64, 64)])
    seg = create_segmenter('test_smt', 'upernet', 3)
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'):
        seg(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match='masks'):
        seg.loss(torch.rand(2, 3, 64, 64), torch.zeros(2, 1, 64, 64, dtype=torch.long))


def _synthetic_batch(n_classes: int = 3):
    images, targets = [], []
    for h, w in ((96, 128), (64, 96)):
        images.append(torch.rand(3, h, w))
        boxes = torch.tensor([[10.0, 12.0, 50.0, 60.0], [30.0, 5.0, 70.0, 40.0]])
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 12:60, 10:50] = 1
        masks[1, 5:40, 30:70] = 1
        targets.append(dict(boxes=boxes, labels=torch.tensor([1, n_classes]), masks=masks))
    return images, targets


@pytest.mark.parametrize('arch', ['mask_rcnn', 'cascade_mask_rcnn', 'retinanet', 'atss', 'sparse_rcnn'])
def test_detector_train_and_eval(arch):
    torch.manual_seed(0)
    model = create_detector(
        'test_smt',
        arch,
        3,
        min_size=64,
        max_size=128,
        rois_per_image=32,
        test_proposals=20,
        channels=32,
        fc_channels=64,
        num_proposals=16,
    )
    assert model.backbone.out_channels == 32
    images, targets = _synthetic_batch()
    model.train()
    losses = model(images, targets)
    expected = {
        'mask_rcnn': {'loss_classifier', 'loss_box_reg', 'loss_mask', 'loss_objectness', 'loss_rpn_box_reg'},
        'retinanet': {'classification', 'bbox_regression'},
        'atss': {'classification', 'bbox_regression', 'bbox_ctrness'},
        'sparse_rcnn': {f's{t}.{k}' for t in range(6) for k in ('loss_classifier', 'loss_box_reg', 'loss_giou')},
    }.get(arch)
    if expected is None:
        expected = {f's{t}.{k}' for t in range(3) for k in ('loss_classifier', 'loss_box_reg', 'loss_mask')}
        expected |= {'loss_objectness', 'loss_rpn_box_reg'}
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    first_conv = next(p for n, p in model.backbone.backbone.named_parameters() if p.dim() == 4)
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    model.eval()
    out = model(images)
    assert len(out) == 2
    for o, im in zip(out, images):
        assert o['boxes'].shape[1] == 4 and len(o['boxes']) == len(o['scores']) == len(o['labels']) <= 100
        if len(o['labels']):
            assert 1 <= int(o['labels'].min()) and int(o['labels'].max()) <= 3
        if arch in ('mask_rcnn', 'cascade_mask_rcnn'):
            assert o['masks'].shape[1:] == (1, *im.shape[1:])
        if arch == 'sparse_rcnn':  # one detection per proposal, best first
            assert len(o['scores']) == 16 and torch.equal(o['scores'], o['scores'].sort(descending=True).values)


def test_cascade_stages_sample_at_their_iou():
    """A proposal at IoU ~0.65 with its ground truth is positive for stages 1-2 and negative for stage 3."""
    model = create_detector('test_smt', 'cascade_mask_rcnn', 3, rois_per_image=8)
    heads = model.roi_heads
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    prop = torch.tensor([[0.0, 0.0, 100.0, 65.0]])  # IoU 0.65
    targets = [dict(boxes=gt, labels=torch.tensor([2]))]
    flags = []
    for t in range(3):
        rois, labels, matched, is_gt = heads._sample(t, [prop], targets)
        proposal_label = labels[0][~is_gt[0]]
        assert torch.equal(is_gt[0].sum(), torch.tensor(1))  # the ground truth added as a proposal
        flags.append(int(proposal_label.item()))
    assert flags == [2, 2, 0]


def test_segmenter_loss_and_ignore():
    torch.manual_seed(0)
    model = create_segmenter('test_smt', 'upernet', 5, channels=64, aux_channels=32)
    assert model.decode_head.conv_seg.in_channels == 64
    images = torch.rand(2, 3, 64, 64)
    masks = torch.randint(0, 5, (2, 64, 64))
    masks[:, :8] = 255
    losses = model.loss(images, masks)
    assert set(losses) == {'loss_decode', 'loss_aux'}
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.decode_head.parameters())
    # ignored pixels do not contribute: changing their label leaves the loss unchanged
    model.eval()
    with torch.no_grad():
        a = model.loss(images, masks)['loss_decode']
        b = model.loss(images, torch.where(masks == 255, torch.full_like(masks, 255), masks))['loss_decode']
        c = model.loss(images, torch.where(masks == 255, torch.zeros_like(masks), masks))['loss_decode']
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model(images).shape == (2, 5, 64, 64)
    no_aux = create_segmenter('test_smt', 'upernet', 5, aux_head=False, channels=32)
    assert set(no_aux.loss(images, masks)) == {'loss_decode'}


def test_official_smt_checkpoint_feeds_the_dense_models(tmp_path):
    """An official-format ImageNet checkpoint ({'model': ...}) loads into the detector's and segmenter's backbone,
    whose stage maps then equal the official implementation's (shared/fixtures/smt/smt_micro)."""
    from conftest import load_fixture, max_abs, official_state_dict

    t, meta = load_fixture('smt', 'smt_micro')
    ckpt = tmp_path / 'official.pth'
    torch.save({'model': official_state_dict(t), 'epoch': 300}, ckpt)
    kwargs = {k: v for k, v in meta['constructor_kwargs'].items() if k != 'num_classes'}
    det = create_detector('smt_tiny', 'mask_rcnn', 3, checkpoint_path=ckpt, **kwargs).eval()
    seg = create_segmenter('smt_tiny', 'upernet', 3, checkpoint_path=ckpt, channels=32, **kwargs).eval()
    with torch.no_grad():
        for backbone in (det.backbone.backbone, seg.backbone):
            feats = backbone(t['input'])
            for i, f in enumerate(feats):
                assert max_abs(f, t[f'features.{i + 1}']) <= meta['atol'], f'stage {i + 1}'


def test_profile_system_by_name():
    stats = profile_system('smt_base', 'mask_rcnn')
    assert stats['params'] == 51_679_733 and stats['input_size'] == (3, 1280, 800)
    assert profile_system('smt_base', 'upernet')['input_size'] == (3, 512, 2048)
    assert profile_system('smt_base', 'atss')['params'] == 39_623_514  # the SMT-B configs (no paper figure)
    assert profile_system('smt_base', 'sparse_rcnn')['params'] == 113_621_928
    with pytest.raises(ValueError, match='arch'):
        profile_system('smt_base', 'fcos')


def test_cascade_refine_regresses_by_class_and_drops_ground_truth():
    model = create_detector('test_smt', 'cascade_mask_rcnn', 3, rois_per_image=8)
    heads = model.roi_heads
    rois = [torch.tensor([[10.0, 10.0, 50.0, 30.0], [0.0, 0.0, 20.0, 20.0]])]
    logits = torch.tensor([[0.0, 5.0, 1.0, 1.0], [9.0, 0.0, 0.0, 3.0]])  # best foreground: class 1, class 3
    deltas = torch.zeros(2, 4, 4)
    deltas[0, 2, 0] = 1.0  # class 2 moves roi 0 by dx = 1/10 of its width (stage-1 weight 10)
    deltas[1, 3, 1] = 2.0  # class 3 moves roi 1 by dy = 2/10 of its height
    labels = [torch.tensor([2, 0])]  # roi 0 is a positive of class 2, roi 1 background
    out = heads._refine(0, logits, deltas.reshape(2, 16), rois, labels, [(100, 100)])[0]
    torch.testing.assert_close(out[0], torch.tensor([14.0, 10.0, 54.0, 30.0]))  # by its ground-truth class
    torch.testing.assert_close(out[1], torch.tensor([0.0, 4.0, 20.0, 24.0]))  # by its best foreground class
    # in training, stage t+1 proposals are the refined sampled rois without the ground-truth boxes
    targets = [dict(boxes=torch.tensor([[10.0, 10.0, 50.0, 30.0]]), labels=torch.tensor([2]))]
    rois_t, labels_t, matched_t, is_gt = heads._sample(0, rois, targets)
    assert int(is_gt[0].sum()) == 1 and len(rois_t[0]) == 3
    assert torch.equal(rois_t[0][is_gt[0]], targets[0]['boxes'])


def test_mask_rcnn_l1_box_losses():
    from torchvision.models.detection.roi_heads import RoIHeads

    from msconv.dense.rcnn import L1RegionProposalNetwork, L1RoIHeads, l1_box_loss

    model = create_detector('test_smt', 'mask_rcnn', 3)
    assert isinstance(model.rpn, L1RegionProposalNetwork) and isinstance(model.roi_heads, L1RoIHeads)
    plain = create_detector('test_smt', 'mask_rcnn', 3, box_loss='smooth_l1')
    assert type(plain.roi_heads) is RoIHeads
    with pytest.raises(ValueError, match='box_loss'):
        create_detector('test_smt', 'mask_rcnn', 3, box_loss='giou')
    regression = torch.zeros(3, 4 * 4)
    regression[0, 8:12] = torch.tensor([1.0, -1.0, 2.0, 0.0])  # roi 0, class 2
    regression[1, 4:8] = 5.0  # roi 1 is background: not counted
    labels = torch.tensor([2, 0, 1])
    targets = torch.tensor([[0.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0], [0.5, 0.0, 0.0, 0.0]])
    assert l1_box_loss(regression, labels, targets).item() == pytest.approx((4.0 + 0.5) / 3)


def test_cascade_rpn_ignores_border_crossing_anchors():
    from msconv.dense.rcnn import BorderRegionProposalNetwork

    model = create_detector('test_smt', 'cascade_mask_rcnn', 3)
    rpn = model.rpn
    assert isinstance(rpn, BorderRegionProposalNetwork) and rpn.allowed_border == 0.0
    anchors = [
        torch.tensor(
            [[10.0, 10.0, 40.0, 40.0], [-20.0, 10.0, 10.0, 40.0], [60.0, 60.0, 100.0, 90.0], [12.0, 12.0, 38.0, 38.0]]
        )
    ]
    targets = [dict(boxes=torch.tensor([[10.0, 10.0, 40.0, 40.0]]), labels=torch.tensor([1]))]
    rpn._image_sizes = [(80, 100)]
    labels, _ = rpn.assign_targets_to_anchors(anchors, targets)
    assert labels[0].tolist() == [1.0, -1.0, -1.0, 1.0]  # x1 < 0 and y2 >= 80 cross the border
    rpn._image_sizes = None
    labels, _ = rpn.assign_targets_to_anchors(anchors, targets)
    assert labels[0].tolist()[1:3] == [0.0, 0.0]


def test_retinanet_head_norm_option():
    torch.manual_seed(0)
    plain = create_detector('test_smt', 'retinanet', 3, min_size=64, max_size=64, channels=32)
    model = create_detector('test_smt', 'retinanet', 3, min_size=64, max_size=64, channels=32, head_norm=True)
    assert not any(isinstance(m, nn.GroupNorm) for m in plain.head.modules())
    norms = [m for m in model.head.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 8 and all(m.num_groups == 32 for m in norms)  # 4 convs in each of the two branches
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{'boxes': torch.tensor([[8.0, 8.0, 40.0, 48.0]]), 'labels': torch.tensor([2])} for _ in range(2)]
    losses = model(images, targets)
    assert set(losses) == {'classification', 'bbox_regression'} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.head.parameters())


# ------------------------------------------------------------------------------------------------ ATSS
def _grid_anchors():
    """Four 10 px anchors tiling [0, 20]^2 and one at (45, 45)."""
    return torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0], [0.0, 10.0, 10.0, 20.0], [10.0, 10.0, 20.0, 20.0]]
        + [[40.0, 40.0, 50.0, 50.0]]
    )


def test_atss_assign_mean_std_threshold_and_centre_inside():
    from msconv.dense.atss import atss_assign

    anchors = _grid_anchors()
    # gt 0 (centre (6, 6)): candidates (4 nearest) have IoU 0.69 / 0.09 / 0.09 / 0.02, mean + std 0.54: only
    # anchor 0; gt 1 around the far anchor: only anchor 4 (IoU 0.51, the others 0)
    gts = torch.tensor([[0.0, 0.0, 12.0, 12.0], [38.0, 38.0, 52.0, 52.0]])
    assert atss_assign(anchors, [5], gts, topk=4).tolist() == [0, -1, -1, -1, 1]
    # a thin box between anchors 0 and 1: both reach the threshold (IoU 0.29 each) but their centres (x 5, 15) are
    # outside it (x 6-14): no positive
    assert atss_assign(anchors, [5], torch.tensor([[6.0, 0.0, 14.0, 10.0]]), topk=4).tolist() == [-1] * 5
    # anchor 0 is positive for both boxes: it goes to the one of highest IoU (0.91 against 0.69)
    gts = torch.tensor([[0.0, 0.0, 12.0, 12.0], [0.0, 0.0, 10.0, 11.0]])
    assert atss_assign(anchors, [5], gts, topk=4).tolist()[0] == 1
    # top-k per level: k = 2 from one level of 5 takes anchors 0 and 1 (IoU 0.69, 0.09: threshold 0.82, none); from
    # levels of 4 + 1 anchors it takes anchors 0, 1 and 4 (IoU 0.69, 0.09, 0: threshold 0.63, anchor 0)
    gt = torch.tensor([[0.0, 0.0, 12.0, 12.0]])
    assert atss_assign(anchors, [5], gt, topk=2).tolist() == [-1] * 5
    assert atss_assign(anchors, [4, 1], gt, topk=2).tolist() == [0, -1, -1, -1, -1]
    assert atss_assign(anchors, [5], torch.zeros(0, 4)).tolist() == [-1] * 5


def test_atss_centerness_and_valid_flags():
    from msconv.dense.atss import centerness_target

    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 25.0]])  # centres (5, 5), (10, 15)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 40.0, 20.0]])
    # centred: 1; (10, 15) in [0, 40] x [0, 20]: sqrt(10 / 30 * 5 / 15)
    torch.testing.assert_close(centerness_target(anchors, boxes), torch.tensor([1.0, (10 / 30 * 5 / 15) ** 0.5]))

    model = create_detector('test_smt', 'atss', 3, channels=32)
    sizes = [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]  # a 96 x 128 batch at strides 8-128
    flags = model._valid_flags(sizes, (64, 96))  # the smaller image of the batch: 64 x 96
    per_level = [int(f.sum()) for f in flags.split([h * w for h, w in sizes])]
    assert per_level == [8 * 12, 4 * 6, 2 * 3, 1 * 2, 1 * 1]  # ceil(64 / s) x ceil(96 / s) cells
    assert model._valid_flags(sizes, (96, 128)).all()


def test_atss_loss_counts_an_image_without_positives_once():
    """mmdet divides the focal loss by the positives of the batch, each image counted at least once: two copies of
    an image without objects give the loss of one."""
    torch.manual_seed(0)
    # 64 channels: GroupNorm's 32 groups hold two values each on the 1 x 1 P7 map of a single image
    model = create_detector('test_smt', 'atss', 3, channels=64, min_size=64, max_size=64)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()  # batch statistics would differ between a batch of one and of two
    image = torch.rand(3, 64, 64)
    empty = {'boxes': torch.zeros(0, 4), 'labels': torch.zeros(0, dtype=torch.int64)}
    with torch.no_grad():
        one = model([image], [empty])
        two = model([image, image], [empty, empty])
    assert one['bbox_regression'] == 0 and one['bbox_ctrness'] == 0 and one['classification'] > 0
    torch.testing.assert_close(two['classification'], one['classification'])
    losses = model(
        [image, image], [{'boxes': torch.tensor([[8.0, 8.0, 40.0, 48.0]]), 'labels': torch.tensor([2])}, empty]
    )
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.head.parameters())


# ------------------------------------------------------------------------------------------------ Sparse R-CNN
def test_hungarian_matcher_finds_the_global_optimum():
    from msconv.dense.sparse_rcnn import HungarianMatcher

    matcher = HungarianMatcher()
    whwh = torch.tensor([100.0, 100.0, 100.0, 100.0])
    gts = torch.tensor([[0.0, 0.0, 40.0, 40.0], [50.0, 50.0, 90.0, 90.0]])
    boxes = torch.tensor([[50.0, 50.0, 90.0, 90.0], [10.0, 10.0, 30.0, 80.0], [0.0, 0.0, 40.0, 40.0]])
    logits = torch.zeros(3, 4)
    rows, cols = matcher(logits, boxes, gts, torch.tensor([1, 3]), whwh)
    assert rows.tolist() == [0, 2] and cols.tolist() == [1, 0]
    # a greedy choice would give proposal 0 to the first box (lowest class cost: logit 9 for class 1) and leave
    # the second box the worse proposal 1; the matching takes the lower total cost
    logits[0, 1] = 9.0
    rows, cols = matcher(logits, boxes, gts, torch.tensor([1, 3]), whwh)
    assert rows.tolist() == [0, 2] and cols.tolist() == [1, 0]
    # alone, proposal 0 goes to the first box: its class cost (-13.5) outweighs its boxes' (10 + 1.2 against 0 - 2)
    rows, cols = matcher(logits[:1], boxes[:1], gts, torch.tensor([1, 3]), whwh)
    assert rows.tolist() == [0] and cols.tolist() == [0]
    rows, cols = matcher(logits, boxes, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), whwh)
    assert rows.numel() == cols.numel() == 0


def test_sparse_rcnn_refines_proposals_stage_by_stage():
    torch.manual_seed(0)
    model = create_detector('test_smt', 'sparse_rcnn', 3, channels=32, fc_channels=64, num_proposals=8)
    model.eval()
    boxes, feats = model.initial_proposals([(64, 96)])
    torch.testing.assert_close(boxes[0, 0], torch.tensor([0.0, 0.0, 96.0, 64.0]))  # mmdet's init: the whole image
    features = model.backbone(torch.rand(1, 3, 64, 96))
    with torch.no_grad():
        for stage in model.stages:
            stage.fc_reg.weight.zero_()
            stage.fc_reg.bias.copy_(torch.tensor([0.2, 0.0, 0.0, 0.0]))  # dx = 0.2 x std 0.5 of the width
        logits, refined, new = model.run_stage(0, features, boxes, feats, [(64, 96)])
    assert logits.shape == (1, 8, 3) and new.shape == feats.shape
    torch.testing.assert_close(refined[0, 0], torch.tensor([9.6, 0.0, 105.6, 64.0]))  # not clipped to the image
    # training: an image without objects gives finite losses (classification only)
    model.train()
    losses = model([torch.rand(3, 64, 96)], [{'boxes': torch.zeros(0, 4), 'labels': torch.zeros(0, dtype=torch.int64)}])
    assert all(torch.isfinite(v) for v in losses.values()) and losses['s5.loss_giou'] == 0
