"""Every script in examples/ runs, on tiny settings, so that none of them rots.

Each test executes the script file itself (``runpy`` with ``__name__ == '__main__'`` and its command line), the
way a user runs it, and checks what the script is meant to produce.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / 'examples'


def run_example(name: str, flags: str, *paths, monkeypatch) -> dict:
    """Run ``examples/<name>`` as ``python examples/<name> FLAGS PATHS...``; returns the script's globals."""
    monkeypatch.setattr(sys, 'argv', [str(EXAMPLES / name), *flags.split(), *map(str, paths)])
    return runpy.run_path(str(EXAMPLES / name), run_name='__main__')


def test_every_example_has_a_test():
    tested = {'finetune_imagefolder.py', 'detection_fasterrcnn.py', 'export_onnxruntime.py', 'draw_erf.py'}
    assert {p.name for p in EXAMPLES.glob('*.py')} == tested


@pytest.fixture(scope='module')
def digit_folder(tmp_path_factory) -> Path:
    """An ImageFolder (train/ and val/, three classes) made from the bundled digits."""
    from msconv.data.digits import load_digits

    root = tmp_path_factory.mktemp('digits_folder')
    for split, per_class in (('train', 16), ('val', 8)):
        images, labels = load_digits(split)
        for c in range(3):
            folder = root / split / f'digit{c}'
            folder.mkdir(parents=True)
            for i, img in enumerate(images[labels == c][:per_class]):
                Image.fromarray(img).convert('RGB').save(folder / f'{i}.png')
    return root


@pytest.fixture
def created_models(monkeypatch):
    """The models the example builds with ``msconv.create_model``, each with a copy of its weights as created."""
    import msconv

    made = []
    real = msconv.create_model

    def recording(*args, **kwargs):
        model = real(*args, **kwargs)
        made.append((model, {k: v.clone() for k, v in model.state_dict().items()}))
        return model

    monkeypatch.setattr(msconv, 'create_model', recording)
    return made


def _top1(model, folder: Path, size: int) -> float:
    """Top-1 (%) of ``model`` on ``folder`` (an ImageFolder), one image at a time with the model's eval transform."""
    import timm.data
    from torchvision.datasets import ImageFolder

    cfg = dict(timm.data.resolve_data_config({}, model=model), input_size=(3, size, size))
    images = ImageFolder(str(folder), transform=timm.data.create_transform(**cfg))
    model.eval()
    with torch.no_grad():
        correct = sum(int(model(x[None]).argmax(1).item() == y) for x, y in images)
    return 100.0 * correct / len(images)


def test_finetune_imagefolder(digit_folder, tmp_path, monkeypatch, capsys, created_models):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    flags = '--model test_smt --img-size 32 --epochs 2 --batch-size 8 --max-steps 3 --lr 1e-3 --data'
    run_example('finetune_imagefolder.py', flags, digit_folder, monkeypatch=monkeypatch)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('epoch ')]
    assert [line.split(':')[0] for line in lines] == ['epoch 1/2', 'epoch 2/2']
    top1 = float(lines[-1].rsplit(' ', 1)[1].rstrip('%'))
    # the printed top-1 is the trained model's, over every val image (24: a multiple of 100/24 %)
    ((model, initial),) = created_models
    assert top1 == pytest.approx(_top1(model, digit_folder / 'val', 32), abs=0.05)
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in initial.items()), 'the example did not train'


def test_finetune_imagefolder_starts_from_a_checkpoint(digit_folder, tmp_path, monkeypatch, capsys, created_models):
    """--checkpoint loads the trunk and replaces the classifier (one output per class folder)."""
    from safetensors.torch import save_file

    import msconv

    src = msconv.create_model('test_smt')  # default head (1000 classes) that must be dropped
    trunk = {k: v for k, v in src.state_dict().items() if not k.startswith('head.fc.')}
    save_file(src.state_dict(), str(tmp_path / 'w.safetensors'))
    created_models.clear()
    with pytest.warns(UserWarning, match='classifier tensors .* were dropped'):
        flags = f'--model test_smt --img-size 32 --epochs 1 --max-steps 1 --data {digit_folder} --checkpoint'
        run_example('finetune_imagefolder.py', flags, tmp_path / 'w.safetensors', monkeypatch=monkeypatch)
    assert 'epoch 1/1' in capsys.readouterr().out
    ((model, initial),) = created_models
    assert initial['head.fc.weight'].shape[0] == 3 and model.num_classes == 3  # digit0, digit1, digit2
    assert set(initial) - set(trunk) == {'head.fc.weight', 'head.fc.bias'}
    for k, v in trunk.items():  # the example starts from the checkpoint's trunk, tensor for tensor
        assert torch.equal(initial[k], v), k


