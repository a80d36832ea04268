"""The dense systems' fast inference forms against their plain forms (issue 24 item 4).

``roi_align`` (``msconv.dense.poolers``): torchvision's RoIAlign kernel or the same samples as a sparse matrix
product (``roi_align_gemm``), chosen by the gate and the autotuner; both must pool the same features, also at the
borders, for empty and inverted boxes, several images, either alignment and sampling ratio.
"""

import pytest
import torch
from torchvision.ops import roi_align

from msconv.dense import create_detector
from msconv.dense.poolers import AlignedRoIAlign, roi_align_gemm
from msconv.layers import forms


def _rois(g: torch.Generator, n: int, size: float, images: int = 1) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * size * 1.2 - size * 0.1  # some start beyond the image
    wh = torch.rand(n, 2, generator=g) * size * 0.6
    wh[: n // 8] *= 0.02  # tiny boxes: one sample per bin
    wh[n // 8 : n // 6, 0] *= 8  # long thin ones: another grid per side
    boxes = torch.cat([xy, xy + wh], 1)
    special = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],  # empty
            [30.0, 30.0, 10.0, 10.0],  # inverted
            [-40.0, -40.0, -5.0, -5.0],  # wholly above-left: samples beyond -1 are zeros
            [size - 3, size - 3, size + 30, size + 30],  # over the bottom-right border
            [0.0, 0.0, size, size],  # the whole image
        ]
    )
    boxes = torch.cat([boxes, special])
    index = torch.randint(0, images, (len(boxes), 1), generator=g).float()
    return torch.cat([index, boxes], 1)


@pytest.mark.parametrize('aligned', [True, False])
@pytest.mark.parametrize('sampling_ratio', [0, 2])
@pytest.mark.parametrize('channels_last', [True, False])
def test_roi_align_gemm_matches_torchvision(aligned, sampling_ratio, channels_last):
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 16, 23, 29, generator=g)
    if channels_last:
        feat = feat.contiguous(memory_format=torch.channels_last)
    rois = _rois(g, 120, 4 * 26, images=2)
    for out_size, scale in (((7, 7), 0.25), ((14, 14), 0.25), ((3, 5), 0.125)):
        ref = roi_align(feat, rois, out_size, scale, sampling_ratio, aligned)
        out = roi_align_gemm(feat, rois, out_size, scale, sampling_ratio, aligned)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert roi_align_gemm(feat, rois[:0], (7, 7), 0.25, sampling_ratio, aligned).shape == (0, 16, 7, 7)


def test_aligned_roi_align_forms_agree_and_step_aside():
    """Pinned kernel vs sparse GEMM through the module (every FPN level, a level with no RoI); with autograd on,
    under reference_forms() and under a trace only the kernel runs (gradients flow as before)."""
    g = torch.Generator().manual_seed(1)
    feats = {
        str(i): torch.randn(1, 8, 64 >> i, 48 >> i, generator=g).contiguous(memory_format=torch.channels_last)
        for i in range(4)
    }
    pool = AlignedRoIAlign(['0', '1', '2', '3'], output_size=7, sampling_ratio=0)
    boxes = [_rois(g, 60, 180)[:, 1:].clamp(0, 190)]
    boxes[0][:, 2:] = torch.maximum(boxes[0][:, 2:], boxes[0][:, :2])
    sizes = [(256, 192)]
    with torch.no_grad():
        assert forms.tunable('roi_align', feats['0'])
        with forms.forced_choices(roi_align='kernel'):
            ref = pool(feats, boxes, sizes)
        with forms.forced_choices(roi_align='sparse_gemm'):
            out = pool(feats, boxes, sizes)
            small = pool(feats, [torch.tensor([[4.0, 4.0, 20.0, 20.0]])], sizes)  # levels 1-3 have no RoI
        with forms.reference_forms():
            plain_small = pool(feats, [torch.tensor([[4.0, 4.0, 20.0, 20.0]])], sizes)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(small, plain_small, rtol=1e-5, atol=1e-5)
    leaf = {k: v.clone().requires_grad_() for k, v in feats.items()}
    assert not forms.tunable('roi_align', leaf['0'])
    with forms.forced_choices(roi_align='sparse_gemm'):
        pooled = pool(leaf, boxes, sizes)
    pooled.sum().backward()
    assert all(v.grad is not None for v in leaf.values())  # every level joins the graph (DDP)
    torch.testing.assert_close(pooled.detach(), ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), forms.forced_choices(roi_align='sparse_gemm'):
        traced = torch.jit.trace(
            lambda f0, f1, f2, f3: pool(dict(zip('0123', (f0, f1, f2, f3))), boxes, sizes),
            tuple(feats.values()),
            check_trace=False,
        )
    assert torch.equal(traced(*feats.values()), ref)  # the trace recorded the kernel


@pytest.mark.parametrize('arch', ['mask_rcnn', 'cascade_mask_rcnn'])
def test_detector_outputs_do_not_depend_on_the_pooling_form(arch):
    torch.manual_seed(0)
    model = create_detector('test_smt', arch, 5, min_size=96, max_size=128, test_proposals=50).eval()
    images = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(2)) for _ in range(2)]
    outs = {}
    with torch.no_grad():
        for form in ('kernel', 'sparse_gemm'):
            with forms.forced_choices(roi_align=form):
                outs[form] = model(images)
    for ref, out in zip(outs['kernel'], outs['sparse_gemm']):
        assert len(ref['boxes']) > 0 and torch.equal(ref['labels'], out['labels'])
        for key in ('boxes', 'scores', 'masks'):
            torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # ~10 s idle, ~40 s on the shared cores: two micro detectors built, timed and counted twice
def test_dense_bench_phases_add_up_and_repeat():
    """``bench_dense(phases=True)``: the detectors' phases (hooks on their parts) cover the call's MACs exactly and
    its time with ``rest``; the seeded weights give the same detections and MACs in a second run."""
    from msconv.tools.dense_bench import bench_dense, format_dense_phases

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = [
            bench_dense(
                subjects,
                baselines=[],
                size={'detection': (96, 128)},
                num_warm_iter=0,
                num_bench_iter=1,
                memory=False,
                macs=True,
                phases=True,
            )
            for subjects in (['test_smt:mask_rcnn', 'test_smt:retinanet'], ['test_smt:mask_rcnn'])
        ]
    finally:
        torch.set_num_threads(threads)
    by = {r['model']: r for r in runs[0]}
    rcnn, retina = by['test_smt:mask_rcnn']['phases'], by['test_smt:retinanet']['phases']
    assert list(rcnn) == ['backbone', 'fpn', 'rpn', 'box pool', 'box head', 'mask pool', 'mask head', 'rest']
    assert list(retina) == ['backbone', 'fpn', 'head', 'anchors', 'rest']
    for rows in runs:
        for r in rows:
            ph = r['phases']
            assert sum(m for _, m in ph.values()) / 1e9 == pytest.approx(r['infer_gmacs'], rel=1e-9)
            assert ph['backbone'][1] > 0 and ph['fpn'][1] > 0 and all(sec >= 0 for sec, _ in ph.values())
            assert ph['rest'][1] == pytest.approx(0.0, abs=1e3)  # NMS, decoding and pasting carry no MACs
        assert 'test_smt:mask_rcnn' in format_dense_phases(rows) and 'box pool' in format_dense_phases(rows)
    first, again = runs[0][0], runs[1][0]  # Mask R-CNN built twice from seed 0
    assert (first['detections'], first['infer_gmacs']) == (again['detections'], again['infer_gmacs'])
