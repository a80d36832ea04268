"""ShiftWise's training forms (the lean strip-conv node with its tuned backward, the block's SE + MLP + GRN node and
BN2 with the layer scale folded in) against the plain form: logits, every gradient and the BatchNorm running
statistics after a training step, with every candidate of the tuned backward operations pinned, at micro and at
SW-T's stage-1 shapes, under gradient checkpointing and bf16 autocast; and what autograd saves. Which form wins on
this machine is never asserted."""

from __future__ import annotations

import contextlib
import copy
import itertools
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import graph_names, max_abs, randomize_shiftwise

import msconv
from msconv.layers import forms
from msconv.layers.fast_ops import depthwise_grad_input, depthwise_grad_weight
from msconv.layers.shiftwise import ShiftWiseConv2d
from msconv.models.shiftwise_net import ShiftWiseBlock

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from _common import saved_bytes  # noqa: E402

GRAD_OPS = ('depthwise_grad_input', 'depthwise_grad_weight', 'shiftwise_mlp_train')
PINS = [dict(zip(GRAD_OPS, choice)) for choice in itertools.product(*(forms.TUNED[op].candidates for op in GRAD_OPS))]


def _step(module, x, loss, ctx=None):
    """Forward in train mode and backward: output, input gradient, parameter gradients, floating buffers after."""
    module = copy.deepcopy(module)
    x = x.detach().clone().requires_grad_(True)
    with ctx if ctx is not None else contextlib.nullcontext():
        out = module(x)
        loss(out).backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in module.named_buffers() if b.is_floating_point()}
    return out.detach().float(), x.grad, grads, buffers


def _assert_same(a, b, what, rtol_out=1e-5, rtol_grad=1e-4, scale_of=None):
    """``scale_of`` maps a parameter whose gradient is analytically zero (a sum of terms that cancel) to one whose
    gradient sums terms of the same size: its tolerance is taken at that scale, not at its own (which is noise)."""
    (out_a, gx_a, grads_a, buf_a), (out_b, gx_b, grads_b, buf_b) = a, b
    assert max_abs(out_a, out_b) <= rtol_out * max(1.0, out_b.abs().max().item()), what
    assert max_abs(gx_a, gx_b) <= rtol_grad * max(1.0, gx_b.abs().max().item()), what
    assert grads_a.keys() == grads_b.keys(), what
    for name in grads_b:
        scale = max(1.0, grads_b[(scale_of or {}).get(name, name)].abs().max().item())
        assert max_abs(grads_a[name], grads_b[name]) <= rtol_grad * scale, (what, name)
    for name in buf_b:
        assert max_abs(buf_a[name], buf_b[name]) <= 1e-5 * max(1.0, buf_b[name].abs().max().item()), (what, name)


def _weighted(out: torch.Tensor) -> torch.Tensor:
    w = torch.linspace(-1.0, 1.0, out.numel(), dtype=torch.float32).view(out.shape)
    return (out.float() * w).sum()


@pytest.mark.parametrize('pins', PINS, ids=lambda p: '-'.join(p.values()))
def test_micro_model_step_equals_the_plain_form(pins, clean_tuner):
    """test_shiftwise, one training step: every pinned backward candidate (and the lean forms) against
    ``reference_forms()``."""
    torch.manual_seed(0)
    model = randomize_shiftwise(msconv.create_model('test_shiftwise', num_classes=10)).train()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    loss = lambda out: F.cross_entropy(out, y)  # noqa: E731
    ref = _step(model, x, loss, forms.reference_forms())
    _assert_same(_step(model, x, loss, forms.forced_choices(**pins)), ref, pins)


def test_micro_model_step_with_the_tuner_measuring(clean_tuner):
    """Nothing pinned: the first backward measures both grad operations' candidates; the step is still the plain
    form's, and the choices are kept."""
    torch.manual_seed(0)
    model = randomize_shiftwise(msconv.create_model('test_shiftwise', num_classes=10)).train()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    loss = lambda out: F.cross_entropy(out, y)  # noqa: E731
    ref = _step(model, x, loss, forms.reference_forms())
    _assert_same(_step(model, x, loss), ref, 'measured')
    chosen = forms.autotune_choices()
    assert any(k.startswith('depthwise_grad_weight|') for k in chosen)
    assert any(k.startswith('depthwise_grad_input|') for k in chosen)


