"""ResNet+SCSC (CBTNet) training forms: the operations the lean SCSC function chooses between
(``scsc_branch_conv``: the depthwise branches in its forward; ``scsc_dw_grad_weight`` and ``depthwise_grad_input``:
their kernel and input gradients in its backward) and the stem's lean training function
(``scsc_stem_train``, with ``stem_conv`` and ``stem_conv_grad_weight`` inside) give what the plain form gives, pinned
every way, at the model's own shapes (strides 1 and 2, odd sizes), in fp32 and in bf16; a training step of the micro
model with every pin equals the plain step (values, gradients, BatchNorm running statistics); the lean stem steps
aside where it must (autocast, captures, eval BatchNorm, a PReLU stem). Which form wins on this machine is never
asserted."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from conftest import form_step, graph_names, randomize_bn
from test_train_forms import _assert_same_step, _ddp_step, _micro_case, _train_step

import msconv
from msconv.layers import forms
from msconv.layers.cross_scale import CrossScaleBottleneck, _branch_conv, _dw_grad_weight
from msconv.models.scsc_resnet import ConvStem

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


BRANCH_PINS = [
    dict(scsc_train='lean', scsc_dw_grad_weight=w, scsc_branch_conv=f, depthwise_grad_input=i)
    for w, f, i in zip(
        DW_FORMS,
        forms.TUNED['scsc_branch_conv'].candidates,
        forms.TUNED['depthwise_grad_input'].candidates,
    )
] + [dict(scsc_train='lean', scsc_dw_grad_weight='per_image', scsc_branch_conv='conv', depthwise_grad_input='flipped')]


@pytest.mark.parametrize('pins', BRANCH_PINS, ids=str)
@pytest.mark.parametrize('stride,size', [(2, 27), (1, 15)])
def test_lean_block_step_with_each_branch_form(pins, stride, size, clean_tuner):
    """CBTNet's stage-1 blocks (kernels 3/9/13; the first with stride 2) at odd sizes, the lean function pinned:
    output, every gradient and the running statistics equal the plain form's."""
    torch.manual_seed(0)
    block = CrossScaleBottleneck(48, 144 if stride == 2 else 48, (3, 9, 13), groups=4, stride=stride)
    randomize_bn(block, 1)
    block.train()
    x = torch.randn(2, 48, size, size)
    with torch.no_grad():
        u = torch.randn_like(copy.deepcopy(block)(x))
    ref = form_step(copy.deepcopy(block), x, u, reference=True)
    with forms.forced_choices(**pins):
        got = form_step(copy.deepcopy(block), x, u, reference=False)
    _assert_same_step(got, ref, pins)


@pytest.mark.parametrize('pins', BRANCH_PINS, ids=str)
def test_micro_model_step_with_each_branch_form(pins, clean_tuner):
    model, x, y, ref = _micro_case('test_scsc_resnet')
    with forms.forced_choices(**pins):
        got = _train_step(copy.deepcopy(model), x, y)
    _assert_same_step(got, ref, pins)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('channels,size,kernel', [(32, 28, 13), (48, 14, 11), (16, 9, 3), (24, 6, 7)])
