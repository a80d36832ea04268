"""Config resolution: presets, YAML, overrides, and errors before any work."""

from __future__ import annotations

import numpy as np
import pytest

from msconv.engine.config import PRESETS, resolve_config


def test_family_presets_reproduce_official_recipes():
    smt = resolve_config({'model': 'smt_small'})
    assert (smt.lr, smt.warmup_lr, smt.min_lr, smt.lr_base_size) == (1e-3, 1e-7, 1e-6, 512)
    assert smt.mixup == 0.2 and smt.cutmix == 1.0 and smt.drop_path == 0.2 and smt.warmup_epochs == 5
    assert smt.clip_grad == 5.0 and smt.weight_decay == 0.05 and smt.auto_augment == 'rand-m9-mstd0.5-inc1'
    assert resolve_config({'model': 'smt_tiny'}).drop_path == 0.1
    assert resolve_config({'model': 'smt_base'}).drop_path == 0.3
    assert PRESETS['imagenet']['scsc']['warmup_epochs'] == 20 and PRESETS['imagenet']['scsc']['min_lr'] == 5e-6
    sw = PRESETS['imagenet']['shiftwise']
    assert sw['batch_size'] * sw['accum_steps'] == 4096 and sw['lr'] == 4e-3 and sw['drop_path'] == 0.2


def test_precedence_defaults_preset_yaml_flags(tmp_path):
    path = tmp_path / 'c.yaml'
    path.write_text('model: test_smt\npreset: demo\nepochs: 7\nlr: 0.01\nscale: [0.5, 1.0]\n')
    cfg = resolve_config(str(path), {'lr': 0.02, 'batch_size': None})
    assert cfg.epochs == 7  # YAML over preset
    assert cfg.lr == 0.02  # flag over YAML
    assert cfg.batch_size == PRESETS['demo']['smt']['batch_size']  # None flag = not given
    assert cfg.scale == (0.5, 1.0) and cfg.data == 'digits'


@pytest.mark.parametrize(
    'values, match',
    [
        ({'model': 'smt_tinny'}, "not an msconv model.*smt_tiny"),
        ({'model': 'test_smt', 'batch_size': 0}, 'batch_size must be a positive integer'),
        ({'model': 'test_smt', 'data': '/no/such/folder'}, "no such folder"),
        ({'model': 'test_smt', 'nan_policy': 'ignore'}, "nan_policy must be one of"),
        ({'model': 'test_smt', 'lr': -1.0}, 'lr must be'),
        ({'model': 'test_smt', 'learning_rate': 1.0}, "unknown config option 'learning_rate'"),
        ({}, 'a model name is required'),
    ],
)
def test_bad_values_fail_early(values, match):
    with pytest.raises(ValueError, match=match):
        resolve_config(values)


def test_one_class_folder_fails_early(tmp_path):
    from PIL import Image

    for split in ('train', 'val'):
        d = tmp_path / split / 'only'
        d.mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / 'x.png')
    with pytest.raises(ValueError, match='at least 2 classes'):
        resolve_config({'model': 'test_smt', 'data': str(tmp_path)})


def test_timm_models_take_the_smt_demo_values_and_no_family_preset():
    """A timm model has no msconv family: preset 'demo' gives it the SMT demo values, preset 'imagenet' nothing (the
    classification config's defaults)."""
    from dataclasses import fields

    from msconv.engine import ClassificationConfig

    demo = resolve_config({'model': 'test_vit', 'preset': 'demo'})
    assert (demo.model, demo.task, demo.preset) == ('test_vit', 'classification', 'demo')
    assert {k: getattr(demo, k) for k in PRESETS['demo']['smt']} == PRESETS['demo']['smt']
    plain = resolve_config({'model': 'test_vit'})
    defaults = ClassificationConfig()
    assert plain.preset == 'imagenet'
    for f in fields(ClassificationConfig):
        if f.name not in ('model', 'preset'):
            assert getattr(plain, f.name) == getattr(defaults, f.name), f.name


def test_trainconfig_object_gets_the_preset_beneath_its_set_fields():
    from msconv.engine import TrainConfig

    cfg = resolve_config(TrainConfig(model='test_smt', preset='demo', epochs=3), {'lr': 0.5})
    assert cfg.epochs == 3 and cfg.lr == 0.5
    assert cfg.batch_size == PRESETS['demo']['smt']['batch_size'] and cfg.mixup == 0.0
