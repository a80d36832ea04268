"""ShiftWise's training forms in a bf16 autocast step (kind ``lean_bf16``: the block's SE product, MLP and GRN node in
bf16 with fp32 statistics; the strip operator's lean node with bf16 BatchNorm inputs and fp32 statistics): when the
gate lets them run, that they run, what they save, and that they train like the plain form under autocast and like
the fp32 step within bf16 rounding (values, every gradient, BatchNorm running statistics). Which form wins on this
machine is never asserted."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import graph_names, max_abs, randomize_shiftwise

from msconv.layers import forms
from msconv.layers.shiftwise import ShiftWiseConv2d
from msconv.models.shiftwise_net import ShiftWiseBlock, _LeanMlpTrain

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from _common import saved_bytes  # noqa: E402


def _amp(dtype=torch.bfloat16):
    return torch.autocast('cpu', dtype)


def _step(module, x, ctx):
    """A train-mode forward and a weighted-sum backward on a copy: output, input gradient, parameter gradients and
    floating buffers after."""
    module = copy.deepcopy(module)
    x = x.detach().clone().requires_grad_(True)
    with ctx:
        out = module(x)
        w = torch.linspace(-1.0, 1.0, out.numel(), dtype=torch.float32).view(out.shape)
        loss = (out.float() * w).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in module.named_buffers() if b.is_floating_point()}
    return out.detach().float(), x.grad.float(), grads, buffers


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


def _close(got, ref, what, cos_min, skip=(), buffers=2e-2):
    """Every output and gradient of ``got`` within ``cos_min`` (cosine) of ``ref``'s, running statistics within bf16
    rounding; returns the smallest cosine."""
    (out_a, gx_a, grads_a, buf_a), (out_b, gx_b, grads_b, buf_b) = got, ref
    assert grads_a.keys() == grads_b.keys(), what
    cosines = {'output': _cos(out_a, out_b), 'input grad': _cos(gx_a, gx_b)}
    for name in grads_b:
        assert grads_a[name].dtype == grads_b[name].dtype == torch.float32, (what, name)
        if name not in skip:
            cosines[name] = _cos(grads_a[name], grads_b[name])
    bad = {k: round(v, 4) for k, v in cosines.items() if not v > cos_min}
    assert not bad, (what, bad)
    for name in buf_b if buffers else ():  # running statistics: accumulated in fp32 from bf16 maps on both sides
        assert max_abs(buf_a[name], buf_b[name]) <= buffers * max(1.0, buf_b[name].abs().max().item()), (what, name)
    return min(cosines.values())


def test_gate_runs_lean_bf16_under_bf16_autocast_only():
    x = torch.randn(2, 8, 4, 4)
    assert not forms.use_fast_form('lean_bf16', x)
    with _amp():
        assert forms.use_fast_form('lean_bf16', x) and forms.use_fast_form('lean_bf16', x.bfloat16())
        assert not forms.use_fast_form('lean_fp32', x)
        with forms.reference_forms():
            assert not forms.use_fast_form('lean_bf16', x)
    with _amp(torch.float16):
        assert not forms.use_fast_form('lean_bf16', x)


def test_block_runs_its_bf16_form_and_saves_less(clean_tuner):
    """Under bf16 autocast the block's training node is in the graph and autograd saves less than in the plain
    form under autocast and than the fp32 training form."""
    torch.manual_seed(0)
    block = randomize_shiftwise(ShiftWiseBlock(32, 13)).train()
    x = torch.randn(2, 32, 16, 16).contiguous(memory_format=torch.channels_last)
    with _amp():
        assert {'_LeanMlpTrainBackward', '_LeanShiftWiseTrainBackward'} <= graph_names(block(x))

    def saved(ctx):
        def run():
            with ctx:
                return copy.deepcopy(block)(x).float().sum()

        return saved_bytes(run)

    lean_bf16, lean_fp32 = saved(_amp()), saved(torch.autocast('cpu', enabled=False))
    with forms.reference_forms():
        plain_bf16 = saved(_amp())
    assert lean_bf16 < 0.5 * plain_bf16 and lean_bf16 < 0.75 * lean_fp32, (lean_bf16, plain_bf16, lean_fp32)


@pytest.mark.parametrize('mlp', ['batched', 'per_image'])
def test_sw_t_stage1_block_bf16(mlp, clean_tuner):
    """SW-T's stage-1 shapes (80 channels, kernel 51, 56x56, channels-last, batch 2), a whole block: the bf16 forms
    against the plain form under autocast and against the plain fp32 step."""
    torch.manual_seed(0)
    block = randomize_shiftwise(ShiftWiseBlock(80, 51)).train()
    x = torch.randn(2, 80, 56, 56).contiguous(memory_format=torch.channels_last)
    with forms.reference_forms():
        fp32 = _step(block, x, torch.autocast('cpu', enabled=False))
        plain = _step(block, x, _amp())
    with forms.forced_choices(shiftwise_mlp_train=mlp):
        got = _step(block, x, _amp())
    # BN biases whose gradients are sums of terms that cancel (see test_train_forms_shiftwise): noise on every side
    cancelling = {f'conv.bn_{b}.bias' for b in 'hvs'} | {'grn.bias'}
    yardstick = _close(plain, fp32, 'plain bf16 vs fp32', 0.9, cancelling)  # bf16's own distance from fp32
    assert _close(got, fp32, (mlp, 'vs fp32'), 0.9, cancelling) > yardstick - 0.01
    _close(got, plain, (mlp, 'vs plain bf16'), 0.9, cancelling)


def test_strip_operator_bf16(clean_tuner):
    """The lean strip operator under autocast (bf16 maps into fp32-statistics BatchNorms) against the plain form
    under autocast and in fp32, at SW-T's stage-2 shapes."""
    torch.manual_seed(0)
    op = randomize_shiftwise(ShiftWiseConv2d(160, 49)).train()
    x = torch.randn(2, 160, 28, 28).contiguous(memory_format=torch.channels_last)
    with forms.reference_forms():
        fp32 = _step(op, x, torch.autocast('cpu', enabled=False))
        plain = _step(op, x, _amp())
    got = _step(op, x, _amp())
    yardstick = _close(plain, fp32, 'plain bf16 vs fp32', 0.9)
    assert _close(got, fp32, 'vs fp32', 0.9) > yardstick - 0.01
    _close(got, plain, 'vs plain bf16', 0.9)


