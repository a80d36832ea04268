"""SMT's dense inference forms at the thread counts the detectors run with (issue 24 item 4): the SAA expansion's
block-diagonal GEMM form (tuned ``saa_expand``) and the MLP bands' fc1 exact against the plain forms, choices kept
apart per thread count, detections unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import max_abs, randomize_bn

import msconv
from msconv.dense import create_detector
from msconv.layers import forms, reference_forms
from msconv.layers.mixed_conv import ScaleAwareAggregation, _expand_gelu
from msconv.models.smt import ConvMlp


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize('dim,heads', [(16, 4), (64, 4), (24, 2), (48, 8)])
def test_saa_expand_gemm_form_is_the_onednn_form(clean_tuner, dim, heads):
    """GELU(grouped 1x1 conv) as the block-diagonal GEMM over chunks of groups gives oneDNN's grouped convolution
    with the GELU post-op, on whole maps and on one image's band of rows (a strided slice)."""
    torch.manual_seed(0)
    groups = dim // heads
    w, b = torch.randn(2 * dim, heads, 1, 1) * 0.5, torch.randn(2 * dim)
    x = torch.randn(2, dim, 9, 7).contiguous(memory_format=torch.channels_last)
    for part in (x, x[1:2, :, 3:7]):
        with torch.no_grad():
            with forms.forced_choices(saa_expand='onednn'):
                ref = _expand_gelu(part, w, b, groups)
            with forms.forced_choices(saa_expand='gemm'):
                out = _expand_gelu(part, w, b, groups)
        assert out.shape == ref.shape
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert max_abs(out, ref) < 1e-5


@pytest.mark.parametrize('form', ['fused', 'fused_bands'])
def test_saa_fused_forms_with_the_gemm_expansion_match_the_plain_form(clean_tuner, monkeypatch, form):
    torch.manual_seed(0)
    saa = ScaleAwareAggregation(32, 4, 2).eval()
    randomize_bn(saa)
    x = torch.randn(2, 32, 7, 5).contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(ScaleAwareAggregation, '_band_bytes', 2 * 5 * 64 * 4)  # 2 rows per band
    calls = []
    original = forms.tuned

    def spy(op, *args, **kwargs):
        calls.append(op)
        return original(op, *args, **kwargs)

    monkeypatch.setattr(msconv.layers.mixed_conv, 'tuned', spy)
    with torch.no_grad():
        with reference_forms():
            ref = saa(x, interleaved=True)
        with forms.forced_choices(saa_fused=form, saa_expand='gemm'):
            out = saa(x, interleaved=True)
    assert 'saa_expand' in calls
    assert max_abs(out, ref) < 1e-5


def test_smt_mlp_bands_is_bit_identical_to_the_whole_map(clean_tuner, monkeypatch):
    """The bands form's fc1 on each band's token matrix (with the one-row halo) computes what the whole-map form
    computes."""
    torch.manual_seed(0)
    mlp = ConvMlp(16, 40).eval()
    mlp.reparameterize()
    x = torch.randn(2, 11, 6, 16)
    monkeypatch.setattr(ConvMlp, '_band_bytes', 4 * 6 * 40 * 4)  # 4 rows per band: 3 bands per image
    with torch.no_grad():
        with reference_forms():
            ref = mlp(x)
        with forms.forced_choices(smt_mlp_bands='bands'):
            out = mlp(x)
    assert max_abs(out, ref) < 1e-5


def test_tuned_choices_are_kept_per_thread_count(clean_tuner, threads):
    """A choice measured on one thread is not reused on two (the fastest form depends on the thread count)."""
    torch.manual_seed(0)
    model = msconv.create_model('test_smt').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.set_num_threads(1)
        model(x)
        one = set(forms.autotune_choices())
        torch.set_num_threads(2)
        model(x)
    two = set(forms.autotune_choices()) - one
    assert one and two
    assert {k.split('|')[5] for k in one} == {'1'} and {k.split('|')[5] for k in two} == {'2'}

    def without_threads(keys):
        return {'|'.join(k.split('|')[:5] + k.split('|')[6:]) for k in keys}

    assert without_threads(one) == without_threads(two)


def test_retinanet_detections_with_the_gemm_expansion_are_the_plain_ones(clean_tuner):
    """A micro SMT RetinaNet gives the same detections with the SAA expansion's GEMM form as with every plain form
    (boxes and labels equal, scores 1e-5)."""
    torch.manual_seed(0)
    model = create_detector('test_smt', 'retinanet', 3, min_size=96, max_size=128).eval()
    randomize_bn(model)
    with torch.no_grad():
        for m in model.modules():  # a head that detects something on random weights
            if isinstance(m, torch.nn.Conv2d) and m.out_channels == 9 * 3:
                m.bias.fill_(2.0)
    images = [torch.rand(3, 96, 128)]
    with torch.no_grad():
        with reference_forms():
            ref = model(images)
        with forms.forced_choices(saa_fused='fused', saa_expand='gemm'):
            out = model(images)
    assert len(ref[0]['boxes']) > 0
    assert torch.equal(out[0]['labels'], ref[0]['labels'])
    assert max_abs(out[0]['boxes'], ref[0]['boxes']) < 1e-4
    assert max_abs(out[0]['scores'], ref[0]['scores']) < 1e-5
