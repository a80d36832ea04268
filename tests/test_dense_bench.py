"""``msconv.tools.dense_bench`` (the dense systems in ``msconv bench``): what it measures and reports, on micro
systems and small images; the figures themselves are timings and are not asserted."""

from __future__ import annotations

import math

import pytest
import torch

from msconv.tools.dense_bench import bench_dense, format_dense_bench

SMALL = {'detection': (96, 128), 'segmentation': (64, 96)}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow  # ~30 s on two shared cores: torchvision's R50-FPN RetinaNet trains one step
def test_dense_bench_rows_ratios_and_table():
    rows = bench_dense(
        ['test_smt:retinanet', 'test_smt:upernet'],
        baselines=['tv:retinanet_resnet50_fpn'],
        size=SMALL,
        train=True,
        num_warm_iter=0,
        num_bench_iter=1,
    )
    by = {r['model']: r for r in rows}
    assert list(by) == ['test_smt:retinanet', 'test_smt:upernet', 'tv:retinanet_resnet50_fpn']
    base, ours, seg = by['tv:retinanet_resnet50_fpn'], by['test_smt:retinanet'], by['test_smt:upernet']
    assert base['baseline'] and not ours['baseline'] and ours['vs'] == 'tv:retinanet_resnet50_fpn'
    assert ours['infer_ratio'] == pytest.approx(ours['infer_img_s'] / base['infer_img_s'])
    assert ours['train_ratio'] == pytest.approx(ours['train_img_s'] / base['train_img_s'])
    assert seg['vs'] is None and math.isnan(seg['infer_ratio']) and seg['size'] == (64, 96)
    # torchvision's RetinaNet R50-FPN, 91 COCO classes; weights_backbone=None trains its BatchNorms (the pretrained
    # builder freezes them into buffers and counts 34.01M)
    assert base['params_m'] == pytest.approx(34.07, abs=0.01)
    for r in rows:
        assert r['infer_img_s'] > 0 and r['train_img_s'] > 0 and r['infer_mem_mb'] > 0 and r['train_mem_mb'] > 0
    table = format_dense_bench(rows)
    assert 'tv:retinanet_resnet50_fpn (baseline)' in table and '128x96' in table


def test_dense_bench_bad_names_are_explained():
    with pytest.raises(ValueError, match="subjects are 'BACKBONE:ARCH' or 'tv:NAME', got 'smt_small'"):
        bench_dense(['smt_small'])
    with pytest.raises(ValueError, match=r"arch in 'smt_small:yolo' must be one of"):
        bench_dense(['smt_small:yolo'])
    with pytest.raises(ValueError, match="torchvision baseline must be one of"):
        bench_dense(['test_smt:retinanet'], baselines=['tv:resnet50'])
    with pytest.raises(ValueError, match='num_bench_iter must be a positive int'):
        bench_dense(['test_smt:retinanet'], num_bench_iter=0)


def test_dense_bench_counts_macs_and_the_speed_per_mac():
    """``macs=True`` counts each model's MACs in one inference call (plain forms) and gives the speed per MAC against
    the baseline: the time ratio scaled by the MAC ratio."""
    rows = bench_dense(
        ['test_smt:retinanet'],
        baselines=['tv:retinanet_resnet50_fpn'],
        size=SMALL,
        num_warm_iter=0,
        num_bench_iter=1,
        memory=False,
        macs=True,
    )
    ours, base = rows
    # R50 alone is ~4.1 GMACs at 224x224, ~1 at 96x128; the FPN and the RetinaNet heads add more
    assert base['infer_gmacs'] > 1.0 and 0 < ours['infer_gmacs'] < base['infer_gmacs']
    assert ours['infer_attention_gmacs'] > 0 and base['infer_attention_gmacs'] == 0
    ratio = ours['infer_ratio'] * ours['infer_gmacs'] / base['infer_gmacs']
    assert ours['infer_per_mac_ratio'] == pytest.approx(ratio)
    assert 'per-MAC ratio' in format_dense_bench(rows)
    assert 'per-MAC ratio' not in format_dense_bench(bench_dense(['test_smt:retinanet'], size=SMALL, memory=False))
