"""The dense tasks in the engine: presets, the schedule hook, training + evaluation + bit-exact resume of micro
detectors and segmenters on the digits sets, ``msconv eval`` on a dense run, and the errors for bad settings."""

from __future__ import annotations

import pytest
import torch
from conftest import write_old_config

from msconv.engine import train
from msconv.engine.checkpoint import list_checkpoints, load_checkpoint
from msconv.engine.config import resolve_config
from msconv.engine.dense_tasks import DetectionTask, SegmentationTask, evaluate_dense, find_coco_split
from msconv.engine.recipes import preset_info

# micro systems on the 128x128 digits canvases: one fixed scale, slim heads, one thread
DET = dict(
    model='test_smt',
    task='detection',
    preset='coco_3x',
    data='digits',
    batch_size=4,
    epochs=2,
    num_workers=0,
    progress=False,
    plot=False,
    log_every=1,
    drop_path=0.1,
    det_scales=[128],
    det_max_size=128,
    det_crop=False,
    eval_max_images=6,
    dense_kwargs=dict(min_size=128, max_size=128, channels=32, fc_channels=64, rois_per_image=32, test_proposals=50),
)
SEG = dict(
    model='test_smt',
    task='segmentation',
    preset='ade20k_160k',
    data='digits',
    batch_size=4,
    total_iters=30,
    warmup_iters=2,
    num_workers=0,
    progress=False,
    plot=False,
    log_every=1,
    seg_scale=(128, 128),
    seg_crop=(128, 128),
    eval_max_images=6,
    dense_kwargs=dict(channels=32, aux_channels=16),
)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two shared cores run these micro models several times slower
    yield
    torch.set_num_threads(n)


def _cfg(model, task, preset, **kw):
    return resolve_config(dict(model=model, task=task, preset=preset, **kw), check_paths=False)