def test_detection_fasterrcnn(monkeypatch, capsys):
    ns = run_example('detection_fasterrcnn.py', '--model test_smt --img-size 64', monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert 'training losses:' in out and 'inference:' in out
    res = ns['main'](['--model', 'test_smt', '--img-size', '64'])
    assert set(res['losses']) == {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}
    assert all(torch.isfinite(v) for v in res['losses'].values())
    body = res['detector'].backbone.backbone.body  # msconv.create_backbone_fpn: FPN over the stride 8/16/32 maps
    assert res['detector'].backbone.strides == [8, 16, 32, 64]
    trunk = [n for n, p in body.named_parameters() if p.requires_grad and p.grad is None]
    assert not trunk, f'backbone parameters without a gradient: {trunk[:5]}'
    det = res['detections']
    assert det['boxes'].shape[1:] == (4,) and len(det['boxes']) == len(det['scores']) == len(det['labels'])


def test_export_onnxruntime(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    img = tmp_path / 'photo.png'
    yy, xx = np.mgrid[0:50, 0:70]  # a smooth picture: resampling details must not dominate the comparison
    pixels = np.stack([xx * 3.5, yy * 5.0, 128 + 100 * np.sin(xx / 9.0 + yy / 7.0)], axis=-1)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(img)
    flags = f'--model test_smt --img-size 64 --num-classes 7 --out {tmp_path / "m.onnx"} --images'
    ns = run_example('export_onnxruntime.py', flags, img, img, monkeypatch=monkeypatch)
    assert (tmp_path / 'm.onnx').is_file()
    out = capsys.readouterr().out
    assert out.count('photo.png') == 2 and 'test_smt has random weights' in out
    assert all('class ' in line for line in out.splitlines() if line.startswith('photo.png'))  # named classes

    # the server's numpy preprocessing matches timm's eval transform of the model's pretrained_cfg
    import timm

    import msconv

    model = msconv.create_model('test_smt', num_classes=7)
    cfg = timm.data.resolve_data_config({'input_size': (3, 64, 64)}, model=model)
    pre = {'size': 64, 'crop_pct': cfg['crop_pct'], 'mean': cfg['mean'], 'std': cfg['std']}
    server = ns['OnnxClassifier'](str(tmp_path / 'm.onnx'), **pre)
    x = timm.data.create_transform(**cfg)(Image.open(img).convert('RGB'))
    np.testing.assert_allclose(ns['preprocess'](Image.open(img), **pre), x.numpy(), atol=5e-2)
    top, probs = server([Image.open(img)], k=3)
    assert top.shape == probs.shape == (1, 3) and np.all(np.diff(probs[0]) <= 0)
    assert server.labels == [f'class {i}' for i in range(7)]
    names = ns['class_names'](1000)  # ImageNet-1K's, from timm
    assert names[1] == 'goldfish' and names[999] == 'toilet tissue' and len(set(names)) > 990


def test_draw_erf(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    flags = 'test_smt test_shiftwise --data digits --num-images 2 --img-size 64 --out'
    run_example('draw_erf.py', flags, tmp_path / 'erf.png', monkeypatch=monkeypatch)
    assert (tmp_path / 'erf.png').stat().st_size > 0
    out = capsys.readouterr().out
    assert 'test_smt (random weights): high-contribution area ratio' in out and 'test_shiftwise (random' in out
    assert 'note: test_smt has random weights' in out
