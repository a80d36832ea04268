"""bf16 as a supported inference path: bf16 weights (and autocast) on CPU, eager and through msconv.inference_model,
against the official fixtures and the fp32 models; ``msconv.evaluate(..., dtype='bf16')``.

Tolerance. bf16 keeps 8 significant bits, so one rounding moves a value by at most u = 2^-8 (0.39%) of itself. A
forward pass rounds the weights once and the activations after every conv/GEMM/norm; for roundings that are
independent the relative error of the logits grows like sqrt(L) u, about 1.5% for the ~15 such steps of a micro
model (measured: 0.5-1.4% of the largest logit, see test_models / test_inference). We allow 4% of the largest
|logit|, about three times that, and far below what a wrong kernel gives (errors of the order of the logits).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import load_fixture, official_state_dict

import msconv
from msconv.inference import inference_model

BF16_RTOL = 0.04
TEST_MODELS = msconv.list_models('test_*')

# fixture -> (family folder, model name, constructor kwargs given beside the fixture's own)
MODEL_FIXTURES = {
    'smt_micro': ('smt', 'smt_tiny', None),
    'smt_micro_ls_k7': ('smt', 'smt_tiny', None),
    'scsc_swin_micro': ('scsc', 'test_scsc_swin', {}),
    'cbtnet_micro': (
        'scsc',
        'test_scsc_resnet',
        dict(depths=(1, 1, 1, 1), stem_width=48, widths=(144, 288, 576, 768), num_classes=10),
    ),
    'sw_net_micro': ('shiftwise', 'test_shiftwise', dict(num_classes=10)),
}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _fixture_model(name):
    family, model_name, kwargs = MODEL_FIXTURES[name]
    t, meta = load_fixture(family, name)
    kwargs = meta['constructor_kwargs'] if kwargs is None else kwargs
    model = msconv.create_model(model_name, **kwargs).eval()
    model.load_state_dict(official_state_dict(t))
    return model, t


@pytest.mark.parametrize('name', list(MODEL_FIXTURES))
def test_fixture_logits_in_bf16(name):
    """The official fp32 logits, reproduced with bf16 weights (eager, training form and reparameterized, and through
    inference_model) and under bf16 autocast, within bf16 accuracy."""
    model, t = _fixture_model(name)
    x, ref = t['input'], t['logits']
    with torch.no_grad():
        for form in (model, msconv.reparameterize(model)):
            out = copy.deepcopy(form).to(torch.bfloat16)(x.to(torch.bfloat16))
            assert out.dtype == torch.bfloat16
            assert _rel_err(out, ref) <= BF16_RTOL
            with torch.autocast('cpu', dtype=torch.bfloat16):
                assert _rel_err(form(x), ref) <= BF16_RTOL
    for precision in ('weights', 'autocast'):  # (the layout choice is tested in test_inference)
        fast = inference_model(model, dtype='bf16', precision=precision, channels_last=False)
        assert _rel_err(fast(x), ref) <= BF16_RTOL


@pytest.mark.parametrize('name', TEST_MODELS)
def test_every_micro_model_runs_with_bf16_weights_in_both_forms(name):
    torch.manual_seed(0)
    model = msconv.create_model(name).eval()
    x = torch.randn(2, *model.pretrained_cfg.get('test_input_size', (3, 64, 64)))
    with torch.no_grad():
        ref = model(x)
        for form in (model, msconv.reparameterize(model)):
            low = copy.deepcopy(form).to(torch.bfloat16)
            out = low(x.to(torch.bfloat16))
            assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
            assert _rel_err(out, ref) <= BF16_RTOL
            assert x.dtype == torch.float32


def test_fast_forms_refuse_what_they_cannot_run_in_bf16():
    """The dispatch keeps the fp32-only CPU forms (oneDNN token GEMMs, explicit-GEMM convs) for fp32 inputs and the
    fp32 tails for bf16/fp16 ones; the in-place and per-image forms run in bf16 when the whole model is bf16 (no
    autocast, one dtype)."""
    from msconv.layers import forms

    x = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        assert not forms.use_fast_form('onednn', x) and not forms.use_fast_form('cpu_gemm', x)
        assert not forms.use_fast_form('fp32_tail', x.float())
        assert forms.use_fast_form('inplace', x) and forms.use_fast_form('per_image', x)
        assert forms.use_fast_form('fp32_tail', x) and forms.use_fast_form('fp32_tail', x.half())
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert not forms.use_fast_form('inplace', x.float()) and not forms.use_fast_form('fp32_tail', x)


def test_evaluate_in_a_dtype(monkeypatch):
    # no autotuning: its first measurement at a 250-image batch (per-image forms included) dwarfs the evaluation
    monkeypatch.setenv('MSCONV_AUTOTUNE', '0')
    common = dict(data='digits', batch_size=250, image_size=32, device='cpu')
    torch.manual_seed(0)
    model = msconv.create_model('test_smt', num_classes=10)
    plain = msconv.evaluate(model, **common)
    fp32 = msconv.evaluate(model, dtype='fp32', **common)
    bf16 = msconv.evaluate(model, dtype='bf16', **common)
    assert plain['count'] == fp32['count'] == bf16['count'] == 500
    assert fp32['top1'] == plain['top1'] and fp32['val_loss'] == pytest.approx(plain['val_loss'], rel=1e-5)
    assert bf16['val_loss'] == pytest.approx(plain['val_loss'], rel=BF16_RTOL)
    with pytest.raises(ValueError, match='exclusive'):
        msconv.evaluate(model, dtype='bf16', amp=True, **common)
    with pytest.raises(ValueError, match='dtype must be'):
        msconv.evaluate(model, dtype='int4', **common)


def test_cli_eval_dtype(monkeypatch, capsys):
    from msconv.cli import main

    monkeypatch.setenv('MSCONV_AUTOTUNE', '0')
    args = ['eval', 'test_smt', '--data', 'digits', '--image-size', '32', '--batch-size', '250', '--dtype', 'bf16']
    assert main(args) == 0
    out = capsys.readouterr().out
    assert 'test_smt (bf16 inference form) on digits/val: top-1' in out and '(500 images)' in out
    with pytest.raises(SystemExit):  # argparse: exit status 2 and the choices
        main(args[:-1] + ['int8'])
    assert "invalid choice: 'int8'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize('family', ['smt', 'scsc', 'shiftwise'])
def test_trained_demo_nano_model_top1_in_bf16_within_half_a_point(family, tmp_path):
    """The demo's nano model, trained briefly on the digits (1 epoch), keeps its validation top-1 in bf16 within 0.5
    points (2 of the 500 digits) of fp32."""
    from msconv.engine.demo import demo

    res = demo(families=[family], output=str(tmp_path), epochs=1, progress=False, print_fn=lambda *a: None)
    run = res['rows'][0]['run_dir']
    from msconv.engine.demo import DEMO_MODELS

    spec = DEMO_MODELS[family]
    kw = dict(checkpoint=run, data='digits', **spec['model_kwargs'])
    tops = {dtype: msconv.evaluate(spec['model'], dtype=dtype, **kw)['top1'] for dtype in ('fp32', 'bf16')}
    assert tops['fp32'] > 50, tops  # trained, or the comparison says nothing
    assert abs(tops['bf16'] - tops['fp32']) <= 0.5, tops


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize('channels_last', [False, True])
def test_spatial_mean_is_the_plain_mean(dtype, channels_last):
    """The SE statistic of the inference forms, reduced image by image for bf16/fp16 on CPU: bit-identical."""
    from msconv.layers.fast_ops import spatial_mean

    torch.manual_seed(0)
    y = torch.randn(3, 40, 9, 11).to(dtype)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    out = spatial_mean(y)
    assert out.dtype == dtype and out.shape == (3, 40, 1, 1)
    assert torch.equal(out, y.mean((2, 3), keepdim=True))
