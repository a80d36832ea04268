"""ResNet+SCSC (CBTNet) training forms: the operations the lean SCSC function's backward chooses between
(``scsc_dw_grad_weight``: the depthwise branches' kernel gradients) give what the plain form gives, pinned either
way, at the model's own shapes (strides 1 and 2, odd sizes), in fp32 and in bf16; a training step of the micro model
with every pin equals the plain step (values, gradients, BatchNorm running statistics). Which form wins on this
machine is never asserted."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from conftest import form_step, randomize_bn
from test_train_forms import _assert_same_step, _micro_case, _train_step

from msconv.layers import forms
from msconv.layers.cross_scale import CrossScaleBottleneck, _dw_grad_weight

DW_FORMS = list(forms.TUNED['scsc_dw_grad_weight'].candidates)


def _dw_case(channels: int, size: int, kernel: int, stride: int, dtype: torch.dtype = torch.float32):
    torch.manual_seed(kernel + stride)
    conv = nn.Conv2d(channels, channels, kernel, stride=stride, padding=kernel // 2, groups=channels, bias=False)
    x = torch.randn(3, channels, size, size).contiguous(memory_format=torch.channels_last)
    out = (size + 2 * (kernel // 2) - kernel) // stride + 1
    g = torch.randn(3, channels, out, out).contiguous(memory_format=torch.channels_last)
    return conv, x.to(dtype), g.to(dtype)


@pytest.mark.parametrize(
    'channels,size,kernel,stride',
    [(32, 28, 13, 1), (32, 29, 9, 2), (64, 15, 7, 2), (48, 14, 3, 1), (40, 7, 5, 1), (16, 9, 11, 2)],
)
def test_dw_kernel_gradient_forms_agree(channels, size, kernel, stride, clean_tuner):
    conv, x, g = _dw_case(channels, size, kernel, stride)
    with torch.no_grad():
        ref = torch.ops.aten.convolution_backward(
            g, x, conv.weight, None, conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups,
            [False, True, False],
        )[1]  # fmt: skip
        for form in DW_FORMS:
            with forms.forced_choices(scsc_dw_grad_weight=form):
                got = _dw_grad_weight(g, x, conv)
            assert got.shape == conv.weight.shape and got.dtype == torch.float32
            assert (got - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item()), form


@pytest.mark.parametrize('channels,size,kernel,stride', [(32, 29, 9, 2), (48, 14, 7, 1)])
def test_dw_kernel_gradient_forms_in_bf16(channels, size, kernel, stride, clean_tuner):
    """bf16 (the lean function under autocast): each form against the plain bf16 form at bf16 tolerance and against
    the fp32 gradient of the same bf16 operands."""
    conv, x, g = _dw_case(channels, size, kernel, stride, torch.bfloat16)
    with torch.no_grad():
        exact = _dw_grad_weight(g.float(), x.float(), conv)
        outs = {}
        for form in DW_FORMS:
            with forms.forced_choices(scsc_dw_grad_weight=form):
                outs[form] = _dw_grad_weight(g, x, conv)
            assert outs[form].dtype == torch.bfloat16
    scale = exact.abs().max().item()
    for form, got in outs.items():
        assert (got.float() - outs['backward'].float()).abs().max().item() <= 2**-6 * scale, form
        assert (got.float() - exact).abs().max().item() <= 2**-6 * scale, form


@pytest.mark.parametrize('form', DW_FORMS)
def test_lean_block_step_with_each_kernel_gradient_form(form, clean_tuner):
    """CBTNet's stage-1 first block (stride 2, kernels 3/9/13) at an odd size, its lean function pinned: output,
    every gradient and the running statistics equal the plain form's."""
    torch.manual_seed(0)
    block = CrossScaleBottleneck(48, 144, (3, 9, 13), groups=4, stride=2)
    randomize_bn(block, 1)
    block.train()
    x = torch.randn(2, 48, 27, 27)
    u = torch.randn(2, 144, 14, 14)
    ref = form_step(copy.deepcopy(block), x, u, reference=True)
    with forms.forced_choices(scsc_train='lean', scsc_dw_grad_weight=form):
        got = form_step(copy.deepcopy(block), x, u, reference=False)
    _assert_same_step(got, ref, form)


@pytest.mark.parametrize('form', DW_FORMS)
def test_micro_model_step_with_each_kernel_gradient_form(form, clean_tuner):
    model, x, y, ref = _micro_case('test_scsc_resnet')
    with forms.forced_choices(scsc_train='lean', scsc_dw_grad_weight=form):
        got = _train_step(copy.deepcopy(model), x, y)
    _assert_same_step(got, ref, form)