@pytest.mark.parametrize('pins', [PINS[0], PINS[-1]], ids=['plain', 'fast'])
def test_sw_t_stage1_layer_and_block(pins, clean_tuner):
    """SW-T's stage-1 shapes (80 channels, kernel 51, 56x56, channels-last, batch 2): the operator and a whole
    block."""
    torch.manual_seed(0)
    x = torch.randn(2, 80, 56, 56).contiguous(memory_format=torch.channels_last)
    # in the block the operator's output feeds a train-mode BatchNorm, whose input gradient sums to zero per
    # channel: the gradients of the operator's BN biases are sums of 6272 terms that cancel (fp32 noise ~1e-3 in
    # either form, 1e-12 in float64), compared at the scale of the BN weights' gradients (the same terms times xhat);
    # so is the GRN bias's (the MLP's output feeds BN2)
    cancelling = {f'conv.bn_{b}.bias': f'conv.bn_{b}.weight' for b in 'hvs'} | {'grn.bias': 'grn.weight'}
    for module, scale_of in ((ShiftWiseConv2d(80, 51), None), (ShiftWiseBlock(80, 51), cancelling)):
        module = randomize_shiftwise(module).train()
        ref = _step(module, x, _weighted, forms.reference_forms())
        got = _step(module, x, _weighted, forms.forced_choices(**pins))
        _assert_same(got, ref, (type(module).__name__, pins), scale_of=scale_of)


def test_block_form_runs_and_saves_less(clean_tuner):
    """The block's training form is the one that runs in fp32 training (its node is in the graph), and autograd
    saves less than half of what the plain form saves."""
    torch.manual_seed(0)
    block = randomize_shiftwise(ShiftWiseBlock(32, 13)).train()
    x = torch.randn(2, 32, 16, 16).contiguous(memory_format=torch.channels_last)
    assert {'_LeanMlpTrainBackward', '_LeanShiftWiseTrainBackward'} <= graph_names(block(x))
    lean = saved_bytes(lambda: copy.deepcopy(block)(x).sum())
    with forms.reference_forms():
        plain = saved_bytes(lambda: copy.deepcopy(block)(x).sum())
    assert lean < 0.5 * plain, (lean, plain)


def test_gradient_checkpointing(clean_tuner):
    """Non-reentrant checkpointing of the stages: the recomputation goes through the same forms (the BN statistics
    are updated again on both sides) and checkpointing's check of what the forward saved holds."""
    torch.manual_seed(0)
    model = randomize_shiftwise(msconv.create_model('test_shiftwise', num_classes=10)).train()
    model.set_grad_checkpointing(True)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    loss = lambda out: F.cross_entropy(out, y)  # noqa: E731
    ref = _step(model, x, loss, forms.reference_forms())
    _assert_same(_step(model, x, loss), ref, 'checkpointed')


@pytest.mark.parametrize('pins', [PINS[0], PINS[-1]], ids=['plain', 'fast'])
def test_bf16_autocast_step(pins, clean_tuner):
    """Under CPU bf16 autocast the block runs its training form in bf16 (kind ``lean_bf16``) and the operator its
    lean form with the pinned backward: each rounds differently from the plain form under autocast, so both are
    compared with the fp32 step (the plain bf16 step's own distance from it is about 0.98 in cosine at worst here)
    and with each other."""
    torch.manual_seed(0)
    model = randomize_shiftwise(msconv.create_model('test_shiftwise', num_classes=10)).train()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    loss = lambda out: F.cross_entropy(out.float(), y)  # noqa: E731
    amp = lambda: torch.autocast('cpu', torch.bfloat16)  # noqa: E731
    with forms.reference_forms():
        fp32 = _step(model, x, loss)
        ref = _step(model, x, loss, amp())
    with forms.forced_choices(**pins):
        got = _step(model, x, loss, amp())
    cos = lambda a, b: F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()  # noqa: E731
    assert cos(got[0], fp32[0]) > 0.99 and cos(got[0], ref[0]) > 0.99
    assert got[2].keys() == ref[2].keys()
    for name, g in fp32[2].items():
        if re.search(r'(conv\.bn_[hvs]|grn)\.bias$', name):
            continue  # analytically zero in a block (see test_sw_t_stage1_layer_and_block): bf16 noise both sides
        assert got[2][name].dtype == torch.float32, name
        assert cos(got[2][name], g) > 0.97 and cos(got[2][name], ref[2][name]) > 0.95, name


@pytest.mark.parametrize('kernel, pad', [((3, 13), (1, 6)), ((13, 3), (6, 1)), ((3, 3), (1, 1)), ((3, 15), (1, 7))])
def test_grad_operations_against_autograd(kernel, pad, clean_tuner):
    """Each candidate of the two tuned gradient operations against autograd's convolution gradients."""
    torch.manual_seed(0)
    x = torch.randn(3, 10, 11, 12).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    k = torch.randn(10, 1, *kernel, requires_grad=True)
    z = F.conv2d(x, k, padding=pad, groups=10)
    gz = torch.randn_like(z)
    gx_ref, gk_ref = torch.autograd.grad(z, (x, k), gz)
    with torch.no_grad():
        for op, ref, fn in (
            ('depthwise_grad_input', gx_ref, depthwise_grad_input),
            ('depthwise_grad_weight', gk_ref, depthwise_grad_weight),
        ):
            for form in forms.TUNED[op].candidates:
                with forms.forced_choices(**{op: form}):
                    got = fn(gz, x.detach(), k.detach(), pad)
                assert got.shape == ref.shape and max_abs(got, ref) <= 1e-4 * ref.abs().max().item(), (op, form)