def test_presets_hold_the_official_recipes():
    """Spot checks (tests/test_recipes.py checks every row of every dense recipe): the system picks the optimizer,
    SMT-B its drop path, the warm-up follows --lr, and every official system says so."""
    coco = _cfg('smt_small', 'detection', 'coco_3x')
    assert (coco.opt, coco.lr, coco.weight_decay, coco.epochs, coco.batch_size) == ('adamw', 2e-4, 0.05, 36, 16)
    assert (coco.sched, coco.lr_milestones, coco.decay_rate, coco.warmup_iters) == ('multistep', [27, 33], 0.1, 500)
    assert coco.warmup_lr == pytest.approx(2e-7) and coco.lr_base_size is None and coco.clip_grad is None
    assert coco.arch == 'mask_rcnn' and coco.drop_path == 0.2 and not coco.wd_exclude_1d
    assert coco.wd_exclude_keys == ['absolute_pos_embed', 'relative_position_bias_table', 'norm']
    assert not hasattr(coco, 'mixup') and not hasattr(coco, 'smoothing')  # classification's options, not detection's
    cascade = _cfg('smt_small', 'detection', 'coco_3x', arch='cascade_mask_rcnn')
    assert (cascade.lr, cascade.wd_exclude_keys, cascade.sync_bn) == (1e-4, [], True)
    assert cascade.warmup_lr == pytest.approx(1e-7)
    retina_b = _cfg('smt_base', 'detection', 'coco_3x', arch='retinanet')
    assert (retina_b.lr, retina_b.drop_path, retina_b.sync_bn) == (1e-4, 0.3, False)
    assert _cfg('smt_small', 'detection', 'coco_3x', lr=1e-3).warmup_lr == pytest.approx(1e-6)  # lr x 0.001
    atss_b = _cfg('smt_base', 'detection', 'coco_3x', arch='atss')
    assert (atss_b.lr, atss_b.weight_decay, atss_b.wd_exclude_1d, atss_b.drop_path, atss_b.clip_grad) == (
        1e-4,
        0.05,
        False,
        0.3,
        None,
    )
    # Sparse R-CNN: AdamW 2.5e-5, weight decay 1e-4 on every parameter, clipping at norm 1; SMT-B keeps drop path 0.2
    sparse = {m: _cfg(m, 'detection', 'coco_3x', arch='sparse_rcnn') for m in ('smt_small', 'smt_base')}
    for cfg in sparse.values():
        assert (cfg.lr, cfg.weight_decay, cfg.clip_grad, cfg.wd_exclude_keys, cfg.drop_path) == (
            2.5e-5,
            1e-4,
            1.0,
            [],
            0.2,
        )
        assert (cfg.epochs, cfg.lr_milestones, cfg.warmup_iters, cfg.det_crop) == (36, [27, 33], 500, True)
    assert sparse['smt_small'].warmup_lr == pytest.approx(2.5e-8)
    custom = _cfg('smt_base', 'detection', 'coco_3x', arch='sparse_rcnn', lr=1e-3, drop_path=0.1)
    assert custom.warmup_lr == pytest.approx(1e-6) and custom.drop_path == 0.1  # lr x 0.001; explicit values win
    one = _cfg('smt_base', 'detection', 'coco_1x')
    assert (one.epochs, one.lr_milestones, one.lr, one.wd_exclude_keys, one.drop_path) == (
        12,
        [8, 11],
        2e-4,
        ['norm'],
        0.2,
    )
    assert (one.det_scales, one.det_max_size, one.det_crop) == ([800], 1333, False)
    ade = _cfg('smt_small', 'segmentation', 'ade20k_160k')
    assert (ade.lr, ade.weight_decay, ade.sched, ade.decay_rate) == (6e-5, 0.01, 'poly', 1.0)
    assert (ade.total_iters, ade.warmup_iters, ade.batch_size, ade.min_lr) == (160_000, 1500, 16, 0.0)
    assert ade.warmup_lr == pytest.approx(6e-11) and ade.eval_every_iters == 16_000 and ade.sync_bn
    assert _cfg('smt_base', 'segmentation', 'ade20k_160k').drop_path == 0.3
    sw = _cfg('shiftwise_tiny', 'segmentation', 'ade20k_160k')
    assert (sw.lr, sw.weight_decay, sw.drop_path, sw.seg_eval_mode, sw.eval_every_iters) == (
        1e-4,
        0.05,
        0.4,
        'slide',
        4000,
    )
    sw_det = _cfg('shiftwise_tiny', 'detection', 'coco_3x')
    assert (sw_det.arch, sw_det.layer_decay, sw_det.lr_base_size, sw_det.wd_exclude_1d) == (
        'cascade_mask_rcnn',
        0.8,
        16,
        True,
    )
    for model, task, preset, arch in [
        ('smt_small', 'detection', 'coco_3x', 'mask_rcnn'),
        ('smt_base', 'detection', 'coco_3x', 'cascade_mask_rcnn'),
        ('smt_base', 'detection', 'coco_1x', 'mask_rcnn'),
        ('smt_small', 'detection', 'coco_3x', 'atss'),
        ('smt_base', 'detection', 'coco_3x', 'atss'),
        ('smt_small', 'detection', 'coco_3x', 'sparse_rcnn'),
        ('smt_base', 'detection', 'coco_3x', 'sparse_rcnn'),
        ('smt_base', 'segmentation', 'ade20k_160k', 'upernet'),
        ('shiftwise_tiny', 'detection', 'coco_3x', 'cascade_mask_rcnn'),
        ('shiftwise_tiny', 'segmentation', 'ade20k_160k', 'upernet'),
    ]:
        assert preset_info(model, preset, arch)['official'], (model, preset, arch)
    for model, preset, arch in [('smt_small', 'coco_1x', 'retinanet'), ('shiftwise_tiny', 'coco_3x', 'mask_rcnn')]:
        info = preset_info(model, preset, arch)
        assert not info['official'] and 'an official recipe only for' in info['based_on'], info
    assert not preset_info('scsc_swin_tiny', 'coco_3x', 'mask_rcnn')['official']
    with pytest.raises(ValueError, match=r"preset 'coco_1x' is defined for \['scsc', 'smt'\] models only"):
        _cfg('shiftwise_tiny', 'detection', 'coco_1x')
    with pytest.raises(ValueError, match='layer_decay follows the ShiftwiseConv configs'):
        _cfg('smt_small', 'detection', 'coco_3x', layer_decay=0.8)


