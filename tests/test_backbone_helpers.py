"""What a user wiring an msconv backbone into their own pipeline relies on: msconv.create_backbone_fpn as the backbone
of torchvision's own detectors with their default anchors and heads, and gradient checkpointing on a features_only
backbone (timm's FeatureGetterNet has no set_grad_checkpointing; msconv's features_only models do)."""

from __future__ import annotations

import pytest
import timm
import torch
from torchvision.models.detection import FasterRCNN, RetinaNet

import msconv


def _boxes(s: int):
    return [{'boxes': torch.tensor([[0.1, 0.1, 0.5, 0.6]]) * s, 'labels': torch.tensor([1])}]


@pytest.mark.parametrize('detector, options', [(FasterRCNN, {}), (RetinaNet, dict(in_levels=(1, 2, 3), extra='p6p7'))])
def test_create_backbone_fpn_fits_torchvisions_detectors_as_they_come(detector, options):
    torch.manual_seed(0)
    backbone = msconv.create_backbone_fpn('test_smt', **options)
    model = detector(backbone, num_classes=3, min_size=64, max_size=64).train()
    losses = model([torch.rand(3, 64, 64)], _boxes(64))
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is not None for p in backbone.backbone.body.parameters())


def _saved_bytes(model, x) -> int:
    """Bytes autograd saves for the backward of ``model(x)``."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return total, out


@pytest.mark.parametrize('name', ['test_smt', 'test_scsc_swin', 'test_scsc_resnet', 'test_shiftwise'])
@pytest.mark.parametrize('route', ['timm', 'msconv checkpoint_path'])
def test_features_only_backbones_take_grad_checkpointing(name, route, tmp_path):
    torch.manual_seed(0)
    if route == 'timm':
        model = timm.create_model(name, features_only=True).train()
    else:
        path = tmp_path / 'w.pth'
        torch.save(msconv.create_model(name).state_dict(), path)
        model = msconv.create_model(name, checkpoint_path=path, features_only=True).train()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    torch.manual_seed(1)
    plain, ref = _saved_bytes(model, x)
    grads = torch.autograd.grad(sum(f.sum() for f in ref), [x, *model.parameters()], allow_unused=True)
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    checkpointed, out = _saved_bytes(model, x)
    assert checkpointed < plain / 2, (checkpointed, plain)  # the stages' activations are recomputed, not kept
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    again = torch.autograd.grad(sum(f.sum() for f in out), [x, *model.parameters()], allow_unused=True)
    for a, b in zip(again, grads):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    model.set_grad_checkpointing(False)
    assert _saved_bytes(model, x)[0] == plain