def test_branch_conv_forms_agree(channels, size, kernel, dtype, clean_tuner):
    conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False)
    x = torch.randn(2, channels, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        exact = torch.nn.functional.conv2d(x, conv.weight, padding=kernel // 2, groups=channels)
        x = x.to(dtype)
        outs = {}
        for form in forms.TUNED['scsc_branch_conv'].candidates:
            with forms.forced_choices(scsc_branch_conv=form):
                outs[form] = _branch_conv(conv, x)
            assert outs[form].dtype == dtype and outs[form].shape == exact.shape
    tol = 1e-5 if dtype == torch.float32 else 2**-6
    scale = max(1.0, exact.abs().max().item())
    for form, got in outs.items():
        assert (got.float() - outs['conv'].float()).abs().max().item() <= tol * scale, form
        assert (got.float() - exact).abs().max().item() <= max(tol, 2**-6 if dtype != torch.float32 else tol) * scale


STEM_PINS = [
    dict(scsc_stem_train='lean', stem_conv=c, stem_conv_grad_weight=g)
    for c in forms.TUNED['stem_conv'].candidates
    for g in forms.TUNED['stem_conv_grad_weight'].candidates
]


@pytest.mark.parametrize('pins', STEM_PINS, ids=lambda p: f"{p['stem_conv']}-{p['stem_conv_grad_weight']}")
@pytest.mark.parametrize('stride,size', [(2, 35), (1, 20)])
def test_lean_stem_step_equals_the_plain_one(pins, stride, size, clean_tuner):
    torch.manual_seed(0)
    stem = ConvStem(3, 24, stride=stride)
    randomize_bn(stem, 1)
    stem.train()
    x = torch.randn(3, 3, size, size)
    u = torch.randn(3, 24, (size - 1) // stride + 1, (size - 1) // stride + 1)
    ref = form_step(copy.deepcopy(stem), x, u, reference=True)
    with forms.forced_choices(**pins):
        lean_stem = copy.deepcopy(stem)
        assert '_LeanStemBackward' in graph_names(copy.deepcopy(stem)(x.clone().requires_grad_(True)))
        got = form_step(lean_stem, x, u, reference=False)
    _assert_same_step(got, ref, pins)


def test_lean_stem_steps_aside():
    """Eval BatchNorm, bf16 autocast, reference_forms(), a PReLU stem (the face networks') and no autograd run the
    plain stem, pinned or not."""
    stem = ConvStem(3, 16).train()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    with forms.forced_choices(scsc_stem_train='lean'):
        assert '_LeanStemBackward' in graph_names(stem(x))
        with torch.autocast('cpu', torch.bfloat16):
            assert '_LeanStemBackward' not in graph_names(stem(x))
        with forms.reference_forms():
            assert '_LeanStemBackward' not in graph_names(stem(x))
        stem.bn.eval()
        assert '_LeanStemBackward' not in graph_names(stem(x))
        prelu = ConvStem(3, 16, act_layer=nn.PReLU).train()
        assert '_LeanStemBackward' not in graph_names(prelu(x))
        with torch.no_grad():
            assert not ConvStem(3, 16).train()._lean_wanted(x)


def test_lean_stem_under_ddp_style_gradient_layout():
    """The lean stem's gradients have the parameters' shapes and strides (DDP's gradient buckets view them)."""
    stem = ConvStem(3, 16).train()
    with forms.forced_choices(scsc_stem_train='lean'):
        stem(torch.randn(2, 3, 18, 18)).square().mean().backward()
    for p in stem.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.stride() == p.stride()


@pytest.mark.parametrize('pin', ['plain', 'lean'])
def test_micro_model_with_lean_stem_and_checkpointing(pin, clean_tuner):
    """The micro CBTNet with the stem pinned and its stages checkpointed equals the plain checkpointed step (the
    stages' BatchNorms move twice on both sides)."""
    model, x, y, _ = _micro_case('test_scsc_resnet')
    model.set_grad_checkpointing(True)
    with forms.reference_forms():
        ref = _train_step(copy.deepcopy(model), x, y)
    with forms.forced_choices(scsc_stem_train=pin, scsc_train='lean'):
        got = _train_step(copy.deepcopy(model), x, y)
    _assert_same_step(got, ref, pin)


def test_single_process_ddp_matches_the_plain_step(tmp_path, clean_tuner):
    model, x, y, ref = _micro_case('test_scsc_resnet')
    with forms.forced_choices(scsc_stem_train='lean', scsc_train='lean', scsc_dw_grad_weight='per_image'):
        got = _ddp_step(tmp_path, model, x, y)
    _assert_same_step(got, ref, 'ddp')


def test_lean_stem_in_the_model_graph(clean_tuner):
    model = msconv.create_model('test_scsc_resnet', num_classes=10).train()
    with forms.forced_choices(scsc_stem_train='lean'):
        assert '_LeanStemBackward' in graph_names(model(torch.randn(2, 3, 64, 64)))
