"""Swin+SCSC training forms of the token parts (``msconv.models.scsc_swin``): the lean MLP's two layouts (tuned
operation ``scsc_swin_mlp_train``: image by image, or batched over all tokens on a channel-major copy), with the block's
residual add inside where there is no drop path, equal the plain form in values (1e-5), gradients (1e-4) and BatchNorm
running statistics, save less for backward than autograd does, and step aside where they must. Which layout wins on
this machine is never asserted."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from conftest import form_step, graph_names, randomize_bn
from test_train_forms import _assert_same_step, _micro_case, _train_step

import msconv
from msconv.layers import forms
from msconv.models.scsc_swin import CrossScaleSwinBlock

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from _common import saved_bytes  # noqa: E402

LAYOUTS = list(forms.TUNED['scsc_swin_mlp_train'].candidates)


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('drop_path', [0.0, 0.3])
@pytest.mark.parametrize('shape', [(2, 48, 14, 14), (3, 48, 7, 9)])
def test_block_layouts_equal_the_plain_block(layout, drop_path, shape):
    """The block (mixer + lean MLP, the residual add fused without drop path, outside it with): values, every
    gradient (the input's too), the running statistics."""
    torch.manual_seed(0)
    block = CrossScaleSwinBlock(48, (3, 5, 7), groups=4, drop_path=drop_path).train()
    randomize_bn(block, 1)
    x, u = torch.randn(shape), torch.randn(shape)
    ref_block = copy.deepcopy(block)
    with forms.forced_choices(scsc_train='lean', scsc_swin_mlp_train=layout):
        got = form_step(block, x, u, reference=False, seed=3)
        assert '_LeanMlpBackward' in graph_names(copy.deepcopy(block)(x.clone().requires_grad_(True)))
    ref = form_step(ref_block, x, u, reference=True, seed=3)
    _assert_same_step(got, ref, f'{layout}, drop path {drop_path}, {shape}')


@pytest.mark.parametrize('layout', LAYOUTS)
def test_micro_model_step_equals_the_plain_step(layout):
    model, x, y, ref = _micro_case('test_scsc_swin')
    with forms.forced_choices(scsc_train='lean', scsc_swin_mlp_train=layout):
        got = _train_step(copy.deepcopy(model), x, y)
    _assert_same_step(got, ref, layout)


@pytest.mark.parametrize('layout', LAYOUTS)
def test_lean_mlp_saves_half_of_what_autograd_saves(layout):
    """The lean MLP keeps the input and the first 1x1 conv's output (5 maps of C channels); autograd keeps about
    10 (the BN output, the hidden map before and after the GELU, ...)."""
    block = CrossScaleSwinBlock(48, (3, 5, 7), groups=4).train()
    x = torch.randn(2, 48, 14, 14, requires_grad=True)
    with forms.forced_choices(scsc_swin_mlp_train=layout):
        lean = saved_bytes(lambda: block._mlp_lean(x))
    with forms.reference_forms():
        plain = saved_bytes(lambda: x + block.mlp(block.norm(x)))
    assert lean < 0.6 * plain


def test_measured_layout_is_the_plain_step_and_is_kept(clean_tuner):
    """Unpinned, the layout is measured on a copy of the block (the timing runs leave its running statistics alone:
    the step moves them once) and the choice is kept per block structure and input shape."""
    torch.manual_seed(0)
    block = CrossScaleSwinBlock(48, (3, 5, 7), groups=4).train()
    randomize_bn(block, 2)
    x, u = torch.randn(2, 48, 14, 14), torch.randn(2, 48, 14, 14)
    ref_block = copy.deepcopy(block)
    with forms.forced_choices(scsc_train='lean'):
        got = form_step(block, x, u, reference=False, seed=3)
    ref = form_step(ref_block, x, u, reference=True, seed=3)
    _assert_same_step(got, ref, 'measured')
    keys = [k for k in forms.autotune_choices() if k.startswith('scsc_swin_mlp_train|(2, 48, 14, 14)|')]
    assert len(keys) == 1 and forms.autotune_choices()[keys[0]] in LAYOUTS


def test_lean_mlp_steps_aside():
    """Autocast, eval-mode BatchNorm, reference_forms() and graph captures run the plain MLP, pinned or not."""
    block = CrossScaleSwinBlock(48, (3, 5, 7), groups=4).train()
    x = torch.randn(2, 48, 14, 14, requires_grad=True)
    with forms.forced_choices(scsc_train='lean', scsc_swin_mlp_train='batched'):
        assert '_LeanMlpBackward' in graph_names(block(x))
        with torch.autocast('cpu', torch.bfloat16):
            assert '_LeanMlpBackward' not in graph_names(block(x))
        with forms.reference_forms():
            assert '_LeanMlpBackward' not in graph_names(block(x))
        block.norm.eval()
        assert '_LeanMlpBackward' not in graph_names(block(x))


@pytest.mark.parametrize('layout', LAYOUTS)
def test_gradient_checkpointing(layout):
    """Non-reentrant checkpointing recomputes the lean MLP in backward (same saved tensors); both sides checkpointed,
    so the statistics move alike."""
    torch.manual_seed(0)
    model = msconv.create_model('test_scsc_swin', num_classes=10, drop_path_rate=0.0).train()
    randomize_bn(model)
    model.set_grad_checkpointing(True)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([3, 4])
    with forms.reference_forms():
        ref = _train_step(copy.deepcopy(model), x, y)
    with forms.forced_choices(scsc_train='lean', scsc_swin_mlp_train=layout):
        _assert_same_step(_train_step(copy.deepcopy(model), x, y), ref, 'checkpointed')


@pytest.mark.parametrize('size', [64, 72])
@pytest.mark.parametrize('channels_last', [False, True])
def test_token_norm_stem_and_mergings_equal_the_plain_ones(size, channels_last):
    """Kind token_norm (the stem's conv run channels-last, the patch mergings' gather read from the NCHW map): a train
    step (values, gradients, statistics) and eval outputs equal the plain forms; 72 px gives odd maps (18 -> 9 -> 5:
    the mergings pad)."""
    torch.manual_seed(0)
    model = msconv.create_model('test_scsc_swin', num_classes=10, drop_path_rate=0.0).train()
    randomize_bn(model)
    x, y = torch.randn(2, 3, size, size), torch.tensor([1, 7])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with forms.reference_forms():
        ref = _train_step(copy.deepcopy(model), x, y)
    with forms.forced_choices(scsc_train='plain', pointwise_conv_train='conv'):  # only token_norm differs
        got = _train_step(copy.deepcopy(model), x, y)
    _assert_same_step(got, ref, f'{size} px')
    model.eval()
    with torch.no_grad():
        fast = model(x)
        with forms.reference_forms():
            plain = model(x)
    assert (fast - plain).abs().max().item() <= 1e-5 * max(1.0, plain.abs().max().item())


def test_token_norm_forms_run_and_step_aside():
    model = msconv.create_model('test_scsc_swin', num_classes=10).eval()
    stem, merge = model.stem, model.stages[1].downsample
    x, fmap = torch.randn(2, 3, 64, 64), torch.randn(2, 24, 16, 16)
    ran = []
    stem._forward_tokens = lambda x, f=stem._forward_tokens: ran.append('stem') or f(x)
    merge._forward_gather = lambda x, f=merge._forward_gather: ran.append('merge') or f(x)
    with torch.no_grad():
        stem(x), merge(fmap)
        assert ran == ['stem', 'merge']
        with forms.reference_forms():
            stem(x), merge(fmap)
        merge(fmap.transpose(2, 3))  # not contiguous: the plain form
        torch.jit.trace(merge, fmap, check_trace=False)
    assert ran == ['stem', 'merge']
