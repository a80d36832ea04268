"""Training forms (the forms that run with autograd on): each is exact against the plain form in values, gradients
and BatchNorm running statistics, and the autotuner's training measurements (``forms.tuned_training``) touch no
state. These count and compare; which form wins on this machine is never asserted."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import max_abs, randomize_bn

import msconv
from msconv.layers import fast_ops, forms


def _train_step(model, x, y):
    """Forward (train mode) and backward: the logits, the parameters' gradients, the BatchNorm buffers after."""
    out = model(x)
    F.cross_entropy(out, y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in model.named_buffers() if b.is_floating_point()}
    return out.detach(), grads, buffers


def _ddp_step(tmp_path, model, x, y):
    """``_train_step`` of a copy of ``model`` wrapped in a one-process DDP (gloo): the gradients DDP's buckets hand
    back, named as the module's own."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/rdzv', rank=0, world_size=1)
    try:
        wrapped = DDP(copy.deepcopy(model))
        out = wrapped(x)
        F.cross_entropy(out, y).backward()
        m = wrapped.module
        return (
            out.detach(),
            {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None},
            {n: b.clone() for n, b in m.named_buffers() if b.is_floating_point()},
        )
    finally:
        dist.destroy_process_group()


def _assert_same_step(a, b, what):
    (out_a, grads_a, buf_a), (out_b, grads_b, buf_b) = a, b
    assert max_abs(out_a, out_b) <= 1e-5 * max(1.0, out_b.abs().max().item()), what
    assert grads_a.keys() == grads_b.keys(), what
    for name in grads_b:
        scale = max(1.0, grads_b[name].abs().max().item())
        assert max_abs(grads_a[name], grads_b[name]) <= 1e-4 * scale, (what, name)
    for name in buf_b:
        assert max_abs(buf_a[name], buf_b[name]) <= 1e-5 * max(1.0, buf_b[name].abs().max().item()), (what, name)


def _micro_case(name: str):
    """A micro model in train mode (no drop path, random BatchNorm statistics and affines), one batch of two 64x64
    images with labels, and the plain forms' training step on a copy of the model: ``(model, x, y, ref)``."""
    torch.manual_seed(0)
    model = msconv.create_model(name, num_classes=10, drop_path_rate=0.0).train()
    randomize_bn(model)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    with forms.reference_forms():
        ref = _train_step(copy.deepcopy(model), x, y)
    return model, x, y, ref


TRAIN_OPS = [name for name, op in forms.TUNED.items() if op.training]


@pytest.mark.parametrize('name', ['test_scsc_swin', 'test_scsc_resnet'])
@pytest.mark.parametrize('op', TRAIN_OPS)
def test_every_training_form_equals_the_plain_form(name, op, clean_tuner):
    """Each candidate of each training operation, pinned, against ``reference_forms()``: logits, every gradient
    and the BatchNorm running statistics after one training step."""
    model, x, y, ref = _micro_case(name)
    for form in forms.TUNED[op].candidates:
        with forms.forced_choices(**{op: form}):
            _assert_same_step(_train_step(copy.deepcopy(model), x, y), ref, (name, op, form))


def test_training_measurement_touches_no_state_and_is_kept(clean_tuner):
    """The first training call of a shape times each form's forward and backward on detached copies: the
    parameters' ``.grad`` stays empty until the real backward, the result is the plain form's, and the choice is
    kept under a key holding the autocast state."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 12, 1)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    out = fast_ops.pointwise_conv_train(conv, x)
    assert conv.weight.grad is None and x.grad is None
    with forms.reference_forms():
        ref = conv(x)
    assert max_abs(out, ref) < 1e-5
    keys = [k for k in forms.autotune_choices() if k.startswith('pointwise_conv_train|(2, 8, 5, 5)|')]
    assert len(keys) == 1 and keys[0].endswith('amp:off')
    out.sum().backward()
    assert max_abs(conv.weight.grad, x.detach().sum((0, 2, 3)).view(1, 8, 1, 1).expand_as(conv.weight)) < 1e-4
    with torch.autocast('cpu', torch.bfloat16):
        fast_ops.pointwise_conv_train(conv, x)
    assert any(k.endswith('amp:bfloat16') for k in forms.autotune_choices())


def test_no_measurement_without_autograd_or_with_autotune_off(clean_tuner, monkeypatch):
    conv = torch.nn.Conv2d(8, 12, 1)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        fast_ops.pointwise_conv_train(conv, x)
    monkeypatch.setenv('MSCONV_AUTOTUNE', '0')
    fast_ops.pointwise_conv_train(conv, x.requires_grad_(True))
    assert not forms.autotune_choices()


def test_gradient_checkpointing_around_a_first_measurement(clean_tuner):
    """Non-reentrant checkpointing records what the forward saves and checks the recomputation saves the same: a
    measurement inside the first forward must not show it extra tensors (its graphs are shielded)."""
    torch.manual_seed(0)
    model = msconv.create_model('test_scsc_swin', num_classes=10, drop_path_rate=0.0).train()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    model.set_grad_checkpointing(True)  # (the recomputation updates the BatchNorm statistics again: on both sides)
    with forms.reference_forms():
        ref = _train_step(copy.deepcopy(model), x, y)
    got = _train_step(model, x, y)  # nothing pinned: the first forward measures, the recomputation reuses the choice
    _assert_same_step(got, ref, 'checkpointed')


def test_tuned_training_refuses_inference_operations_and_wrong_forms():
    x = torch.zeros(1, 2, 1, 1)
    with pytest.raises(ValueError, match="'linear' is not a training operation"):
        forms.tuned_training('linear', (x,), {'blas': lambda x: x, 'onednn': lambda x: x})
    with pytest.raises(ValueError, match=r"has the forms \['conv', 'gemm'\]"):
        forms.tuned_training('pointwise_conv_train', (x,), {'gemm': lambda x: x, 'conv': lambda x: x})
