"""ONNX export of the inference form: onnxruntime matches PyTorch within 1e-4 at two batch sizes (dynamic batch)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import msconv
from msconv.cli import main
from msconv.tools.export import _onnx_summary, check_onnx, export_onnx

# one tiny test_* model per family present in the registry (preferring one named after its family)
FAMILY_MODELS = [
    next((n for n in names if f in n), names[0])
    for f, names in ((f, msconv.list_models('test_*', family=f)) for f in msconv.FAMILIES)
    if names
]


def _input_size(model):
    return tuple(model.pretrained_cfg.get('test_input_size') or (3, 64, 64))


@pytest.mark.parametrize('name', FAMILY_MODELS)
def test_family_model_matches_onnxruntime(name, tmp_path):
    torch.manual_seed(0)
    model = msconv.create_model(name).eval()
    size = _input_size(model)
    with torch.no_grad():
        x = torch.randn(2, *size)
        reference = model(x)  # training form, before re-parameterization
    path = export_onnx(model, tmp_path / f'{name}.onnx', size)
    assert _onnx_summary(path)['input_shape'][0] == 'batch'
    with torch.no_grad():  # the exported inference form still computes the same function
        assert (model(x) - reference).abs().max().item() < 1e-4
    diffs = check_onnx(model, path, size, batch_sizes=(1, 3))
    assert max(diffs.values()) < 1e-4, diffs


class RepBlock(nn.Module):
    """conv3x3 + conv1x1 + BN branches that reparameterize() merges into a single conv3x3."""

    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.fused = None

    def reparameterize(self) -> None:
        w = self.c3.weight.detach().clone()
        w[:, :, 1:2, 1:2] += self.c1.weight.detach()
        self.fused = nn.Conv2d(3, 8, 3, padding=1)
        self.fused.weight.data, self.fused.bias.data = w, (self.c3.bias + self.c1.bias).detach()
        del self.c3, self.c1

    def forward(self, x):
        y = self.fused(x) if self.fused is not None else self.c3(x) + self.c1(x)
        return self.bn(y).mean((2, 3))


@pytest.mark.parametrize('exporter', ['torchscript', 'dynamo'])
def test_reparameterized_form_is_exported(exporter, tmp_path):
    torch.manual_seed(0)
    model = RepBlock().eval()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reference = model(x)
    path = export_onnx(model, tmp_path / 'rep.onnx', (3, 16, 16), exporter=exporter)
    assert model.fused is None and hasattr(model, 'c1'), 'the model passed in is not modified (a copy is exported)'
    import onnx

    convs = [n for n in onnx.load(path).graph.node if n.op_type == 'Conv']
    assert len(convs) == 1  # the merged kernel, not the two training branches
    diffs = check_onnx(model, path, (3, 16, 16), batch_sizes=(1, 5))
    assert max(diffs.values()) < 1e-5
    with torch.no_grad():
        assert (model(x) - reference).abs().max().item() < 1e-5


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match='exporter'):
        export_onnx(RepBlock(), tmp_path / 'x.onnx', (3, 16, 16), exporter='tflite')
    with pytest.raises(ValueError, match='input_size'):
        export_onnx(RepBlock(), tmp_path / 'x.onnx', (16, 16))


def test_cli_export_and_check(tmp_path, capsys):
    out = tmp_path / 'r.onnx'
    rc = main(
        [
            'export',
            'timm:resnet10t',
            '--img-size',
            '32',
            '--num-classes',
            '7',
            '--exporter',
            'torchscript',
            '--out',
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    assert out.is_file() and "['batch', 3, 32, 32]" in text and 'batch 3:' in text


def test_cli_missing_checkpoint(tmp_path, capsys):
    assert main(['export', 'timm:resnet10t', '--checkpoint', str(tmp_path / 'nope.pth')]) == 2
    assert 'does not exist' in capsys.readouterr().err


def test_checked_export_leaves_no_file_when_onnxruntime_disagrees(tmp_path, monkeypatch):
    """``export_onnx_checked`` (what ``msconv export`` uses) renames the file into place only after the check."""
    from msconv.tools import export as export_module

    model = msconv.create_model('test_smt').eval()
    size = _input_size(model)
    out = tmp_path / 'model.onnx'
    diffs = export_module.export_onnx_checked(model, out, size, batch_sizes=(1, 3))
    assert out.is_file() and max(diffs.values()) <= export_module.ONNX_RTOL
    out.unlink()
    monkeypatch.setattr(export_module, 'check_onnx', lambda *a, **k: {1: 0.0, 3: 0.5})  # a graph that is wrong
    with pytest.raises(export_module.OnnxCheckError, match='was not written'):
        export_module.export_onnx_checked(model, out, size, batch_sizes=(1, 3))
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary file is left
