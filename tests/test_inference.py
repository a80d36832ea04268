"""msconv.inference_model: the reparameterized eval copy, in a dtype, in the faster layout, optionally compiled."""

from __future__ import annotations

import pytest
import timm
import torch

import msconv
from msconv.inference import InferenceModel, inference_model, resolve_dtype
from msconv.layers import forms

TEST_MODELS = msconv.list_models('test_*')

# bf16 keeps 8 significant bits: unit roundoff u = 2^-8. A micro model rounds its activations after each of its
# ~10-20 sequential convs/GEMMs (and its weights once); independent roundings grow like sqrt(L) u ~ 1-2% of the
# output scale, which is what is measured (0.5-1.1% of the largest logit). 4% is about three such sigmas.
BF16_RTOL = 0.04


def _x(model, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, *model.pretrained_cfg.get('test_input_size', (3, 64, 64)))


def _close(out: torch.Tensor, ref: torch.Tensor, rtol: float) -> bool:
    return (out.float() - ref).abs().max().item() <= rtol * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize('name', TEST_MODELS)
def test_fp32_equals_the_eager_reparameterized_model(name):
    torch.manual_seed(0)
    model = msconv.create_model(name).train()
    x = _x(model)
    ref_model = msconv.reparameterize(model)
    with torch.no_grad():
        ref = ref_model(x)
    for layout in (False, True, 'auto'):
        fast = inference_model(model, channels_last=layout)
        out = fast(x)
        assert out.dtype == torch.float32 and not out.requires_grad
        assert _close(out, ref, 1e-5), layout
        assert fast.channels_last in (True, False), 'the first eager call decides the layout'
        assert _close(fast(x), ref, 1e-5), layout
    assert model.training, 'the given model is not modified (a copy is converted)'
    assert not fast.training and not fast.model.training
    with pytest.raises(ValueError, match='eval mode only'):
        fast.train()


@pytest.mark.parametrize('name', TEST_MODELS)
def test_bf16_within_bf16_accuracy_of_fp32(name):
    torch.manual_seed(0)
    model = msconv.create_model(name).eval()
    x = _x(model)
    with torch.no_grad():
        ref = msconv.reparameterize(model)(x)
    for precision in ('weights', 'autocast'):
        fast = inference_model(model, dtype='bf16', precision=precision, channels_last=False)
        out = fast(x)  # an fp32 input is cast to the weights' dtype
        assert out.dtype == torch.bfloat16
        weight_dtypes = {p.dtype for p in fast.model.parameters()}
        assert weight_dtypes == ({torch.bfloat16} if precision == 'weights' else {torch.float32})
        assert _close(out, ref, BF16_RTOL), precision


def test_fp16_weights_on_a_micro_model(monkeypatch):
    monkeypatch.setenv('MSCONV_AUTOTUNE', '0')  # torch's CPU fp16 convs take a slow per-group path: no measuring
    model = msconv.create_model('test_smt').eval()
    x = torch.randn(2, 3, 32, 32)  # fp16 convolutions are slow on a CPU without fp16 units: a small input
    with torch.no_grad():
        ref = msconv.reparameterize(model)(x)
    out = inference_model(model, dtype=torch.float16, channels_last=False)(x)
    assert out.dtype == torch.float16
    assert _close(out, ref, 5e-3)  # fp16: 11 significant bits, u = 2^-11; the same sqrt(L) argument as bf16


def test_layout_follows_the_autotuner_and_its_switch(monkeypatch):
    model = msconv.create_model('test_smt').eval()
    x = _x(model)
    with forms.forced_choices(**{'inference_model.memory_format': 'channels_last'}):
        fast = inference_model(model)
        fast(x)
    assert fast.channels_last is True
    conv = next(m for m in fast.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with forms.forced_choices(**{'inference_model.memory_format': 'contiguous'}):
        fast = inference_model(model)
        fast(x)
    assert fast.channels_last is False
    monkeypatch.setenv('MSCONV_AUTOTUNE', '0')
    fast = inference_model(model)
    fast(x)
    assert fast.channels_last == 'auto', 'with the autotuner off nothing is measured and the default layout runs'


def test_compile_path_on_a_micro_model():
    torch._dynamo.reset()
    model = msconv.create_model('test_smt').eval()
    x = _x(model)
    with torch.no_grad():
        ref = msconv.reparameterize(model)(x)
    fast = inference_model(model, compile='aot_eager', channels_last=False)
    assert _close(fast(x), ref, 1e-5)
    assert fast._compiled is not None
    assert _close(fast(x), ref, 1e-5)
    assert all(k.startswith('model.') for k in fast.state_dict()), 'the compiled module shares the weights'


@pytest.mark.slow
def test_compile_with_inductor_on_a_micro_model():
    torch._dynamo.reset()
    model = msconv.create_model('test_smt').eval()
    x = _x(model)
    with torch.no_grad():
        ref = msconv.reparameterize(model)(x)
    fast = inference_model(model, compile=True)
    assert _close(fast(x), ref, 1e-5)  # the layout is measured eagerly first
    assert _close(fast(x), ref, 1e-5)  # then compiled
    assert fast._compiled is not None


def test_any_timm_model():
    torch.manual_seed(0)
    model = timm.create_model('test_resnet').eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    out = inference_model(model)(x)
    assert _close(out, ref, 1e-5)
    fast = inference_model(model, dtype='bf16')
    assert fast.num_classes == model.num_classes and fast.pretrained_cfg == model.pretrained_cfg
    assert _close(fast(x), ref, BF16_RTOL)


@pytest.mark.parametrize(
    'kwargs,match',
    [
        (dict(dtype='int8'), "dtype must be None, one of"),
        (dict(dtype=torch.int32), 'dtype must be'),
        (dict(compile='no_such_backend'), 'compile must be True, False or a torch.compile backend name'),
        (dict(compile=3), 'compile must be'),
        (dict(channels_last='yes'), "channels_last must be True, False or 'auto'"),
        (dict(precision='mixed'), 'precision must be one of'),
        (dict(device='gpu0'), 'device must be a torch device'),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    model = msconv.create_model('test_smt')
    with pytest.raises(ValueError, match=match):
        inference_model(model, **kwargs)


def test_bad_model():
    with pytest.raises(ValueError, match='model must be a torch.nn.Module'):
        inference_model('smt_tiny')
    fast = inference_model(msconv.create_model('test_smt'))
    with pytest.raises(ValueError, match='already an InferenceModel'):
        inference_model(fast)
    assert isinstance(fast, InferenceModel)
    assert msconv.inference_model is inference_model


def test_resolve_dtype():
    assert resolve_dtype(None) is torch.float32
    assert resolve_dtype('BF16') is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
