"""``msconv.layers.Linear``: the oneDNN (1x1 convolution) GEMM path against ``F.linear``, and how the faster one
is chosen (measured by ``msconv.layers.forms.tuned``)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import max_abs, onednn_enabled
from torch.profiler import ProfilerActivity, profile

from msconv.layers import Linear, forms, reference_forms
from msconv.layers.fast_ops import linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason='torch built without oneDNN')


def _ops(fn) -> set:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.fixture
def always_onednn():
    with forms.forced_choices(linear='onednn'):
        yield


@pytest.mark.parametrize('shape', [(2, 5, 7, 24), (3, 11, 24), (1, 1, 24), (2, 1, 1, 24)])
@pytest.mark.parametrize('bias', [True, False])
def test_forward_and_backward_equal_f_linear(shape, bias, always_onednn):
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(40, 24, requires_grad=True)
    b = torch.randn(40, requires_grad=True) if bias else None
    g = torch.randn(*shape[:-1], 40)
    assert 'aten::mkldnn_convolution' in _ops(lambda: linear(x, w, b))
    out = linear(x, w, b)
    ref = F.linear(x, w, b)
    assert out.shape == ref.shape
    assert max_abs(out, ref) < 1e-5 * ref.abs().max().item()
    grads = torch.autograd.grad(out, [x, w] + ([b] if bias else []), g)
    refs = torch.autograd.grad(ref, [x, w] + ([b] if bias else []), g)
    for ours, theirs in zip(grads, refs):
        assert max_abs(ours, theirs) < 1e-4 * max(theirs.abs().max().item(), 1.0)


@pytest.mark.parametrize('shape', [(2, 5, 5, 16), (3, 7, 16)])
def test_strided_weight_and_bias(shape, always_onednn):
    torch.manual_seed(0)
    x = torch.randn(shape)
    w, b = torch.randn(16, 32).t(), torch.randn(64)[::2]  # neither is contiguous
    assert max_abs(linear(x, w, b), F.linear(x, w, b)) < 1e-5


def test_token_output_is_contiguous(always_onednn):
    out = linear(torch.randn(2, 6, 6, 16), torch.randn(32, 16))
    assert out.shape == (2, 6, 6, 32) and out.is_contiguous()


def test_bfloat16_stays_on_f_linear(always_onednn):
    x, w = torch.randn(2, 8, 8, 32).bfloat16(), torch.randn(48, 32).bfloat16()
    assert 'aten::mkldnn_convolution' not in _ops(lambda: linear(x, w))
    assert torch.equal(linear(x, w), F.linear(x, w))


def test_autocast_keeps_its_lower_precision(always_onednn):
    x, w = torch.randn(2, 8, 8, 32), torch.randn(48, 32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert linear(x, w).dtype == torch.bfloat16


def test_path_choice_is_measured_once_per_shape_and_cached(monkeypatch, tmp_path):
    """In eager inference the autotuner times BLAS and oneDNN on the first call for a shape, keeps the faster,
    reuses it (also from MSCONV_CACHE_DIR in a new process), and returns the chosen form's own result."""
    monkeypatch.setattr(forms, '_CHOICES', {})
    monkeypatch.setattr(forms, '_DISK', None)
    monkeypatch.setenv('MSCONV_CACHE_DIR', str(tmp_path))
    calls = []
    real = forms._measure
    monkeypatch.setattr(forms, '_measure', lambda cands, rounds=3: calls.append(sorted(cands)) or real(cands, rounds))
    w = torch.randn(512, 64)
    big = torch.randn(1, 56, 56, 64)
    with torch.no_grad():
        first = linear(big, w)
        again = linear(big, w)
    assert calls == [['blas', 'onednn']] and torch.equal(first, again)
    ((key, choice),) = forms.autotune_choices().items()
    assert key.startswith('linear|(1, 56, 56, 64)|c|float32|cpu|') and choice in ('blas', 'onednn')
    assert (tmp_path / 'autotune.json').is_file()
    monkeypatch.setattr(forms, '_CHOICES', {})
    monkeypatch.setattr(forms, '_DISK', None)  # a new process: the disk cache answers, nothing is measured
    with torch.no_grad():
        linear(big, w)
    assert len(calls) == 1 and forms.autotune_choices() == {key: choice}
    with torch.no_grad():
        linear(torch.randn(1, 7, 7, 64), w)  # another shape: measured
    assert len(calls) == 2
    # autograd on (training) or MSCONV_AUTOTUNE=0: no measuring, the plain BLAS GEMM
    assert 'aten::mkldnn_convolution' not in _ops(lambda: linear(big, w.requires_grad_()))
    w.requires_grad_(False)
    monkeypatch.setenv('MSCONV_AUTOTUNE', '0')
    with torch.no_grad():
        assert 'aten::mkldnn_convolution' not in _ops(lambda: linear(torch.randn(1, 9, 9, 64), w))
    assert len(calls) == 2


