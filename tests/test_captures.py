"""Every registered model gives its eager numbers under every graph capture (``msconv.layers.forms``).

For each micro model (``test_*``; the full-size ``*_tiny``/``scsc_resnet50`` with ``make test-slow``), in the
training form and in the reparameterized inference form, against eager at relative error <= 1e-5:
``torch.jit.trace`` at batch 2 run at batches 1 and 3 (with and without autograd), ``torch.jit.script``,
``torch.fx.symbolic_trace`` (forward, and backward gradients), timm's ``features_only`` with ``feature_cls='fx'``,
``torch.export`` with a dynamic batch, ONNX through both exporters checked in onnxruntime at batches 1 and 3, and
``torch.compile(fullgraph=True)``. Eager runs under ``torch.no_grad()``, i.e. with the fast forms (in place, image
by image, oneDNN GEMMs, fused), once for each set of pinned forms in ``FORM_SETS`` (which together pin every
candidate of every tuned operation of ``forms.TUNED``); the captures must step aside to the plain forms and agree
with each.
"""

import warnings

import pytest
import timm
import torch

import msconv
from msconv.layers import forms
from msconv.tools.export import check_onnx, export_onnx

MICRO = msconv.list_models('test_*')
FULL = ['smt_tiny', 'scsc_swin_tiny', 'scsc_resnet50', 'shiftwise_tiny']
RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def _err(out: torch.Tensor, refs, b: int) -> float:
    """The largest relative error of a capture's output at batch ``b`` against every eager reference."""
    return max(_rel(out, ref[b]) for ref in refs)


def _model(name: str, form: str, per_image_min_pixels: int = 16):
    torch.manual_seed(0)
    model = msconv.create_model(name).eval()
    with torch.no_grad():  # non-trivial BN statistics, so that folding is exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    if form == 'inference':
        msconv.reparameterize(model, inplace=True)
    return model


def _inputs(model, batches=(1, 2, 3)):
    c, h, w = model.pretrained_cfg.get('test_input_size', model.pretrained_cfg['input_size'])
    gen = torch.Generator().manual_seed(1)
    return {b: torch.randn(b, c, h, w, generator=gen) for b in batches}


def _form_sets():
    """Sets of pinned forms for the eager references: set ``i`` pins the ``i``-th fast candidate of every tuned
    operation (its last one where it has fewer), so that every candidate of ``forms.TUNED`` runs in one of them where
    the gate allows it. The fast forms that are not tuned (folded, in place) run in all of them."""
    fast = {op: list(spec.candidates)[1:] for op, spec in forms.TUNED.items()}
    sets = max(len(names) for names in fast.values())
    return [{op: names[min(i, len(names) - 1)] for op, names in fast.items()} for i in range(sets)]


FORM_SETS = _form_sets()


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)


def _eager(model, xs, choices):
    with torch.no_grad(), forms.forced_choices(**choices):
        return {b: model(x) for b, x in xs.items()}


def _eager_refs(model, xs):
    return [_eager(model, xs, choices) for choices in FORM_SETS]


def check_trace(model, xs, refs):
    errors = {}
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            traced = torch.jit.trace(model, xs[2], check_trace=False)
        with torch.no_grad():
            errors[grad] = max(_err(traced(xs[b]), refs, b) for b in (1, 3))
    return max(errors.values())


def check_script(model, xs, refs):
    scripted = torch.jit.script(model)
    with torch.no_grad():
        return max(_err(scripted(xs[b]), refs, b) for b in (1, 3))


def check_fx(model, xs, refs):
    graph = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        err = max(_err(graph(xs[b]), refs, b) for b in (1, 3))
    # backward through the traced graph equals backward through the module (training form: every parameter)
    x = xs[2]
    graph(x).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert n in grads, f"FX backward gave no gradient for {n}"
            err = max(err, _rel(grads[n], p.grad) if p.grad.abs().max() > 0 else 0.0)
    model.zero_grad(set_to_none=True)
    return err


def check_export(model, xs, refs):
    program = torch.export.export(model, (xs[2],), dynamic_shapes=({0: torch.export.Dim('batch', max=64)},))
    module = program.module()
    with torch.no_grad():
        return max(_err(module(xs[b]), refs, b) for b in (1, 3))


def check_compile(model, xs, refs):
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    with torch.no_grad():
        return max(_err(compiled(xs[b]), refs, b) for b in (2, 3))


CAPTURES = {'trace': check_trace, 'script': check_script, 'fx': check_fx, 'export': check_export}