def test_backward_inside_autocast_is_the_same():
    """The MLP node fixes its own dtypes: a backward called inside the autocast region gives the same gradients."""
    torch.manual_seed(0)
    block = randomize_shiftwise(ShiftWiseBlock(16, 7)).train()
    x = torch.randn(2, 16, 8, 8, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    gate = torch.rand(2, 16, 1, 1, dtype=torch.bfloat16)
    params = (block.fc1.weight, block.fc1.bias, block.grn.weight, block.grn.bias, block.fc2.weight)
    grads = []
    for inside in (False, True):
        xs, gs = x.clone().requires_grad_(True), gate.clone().requires_grad_(True)
        with _amp():
            out = _LeanMlpTrain.apply(xs, gs, *params, block.grn.eps, False, torch.bfloat16)
            loss = (out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum()
            if inside:
                grads.append(torch.autograd.grad(loss, (xs, gs, *params)))
        if not inside:
            grads.append(torch.autograd.grad(loss, (xs, gs, *params)))
    assert out.dtype == torch.bfloat16
    for a, b, t in zip(*grads, (x, gate, *params)):
        assert a.dtype == t.dtype and torch.equal(a, b)


@pytest.mark.parametrize('mlp', ['batched', 'per_image'])
def test_gradient_checkpointing_under_autocast(mlp, clean_tuner):
    """Non-reentrant checkpointing of the stages in a bf16 autocast step: the recomputation goes through the bf16
    forms again (checkpointing's check of what the forward saved holds) and the step trains like the plain form's
    checkpointed step. The forms are pinned (each rounds differently; which one the tuner picks depends on the
    load)."""
    import msconv

    torch.manual_seed(0)
    model = randomize_shiftwise(msconv.create_model('test_shiftwise', num_classes=10)).train()
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    cancelling = {
        n for n, _ in model.named_parameters() if n.endswith(('bn_h.bias', 'bn_v.bias', 'bn_s.bias', 'grn.bias'))
    }
    with forms.reference_forms():
        fp32 = _step(model, x, torch.autocast('cpu', enabled=False))
        plain = _step(model, x, _amp())
    pins = dict(depthwise_grad_input='flipped', depthwise_grad_weight='per_image', shiftwise_mlp_train=mlp)
    with forms.forced_choices(**pins):
        got = _step(model, x, _amp())
    # a micro model's gradients are short sums and its BN statistics come from few pixels, bf16 noise is larger than
    # at SW-T's shapes (where the running statistics are compared): against the plain bf16 step's own distance from
    # fp32
    yardstick = _close(plain, fp32, 'plain bf16 vs fp32', 0.8, cancelling, buffers=None)
    assert _close(got, fp32, 'checkpointed vs fp32', 0.8, cancelling, buffers=None) > yardstick - 0.02
    _close(got, plain, 'checkpointed vs plain bf16', 0.8, cancelling, buffers=None)


def test_autocast_inference_form(monkeypatch):
    """``inference_model(..., dtype='bf16', precision='autocast')``: the reparameterized blocks run their inference
    form in bf16 under autocast (kind ``inplace_bf16``), within bf16 rounding of the plain form under autocast and of
    fp32; not under fp16 autocast, nor with autograd on."""
    import msconv

    torch.manual_seed(0)
    model = randomize_shiftwise(msconv.create_model('test_shiftwise', num_classes=10)).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        fp32 = model(x)
    fast = msconv.inference_model(model, dtype='bf16', precision='autocast')
    blocks = [m for m in fast.modules() if isinstance(m, ShiftWiseBlock)]
    assert blocks and all(b.conv.deployed for b in blocks)
    calls = []
    inference_form = ShiftWiseBlock._forward_inference
    monkeypatch.setattr(
        ShiftWiseBlock, '_forward_inference', lambda m, t: calls.append(t.dtype) or inference_form(m, t)
    )
    fast(x)  # the first call decides the memory layout (runs the model several times)
    calls.clear()
    got = fast(x)
    assert len(calls) == len(blocks)
    with forms.reference_forms():
        plain = fast(x)
    assert len(calls) == len(blocks)
    scale = fp32.abs().max().item()
    assert max_abs(got.float(), plain.float()) <= 2e-2 * scale
    assert max_abs(got.float(), fp32) <= 3e-2 * scale and _cos(got, fp32) > 0.999
    xb = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert not forms.use_fast_form('inplace_bf16', xb)
        with _amp():
            assert forms.use_fast_form('inplace_bf16', xb, 'channels_last')
            assert not forms.use_fast_form('inplace_bf16', xb.contiguous(), 'channels_last')
        with _amp(torch.float16):
            assert not forms.use_fast_form('inplace_bf16', xb)
    with _amp():
        assert not forms.use_fast_form('inplace_bf16', xb)  # autograd on
