"""SMT's training forms (kinds ``lean``: MHMC's per-head weight gradients, the SAM mixer and the ConvMlp as autograd
functions; ``attention_math``: MSA as GEMMs and a softmax under bf16 autocast): exact against the plain forms
(``reference_forms()``) in values, gradients and BatchNorm running statistics, on the micro model and on blocks at
SMT-T's stage-1 shapes, under bf16 autocast and gradient checkpointing; they save less for backward."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import max_abs, randomize_bn
from test_train_forms import _assert_same_step, _train_step

import msconv
from msconv.layers import forms
from msconv.layers.mixed_conv import ScaleAwareModulation
from msconv.models.smt import Block, ConvMlp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from _common import saved_bytes  # noqa: E402


def _micro_model():
    torch.manual_seed(0)
    model = msconv.create_model('test_smt', num_classes=10, drop_path_rate=0.0).train()
    randomize_bn(model)
    return model


def _xy():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 64, 64, generator=g), torch.tensor([1, 7])


def test_smt_training_forms_equal_the_plain_form():
    model, (x, y) = _micro_model(), _xy()
    with forms.reference_forms():
        ref = _train_step(copy.deepcopy(model), x, y)
    _assert_same_step(_train_step(model, x, y), ref, 'fast forms')
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert int(m.num_batches_tracked) == 1


def _module_step(module, x, forward):
    x = x.clone().requires_grad_()
    out = forward(module, x)
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    buffers = {n: b.clone() for n, b in module.named_buffers() if b.is_floating_point()}
    return out.detach(), x.grad.clone(), grads, buffers


# biases right before SAA's BatchNorm (and MHMC's, which feed them): their exact gradient is zero (the batch mean
# removes them), so what is computed is round-off of the other gradients' size, compared at that scale
_ZERO_GRAD = ('mhmc.convs.', 'saa.proj0.bias')


def _assert_same_module_step(a, b, what, zero_grad=()):
    out_a, gx_a, grads_a, buf_a = a
    out_b, gx_b, grads_b, buf_b = b
    assert max_abs(out_a, out_b) <= 1e-5 * max(1.0, out_b.abs().max().item()), what
    assert max_abs(gx_a, gx_b) <= 1e-4 * max(1.0, gx_b.abs().max().item()), what
    block_scale = max(g.abs().max().item() for g in grads_b.values())
    for name in grads_b:
        cancelled = name.endswith('bias') and any(z in name for z in zero_grad)
        scale = block_scale if cancelled else max(1.0, grads_b[name].abs().max().item())
        assert max_abs(grads_a[name], grads_b[name]) <= 1e-4 * scale, (what, name)
    for name in buf_b:
        assert max_abs(buf_a[name], buf_b[name]) <= 1e-5 * max(1.0, buf_b[name].abs().max().item()), (what, name)


def _sam(dim=64):
    torch.manual_seed(0)
    module = ScaleAwareModulation(dim, num_heads=4).train()
    randomize_bn(module)
    with torch.no_grad():
        module.s.bias.normal_()
    return module


def test_sam_training_form_at_stage1_shapes():
    """SMT-T's first-stage token mixer (64 channels, 56x56 tokens)."""
    module, x = _sam(), torch.randn(2, 56, 56, 64)
    forward = lambda m, t: m.forward_nhwc(t)  # noqa: E731
    with forms.reference_forms():
        ref = _module_step(copy.deepcopy(module), x, forward)
    _assert_same_module_step(_module_step(module, x, forward), ref, 'sam', _ZERO_GRAD)


def test_mlp_training_form_at_stage1_shapes():
    torch.manual_seed(0)
    module, x = ConvMlp(64, 256).train(), torch.randn(2, 56, 56, 64)
    with forms.reference_forms():
        ref = _module_step(copy.deepcopy(module), x, lambda m, t: m(t))
    _assert_same_module_step(_module_step(module, x, lambda m, t: m(t)), ref, 'mlp')


@pytest.mark.parametrize('sam', [True, False])
def test_block_training_forms_with_a_second_step(sam):
    """A whole block (SAM or MSA mixer) with every lean form, two steps: the running statistics move twice alike."""
    torch.manual_seed(0)
    block = Block(64, ca_num_heads=4, sa_num_heads=8, mlp_ratio=4, qkv_bias=True, ca_attention=int(sam)).train()
    randomize_bn(block)
    x = torch.randn(2, 28, 28, 64)
    with forms.reference_forms():
        ref_block = copy.deepcopy(block)
        _module_step(ref_block, x, lambda m, t: m(t))
        ref = _module_step(ref_block, x * 0.5, lambda m, t: m(t))
    lean_block = copy.deepcopy(block)
    _module_step(lean_block, x, lambda m, t: m(t))
    got = _module_step(lean_block, x * 0.5, lambda m, t: m(t))
    _assert_same_module_step(got, ref, 'block', tuple(f'attn.{z}' for z in _ZERO_GRAD))
    assert int(lean_block.attn.saa.bn.num_batches_tracked) == 2 if sam else True


def test_lean_forms_save_less():
    model, (x, y) = _micro_model(), _xy()
    with forms.reference_forms():
        plain = saved_bytes(lambda: F.cross_entropy(model(x), y))
    lean = saved_bytes(lambda: F.cross_entropy(model(x), y))
    assert lean < 0.9 * plain, (lean, plain)  # parameters included: a tiny model's own share is large


def test_bf16_autocast_training_forms():
    """Under bf16 autocast each form trains like the plain form within bf16 round-off, gradients in fp32."""
    model, (x, y) = _micro_model(), _xy()

    def step(m):
        with torch.autocast('cpu', torch.bfloat16):
            out = m(x)
        F.cross_entropy(out.float(), y).backward()
        return out.float().detach(), {n: p.grad for n, p in m.named_parameters()}

    with forms.reference_forms():
        ref_out, ref_grads = step(copy.deepcopy(model))
    out, grads = step(model)
    assert max_abs(out, ref_out) <= 3e-2 * max(1.0, ref_out.abs().max().item())
    for name, g in grads.items():
        assert g.dtype == torch.float32, name
        assert max_abs(g, ref_grads[name]) <= 5e-2 * max(1e-2, ref_grads[name].abs().max().item()), name


def test_gradient_checkpointing_with_the_training_forms():
    """Checkpointed stages recompute their blocks in backward (the BatchNorm statistics then move twice, in the
    plain form too): the lean forms give the plain form's step."""
    model, (x, y) = _micro_model(), _xy()
    model.set_grad_checkpointing(True)
    with forms.reference_forms():
        ref = _train_step(copy.deepcopy(model), x, y)
    _assert_same_step(_train_step(model, x, y), ref, 'checkpointing')


def test_attention_math_form_equals_sdpa():
    """The ``attention_math`` form (bf16 autocast training) computes scaled_dot_product_attention's maths: fp32
    values and gradients against the fused kernel at SMT-T's stage-3 head shapes."""
    from msconv.models.smt import Attention

    attn = Attention(64, num_heads=2)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 196, 32, generator=g, requires_grad=True) for _ in range(3))
    out = attn._attention_math(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    assert max_abs(out, ref) <= 1e-5 * max(1.0, ref.abs().max().item())
    cot = torch.randn(ref.shape, generator=g)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), cot), torch.autograd.grad(ref, (q, k, v), cot)):
        assert max_abs(a, b) <= 1e-4 * max(1.0, b.abs().max().item())
