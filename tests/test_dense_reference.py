"""The dense systems against the official SMT / ShiftwiseConv configs run in mmdetection 2.28.2 / mmsegmentation
0.30.0 (``tests/fixtures/dense``, written by ``scripts/dense_reference/make_dense_fixtures.py``; see
``tests/dense_reference.py`` for what the fixtures hold and what they change from the configs).

Each test regenerates the official random weights from the fixture's key list and seed, converts them with
:func:`msconv.dense.convert.convert_official_dense` (a strict load: every official key has its place), runs the
msconv system and compares: every map, proposal, detection, mask and loss within 1e-4 of the official value
relative to the tensor's largest magnitude; every official detection matched (same label, IoU > 0.99) and every
proposal; the binary masks of matched detections equal up to a pixel or two whose probability is ~0.5 (IoU >=
0.99, areas within 2 pixels); segmentation argmax agreement >= 99.9%.
"""

from __future__ import annotations

import dense_reference as ref
import pytest
import torch

from msconv.dense.convert import convert_official_dense, detect_official_system

TOL = 1e-4
SEGMENTERS = [n for n, (_, arch) in ref.SYSTEMS.items() if arch == 'upernet']


def _check(name: str, multi_scale: bool = False) -> dict:
    expected, meta = ref.load_fixture(name)
    torch.manual_seed(0)
    ours = ref.run_msconv(name, ref.loaded_msconv(name, meta), multi_scale=multi_scale)
    if not multi_scale:
        expected = {k: v for k, v in expected.items() if not k.startswith('probs.msflip')}
    assert set(expected) <= set(ours), sorted(set(expected) - set(ours))
    res = ref.compare(ours, expected)
    for key, val in res.items():
        if key.endswith('.argmax'):
            assert val >= 0.999, f'{name} {key}: argmax agreement {val:.5f}'
        elif key in ('detections_matched', 'proposals_matched'):
            total = res['detections' if key == 'detections_matched' else 'proposal_count']
            assert val == total, f'{name}: {val:.0f} of {total:.0f} {key.split("_")[0]} matched'
        elif key == 'mask_iou_min':
            assert val >= 0.99, f'{name}: binary mask IoU {val:.4f}'
        elif key == 'mask_area_pixels':
            assert val <= 2, f'{name}: binary mask areas differ by {val:.0f} pixels'
        elif key not in ('detections', 'proposal_count'):
            assert val <= TOL, f'{name} {key}: max relative difference {val:.3g}'
    return res


@pytest.mark.parametrize('name', list(ref.SYSTEMS))
def test_reproduces_official_outputs_and_losses(name):
    res = _check(name)
    if 'detections' in res:
        # the fixtures' weights give a full set of detections (Sparse R-CNN: one per proposal, 300)
        assert res['detections'] == (300 if ref.SYSTEMS[name][1] == 'sparse_rcnn' else 100)


@pytest.mark.slow
@pytest.mark.parametrize('name', SEGMENTERS)
def test_reproduces_official_multi_scale_flip(name):
    res = _check(name, multi_scale=True)
    assert 'probs.msflip.head' in res


@pytest.mark.parametrize('name', list(ref.SYSTEMS))
def test_converter_maps_every_official_key(name):
    """The official state dict converts to exactly the msconv system's keys and shapes; classes move to
    torchvision's order (background first) with zero background rows for the regressor and mask logits."""
    _, meta = ref.load_fixture(name)
    official = ref.official_weights(meta['state_dict_spec'], meta['seed'], meta['sparse'])
    assert detect_official_system(official) == (
        {'smt_small': 'smt', 'shiftwise_tiny': 'shiftwise'}[meta['backbone']],
        meta['arch'],
    )
    ours = convert_official_dense({'state_dict': official, 'meta': {}})  # an mmcv checkpoint
    model = ref.build_msconv(name)
    target = model.state_dict()
    assert set(ours) <= set(target), sorted(set(ours) - set(target))[:5]
    # not in official checkpoints: ShiftwiseConv's channel / shuffle indices, rebuilt by the layer from its seed
    index_buffers = ('ghost_index', 'rep_index', 'perm_h', 'perm_v', 'centre')
    assert all(k.endswith(index_buffers) for k in set(target) - set(ours)), sorted(set(target) - set(ours))[:5]
    for k, v in ours.items():
        assert v.shape == target[k].shape, k
    model.load_state_dict(ours, strict=True)
    if meta['arch'] == 'mask_rcnn':
        cls = official['roi_head.bbox_head.fc_cls.weight']
        torch.testing.assert_close(ours['roi_heads.box_predictor.cls_score.weight'], torch.cat([cls[80:], cls[:80]]))
        reg = ours['roi_heads.box_predictor.bbox_pred.weight']
        assert reg[:4].abs().sum() == 0 and torch.equal(reg[4:], official['roi_head.bbox_head.fc_reg.weight'])
        logits = ours['roi_heads.mask_predictor.mask_fcn_logits.weight']
        assert logits[0].abs().sum() == 0 and torch.equal(logits[1:], official['roi_head.mask_head.conv_logits.weight'])


def test_converter_errors():
    with pytest.raises(ValueError, match='backbone'):
        convert_official_dense({'neck.lateral_convs.0.conv.weight': torch.zeros(1)})
    _, meta = ref.load_fixture('smt_s_mask_rcnn')
    official = ref.official_weights(meta['state_dict_spec'][:40], meta['seed'])  # backbone keys only
    with pytest.raises(ValueError, match='mmdet detector'):
        convert_official_dense(official)
    official['roi_head.bbox_head.fc_cls.weight'] = torch.zeros(81, 4)
    official['roi_head.bbox_head.unknown.weight'] = torch.zeros(1)
    with pytest.raises(ValueError, match='roi_head.bbox_head.unknown.weight'):
        convert_official_dense(official)
    with pytest.raises(ValueError, match='mapping'):
        convert_official_dense([1, 2])