def _lrs(task, steps_per_epoch, total_steps, at):
    from timm.scheduler import create_scheduler_v2

    cfg = task.cfg
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    kw = dict(
        sched=cfg.sched,
        num_epochs=cfg.epochs - cfg.warmup_epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        warmup_prefix=True,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    kw, total = task.schedule(kw, total_steps, steps_per_epoch)
    sched, _ = create_scheduler_v2(opt, **kw)
    out = []
    for t in at:
        sched.step_update(num_updates=t)
        out.append(opt.param_groups[0]['lr'])
    return out, total


def test_schedule_hook_gives_mmdet_step_and_mmseg_poly_schedules():
    # COCO 3x with 100 steps per epoch: linear warm-up over 500 steps from lr x 0.001, x0.1 at epochs 27 and 33
    task = DetectionTask(resolve_config(dict(model='smt_small', task='detection', preset='coco_3x'), check_paths=False))
    lrs, total = _lrs(task, 100, 3600, [0, 250, 500, 2699, 2700, 3299, 3300, 3599])
    assert total == 3600
    expected = [2e-7, 2e-7 + 250 * (2e-4 - 2e-7) / 500, 2e-4, 2e-4, 2e-5, 2e-5, 2e-6, 2e-6]
    assert lrs == pytest.approx(expected, rel=1e-6)
    # ADE 160k: 160000 steps whatever the epoch length, poly power 1 to 0 counted from step 0
    task = SegmentationTask(
        resolve_config(dict(model='smt_small', task='segmentation', preset='ade20k_160k'), check_paths=False)
    )
    lrs, total = _lrs(task, 1263, 1263, [1500, 80_000, 159_999])
    assert total == 160_000
    assert lrs == pytest.approx([6e-5 * (1 - 1500 / 160_000), 3e-5, 6e-5 / 160_000], rel=1e-3)


def test_bad_dense_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="arch must be one of .*'retinanet'.* got 'upernet'"):
        DetectionTask(resolve_config(dict(DET, arch='upernet'), check_paths=False))
    with pytest.raises(ValueError, match="preset 'imagenet' is a shared preset, not one of .*; use preset 'coco_3x'"):
        DetectionTask(resolve_config(dict(DET, preset='imagenet', epochs=10), check_paths=False))
    (tmp_path / 'annotations').mkdir()
    with pytest.raises(ValueError, match=r"not a COCO folder with a train split; expected train2017/ \+ annotations"):
        find_coco_split(tmp_path, 'train')
    with pytest.raises(ValueError, match='total_iters must be a positive integer'):
        train(dict(SEG, output=str(tmp_path), total_iters=0))