def test_forms_that_never_apply(always_onednn):
    w = torch.randn(512, 64)
    big = torch.randn(1, 56, 56, 64)
    strided = torch.randn(1, 56, 56, 128)[..., ::2]  # not contiguous: BLAS
    assert 'aten::mkldnn_convolution' not in _ops(lambda: linear(strided, w))
    assert max_abs(linear(strided, w), F.linear(strided, w)) == 0
    assert 'aten::mkldnn_convolution' not in _ops(lambda: linear(big.double(), w.double()))
    with reference_forms():
        assert 'aten::mkldnn_convolution' not in _ops(lambda: linear(big, w))
    with onednn_enabled(False):
        assert 'aten::mkldnn_convolution' not in _ops(lambda: linear(big, w))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.trace is deprecated, but still used by exporters
        traced = torch.jit.trace(Linear(64, 512), big)  # traced graphs keep a plain linear
    assert 'aten::linear' in str(traced.graph) and 'convolution' not in str(traced.graph)


def test_module_is_a_drop_in_nn_linear(always_onednn):
    torch.manual_seed(0)
    plain = nn.Linear(16, 8)
    ours = Linear(16, 8)
    ours.load_state_dict(plain.state_dict())
    assert isinstance(ours, nn.Linear) and ours.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 4, 4, 16)
    assert max_abs(ours(x), plain(x)) < 1e-6


def test_compiled_module_matches(always_onednn):
    torch.manual_seed(0)
    m = Linear(16, 8)
    x = torch.randn(2, 4, 4, 16)
    compiled = torch.compile(m, fullgraph=True, backend='eager')
    assert max_abs(compiled(x), F.linear(x, m.weight, m.bias)) < 1e-6


def test_flop_counter_counts_the_onednn_path(always_onednn):
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 8, 8, 32, requires_grad=True)
    w, b = torch.randn(48, 32, requires_grad=True), torch.randn(48, requires_grad=True)
    totals = []
    for fn in (F.linear, linear):
        with FlopCounterMode(display=False) as counter:
            fn(x, w, b).sum().backward()
        totals.append(counter.get_total_flops())
    assert totals[0] == totals[1] == 3 * 2 * (2 * 8 * 8) * 32 * 48


@pytest.mark.parametrize('form', ['plain', 'fused'])
@pytest.mark.parametrize('shape', [(2, 5, 7, 16), (3, 11, 16), (13, 16)])
@pytest.mark.parametrize('bias', [True, False])
def test_linear_gelu_forms_match_linear_then_gelu(form, shape, bias):
    from msconv.layers import forms
    from msconv.layers.fast_ops import linear_gelu

    torch.manual_seed(0)
    w, b = torch.randn(40, 16) * 0.2, (torch.randn(40) if bias else None)
    x = torch.randn(*shape)
    ref = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b))
    with torch.no_grad():
        if form == 'fused' and not forms.use_fast_form('fused', x):
            pytest.skip('no oneDNN here: the fused form is not allowed')
        with forms.forced_choices(linear_gelu=form):
            out = linear_gelu(x, w, b)
    assert out.shape == ref.shape and out.is_contiguous()
    assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    out = linear_gelu(x, w, b)  # autograd on: the plain form, differentiable
    assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_linear_gelu_fused_form_runs_bf16_within_bf16_rounding():
    """bf16 tokens and weights: the oneDNN post-op form keeps bf16 and stays within bf16 rounding (8 bits of
    mantissa: 2^-8 of the largest output, twice for the GEMM's and the GELU's roundings) of the fp32 maths."""
    from msconv.layers.fast_ops import linear_gelu

    torch.manual_seed(0)
    w, b, x = torch.randn(40, 16).bfloat16(), torch.randn(40).bfloat16(), torch.randn(2, 5, 5, 16).bfloat16()
    ref = F.gelu(F.linear(x.float(), w.float(), b.float()))
    with torch.no_grad():
        if not forms.use_fast_form('fused', x):
            pytest.skip('no oneDNN here: the fused form is not allowed')
        with forms.forced_choices(linear_gelu='fused'):
            out = linear_gelu(x, w, b)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert (out.float() - ref).abs().max().item() <= 2 * 2**-8 * ref.abs().max().item()