@pytest.mark.parametrize('form', ['training', 'inference'])
@pytest.mark.parametrize('capture', list(CAPTURES))
@pytest.mark.parametrize('name', MICRO)
def test_capture_matches_eager(name, capture, form):
    model = _model(name, form)
    xs = _inputs(model)
    assert CAPTURES[capture](model, xs, _eager_refs(model, xs)) <= RTOL


@pytest.mark.parametrize('name', MICRO)
def test_compile_matches_eager_inference_form(name):
    model = _model(name, 'inference')
    xs = _inputs(model)
    assert check_compile(model, xs, _eager_refs(model, xs)) <= RTOL


@pytest.mark.parametrize('exporter', ['dynamo', 'torchscript'])
@pytest.mark.parametrize('name', MICRO)
def test_onnx_matches_eager(name, exporter, tmp_path):
    model = _model(name, 'inference')
    size = tuple(model.pretrained_cfg.get('test_input_size', model.pretrained_cfg['input_size']))
    path = export_onnx(model, tmp_path / 'model.onnx', size, exporter=exporter)
    diffs = check_onnx(model, path, size, batch_sizes=(1, 3), relative=True)
    assert max(diffs.values()) <= RTOL, diffs


@pytest.mark.parametrize('name', MICRO)
def test_features_only_fx_matches_getter(name):
    torch.manual_seed(0)
    fx_net = timm.create_model(name, features_only=True, feature_cls='fx').eval()
    torch.manual_seed(0)  # the same initial weights
    getter = msconv.create_model(name, features_only=True).eval()
    xs = _inputs(getter, (2,))
    with torch.no_grad():
        got, ref = fx_net(xs[2]), getter(xs[2])
    got = list(got.values()) if isinstance(got, dict) else list(got)
    if msconv.model_family(name) == 'smt':  # FX taps the stage modules as they are: SMT stages carry NHWC tokens
        got = [t.permute(0, 3, 1, 2) for t in got]
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert _rel(a, b) <= RTOL


def test_capture_predicate_steps_aside():
    """The one predicate: fast forms under eager no-grad; only folded forms under a capture; none in reference_forms."""
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        assert forms.use_fast_form('inplace', x) and forms.use_fast_form('per_image', x)
        assert not forms.use_fast_form('per_image', x[:1])  # one image: nothing to split
        with forms.reference_forms():
            assert not forms.use_fast_form('folded', x) and not forms.use_fast_form('inplace', x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert not forms.use_fast_form('inplace', x) and not forms.use_fast_form('onednn', x)
    assert not forms.use_fast_form('inplace', x)  # autograd on
    with torch.no_grad():  # the input's memory layout, where a form reads it so
        assert not forms.use_fast_form('inplace', x, layout='channels_last')
        assert forms.use_fast_form('inplace', x.contiguous(memory_format=torch.channels_last), layout='channels_last')
        assert forms.tunable('stem_conv', x) and not forms.tunable('stem_conv', x.transpose(2, 3))
    seen = {}

    def probe(t):
        seen['folded'] = forms.use_fast_form('folded', t)
        seen['others'] = any(forms.use_fast_form(k, t) for k in forms.FORMS if k != 'folded')
        seen['others'] |= any(forms.tunable(op, t) for op in forms.TUNED)
        return t + 1

    with torch.no_grad():
        torch.jit.trace(probe, x, check_trace=False)
    assert seen == {'folded': True, 'others': False}
    seen.clear()
    torch.fx.symbolic_trace(probe)
    assert seen == {'folded': True, 'others': False}
    with pytest.raises(ValueError, match='form must be one of'):
        forms.use_fast_form('fastest', x)


@pytest.mark.slow
@pytest.mark.parametrize('capture', ['trace', 'script', 'fx', 'export', 'onnx-dynamo', 'onnx-torchscript', 'compile'])
@pytest.mark.parametrize('name', FULL)
def test_full_size_capture_matches_eager(name, capture, tmp_path):
    model = _model(name, 'inference')
    xs = _inputs(model)
    refs = [_eager(model, xs, {})]  # the forms the autotuner picks on this machine
    if capture.startswith('onnx'):
        size = tuple(xs[1].shape[1:])
        path = export_onnx(model, tmp_path / 'model.onnx', size, exporter=capture.split('-')[1])
        err = max(check_onnx(model, path, size, batch_sizes=(1, 3), relative=True).values())
    elif capture == 'compile':
        err = check_compile(model, xs, refs)
    else:
        err = CAPTURES[capture](model, xs, refs)
    assert err <= RTOL
