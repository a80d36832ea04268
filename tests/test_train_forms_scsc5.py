"""The GEMM layouts of SCSC's lean training function (``scsc_lean_gemm`` forward, ``scsc_lean_gemm_backward``): every
layout, pinned, gives the plain form's step (values 1e-5, gradients 1e-4, BatchNorm running statistics), with and
without an input gradient, at stride 1 and 2; the weight gradients are their own small tensors (not views of the input
gradient's buffer); DDP's buckets get the same gradients. Which layout wins on this machine is never asserted."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import form_step, graph_names, randomize_bn
from test_train_forms import _assert_same_step, _ddp_step, _micro_case, _train_step

from msconv.layers import forms
from msconv.layers.cross_scale import CrossScaleBottleneck, SpatialCrossScaleConv

FORWARD = list(forms.TUNED['scsc_lean_gemm'].candidates)
BACKWARD = list(forms.TUNED['scsc_lean_gemm_backward'].candidates)


def _nontrivial(module, seed: int):
    randomize_bn(module, seed)
    return module.train()


def _pinned(fwd: str, bwd: str):
    return forms.forced_choices(scsc_train='lean', scsc_lean_gemm=fwd, scsc_lean_gemm_backward=bwd)


@pytest.mark.parametrize('fwd,bwd', [(f, b) for f in FORWARD for b in BACKWARD])
@pytest.mark.parametrize(
    'make,shape',
    [
        (lambda: SpatialCrossScaleConv(48, (3, 5, 7), groups=4), (3, 48, 7, 7)),
        (lambda: CrossScaleBottleneck(24, 48, (3, 5), groups=2, stride=2), (2, 24, 9, 9)),
    ],
)
def test_every_layout_gives_the_plain_step(make, shape, fwd, bwd):
    torch.manual_seed(0)
    module = _nontrivial(make(), 1)
    x = torch.randn(shape)
    with torch.no_grad():
        u = torch.randn_like(module(x))
    module = _nontrivial(make(), 1)
    module.load_state_dict(_nontrivial(make(), 1).state_dict())
    ref_module = copy.deepcopy(module)
    with _pinned(fwd, bwd):
        assert '_LeanCrossScaleBackward' in graph_names(copy.deepcopy(module)(x.clone().requires_grad_(True)))
        got = form_step(module, x, u, reference=False)
    _assert_same_step(got, form_step(ref_module, x, u, reference=True), f'{fwd}/{bwd}')
    for name, p in module.named_parameters():  # a view would keep the input gradient's buffer alive in .grad
        assert p.grad.untyped_storage().nbytes() == p.grad.numel() * p.grad.element_size(), name


@pytest.mark.parametrize('bwd', BACKWARD)
def test_without_an_input_gradient(bwd):
    """The first module of a network (its input needs no gradient): the reduce conv's weight gradient alone."""
    torch.manual_seed(0)
    module = _nontrivial(SpatialCrossScaleConv(16, (3, 5), groups=2), 2)
    ref_module = copy.deepcopy(module)
    x = torch.randn(2, 16, 6, 6)
    with _pinned('batched', bwd):
        (module(x) ** 2).sum().backward()
    with forms.reference_forms():
        (ref_module(x) ** 2).sum().backward()
    for (name, p), q in zip(module.named_parameters(), ref_module.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-4 * max(1.0, q.grad.abs().max().item()), name


@pytest.mark.parametrize('fwd,bwd', [('batched', 'tokens'), ('conv', 'conv'), ('per_image', 'batched')])
def test_micro_model_step_and_ddp(tmp_path, fwd, bwd):
    model, x, y, ref = _micro_case('test_scsc_swin')
    with _pinned(fwd, bwd):
        _assert_same_step(_train_step(copy.deepcopy(model), x, y), ref, 'step')
        _assert_same_step(_ddp_step(tmp_path, model, x, y), ref, 'ddp')
