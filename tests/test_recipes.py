"""The training recipes against the official configurations (issue 16): the preset x hyper-parameter table, the
SCSC schedule, mixed precision, --per-gpu-batch, SMT-L 22K presets, best/last reporting and `eval --which`."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from test_engine_train import make_image_folder

import msconv
from msconv.engine.config import PRESETS, resolve_config, split_global_batch
from msconv.engine.distributed import DistInfo
from msconv.engine.recipes import (
    _SAME,
    OFFICIAL_RECIPES,
    UNOFFICIAL_PRESETS,
    preset_info,
    recipe_table_markdown,
    recipe_value,
)
from msconv.engine.trainer import _amp_dtype, _Trainer

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / 'docs' / 'guides' / 'recipes.md'

pytestmark = pytest.mark.usefixtures('one_thread')


def _resolve(model, preset, arch=None, **kw):
    if preset in ('imagenet22kto1k', 'imagenet22kto1k_384'):
        kw.setdefault('init_checkpoint', 'pretrained.pth')
    if arch is not None:
        kw['arch'] = arch
    return resolve_config(dict(model=model, preset=preset, **kw), check_paths=False)


def test_presets_match_official_table():
    """Every preset of every released model resolves to the official value of every row of the table (or to the
    msconv value its note explains), and docs/guides/recipes.md shows exactly the generated table."""
    checked = 0
    for key, rec in OFFICIAL_RECIPES.items():
        assert rec['official'] and rec['preset'] in PRESETS, key
        for model in rec['models']:
            cfg = _resolve(model, rec['preset'], rec.get('arch'))
            info = preset_info(model, rec['preset'], rec.get('arch'))
            assert info['official'] and info['recipe'] == key
            for row in rec['rows']:
                if row['field'] is None or (row['models'] and model not in row['models']):
                    continue
                expected = row['official'] if row['msconv'] is _SAME else row['msconv']
                if row['msconv'] is not _SAME:
                    assert row['note'], f"{key}/{row['param']}: msconv differs from the official value without a note"
                got = recipe_value(cfg, row['field'])
                if isinstance(expected, float):
                    assert got == pytest.approx(expected, rel=1e-12), (key, model, row['param'], got)
                else:
                    assert got == expected, (key, model, row['param'], got)
                checked += 1
    for model, rec in UNOFFICIAL_PRESETS.items():
        cfg = _resolve(model, rec['preset'])
        info = preset_info(model, rec['preset'])
        assert not info['official'] and info['based_on'] == rec['based_on']
        for row in rec['rows']:
            assert recipe_value(cfg, row['field']) == row['official'], (model, row['param'])
            checked += 1
    assert checked > 500
    # every released classification model's 'imagenet' preset is either an official recipe or labelled as not one
    released = [m for m in msconv.list_models() if not m.startswith(('test_', 'face_')) and 'face' not in m]
    covered = {m for r in OFFICIAL_RECIPES.values() if r['preset'] == 'imagenet' for m in r['models']}
    assert set(released) <= covered | set(UNOFFICIAL_PRESETS), set(released) - covered - set(UNOFFICIAL_PRESETS)
    # the docs page holds the generated table verbatim
    text = DOCS.read_text()
    m = re.search(r'<!-- recipe-table:start -->\n(.*)<!-- recipe-table:end -->', text, re.S)
    assert m, 'docs/guides/recipes.md lacks the recipe-table markers'
    assert m.group(1) == recipe_table_markdown(), (
        "docs/guides/recipes.md is out of date: paste msconv.engine.recipes.recipe_table_markdown() between the markers"
    )


def test_per_size_and_unofficial_values_win_over_the_family_preset():
    assert _resolve('scsc_swin_small', 'imagenet').drop_path == 0.3
    assert _resolve('scsc_swin_tiny', 'imagenet').drop_path == 0.1
    assert _resolve('scsc_resnet50', 'imagenet').drop_path == 0.0
    assert [_resolve(f'smt_{s}', 'imagenet').drop_path for s in ('tiny', 'small', 'base', 'large')] == [
        0.1,
        0.2,
        0.3,
        0.4,
    ]
    assert _resolve('smt_large', 'imagenet', drop_path=0.25).drop_path == 0.25  # explicit values still win
    info = preset_info('scsc_resnet101', 'imagenet')
    assert not info['official'] and 'CBTNet' in info['based_on']
    assert not preset_info('shiftwise_large', 'imagenet')['official']
    assert not preset_info('smt_tiny', 'imagenet22k')['official']  # the 22K recipe is SMT-L's only


def _official_scsc_lr(t, total, warmup, peak, warmup_lr, min_lr):
    """SCSC lr_scheduler.py:21-30: timm CosineLRScheduler(t_initial=total, warmup_t=warmup), no warm-up prefix."""
    if t < warmup:
        return warmup_lr + t * (peak - warmup_lr) / warmup
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * t / total))


def test_scsc_schedule_is_the_official_cosine_over_all_epochs():
    cfg = _resolve('test_scsc_swin', 'imagenet', batch_size=8, output='/nonexistent-unused', num_workers=0)
    assert cfg.warmup_prefix is False and cfg.warmup_epochs == 20 and cfg.epochs == 300
    t = _Trainer(cfg, torch.device('cpu'), DistInfo())
    t._build()
    spe, scale = t.steps_per_epoch, 8 / 512
    total, warm = 300 * spe, 20 * spe
    for epoch in (0, 1, 10, 19.5, 20, 21, 100, 150, 250, 299):
        s = int(epoch * spe)
        t.scheduler.step_update(num_updates=s)
        expected = _official_scsc_lr(s, total, warm, 1e-3 * scale, 5e-7 * scale, 5e-6 * scale)
        assert t.optimizer.param_groups[0]['lr'] == pytest.approx(expected, rel=1e-9), epoch
    # the figures at the official global batch 1024 (peak 2e-3): epoch 150 is 1.00e-3 here, where the
    # warm-up-prefix cosine gives 1.12e-3
    assert _official_scsc_lr(150, 300, 20, 2e-3, 1e-6, 1e-5) == pytest.approx(1.005e-3)
    prefix = 1e-5 + 0.5 * (2e-3 - 1e-5) * (1 + math.cos(math.pi * 130 / 280))
    assert f"{prefix:.2e}" == '1.12e-03'


def test_mixed_precision_defaults_and_the_cpu_fallback():
    for model in ('smt_tiny', 'scsc_swin_tiny'):
        cfg = _resolve(model, 'imagenet')
        assert cfg.amp and cfg.amp_dtype == 'float16'
        assert _amp_dtype(cfg, torch.device('cuda')) == (torch.float16, None)
        dtype, note = _amp_dtype(cfg, torch.device('cpu'))
        assert dtype is None and 'fp32' in note and 'needs CUDA' in note
        cfg_bf16 = _resolve(model, 'imagenet', amp_dtype='bfloat16')
        assert _amp_dtype(cfg_bf16, torch.device('cpu')) == (torch.bfloat16, None)
    sw = _resolve('shiftwise_tiny', 'imagenet')
    assert not sw.amp and _amp_dtype(sw, torch.device('cpu')) == (None, None)


def test_per_gpu_batch_keeps_the_global_batch_and_lr():
    cfg = _resolve('smt_tiny', 'imagenet', per_gpu_batch=128)
    one = split_global_batch(cfg, 1)
    assert (one.batch_size, one.accum_steps) == (128, 8)
    eight = split_global_batch(cfg, 8)
    assert (eight.batch_size, eight.accum_steps) == (1024, 1)
    four = split_global_batch(_resolve('shiftwise_tiny', 'imagenet', per_gpu_batch=64), 4)
    assert (four.batch_size, four.accum_steps) == (256, 16)  # 4096 = 4 x 64 x 16
    assert split_global_batch(_resolve('smt_tiny', 'imagenet'), 3).batch_size == 1024  # not asked: unchanged
    with pytest.raises(ValueError, match=r'per_gpu_batch 100 x 1 .* does not divide the global batch 1024'):
        split_global_batch(_resolve('smt_tiny', 'imagenet', per_gpu_batch=100), 1)
    with pytest.raises(ValueError, match='per_gpu_batch must be a positive integer'):
        _resolve('smt_tiny', 'imagenet', per_gpu_batch=0)


def test_per_gpu_batch_in_a_run(tmp_path):
    data = make_image_folder(tmp_path / 'imgs', n_train=8, n_val=2)
    res = msconv.train(
        dict(
            model='test_smt',
            preset='demo',
            data=str(data),
            batch_size=8,
            per_gpu_batch=4,
            lr=1e-3,
            lr_base_size=8,
            max_steps=1,
            progress=False,
            plot=False,
            num_workers=0,
            output=str(tmp_path),
            name='pgb',
        )
    )
    import yaml

    saved = yaml.safe_load((Path(res['run_dir']) / 'config.yaml').read_text())
    assert (saved['batch_size'], saved['accum_steps']) == (4, 2)  # one process: 4 per micro-step x 2
    from msconv.engine.metrics import read_metrics

    rec = [r for r in read_metrics(res["run_dir"]) if r["kind"] == "train"][0]
    assert rec['lr'] > 0
    t = _Trainer(resolve_config(saved, check_paths=False), torch.device('cpu'), DistInfo())
    assert t.local_bs == 4


def test_smt_large_22k_presets():
    pre = _resolve('smt_large', 'imagenet22k')
    assert (pre.epochs, pre.batch_size * pre.accum_steps, pre.drop_path) == (90, 4096, 0.1)
    assert pre.lr * 4096 / pre.lr_base_size == pytest.approx(1e-3)  # 1.25e-4 per 512 -> 1e-3 at 4096
    ft = _resolve('smt_large', 'imagenet22kto1k')
    assert (ft.epochs, ft.lr, ft.batch_size, ft.drop_path) == (30, 1e-5, 512, 0.1)
    ft384 = _resolve('smt_large', 'imagenet22kto1k_384')
    assert (ft384.image_size, ft384.crop_pct, ft384.lr, ft384.crop_mode) == (384, 1.0, 2e-5, 'squash')
    # TEST.CROP False: a 600x400 image is resized straight to 384x384 (data/build.py:155-158), not cropped
    from PIL import Image

    from msconv.data.loader import build_transform

    squash = build_transform(ft384, False, 384, (0.5,) * 3, (0.5,) * 3)
    image = Image.new('RGB', (600, 400))
    image.paste((255, 0, 0), (0, 0, 100, 400))  # a red band on the left sixth: kept by the squash, cut by a crop
    x = squash(image)
    assert tuple(x.shape) == (3, 384, 384) and x[0, :, :50].mean() > 0.9
    center = build_transform(_resolve('smt_large', 'imagenet22kto1k'), False, 384, (0.5,) * 3, (0.5,) * 3)
    assert center(image)[0, :, :50].mean() < -0.9  # short side to 384 / 0.875, centre crop: the band is cut off
    with pytest.raises(ValueError, match='--init-checkpoint'):
        resolve_config(dict(model='smt_large', preset='imagenet22kto1k'), check_paths=False)
    with pytest.raises(ValueError, match=r"preset 'imagenet22k' is defined for \['smt'\] models only"):
        _resolve('scsc_swin_tiny', 'imagenet22k')
    with pytest.raises(ValueError, match='class_map selects rows'):
        _resolve('smt_large', 'imagenet', class_map='map.txt')


def test_finetune_preset_loads_a_22k_checkpoint_through_the_class_map(tmp_path):
    """The 22K -> 1K chain on micro models: a 12-class 'pre-trained' test_smt, a class map picking 3 of its rows."""
    from safetensors.torch import save_file

    data = make_image_folder(tmp_path / 'imgs', n_train=4, n_val=2)
    big = msconv.create_model('test_smt', num_classes=12)
    save_file({k: v.contiguous() for k, v in big.state_dict().items()}, str(tmp_path / 'pre.safetensors'))
    (tmp_path / 'map.txt').write_text('7\n2\n11\n')
    cfg = resolve_config(
        dict(
            model='test_smt',
            preset='imagenet22kto1k',
            data=str(data),
            init_checkpoint=str(tmp_path / 'pre.safetensors'),
            class_map=str(tmp_path / 'map.txt'),
            image_size=32,
            batch_size=4,
            output=str(tmp_path),
            num_workers=0,
            amp=False,
        )
    )
    t = _Trainer(cfg, torch.device('cpu'), DistInfo())
    t._build()
    head = t.model.get_classifier()
    assert torch.equal(head.weight, big.get_classifier().weight[[7, 2, 11]])


def test_best_and_last_are_tracked_and_eval_picks_either(tmp_path, capsys):
    from msconv.cli import main
    from msconv.engine.checkpoint import list_best_checkpoints
    from msconv.engine.config import save_config

    data = make_image_folder(tmp_path / 'imgs', n_train=4, n_val=2)
    cfg = resolve_config(
        dict(
            model='test_smt',
            preset='demo',
            data=str(data),
            batch_size=4,
            output=str(tmp_path),
            name='run',
            num_workers=0,
            progress=False,
            plot=False,
        )
    )
    t = _Trainer(cfg, torch.device('cpu'), DistInfo())
    t.best = t.last = t.last_eval = None
    t.curves = None
    t._build()
    t.run_dir.mkdir(parents=True)
    save_config(cfg, t.run_dir / 'config.yaml')
    spe = t.steps_per_epoch
    t._track_best({'top1': 50.0}, spe)
    best_w = {k: v.clone() for k, v in t.model.state_dict().items()}
    with torch.no_grad():
        for p in t.model.parameters():
            p.add_(1.0)
    t._track_best({'top1': 40.0}, 2 * spe)  # lower: the best stays
    assert t.best['top1'] == 50.0 and t.best['epoch'] == 1 and t.last == {'top1': 40.0, 'step': 2 * spe, 'epoch': 2}
    (best_dir,) = list_best_checkpoints(t.run_dir)
    assert best_dir.name == f'best-{spe:08d}' and t.best['checkpoint'] == str(best_dir)
    t._save(2 * spe, 2, 'epoch')  # the last checkpoint holds the later weights
    res = msconv.evaluate('test_smt', checkpoint=t.run_dir, data=str(data), which='best')
    assert res['checkpoint'] == str(best_dir) and res['best_top1'] == 50.0
    last = msconv.evaluate('test_smt', checkpoint=t.run_dir, data=str(data), which='last')
    assert 'step-' in last['checkpoint']
    from msconv.engine.checkpoint import best_checkpoint

    weights = best_checkpoint(t.run_dir)[1]['model']
    assert all(torch.equal(weights[k], best_w[k]) for k in best_w)
    capsys.readouterr()
    assert main(['eval', 'test_smt', '--checkpoint', str(t.run_dir), '--data', str(data), '--which', 'best']) == 0
    out = capsys.readouterr().out
    assert f'best-{spe:08d}' in out and 'best evaluation: top-1 50.00% at epoch 1' in out
    t._track_best({'top1': 60.0}, 3 * spe)  # higher: replaces the best folder
    assert [p.name for p in list_best_checkpoints(t.run_dir)] == [f'best-{3 * spe:08d}']
    with pytest.raises(ValueError, match="which must be 'last' or 'best'"):
        msconv.evaluate('test_smt', checkpoint=t.run_dir, data=str(data), which='first')
    with pytest.raises(ValueError, match="which='best' needs a run folder"):
        msconv.evaluate('test_smt', checkpoint=list_best_checkpoints(t.run_dir)[0], data=str(data), which='best')


def test_top1_summary_reports_last_and_best():
    from msconv.engine.metrics import top1_summary

    recs = [
        {'kind': 'train', 'step': 5, 'loss': 1.0},
        {'kind': 'val', 'step': 10, 'top1': 40.0},
        {'kind': 'val', 'step': 20, 'top1': 55.0},
        {'kind': 'val', 'step': 30, 'top1': 55.0},
        {'kind': 'val', 'step': 40, 'top1': 50.0},
    ]
    s = top1_summary(recs, steps_per_epoch=10)
    assert s['last'] == {'top1': 50.0, 'step': 40, 'epoch': 4.0}
    assert s['best'] == {'top1': 55.0, 'step': 20, 'epoch': 2.0}  # the first of equal ones
    assert top1_summary(recs, 10, up_to_step=15)['best']['step'] == 10
    assert top1_summary(recs[:1]) == {'last': None, 'best': None}


def test_best_survives_a_resume(tmp_path):
    from msconv.engine.checkpoint import list_best_checkpoints
    from msconv.engine.metrics import read_metrics, top1_summary

    data = make_image_folder(tmp_path / 'imgs', n_train=4, n_val=2)
    common = dict(
        model='test_smt',
        preset='demo',
        data=str(data),
        batch_size=4,
        progress=False,
        plot=False,
        num_workers=0,
        output=str(tmp_path),
        name='r',
        epochs=3,
    )
    first = msconv.train(dict(common, max_steps=1))
    assert first['best']['step'] == 1 and first['last']['step'] == 1
    second = msconv.train(dict(common, max_steps=2, resume='auto'))
    expected = top1_summary(read_metrics(tmp_path / 'r'), steps_per_epoch=3)
    assert second['last'] == expected['last'] and second['last']['step'] == 2
    assert {k: second['best'][k] for k in ('top1', 'step', 'epoch')} == expected['best']
    (best_dir,) = list_best_checkpoints(tmp_path / 'r')
    assert best_dir.name == f"best-{expected['best']['step']:08d}" and second['best']['checkpoint'] == str(best_dir)