def test_detection_run_trains_evaluates_and_resumes_bit_exactly(tmp_path, capsys):
    # Mask R-CNN with EMA and drop path: 4 steps straight, and 2 steps + resume for 2 more, give equal weights
    common = dict(DET, arch='mask_rcnn', output=str(tmp_path), ema=True, ema_decay=0.9, lr=1e-3, warmup_iters=1)
    ref = train(dict(common, name='ref', max_steps=4, ckpt_every=2))
    assert ref['status'] == 'finished' and ref['steps'] == 4
    ev = ref['last_eval']
    for key in ('bbox_AP', 'bbox_AP50', 'bbox_AP75', 'segm_AP', 'segm_AP50', 'ema_bbox_AP'):
        assert 0.0 <= ev[key] <= 1.0, key
    train(dict(common, name='cut', max_steps=2))
    res = train(dict(common, name='cut', max_steps=4, resume='auto'))
    assert res['steps'] == 4
    a = load_checkpoint(list_checkpoints(tmp_path / 'ref')[-1])
    b = load_checkpoint(list_checkpoints(tmp_path / 'cut')[-1])
    assert a[0]['model'].keys() == b[0]['model'].keys() and any(k.startswith('roi_heads.mask') for k in a[0]['model'])
    for key in ('model', 'ema'):
        for k in a[0][key]:
            assert torch.equal(a[0][key][k], b[0][key][k]), (key, k)
    # the weights moved between steps 2 and 4, and `msconv eval` on the run reproduces its last evaluation
    mid = load_checkpoint(list_checkpoints(tmp_path / 'ref')[0])
    assert mid[2]['step'] == 2
    assert any(not torch.equal(mid[0]['model'][k], a[0]['model'][k]) for k in a[0]['model'] if 'backbone' in k)
    again = evaluate_dense(str(tmp_path / 'ref'), device='cpu')
    assert again['step'] == 4 and again['arch'] == 'mask_rcnn'
    for key in ('bbox_AP', 'bbox_AP50', 'segm_AP'):
        assert again[key] == pytest.approx(ev[key]), key
    # the run folder as msconv wrote it before the task sections (every task's options in config.yaml) evaluates alike
    assert write_old_config(tmp_path / 'ref')['mixup'] == 0.8
    old = evaluate_dense(str(tmp_path / 'ref'), device='cpu')
    assert {k: old[k] for k in ('bbox_AP', 'segm_AP', 'step')} == {k: again[k] for k in ('bbox_AP', 'segm_AP', 'step')}
    from msconv.cli import main

    assert main(['eval', 'test_smt', '--checkpoint', str(tmp_path / 'ref'), '--device', 'cpu']) == 0
    out = capsys.readouterr().out
    assert f"mask_rcnn box: AP {ev['bbox_AP']:.3f}  AP50 {ev['bbox_AP50']:.3f}" in out and 'mask_rcnn mask: AP' in out


@pytest.mark.parametrize('arch', ['atss', 'sparse_rcnn'])
def test_box_only_detectors_resume_bit_exactly_without_masks(tmp_path, arch):
    # ATSS and Sparse R-CNN (its preset clips gradients at norm 1) with EMA and drop path: 3 steps straight, and 2
    # steps + resume for 1 more, give equal weights; their runs load no masks
    common = dict(DET, arch=arch, output=str(tmp_path), ema=True, ema_decay=0.9, lr=1e-3, warmup_iters=1)
    # (ATSS: 64 channels, two per GroupNorm group: P7 is 1x1 on these canvases)
    common['dense_kwargs'] = dict(DET['dense_kwargs'], num_proposals=20, channels=64 if arch == 'atss' else 32)
    ref = train(dict(common, name='ref', max_steps=3))
    assert ref['status'] == 'finished' and 0.0 <= ref['last_eval']['bbox_AP50'] <= 1.0
    assert 'segm_AP' not in ref['last_eval']
    train(dict(common, name='cut', max_steps=2))
    assert train(dict(common, name='cut', max_steps=3, resume='auto'))['steps'] == 3
    a = load_checkpoint(list_checkpoints(tmp_path / 'ref')[-1])
    b = load_checkpoint(list_checkpoints(tmp_path / 'cut')[-1])
    assert a[0]['model'].keys() == b[0]['model'].keys()
    for key in ('model', 'ema'):
        for k in a[0][key]:
            assert torch.equal(a[0][key][k], b[0][key][k]), (key, k)
    task = DetectionTask(resolve_config(dict(common, name='ref'), check_paths=False))
    train_set = task._train_set()
    assert not train_set.with_masks and 'masks' not in train_set[0][1]
    assert task.cfg.clip_grad == (1.0 if arch == 'sparse_rcnn' else None)


