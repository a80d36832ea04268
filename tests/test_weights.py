"""Official weights: pretrained=True without network (a refused connection on the loopback interface) or without a
download URL fails with one line naming the URL / the page and the file-based alternative; a local file loads through
both routes; models saved for the Hugging Face hub carry their weights' real licence and timm's model card."""

from __future__ import annotations

import json
import socket

import pytest
import timm
import torch

import msconv
from msconv.hub import model_card, save_for_hf
from msconv.models._weights import MANUAL_DOWNLOADS, WeightsDownloadError, load_lines


@pytest.fixture
def dead_url(tmp_path, monkeypatch):
    """A URL on this machine that refuses connections, and an empty torch hub cache."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch-home'))
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    return f'http://127.0.0.1:{port}/smt_tiny.pth'


@pytest.mark.parametrize('create', [timm.create_model, msconv.create_model])
def test_pretrained_without_network_names_the_url_and_the_file_alternative(create, dead_url):
    with pytest.raises(WeightsDownloadError) as e:
        create('smt_tiny', pretrained=True, pretrained_cfg_overlay=dict(url=dead_url))
    message = str(e.value)
    assert '\n' not in message and dead_url in message
    assert "msconv.create_model('smt_tiny', checkpoint_path='smt_tiny.pth')" in message
    assert "pretrained_cfg_overlay=dict(file='smt_tiny.pth')" in message
    assert isinstance(e.value, OSError)  # the command line prints it as one line


def test_the_registered_urls_are_the_official_release_files():
    cfg = timm.models.get_pretrained_cfg('smt_tiny.in1k')
    assert cfg.url == 'https://github.com/AFeng-x/SMT/releases/download/v1.0.0/smt_tiny.pth' and cfg.license == 'mit'
    assert load_lines('smt_large.in22k') == {
        'online': "timm.create_model('smt_large.in22k', pretrained=True)",
        'file': "msconv.create_model('smt_large.in22k', checkpoint_path='smt_large_22k.pth')",
    }


@pytest.mark.parametrize('create', [timm.create_model, msconv.create_model])
def test_pretrained_without_a_download_url_says_where_the_weights_are(create):
    with pytest.raises(ValueError) as e:
        create('shiftwise_tiny', pretrained=True)
    assert MANUAL_DOWNLOADS['shiftwise_tiny']['url'] in str(e.value) and 'Google Drive' in str(e.value)
    assert 'checkpoint_path=' in str(e.value) and '\n' not in str(e.value)
    with pytest.raises(ValueError, match="no official weights are published for 'scsc_swin_tiny'"):
        create('scsc_swin_tiny', pretrained=True)  # timm alone would warn in a log and initialise at random


def test_a_local_file_loads_through_the_overlay_and_checkpoint_path(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model('test_smt').eval()
    path = tmp_path / 'test_smt.pth'
    torch.save({'model': ref.state_dict()}, path)
    x = torch.randn(1, 3, 64, 64)
    overlay = dict(file=str(path))
    for model in (
        timm.create_model('test_smt', pretrained=True, pretrained_cfg_overlay=overlay),
        msconv.create_model('test_smt', pretrained=True, pretrained_cfg_overlay=overlay),
        msconv.create_model('test_smt', checkpoint_path=path),
    ):
        torch.testing.assert_close(model.eval()(x), ref(x), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        timm.create_model('test_smt', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'missing.pth')))


@pytest.mark.parametrize(
    'name, licence', [('test_smt', 'mit'), ('test_shiftwise', 'mit'), ('test_scsc_swin', 'apache-2.0')]
)
def test_saved_for_the_hub_with_the_real_licence_and_a_model_card(tmp_path, name, licence):
    model = timm.create_model(name).eval()
    folder = save_for_hf(model, tmp_path / name, safe_serialization=True)
    readme = (folder / 'README.md').read_text()
    front = readme.split('---')[1]
    assert f'license: {licence}\n' in front and 'library_name: timm' in front
    assert f'# Model card for {name}' in readme and 'import msconv' in readme and 'arxiv.org/abs/' in readme
    assert json.loads((folder / 'config.json').read_text())['pretrained_cfg']['license'] == licence
    again = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(folder / 'model.safetensors'))
    )
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(again.eval()(x), model(x), rtol=0, atol=0)
    assert model_card(model, license='cc-by-4.0')['license'] == 'cc-by-4.0'  # weights you trained, your terms
