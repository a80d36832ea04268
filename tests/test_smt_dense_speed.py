"""SMT's inference forms for the dense systems (issue 24 item 4): each one exact against the plain form, and run
where it is meant to run (pinned through ``forms.forced_choices``)."""

from __future__ import annotations

import pytest
import torch
from conftest import max_abs, randomize_bn

import msconv
from msconv.layers import forms, reference_forms
from msconv.layers.mixed_conv import ScaleAwareAggregation


def _counting(monkeypatch, cls, name):
    calls = []
    original = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, wrapper)
    return calls


@pytest.mark.parametrize('deployed', [False, True])
def test_saa_fused_form_matches_the_plain_form(clean_tuner, monkeypatch, deployed):
    """The fused SAA (BatchNorm folded at call time, grouped 1x1 conv + GELU in one oneDNN call, dense 1x1 conv as a
    token GEMM) gives the plain form's eval output for the whole model, reparameterized or not."""
    torch.manual_seed(0)
    model = msconv.create_model('test_smt').eval()
    randomize_bn(model)
    if deployed:
        model.reparameterize()
    x = torch.randn(2, 3, 64, 64)
    calls = _counting(monkeypatch, ScaleAwareAggregation, '_forward_fused')
    with torch.no_grad():
        with reference_forms():
            ref = model(x)
        with forms.forced_choices(saa_fused='fused'):
            out = model(x)
    assert calls, 'the fused SAA form did not run'
    assert max_abs(out, ref) < 1e-5


def test_saa_fused_form_steps_aside_in_training_and_under_autograd(clean_tuner, monkeypatch):
    """Training-mode BatchNorm (batch statistics) and autograd keep the plain form, even when pinned."""
    saa = ScaleAwareAggregation(16, 4, 2)
    x = torch.randn(2, 16, 5, 6).contiguous(memory_format=torch.channels_last)
    calls = _counting(monkeypatch, ScaleAwareAggregation, '_forward_fused')
    with forms.forced_choices(saa_fused='fused'):
        with torch.no_grad():
            saa.train()(x, interleaved=True)
        saa.eval()(x.requires_grad_(), interleaved=True).sum().backward()
    assert not calls
    assert x.grad is not None


@pytest.mark.parametrize('deployed', [False, True])
@pytest.mark.parametrize('rows', [4, 1 << 20])
def test_smt_mlp_bands_match_the_plain_form(clean_tuner, monkeypatch, deployed, rows):
    """The banded MLP (rows of 4: many bands with halos, first and last at the image border; or one band) gives the
    plain form's output, with the identity folded at call time or by reparameterize()."""
    from msconv.models import smt

    torch.manual_seed(0)
    mlp = smt.ConvMlp(16, 40).eval()
    if deployed:
        mlp.reparameterize()
    x = torch.randn(2, 13, 7, 16)
    monkeypatch.setattr(smt.ConvMlp, '_band_bytes', rows * 7 * 40 * 4, raising=False)
    calls = _counting(monkeypatch, smt.ConvMlp, '_forward_bands')
    with torch.no_grad():
        with reference_forms():
            ref = mlp(x)
        with forms.forced_choices(smt_mlp_bands='bands'):
            out = mlp(x)
    assert calls, 'the banded MLP did not run'
    assert max_abs(out, ref) < 1e-5


def test_smt_stem_fused_form_matches_the_plain_form(clean_tuner, monkeypatch):
    """conv -> BatchNorm (eval statistics) -> ReLU as one oneDNN call with the BatchNorm folded at call time."""
    from msconv.models import smt

    torch.manual_seed(0)
    stem = smt.Stem(3, 16).eval()
    randomize_bn(stem)
    x = torch.randn(2, 3, 33, 31)
    calls = _counting(monkeypatch, smt.Stem, '_first_fused')
    with torch.no_grad():
        with reference_forms():
            ref = stem(x)
        with forms.forced_choices(smt_stem='fused'):
            out = stem(x)
    assert calls, 'the fused stem did not run'
    assert max_abs(out, ref) < 1e-5


@pytest.mark.parametrize('band_rows', [2, 3])
def test_saa_fused_form_in_bands_matches_the_plain_form(clean_tuner, monkeypatch, band_rows):
    """The fused SAA one band of rows at a time (as on large maps) gives the plain form's output."""
    torch.manual_seed(0)
    saa = ScaleAwareAggregation(16, 4, 2).eval()
    randomize_bn(saa)
    x = torch.randn(2, 16, 7, 5).contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(ScaleAwareAggregation, '_band_bytes', band_rows * 5 * 32 * 4)
    with torch.no_grad():
        with reference_forms():
            ref = saa(x, interleaved=True)
        with forms.forced_choices(saa_fused='fused_bands'):
            out = saa(x, interleaved=True)
    assert max_abs(out, ref) < 1e-5


def test_smt_attention_contiguous_form_is_the_views_form():
    """SMT's eval attention on contiguous copies of q, k and v (tuned ``smt_attention``) gives what SDPA gives on
    the projection's strided views; with autograd on or under a trace the views run."""
    torch.manual_seed(0)
    attn = msconv.models.smt.Attention(32, 4).eval()
    x = torch.randn(2, 9, 11, 32)
    with torch.no_grad():
        ref = attn(x)
        attn.reparameterize()
        assert forms.tunable('smt_attention', x)
        with forms.forced_choices(smt_attention='views'):
            views = attn(x)
        with forms.forced_choices(smt_attention='contiguous'):
            out = attn(x)
            traced = torch.jit.trace(attn, (x,), check_trace=False)
    torch.testing.assert_close(out, views, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(traced(x), views, rtol=1e-6, atol=1e-6)
    with forms.forced_choices(smt_attention='contiguous'):
        y = attn(x.requires_grad_())
    y.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(y.detach(), views, rtol=1e-6, atol=1e-6)
