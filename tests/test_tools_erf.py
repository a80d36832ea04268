"""Effective receptive field: exact maps for a known convolution, area ratios, real-image loaders, figure, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import msconv
from msconv.cli import main
from msconv.tools.erf import area_ratios, compute_erf, erf_map, load_images, normalise, plot_erf


class OneConv(nn.Module):
    """A single 5x5 conv with non-negative weights: the centre pixel's input gradient is the kernel itself."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 5, padding=2, bias=True)
        with torch.no_grad():
            self.conv.weight.uniform_(0.1, 1.0)
            self.conv.bias.fill_(10.0)  # keeps the ReLU of the centre output open

    def forward_features(self, x):
        return self.conv(x)


def test_erf_map_is_the_kernel():
    model = OneConv()
    images = torch.rand(3, 3, 17, 17)
    m = erf_map(model, images, batch_size=2)
    expected = np.zeros((17, 17))
    expected[6:11, 6:11] = model.conv.weight.detach().sum((0, 1)).double().numpy()
    np.testing.assert_allclose(m, expected, rtol=1e-6, atol=1e-9)
    assert model.training  # mode restored


def test_relu_vs_abs():
    model = OneConv()
    with torch.no_grad():
        model.conv.weight[:, 0] *= -1  # negative gradients from channel 0
    images = torch.rand(2, 3, 9, 9)
    w = model.conv.weight.detach().double()
    np.testing.assert_allclose(erf_map(model, images, grad='abs')[2:7, 2:7], w.abs().sum((0, 1)).numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        erf_map(model, images, grad='relu')[2:7, 2:7], w.clamp(min=0).sum((0, 1)).numpy(), rtol=1e-6
    )
    with pytest.raises(ValueError, match='grad'):
        erf_map(model, images, grad='square')


def test_area_ratios_centred_squares():
    data = np.zeros((11, 11))
    data[5, 5] = 1.0  # centre pixel: 39% of the total (2.75)
    data[4:7, 4:7] += 1.0 / 12  # centred 3x3 square: 64%
    data[0, 0] = 1.0  # a far corner: the remaining 36%
    total = data.sum()
    ratios = area_ratios(data, (0.2, 0.5, 0.99, 1.0))
    assert data[5, 5] / total >= 0.2 and ratios[0.2] == 1 / 121
    assert data[4:7, 4:7].sum() / total >= 0.5 and ratios[0.5] == 9 / 121
    assert ratios[0.99] == 1.0 and ratios[1.0] == 1.0  # only the full square reaches the corner
    with pytest.raises(ValueError, match='thresholds'):
        area_ratios(data, (1.5,))


def test_normalise_log_scale():
    data = normalise(np.array([[0.0, 9.0], [99.0, 999.0]]))
    np.testing.assert_allclose(data, [[0.0, 1 / 3], [2 / 3, 1.0]])
    with pytest.raises(ValueError, match='zero'):
        normalise(np.zeros((3, 3)))


@pytest.mark.parametrize('source', ['digits', 'textures'])
def test_bundled_images(source):
    x = load_images(source, num_images=3, img_size=32)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    assert x.std() > 0.1  # real content, normalised
    assert torch.equal(x, load_images(source, num_images=3, img_size=32))  # deterministic for a seed


def test_folder_images_and_bad_source(tmp_path):
    from PIL import Image

    for i in range(2):
        pixels = (np.random.default_rng(i).random((40, 50, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / f'{i}.png')
    assert load_images(str(tmp_path), num_images=5, img_size=24).shape == (2, 3, 24, 24)
    with pytest.raises(ValueError, match='data must be'):
        load_images('imagenet')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no images'):
        load_images(str(tmp_path / 'empty'))
    with pytest.raises(ValueError, match='num_images'):
        load_images('digits', num_images=0)


def test_compute_and_plot_side_by_side(tmp_path):
    out = tmp_path / 'erf.png'
    results = compute_erf([('a', OneConv()), ('b', OneConv())], data='digits', num_images=2, img_size=16, out=out)
    assert set(results) == {'a', 'b'}
    assert results['a']['ratios'][0.99] <= 25 / 256  # a 5x5 kernel: everything within the centred 5x5 square
    from PIL import Image

    w, h = Image.open(out).size
    assert w > 1.8 * h  # two panels side by side
    with pytest.raises(ValueError, match='at least one'):
        plot_erf({}, tmp_path / 'x.png')


def test_cli_erf(tmp_path, capsys):
    out = tmp_path / 'erf.png'
    rc = main(['erf', 'timm:resnet10t', '--data', 'digits', '--num-images', '2', '--img-size', '64', '--out', str(out)])
    assert rc == 0 and out.is_file()
    text = capsys.readouterr().out
    assert 't=0.99' in text and 'resnet10t (random init)' in text
    assert main(['erf', 'timm:resnet10t', 'timm:resnet10t', '--checkpoint', 'a.pth', '--out', str(out)]) == 2
    assert 'once per model' in capsys.readouterr().err


def test_cli_erf_takes_a_run_folder_and_model_kwargs(tmp_path, capsys):
    """A run trained with model_kwargs (other MLP widths) is rebuilt as it was trained, its newest checkpoint
    loaded strictly; --model-kwargs reaches every model; a run of another model is refused by name."""
    from test_engine_train import make_image_folder

    data = make_image_folder(tmp_path / 'imgs', n_train=4, n_val=2)
    msconv.train(
        dict(
            model='test_smt',
            preset='demo',
            data=str(data),
            batch_size=4,
            max_steps=1,
            progress=False,
            plot=False,
            num_workers=0,
            output=str(tmp_path),
            name='run',
            model_kwargs={'mlp_ratios': [1, 1, 1, 1]},
        )
    )
    out = tmp_path / 'erf.png'
    args = ['erf', 'test_smt', '--data', str(data), '--num-images', '2', '--img-size', '64', '--out', str(out)]
    assert main(args + ['--checkpoint', str(tmp_path / 'run')]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert 'test_smt ' in text and 'random init' not in text and out.is_file()
    assert main(args + ['--model-kwargs', 'mlp_ratios=[1, 1, 1, 1]']) == 0  # random weights, the run's widths
    assert main(args + ['--model-kwargs', 'mlp_ratios']) == 2
    assert '--model-kwargs expects KEY=VALUE' in capsys.readouterr().err
    assert main(['erf', 'test_scsc_swin', '--checkpoint', str(tmp_path / 'run'), '--out', str(out)]) == 2
    assert "is a checkpoint of 'test_smt', not of 'test_scsc_swin'" in capsys.readouterr().err
