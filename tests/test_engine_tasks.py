"""Tasks own their part: each run's config holds the shared options and its task's own, nothing else; a task brings
its flags, presets, evaluation and demo through its class; a new task is one module and one registration; the
config.yaml of run folders written before the task sections still evaluates and resumes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import OLD_CONFIG_OPTIONS, write_old_config
from test_engine_train import TINY, make_image_folder

from msconv.cli import main
from msconv.engine import (
    TASKS,
    ClassificationConfig,
    DetectionConfig,
    FaceConfig,
    SegmentationConfig,
    Task,
    TrainConfig,
    evaluate,
    register_task,
    train,
)
from msconv.engine import config as config_module
from msconv.engine.config import PRESETS, option, register_presets, resolve_config

pytestmark = pytest.mark.usefixtures('one_thread')

COMMON = {f.name for f in dataclasses.fields(TrainConfig)}
# options that belong to one task only: none of them may show in another task's config
FACE_ONLY = {'face_val_bins', 'embedding_size', 'margin', 'margin_s', 'margin_m'}
CLASSIFICATION_ONLY = {'mixup', 'cutmix', 'mixup_prob', 'mixup_switch_prob', 'mixup_mode', 'smoothing', 'class_map'}
SEGMENTATION_ONLY = {
    'seg_scale',
    'seg_ratio_range',
    'seg_crop',
    'seg_num_classes',
    'seg_eval_ms',
    'seg_eval_flip',
    'seg_eval_mode',
    'seg_slide_crop',
    'seg_slide_stride',
}


def _printed_config(capsys, *argv) -> dict:
    assert main(['train', 'test_smt', *argv, '--print-config']) == 0
    out = capsys.readouterr().out
    assert out.startswith('# preset ')
    return yaml.safe_load(out)


def test_print_config_of_a_detection_run_shows_detection_and_shared_options_only(capsys):
    printed = _printed_config(capsys, '--task', 'detection', '--arch', 'mask_rcnn')
    detection = {f.name for f in dataclasses.fields(DetectionConfig)}
    assert set(printed) == detection and COMMON < detection
    assert set(printed) - COMMON == {
        'dense_kwargs',
        'eval_max_images',
        'norm_eval',
        'warmup_iters',
        'total_iters',
        'lr_milestones',
        'decay_rate',
        'warmup_ratio',
        'eval_every_iters',
        'wd_exclude_1d',
        'wd_exclude_keys',
        'layer_decay',
        'layer_decay_layers',
        'arch',
        'det_scales',
        'det_max_size',
        'det_crop',
    }
    assert not (FACE_ONLY | CLASSIFICATION_ONLY | SEGMENTATION_ONLY) & set(printed)
    # the detection preset is the default, and the flag reached the config
    assert (printed['task'], printed['preset'], printed['arch']) == ('detection', 'coco_3x', 'mask_rcnn')
    assert (printed['lr'], printed['lr_milestones'], printed['warmup_iters']) == (2e-4, [27, 33], 500)


def test_each_task_config_holds_its_own_options(tmp_path, capsys):
    classification = _printed_config(capsys, '--preset', 'demo')
    assert set(classification) == {f.name for f in dataclasses.fields(ClassificationConfig)}
    assert CLASSIFICATION_ONLY <= set(classification) and not (FACE_ONLY | SEGMENTATION_ONLY) & set(classification)
    (tmp_path / 'faces' / 'a').mkdir(parents=True)
    face = _printed_config(capsys, '--task', 'face', '--data', str(tmp_path / 'faces'), '--embedding-size', '64')
    assert set(face) == {f.name for f in dataclasses.fields(FaceConfig)} and face['embedding_size'] == 64
    assert not CLASSIFICATION_ONLY & set(face)
    segmentation = _printed_config(capsys, '--preset', 'ade20k_160k')  # the preset names its task
    assert segmentation['task'] == 'segmentation' and segmentation['arch'] == 'upernet'
    assert set(segmentation) == {f.name for f in dataclasses.fields(SegmentationConfig)}


def test_an_option_of_another_task_is_refused_by_name(capsys):
    assert main(['train', 'test_smt', '--task', 'detection', '--embedding-size', '64', '--print-config']) == 2
    err = capsys.readouterr().err
    assert "option 'embedding_size' belongs to task 'face', not to this run's task 'detection'" in err
    with pytest.raises(ValueError, match="option 'mixup' belongs to task 'classification'"):
        resolve_config({'model': 'test_smt', 'task': 'segmentation'}, {'mixup': 0.2})
    assert main(['train', 'test_smt', '--bogus', '1', '--print-config']) == 2
    assert 'unrecognized arguments: --bogus 1' in capsys.readouterr().err
    assert main(['train', 'test_smt', '--task', 'face', '--embedding-size', 'x']) == 2
    assert "argument --embedding-size: invalid int value: 'x'" in capsys.readouterr().err


# A fifth task, as a contributor adds one: this module plays its new module, `keypoints_task` its registration.
@dataclass
class KeypointsConfig(TrainConfig):
    """``TrainConfig`` plus the options of the toy keypoint task."""

    num_keypoints: int = option(17, flag='--num-keypoints', help='keypoints per instance')
    oks_sigma: float = option(0.05, help='OKS sigma of every keypoint')


class KeypointsTask(Task):
    """Toy keypoint detection: the interface a new task implements outside a run."""

    config_class = KeypointsConfig
    default_preset = 'keypoints_toy'
    own_presets_only = True

    @classmethod
    def evaluate_run(cls, model, checkpoint, data=None, device='auto'):
        return {'checkpoint': checkpoint, 'model': model, 'data': data, 'AP': 0.25}

    @classmethod
    def format_evaluation(cls, res):
        return f"keypoint AP {res['AP']:.2f} of {res['checkpoint']}"

    @classmethod
    def demo(cls, output='runs/keypoints', max_steps=None, threads=1, progress=True, device='cpu'):
        return dict(table=f'keypoints demo in {output}', summary='done', interrupted=False, ok=True)


@pytest.fixture
def keypoints_task():
    before = dict(TASKS), dict(PRESETS), dict(config_module._PRESET_RULES)
    register_presets(
        'keypoints_toy', {'smt': dict(epochs=3, warmup_epochs=1, num_keypoints=5)}, task='keypoints', other_models='smt'
    )
    register_task('keypoints')(KeypointsTask)  # the one registration line
    yield KeypointsTask
    for registry, saved in zip((TASKS, PRESETS, config_module._PRESET_RULES), before):
        registry.clear()
        registry.update(saved)


def test_a_fifth_task_is_one_module_and_one_registration(keypoints_task, tmp_path, capsys):
    # config resolution: its config class, its default preset, its own options; the preset names the task
    cfg = resolve_config({'model': 'test_smt', 'task': 'keypoints'})
    assert type(cfg) is KeypointsConfig and (cfg.preset, cfg.epochs, cfg.num_keypoints) == ('keypoints_toy', 3, 5)
    assert resolve_config({'model': 'test_smt', 'preset': 'keypoints_toy'}).task == 'keypoints'
    with pytest.raises(ValueError, match="preset 'imagenet' is a shared preset, not one of the task's own"):
        resolve_config({'model': 'test_smt', 'task': 'keypoints', 'preset': 'imagenet'})
    with pytest.raises(ValueError, match="preset 'keypoints_toy' is a recipe of task 'keypoints'"):
        resolve_config({'model': 'test_smt', 'task': 'classification', 'preset': 'keypoints_toy'})
    # the command line: its flag, its config, its listing
    printed = _printed_config(capsys, '--task', 'keypoints', '--num-keypoints', '7')
    assert set(printed) == COMMON | {'num_keypoints', 'oks_sigma'} and printed['num_keypoints'] == 7
    assert main(['tasks', 'keypoints']) == 0
    listing = capsys.readouterr().out
    assert listing.startswith('keypoints: Toy keypoint detection') and 'presets: keypoints_toy' in listing
    assert 'num_keypoints = 17  [--num-keypoints]  keypoints per instance' in listing
    # `msconv eval` of one of its runs asks it, and refuses what it does not take
    run = tmp_path / 'run'
    (run / 'checkpoints').mkdir(parents=True)
    (run / 'config.yaml').write_text(yaml.safe_dump(dict(cfg.to_dict(), task='keypoints')))
    assert main(['eval', 'test_smt', '--checkpoint', str(run)]) == 0
    assert capsys.readouterr().out == f"keypoint AP 0.25 of {run}\n"
    assert main(['eval', 'test_smt', '--checkpoint', str(run), '--split', 'train']) == 2
    assert "option(s) ['split'] do not apply to the evaluation of a 'keypoints' run" in capsys.readouterr().err
    # `msconv demo --task` runs its demo
    assert main(['demo', '--task', 'keypoints', '--output', str(tmp_path / 'd')]) == 0
    assert f"keypoints demo in {tmp_path / 'd'}" in capsys.readouterr().out
    assert main(['demo', '--task', 'keypoints', '--families', 'smt']) == 2
    assert "option(s) ['families'] do not apply to the demo of task 'keypoints'" in capsys.readouterr().err


def test_old_run_folders_still_load_evaluate_and_resume(tmp_path):
    """A run folder whose config.yaml holds every task's options (as msconv wrote them before the sections)."""
    data = make_image_folder(tmp_path / 'imgs')
    common = dict(TINY, data=str(data), output=str(tmp_path), name='old', ckpt_every=2)
    run = Path(train(dict(common, max_steps=2))['run_dir'])
    new_eval = evaluate('test_smt', checkpoint=run, data=str(data))
    old = write_old_config(run)
    assert len(old) == len(OLD_CONFIG_OPTIONS) == 90 and old['margin'] == 'arcface' and old['arch'] is None
    cfg = resolve_config(str(run / 'config.yaml'))
    assert type(cfg) is ClassificationConfig and cfg.model == 'test_smt' and cfg.crop_pct == old['crop_pct']
    old_eval = evaluate('test_smt', checkpoint=run, data=str(data))
    assert old_eval['top1'] == new_eval['top1'] and old_eval['val_loss'] == new_eval['val_loss']
    assert old_eval['step'] == 2
    res = train(dict(common, max_steps=4, resume='auto'))
    assert res['status'] == 'finished' and res['steps'] == 4
    assert 'margin' not in yaml.safe_load((run / 'config.yaml').read_text())  # rewritten with its own options
