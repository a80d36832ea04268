"""SMT's training forms, second round: SAA's grouped 1x1 conv as oneDNN's convolution or per-chunk block-diagonal GEMMs
(tuned ``grouped_pointwise`` and ``grouped_pointwise_grad_weight``), MHMC's input and per-head weight gradients through
the tuned ``depthwise_grad_input`` / ``depthwise_grad_weight`` forms, and the lean functions' token GEMMs through the
tuned ``linear``. Each form, pinned, is exact against the plain form (``reference_forms()``) in values, gradients and
BatchNorm running statistics; they behave under bf16 autocast, gradient checkpointing, DDP and captures."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import graph_names, max_abs
from test_train_forms import _assert_same_step, _ddp_step, _train_step
from test_train_forms_smt import _ZERO_GRAD, _assert_same_module_step, _micro_model, _module_step, _sam, _xy

from msconv.layers import forms
from msconv.layers.mixed_conv import (
    _group_chunks,
    _grouped_transposed,
    grouped_pointwise,
    grouped_pointwise_grad_weight,
)
from msconv.models.smt import ConvMlp

#: every form of this round's operations, as forced_choices pins
PINS = {
    'grouped_pointwise': ('conv', 'onednn', 'gemm'),
    'grouped_pointwise_grad_weight': ('backward', 'gemm'),
    'depthwise_grad_input': ('backward', 'flipped'),
    'depthwise_grad_weight': ('backward', 'per_image'),
    'linear': ('blas', 'onednn'),
    'smt_mlp_train': ('batched', 'per_image'),
}
FAST = dict(
    grouped_pointwise='gemm',
    grouped_pointwise_grad_weight='gemm',
    depthwise_grad_input='flipped',
    depthwise_grad_weight='per_image',
    linear='onednn',
    smt_mlp_train='per_image',
)


@pytest.mark.parametrize(
    'in_per_group, groups, out_per_group, bias',
    [(4, 16, 8, True), (4, 6, 8, False), (2, 12, 3, True), (8, 3, 4, True), (1, 20, 2, False)],
)
@pytest.mark.parametrize('form', ['conv', 'onednn', 'gemm'])
def test_grouped_pointwise_forms_are_the_grouped_conv(in_per_group, groups, out_per_group, bias, form, clean_tuner):
    """Forward, input gradient (the transposed grouped weight's convolution) and weight gradient of every form
    against ``F.conv2d`` and its autograd, chunk sizes that do and do not divide the groups evenly."""
    g = torch.Generator().manual_seed(0)
    cin, cout = in_per_group * groups, out_per_group * groups
    x = torch.randn(3, cin, 7, 5, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(cout, in_per_group, 1, 1, generator=g, requires_grad=True)
    b = torch.randn(cout, generator=g, requires_grad=True) if bias else None
    ref = F.conv2d(x, w, b, groups=groups)
    cot = torch.randn(ref.shape, generator=g).contiguous(memory_format=torch.channels_last)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, w), cot)
    wgrad = {'conv': 'backward', 'onednn': 'backward', 'gemm': 'gemm'}[form]
    with torch.no_grad(), forms.forced_choices(grouped_pointwise=form, grouped_pointwise_grad_weight=wgrad):
        out = grouped_pointwise(x, w, b, groups)
        gx = grouped_pointwise(cot, _grouped_transposed(w, groups), None, groups)
        gw = grouped_pointwise_grad_weight(cot, x, w, groups)
    assert 1 <= _group_chunks(groups, in_per_group) <= groups
    assert max_abs(out, ref) <= 1e-5 * max(1.0, ref.abs().max().item())
    assert max_abs(gx, gx_ref) <= 1e-4 * max(1.0, gx_ref.abs().max().item())
    assert max_abs(gw, gw_ref) <= 1e-4 * max(1.0, gw_ref.abs().max().item())


def test_grouped_pointwise_is_plain_with_autograd_on(clean_tuner):
    """Called with autograd recording, the helpers run the differentiable plain form (never a fast one)."""
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(32, 4, 1, 1, requires_grad=True)
    with forms.forced_choices(grouped_pointwise='gemm'):
        out = grouped_pointwise(x, w, None, 4)
    assert 'ConvolutionBackward0' in graph_names(out)


@pytest.mark.parametrize('op', list(PINS))
def test_sam_each_pinned_form_equals_the_plain_form(op, clean_tuner):
    """The SAM mixer's lean training form with each form of each operation pinned (the others tuned), 64 channels
    and 4 heads (16 groups, chunks of 4) at 28x28: values, input and parameter gradients, running statistics."""
    module, x = _sam(), torch.randn(2, 28, 28, 64)
    forward = lambda m, t: m.forward_nhwc(t)  # noqa: E731
    with forms.reference_forms():
        ref = _module_step(copy.deepcopy(module), x, forward)
    for form in PINS[op]:
        with forms.forced_choices(**{op: form}):
            got = _module_step(copy.deepcopy(module), x, forward)
        _assert_same_module_step(got, ref, (op, form), _ZERO_GRAD)


def test_sam_every_fast_form_at_once_at_stage1_shapes(clean_tuner):
    module, x = _sam(), torch.randn(2, 56, 56, 64)
    forward = lambda m, t: m.forward_nhwc(t)  # noqa: E731
    with forms.reference_forms():
        ref = _module_step(copy.deepcopy(module), x, forward)
    with forms.forced_choices(**FAST):
        got = _module_step(copy.deepcopy(module), x, forward)
    _assert_same_module_step(got, ref, 'fast', _ZERO_GRAD)


@pytest.mark.parametrize('op', ['linear', 'smt_mlp_train'])
def test_mlp_forms_equal_the_plain_form(op, clean_tuner):
    """The lean MLP with its GEMMs in BLAS or oneDNN, on the batch or image by image (three images: the weight
    gradients accumulate)."""
    torch.manual_seed(0)
    module, x = ConvMlp(64, 256).train(), torch.randn(3, 28, 28, 64)
    with forms.reference_forms():
        ref = _module_step(copy.deepcopy(module), x, lambda m, t: m(t))
    for form in PINS[op]:
        with forms.forced_choices(**{op: form}):
            got = _module_step(copy.deepcopy(module), x, lambda m, t: m(t))
        _assert_same_module_step(got, ref, (op, form))


@pytest.mark.parametrize('fast', [True, False])
def test_micro_model_step_with_the_forms_pinned(fast, clean_tuner):
    """The whole micro model: every fast form pinned, or every plain one, against ``reference_forms()``; then a
    second step with the statistics moved once more."""
    model, (x, y) = _micro_model(), _xy()
    pins = FAST if fast else {op: forms_[0] for op, forms_ in PINS.items()}
    ref_model, got_model = copy.deepcopy(model), copy.deepcopy(model)
    for scale in (1.0, 0.5):
        with forms.reference_forms():
            ref = _train_step(ref_model, x * scale, y)
        with forms.forced_choices(**pins):
            got = _train_step(got_model, x * scale, y)
        _assert_same_step(got, ref, ('pinned', fast, scale))


def test_micro_model_step_measured_is_the_plain_step(clean_tuner):
    """Nothing pinned: the autotuner measures this round's operations inside the lean functions (autograd off
    there) and the step is still the plain one."""
    model, (x, y) = _micro_model(), _xy()
    with forms.reference_forms():
        ref = _train_step(copy.deepcopy(model), x, y)
    _assert_same_step(_train_step(model, x, y), ref, 'measured')
    chosen = {k.split('|', 1)[0] for k in forms.autotune_choices()}
    if forms.tunable('grouped_pointwise', torch.empty(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)):
        assert {'grouped_pointwise', 'grouped_pointwise_grad_weight'} <= chosen, chosen


def test_bf16_autocast_step_with_the_gemm_forms(clean_tuner):
    """Under bf16 autocast the lean SAM function computes in bf16: its chunked GEMM forms (allowed in bf16; oneDNN's
    fp32 linear steps aside) train like the plain form within bf16 round-off, gradients in fp32."""
    model, (x, y) = _micro_model(), _xy()

    def step(m, pins):
        with forms.forced_choices(**pins), torch.autocast('cpu', torch.bfloat16):
            out = m(x)
        with forms.forced_choices(**pins):
            F.cross_entropy(out.float(), y).backward()
        return out.float().detach(), {n: p.grad for n, p in m.named_parameters()}

    plain = {op: forms_[0] for op, forms_ in PINS.items()}
    ref_out, ref_grads = step(copy.deepcopy(model), plain)
    out, grads = step(model, FAST)
    assert max_abs(out, ref_out) <= 3e-2 * max(1.0, ref_out.abs().max().item())
    for name, g in grads.items():
        assert g.dtype == torch.float32, name
        assert max_abs(g, ref_grads[name]) <= 5e-2 * max(1e-2, ref_grads[name].abs().max().item()), name


def test_gradient_checkpointing_with_the_fast_forms(clean_tuner):
    model, (x, y) = _micro_model(), _xy()
    model.set_grad_checkpointing(True)
    with forms.reference_forms():
        ref = _train_step(copy.deepcopy(model), x, y)
    with forms.forced_choices(**FAST):
        _assert_same_step(_train_step(model, x, y), ref, 'checkpointing')


def test_single_process_ddp_with_the_fast_forms(tmp_path, clean_tuner):
    model, (x, y) = _micro_model(), _xy()
    with forms.reference_forms():
        ref = _train_step(copy.deepcopy(model), x, y)
    with forms.forced_choices(**FAST):
        got = _ddp_step(tmp_path, model, x, y)
    _assert_same_step(got, ref, 'ddp')


def test_fx_capture_in_training_runs_the_plain_form():
    model, (x, _) = _micro_model(), _xy()
    with forms.forced_choices(**FAST):
        traced = torch.fx.symbolic_trace(copy.deepcopy(model))
        out = traced(x)
    assert not {'_SamLeanBackward', '_ConvMlpLeanBackward'} & graph_names(out)
    with forms.reference_forms():
        ref = copy.deepcopy(model)(x)
    assert max_abs(out, ref) <= 1e-5 * max(1.0, ref.abs().max().item())


def test_pins_cover_every_candidate():
    for op, names in PINS.items():
        assert tuple(forms.TUNED[op].candidates) == names, op
    assert all(FAST[op] in PINS[op] for op in FAST)