def test_segmentation_run_learns_and_eval_reports_single_and_multi_scale(tmp_path):
    res = train(dict(SEG, output=str(tmp_path), name='seg', lr=2e-3, seg_eval_ms=True, eval_every_iters=15))
    assert res['steps'] == 30
    records = [__import__('json').loads(line) for line in (tmp_path / 'seg' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in records if r['kind'] == 'val'] == [15, 30]  # mid-epoch (100 steps per epoch) and last
    ev = res['last_eval']
    assert {'mIoU', 'mAcc', 'aAcc', 'ms_mIoU', 'ms_aAcc'} <= set(ev)
    # 30 steps on the digits: the background class is learnt, most pixels are right
    assert ev['aAcc'] > 0.6, ev
    again = evaluate_dense(str(tmp_path / 'seg'), multi_scale=False, device='cpu')
    assert again['mIoU'] == pytest.approx(ev['mIoU']) and 'ms_mIoU' not in again
    losses = [r['loss'] for r in records if r['kind'] == 'train']
    # (mmseg's N(0, 0.01) classifiers start near ln K, so the drop is smaller than from a wider init: 0.78 here)
    assert sum(losses[-5:]) < 0.82 * sum(losses[:5])


@pytest.mark.slow  # writes 900 canvases and evaluates 100
def test_dense_demo_runs_from_a_given_backbone(tmp_path):
    from safetensors.torch import save_file

    import msconv
    from msconv.engine.demo import DEMO_MODELS, dense_demo

    spec = DEMO_MODELS['smt']
    weights = tmp_path / 'nano.safetensors'
    save_file(msconv.create_model(spec['model'], num_classes=10, **spec['model_kwargs']).state_dict(), str(weights))
    out = str(tmp_path / 'demo')
    res = dense_demo('segmentation', output=out, pretrained=str(weights), max_steps=2, progress=False)
    (row,) = res['rows']
    assert row['arch'] == 'upernet' and row['steps'] == 2 and 0.0 <= row['value'] <= 1.0 and row['cpu_s'] > 0
    assert (tmp_path / 'demo' / 'data' / 'ade' / 'annotations' / 'validation' / '000099.png').is_file()
    assert 'upernet' in res['table'] and 'mIoU' in res['table']
    with pytest.raises(ValueError, match=r"archs for task 'segmentation' must be among \('upernet',\)"):
        dense_demo('segmentation', archs=['mask_rcnn'], output=str(tmp_path / 'x'), pretrained=str(weights))


@pytest.mark.slow  # writes 900 canvases and evaluates 100 twice
def test_detection_demo_runs_atss_and_sparse_rcnn_when_asked(tmp_path):
    from safetensors.torch import save_file

    import msconv
    from msconv.engine.demo import DEMO_MODELS, dense_demo

    assert [a for a, spec in DetectionTask.demo_runs.items() if spec.get('default', True)] == ['mask_rcnn', 'retinanet']
    spec = DEMO_MODELS['smt']
    weights = tmp_path / 'nano.safetensors'
    save_file(msconv.create_model(spec['model'], num_classes=10, **spec['model_kwargs']).state_dict(), str(weights))
    res = dense_demo(
        'detection', archs=['atss', 'sparse_rcnn'], output=str(tmp_path / 'demo'), pretrained=str(weights), max_steps=1
    )
    assert [r['arch'] for r in res['rows']] == ['atss', 'sparse_rcnn']
    for row in res['rows']:
        assert row['steps'] == 1 and row['metric'] == 'bbox_AP50' and 0.0 <= row['value'] <= 1.0
    with pytest.raises(ValueError, match=r"must be among \('mask_rcnn', 'retinanet', 'atss', 'sparse_rcnn'\)"):
        dense_demo('detection', archs=['upernet'], output=str(tmp_path / 'x'), pretrained=str(weights))


def test_weight_decay_rules_and_layer_ids():
    """mmcv's rule (everything decays but names containing a key) against timm's (1-D and biases exempt), and the
    ShiftwiseConv constructor's layer ids on msconv's names (tests/test_dense_optimizer.py checks whole systems
    against the official constructors)."""
    from msconv.engine.optim import layer_decay_groups, shiftwise_layer_id, weight_decay_groups

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    net.add_module('norm', torch.nn.LayerNorm(4))
    names = {id(p): n for n, p in net.named_parameters()}

    def decayed(groups):
        return sorted(names[id(p)] for g in groups if g['weight_decay'] > 0 for p in g['params'])

    assert decayed(weight_decay_groups(net, 0.05)) == ['0.weight']
    assert decayed(weight_decay_groups(net, 0.05, exclude_1d=False)) == sorted(names.values())
    assert decayed(weight_decay_groups(net, 0.05, exclude_1d=False, exclude_keys=['norm'])) == [
        '0.bias',
        '0.weight',
        '1.bias',
        '1.weight',
    ]
    ids = [shiftwise_layer_id(n, 12) for n in ('stem.0.weight', 'stages.0.blocks.2.fc1.weight')]
    ids += [shiftwise_layer_id(f'stages.{s}.downsample.0.weight', 12) for s in (1, 2, 3)]
    ids += [shiftwise_layer_id(f'stages.{s}.blocks.{b}.norm.weight', 12) for s, b in ((1, 0), (2, 0), (2, 17), (3, 2))]
    assert ids == [0, 1, 2, 3, 12, 2, 3, 8, 12] and shiftwise_layer_id('head.fc.weight', 12) == 13
    groups = layer_decay_groups(weight_decay_groups(net, 0.05), {id(net[0].weight): 3}, 0.8, 12)
    scales = {names[id(p)]: (g['lr_scale'], g['weight_decay']) for g in groups for p in g['params']}
    assert scales['0.weight'] == (pytest.approx(0.8**10), 0.05) and scales['0.bias'] == (1.0, 0.0)


def test_sync_bn_converts_what_the_configs_synchronise_and_says_when_it_cannot():
    from msconv.dense import create_detector, create_segmenter
    from msconv.dense.sync_bn import sync_bn_scope
    from msconv.engine.distributed import sync_bn_plan

    cuda, cpu = torch.device('cuda', 0), torch.device('cpu')
    assert sync_bn_plan(True, cuda, 2) == (True, None)
    assert sync_bn_plan(True, cuda, 1) == (False, None) and sync_bn_plan(False, cuda, 8) == (False, None)
    assert sync_bn_plan(True, cpu, 1) == (False, None)
    convert, note = sync_bn_plan(True, cpu, 2)
    assert not convert and note.startswith("sync_bn: torch's SyncBatchNorm runs on CUDA only; this cpu run of 2 ")

    def kinds(model):
        bn = torch.nn.modules.batchnorm._BatchNorm
        return {n.split('.')[0]: type(m).__name__ for n, m in model.named_modules() if isinstance(m, bn)}

    small = dict(channels=16, fc_channels=32)
    cascade = create_detector('test_smt', 'cascade_mask_rcnn', 3, **small)
    task = DetectionTask(resolve_config(dict(DET, arch='cascade_mask_rcnn'), check_paths=False))
    assert task.cfg.sync_bn and sync_bn_scope('test_smt', 'cascade_mask_rcnn') == ('roi_heads',)
    cascade = task.convert_sync_batchnorm(cascade)
    assert kinds(cascade) == {'backbone': 'BatchNorm2d', 'roi_heads': 'SyncBatchNorm'}  # SMT's stem stays BN
    seg = create_segmenter('test_smt', 'upernet', 3, channels=16, aux_channels=8)
    seg_task = SegmentationTask(resolve_config(SEG, check_paths=False))
    assert seg_task.cfg.sync_bn
    assert set(kinds(seg_task.convert_sync_batchnorm(seg)).items()) == {
        ('backbone', 'BatchNorm2d'),
        ('decode_head', 'SyncBatchNorm'),
        ('auxiliary_head', 'SyncBatchNorm'),
    }
    for arch in ('mask_rcnn', 'retinanet', 'atss', 'sparse_rcnn'):  # no BatchNorm in these configs' heads
        assert sync_bn_scope('smt_small', arch) == (), arch
    sw = create_segmenter('test_shiftwise', 'upernet', 3, channels=16, aux_channels=8)
    sw_task = SegmentationTask(resolve_config(dict(SEG, model='test_shiftwise'), check_paths=False))
    assert set(kinds(sw_task.convert_sync_batchnorm(sw)).values()) == {'SyncBatchNorm'}  # the whole SW system
