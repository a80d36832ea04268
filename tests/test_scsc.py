"""SCSC: parity with the official fixtures, both routings, folding, sizes, counts."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
from conftest import load_fixture, max_abs, official_state_dict, onednn_enabled, randomize_bn
from torch.utils.flop_counter import FlopCounterMode

import msconv
from msconv.layers import CrossScaleBottleneck, SpatialCrossScaleConv, forms
from msconv.models.scsc_resnet import CrossScaleResNet
from msconv.models.scsc_swin import CrossScaleSwin

EVAL_TOL = 1e-5
TRAIN_TOL = 1e-4


def _nhwc_to_nchw(x):
    return x.permute(0, 3, 1, 2)


def _raw(name):
    """Fixture tensors without the float32 cast (for the float64 references)."""
    from conftest import FIXTURES
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / 'scsc' / f'{name}.safetensors'))


def _save_official(tmp_path, tensors, name):
    from safetensors.torch import save_file

    path = tmp_path / f'{name}.safetensors'
    save_file({k: v.contiguous() for k, v in official_state_dict(tensors).items()}, str(path))
    return path


# ------------------------------------------------------------------ module fixtures


def _scsc_block(routing='official'):
    t, _ = load_fixture('scsc', 'scsc_block')
    m = SpatialCrossScaleConv(48, (3, 7, 11), groups=4, routing=routing)
    m.load_state_dict(msconv.convert_official(official_state_dict(t), 'scsc'))
    return m, t


def test_scsc_block_eval_matches_official():
    m, t = _scsc_block()
    m.eval()
    x = _nhwc_to_nchw(t['input'])
    with torch.no_grad():
        y = m(x)
        assert max_abs(y, _nhwc_to_nchw(t['output'])) <= EVAL_TOL
        # the routed tensor itself (input of the recovery 1x1). The plain form calls the `recover` module; a fast
        # form the autotuner may pick on this machine (the 1x1 as a GEMM) uses its weights without calling it.
        seen = {}
        h = m.recover.register_forward_pre_hook(lambda mod, inp: seen.update(routed=inp[0]))
        with forms.reference_forms():
            m(x)
        h.remove()
        assert max_abs(seen['routed'], t['intermediate.routed']) <= EVAL_TOL
        m.reparameterize()
        assert max_abs(m(x), _nhwc_to_nchw(t['output'])) <= EVAL_TOL
        assert not any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())


def test_scsc_block_fp64_matches_official_fp64():
    m, t = _scsc_block()
    m = m.double().eval()
    with torch.no_grad():
        y = m(_nhwc_to_nchw(t['input']).double())
    raw = _raw('scsc_block')
    assert raw['output_fp64'].dtype == torch.float64
    assert (y - _nhwc_to_nchw(raw['output_fp64'])).abs().max().item() <= 1e-10


def test_scsc_block_train_output_grads_and_running_stats():
    t, meta = load_fixture('scsc', 'scsc_block_train')
    m = SpatialCrossScaleConv(48, (3, 7, 11), groups=4)
    m.load_state_dict(msconv.convert_official(official_state_dict(t), 'scsc'))
    m.train()
    x = _nhwc_to_nchw(t['input']).clone().requires_grad_()
    y = m(x)
    assert max_abs(y, _nhwc_to_nchw(t['output'])) <= TRAIN_TOL
    (y * _nhwc_to_nchw(t['upstream'])).sum().backward()
    assert max_abs(x.grad, _nhwc_to_nchw(t['grad.input'])) <= TRAIN_TOL
    ref_grads = msconv.convert_official(
        {k[len('grad.') :]: v for k, v in t.items() if k.startswith('grad.') and k != 'grad.input'}, 'scsc'
    )
    params = dict(m.named_parameters())
    assert set(ref_grads) == set(params)
    for k, g in ref_grads.items():
        assert max_abs(params[k].grad, g) <= TRAIN_TOL, k
    after_official = dict(official_state_dict(t))  # the full official dict, so the module is recognised
    after_official.update({k[len('state_dict_after.') :]: v for k, v in t.items() if k.startswith('state_dict_after.')})
    after = {k: v for k, v in msconv.convert_official(after_official, 'scsc').items() if 'running' in k}
    assert len(after) == 6
    buffers = dict(m.named_buffers())
    for k, v in after.items():
        if v.is_floating_point():
            assert max_abs(buffers[k], v) <= EVAL_TOL, k


def test_cnn_block_stride2_matches_official():
    t, _ = load_fixture('scsc', 'cbt_block_s2')
    m = CrossScaleBottleneck(36, 48, (3, 5, 7), groups=4, stride=2)
    m.load_state_dict(msconv.convert_official(official_state_dict(t), 'scsc'))
    m.eval()
    with torch.no_grad():
        assert max_abs(m(t['input']), t['output']) <= EVAL_TOL
        assert max_abs(m.shortcut(t['input']), t['intermediate.identity']) <= EVAL_TOL
        m.reparameterize()
        assert max_abs(m(t['input']), t['output']) <= EVAL_TOL


# ------------------------------------------------------------------ model fixtures (load through create_model)


def test_swin_micro_matches_official_via_checkpoint_path(tmp_path, gemm):
    t, _ = load_fixture('scsc', 'scsc_swin_micro')
    path = _save_official(tmp_path, t, 'scsc_swin_micro')
    model = msconv.create_model('test_scsc_swin', checkpoint_path=path).eval()
    timm_model = timm.create_model('test_scsc_swin', checkpoint_path=str(path)).eval()
    with torch.no_grad():
        y = model(t['input'])
        assert max_abs(y, t['logits']) <= EVAL_TOL
        assert max_abs(timm_model(t['input']), t['logits']) <= EVAL_TOL
        feats = model.forward_head(model.forward_features(t['input']), pre_logits=True)
        assert max_abs(feats, t['features']) <= EVAL_TOL
        _, inter = model.forward_intermediates(t['input'])
        # official stage 0 output is after its patch merging = our stage 1 downsample applied to our stage 0 output
        ref0 = t['intermediate.layers.0'].reshape(1, 8, 8, 48).permute(0, 3, 1, 2)  # tokens (h, w) row-major
        assert max_abs(model.stages[1].downsample(inter[0]), ref0) <= EVAL_TOL
        model.reparameterize()
        assert max_abs(model(t['input']), t['logits']) <= EVAL_TOL


def test_cbtnet_micro_matches_official_via_checkpoint_path(tmp_path):
    t, _ = load_fixture('scsc', 'cbtnet_micro')
    path = _save_official(tmp_path, t, 'cbtnet_micro')
    kw = dict(depths=(1, 1, 1, 1), stem_width=48, widths=(144, 288, 576, 768), num_classes=10)
    model = msconv.create_model('test_scsc_resnet', checkpoint_path=path, **kw).eval()
    with torch.no_grad():
        assert max_abs(model(t['input']), t['logits']) <= EVAL_TOL
        _, inter = model.forward_intermediates(t['input'])
        for i in range(4):
            assert max_abs(inter[i], t[f'intermediate.layer{i + 1}']) <= EVAL_TOL
        model.reparameterize()
        assert max_abs(model(t['input']), t['logits']) <= EVAL_TOL
    feats = msconv.create_model('test_scsc_resnet', checkpoint_path=path, features_only=True, **kw).eval()
    with torch.no_grad():
        assert max_abs(feats(t['input'])[3], t['intermediate.layer4']) <= EVAL_TOL


def test_models_fp64_match_official_fp64():
    for name, fixture, kw in [
        ('test_scsc_swin', 'scsc_swin_micro', {}),
        ('test_scsc_resnet', 'cbtnet_micro', dict(depths=(1, 1, 1, 1), stem_width=48, widths=(144, 288, 576, 768))),
    ]:
        raw = _raw(fixture)
        model = msconv.create_model(name, num_classes=10, **kw)
        model.load_state_dict(official_state_dict(raw))
        model = model.double().eval()
        with torch.no_grad():
            y = model(raw['input'].double())
        assert (y - raw['logits_fp64']).abs().max().item() <= 1e-10, name


def test_converter_is_identity_on_msconv_state_dicts():
    for name in msconv.list_models('test_*', family='scsc'):
        sd = msconv.create_model(name).state_dict()
        conv = msconv.convert_official(sd, 'scsc')
        assert list(conv) == list(sd), name
        assert all(conv[k] is sd[k] for k in sd), name


# ------------------------------------------------------------------ routings


def _naive_route(feats, gate, m, groups, cp, routing):
    """Per-channel loops straight from the formulas in the module docstring."""
    out = torch.zeros(feats.shape[0], cp, *feats.shape[2:], dtype=feats.dtype)
    for q in range(cp):
        g = q // (cp // groups)
        for j in range(m):
            src = q * m + j if routing == 'official' else j * cp + q
            out[:, q] += gate[:, j * groups + g] * feats[:, src]
    return out


@pytest.mark.parametrize('routing', ['official', 'cross_scale'])
@pytest.mark.parametrize('ks', [(3, 7, 11), (3, 5)])
def test_routing_matches_naive_formula(routing, ks):
    torch.manual_seed(0)
    dim = 48
    mod = SpatialCrossScaleConv(dim, ks, groups=4, routing=routing)
    cp, m = dim // len(ks), len(ks)
    feats, gate = torch.randn(2, m * cp, 5, 6), torch.rand(2, m * 4, 5, 6)
    ref = _naive_route(feats, gate, m, 4, cp, routing)
    assert max_abs(mod.route(feats, gate), ref) <= 1e-6


def test_routings_differ_but_share_parameters_and_cost():
    torch.manual_seed(0)
    a = SpatialCrossScaleConv(48, (3, 7, 11), routing='official').eval()
    b = SpatialCrossScaleConv(48, (3, 7, 11), routing='cross_scale').eval()
    b.load_state_dict(a.state_dict())
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    x = torch.randn(1, 48, 14, 14)
    with torch.no_grad(), FlopCounterMode(display=False) as fa:
        ya = a(x)
    with torch.no_grad(), FlopCounterMode(display=False) as fb:
        yb = b(x)
    assert fa.get_total_flops() == fb.get_total_flops()
    assert max_abs(ya, yb) > 1e-3  # a different channel pairing gives a different function


def test_cross_scale_routing_model_reparameterizes():
    torch.manual_seed(0)
    model = msconv.create_model('test_scsc_swin', routing='cross_scale').eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        assert max_abs(model.reparameterize()(x), ref) <= EVAL_TOL


def test_layer_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match='groups'):
        SpatialCrossScaleConv(40, (3, 5, 7), groups=4)  # cp = 13
    with pytest.raises(ValueError, match='kernel_sizes'):
        SpatialCrossScaleConv(48, (3, 4))
    with pytest.raises(ValueError, match='routing'):
        SpatialCrossScaleConv(48, routing='nope')
    with pytest.raises(ValueError, match='stride'):
        CrossScaleBottleneck(48, 48, stride=3)
    with pytest.raises(ValueError, match='kernel_sizes'):
        CrossScaleSwin(depths=(2, 2), kernel_sizes=((3,),))
    with pytest.raises(ValueError, match='widths, depths and kernel_sizes'):
        CrossScaleResNet(depths=(1, 1, 1))


# ------------------------------------------------------------------ whole-model folding, compile, sizes, counts


@pytest.mark.parametrize('name', ['test_scsc_swin', 'test_scsc_resnet', 'test_scsc_faceresnet', 'test_face_iresnet'])
def test_reparameterize_keeps_outputs(name):
    torch.manual_seed(0)
    model = msconv.create_model(name).eval()
    randomize_bn(model)
    x = torch.randn(2, *model.pretrained_cfg['test_input_size'])
    with torch.no_grad():
        ref = model(x)
        out = model.reparameterize()(x)
    assert max_abs(out, ref) <= EVAL_TOL * max(1.0, ref.abs().max().item())


def test_reparameterized_model_compiles_fullgraph():
    torch._dynamo.reset()
    model = msconv.create_model('test_scsc_resnet').eval().reparameterize()
    x = torch.randn(1, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    with torch.no_grad():
        assert max_abs(compiled(x), model(x)) <= EVAL_TOL


@pytest.mark.parametrize('size', [224, 160, 128, 112, 100, 33])
def test_scsc_resnet_runs_at_any_size_surviving_the_stride(size):
    with torch.device('meta'):
        model = msconv.create_model('scsc_resnet50').eval()
        out = model.forward_features(torch.empty(1, 3, size, size))
    side = size
    for _ in range(5):
        side = -(-side // 2)
    assert tuple(out.shape) == (1, 1536, side, side)


def test_tiny_resnet_odd_sizes_numerically():
    """At sizes whose stage resolutions become odd (each stride-2 stage rounds up), the inference forms with every
    tuned form pinned fast (stride-2 1x1 convs as GEMMs on the subsampled map, the im2col stem, the fused conv+GELU
    once reparameterized) give the plain forms' numbers, and the stages have ceil(size / 2**k) sides."""
    torch.manual_seed(0)
    model = msconv.create_model('test_scsc_resnet').eval()
    randomize_bn(model)
    pins = dict(pointwise_conv='gemm', stem_conv='im2col', conv_gelu='fused')
    for net in (model, msconv.reparameterize(model)):
        for size in (112, 100, 37):
            x = torch.randn(2, 3, size, size)
            with torch.no_grad():
                with forms.reference_forms():
                    ref = net(x)
                    sides = [f.shape[-1] for f in net.forward_intermediates(x, intermediates_only=True)]
                with forms.forced_choices(**pins):
                    out = net(x)
            assert sides == [-(-size // 2**k) for k in (2, 3, 4, 5)]
            assert out.shape == (2, 10) and max_abs(out, ref) <= EVAL_TOL * max(1.0, ref.abs().max().item())


PARAMS = {
    'scsc_swin_tiny': 21_943_176,
    'scsc_swin_small': 37_773_192,
    'scsc_resnet50': 25_567_816,
    'scsc_resnet101': 37_283_080,
    'scsc_resnet152': 52_693_384,
    'scsc_faceresnet': 9_212_272,
    'face_iresnet50': 43_590_848,
}


@pytest.mark.parametrize('name', sorted(PARAMS))
def test_parameter_counts(name):
    with torch.device('meta'):
        model = msconv.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def _macs(name: str) -> float:
    with torch.device('meta'):
        model = msconv.create_model(name).eval()
        x = torch.empty(1, *model.pretrained_cfg['input_size'])
        with FlopCounterMode(display=False) as counter:
            model(x)
    return counter.get_total_flops() / 2  # FlopCounterMode counts 2 flops per multiply-add


def test_macs():
    # conv + linear + matmul MACs (the routing is an elementwise multiply-add: not counted, as in the reference)
    assert _macs('scsc_swin_tiny') == pytest.approx(3.303e9, rel=2e-3)
    assert _macs('scsc_resnet50') == pytest.approx(4.557e9, rel=2e-3)


def test_face_claim_ratios():
    """The abstract: FaceResNet + SCSC has 79% fewer params and 68% fewer FLOPs than FaceResNet."""
    assert 1 - PARAMS['scsc_faceresnet'] / PARAMS['face_iresnet50'] == pytest.approx(0.79, abs=0.01)
    assert 1 - _macs('scsc_faceresnet') / _macs('face_iresnet50') == pytest.approx(0.68, abs=0.01)


# ------------------------------------------------------------------ in-place inference forms against the plain forms


@pytest.mark.parametrize('onednn', [True, False])  # the per-image MLP through oneDNN convs, or BLAS GEMMs
@pytest.mark.parametrize('folded', [False, True])
def test_inplace_inference_forms_match_plain_forms(folded, onednn):
    from msconv.layers import forms

    mlp = 'per_image_onednn' if onednn else 'per_image_gemm'  # the per-image MLP forms, whatever is fastest here
    with onednn_enabled(onednn), forms.forced_choices(scsc_swin_block=mlp, pointwise_conv='gemm'):
        _check_inplace_inference_forms(folded)


def _check_inplace_inference_forms(folded):
    from msconv.models.scsc_swin import CrossScaleSwinBlock

    torch.manual_seed(0)
    swin = CrossScaleSwinBlock(24, (3, 5), groups=2).eval()
    cnn = CrossScaleBottleneck(24, 36, (3, 5), groups=2, stride=2).eval()
    for m in (swin, cnn):
        randomize_bn(m)
        if folded:
            m.reparameterize()
    x_big = torch.randn(1, 24, 56, 56)  # large enough for the GEMM form of the 1x1 convs
    x = torch.randn(2, 24, 9, 9)
    for m in (swin, cnn):
        with torch.no_grad():
            with forms.reference_forms():  # the mixer inside the block's forward_reference has fast forms too
                ref = m.forward_reference(x)
            x_in = x.clone()
            out = m(x_in)
        assert out.data_ptr() != x_in.data_ptr()
        assert torch.equal(x_in, x)  # the caller's tensor is never written
        assert max_abs(out, ref) <= EVAL_TOL
        with torch.inference_mode():
            assert max_abs(m(x), ref) <= EVAL_TOL
        assert max_abs(m(x), ref) <= EVAL_TOL  # grad enabled: the plain form runs
        with torch.no_grad():
            with forms.reference_forms():
                ref = swin.forward_reference(x_big)
            assert max_abs(swin(x_big), ref) <= EVAL_TOL * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize('routing', ['official', 'cross_scale'])
def test_fast_routing_matches_plain_routing(routing):
    torch.manual_seed(0)
    m = SpatialCrossScaleConv(24, (3, 5, 7), groups=2, routing=routing)
    feats, gate = torch.randn(2, 24, 5, 6), torch.rand(2, 6, 5, 6)
    assert max_abs(m.route_fast(feats, gate), m.route(feats, gate)) <= 1e-6


BF16_ULP = 2.0**-8  # bf16 keeps 8 significant bits: one rounding moves a value by at most half of this, relatively


@pytest.mark.parametrize('tokens', [False, True])
@pytest.mark.parametrize('routing', ['official', 'cross_scale'])
def test_bf16_routing_forms_are_within_bf16_rounding_of_the_exact_sum(routing, tokens):
    """The two forms of ``scsc_routing`` on bf16 features and gates, against the exact gated sum of the same bf16
    inputs (float64, rounded once to bf16): ``fp32_tail`` accumulates in fp32 and rounds once, so it is that
    rounding (the float64 result rounded to bf16, up to fp32's own error: one bf16 ulp at most, nearly always equal);
    the plain form rounds each of its m - 1 partial sums and products as well, so it may sit m bf16 roundings away
    (half an ulp of the running sum each), as the plain form in bf16 does. Both computed the same routed channels."""
    torch.manual_seed(0)
    m = SpatialCrossScaleConv(48, (3, 5, 7), groups=4, routing=routing)
    feats = torch.randn(2, 48, 9, 10).to(torch.bfloat16)
    gate = torch.rand(2, 12, 9, 10).to(torch.bfloat16)
    exact = m.route(feats.double(), gate.double())  # (2, 16, 9, 10)
    f_in, g_in = feats, gate
    if tokens:  # (B, H, W, C) views of channels-last maps, as the token form passes them
        f_in = feats.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        g_in = gate.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    outs = {}
    with torch.no_grad():
        for form in ('plain', 'fp32_tail'):
            with forms.forced_choices(scsc_routing=form):
                out = m._routed(f_in, g_in, tokens=tokens)
            assert out.dtype == torch.bfloat16
            outs[form] = out.reshape(2, 9, 10, 16).permute(0, 3, 1, 2) if tokens else out.reshape(2, 16, 9, 10)
    rounded_once = exact.to(torch.bfloat16).double()
    tail_err = (outs['fp32_tail'].double() - rounded_once).abs()
    assert (tail_err <= BF16_ULP * exact.abs()).all()
    assert (tail_err == 0).float().mean() > 0.95
    # the plain form: m roundings (the first product, then each accumulate), each within half an ulp of the running
    # sum, which stays below m * max|feats| (gates in [0, 1])
    bound = 3 * (3 * feats.abs().max().item()) * BF16_ULP / 2
    assert (outs['plain'].double() - exact).abs().max() <= bound
    assert forms.tunable('scsc_routing', f_in) == forms.use_fast_form('fp32_tail', f_in)


def test_routing_forms_of_fp32_inputs_are_the_plain_one():
    """``fp32_tail`` is a bf16/fp16 form: fp32 features are not even offered to the tuner."""
    m = SpatialCrossScaleConv(24, (3, 5), groups=2)
    with torch.no_grad():
        assert not forms.tunable('scsc_routing', torch.randn(1, 24, 4, 4))
        assert forms.tunable('scsc_routing', torch.randn(1, 24, 4, 4).bfloat16())
    assert not forms.tunable('scsc_routing', torch.randn(1, 24, 4, 4).bfloat16())  # autograd on
    assert m.route_fast(torch.randn(1, 24, 3, 3), torch.rand(1, 4, 3, 3)).dtype == torch.float32


@pytest.mark.parametrize('stride,size,bias', [(1, 56, True), (2, 112, False), (2, 113, True)])
def test_pointwise_conv_gemm_form_matches_conv(stride, size, bias):
    from msconv.layers.fast_ops import pointwise_conv

    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 1, stride=stride, bias=bias)
    x = torch.randn(2, 16, size, size)
    with torch.no_grad():
        ref = conv(x)
        out = pointwise_conv(conv, x)
    assert out.shape == ref.shape
    assert max_abs(out, ref) <= EVAL_TOL


@pytest.mark.parametrize('stride,size,folded', [(2, 33, False), (2, 32, True), (1, 17, True)])
def test_conv_stem_im2col_inference_matches_conv(stride, size, folded):
    from msconv.models.scsc_resnet import ConvStem

    torch.manual_seed(0)
    stem = ConvStem(3, 16, stride=stride).eval()
    randomize_bn(stem)
    if folded:
        stem.reparameterize()  # the folded conv has a bias, the plain one none
    x = torch.randn(2, 3, size, size)
    ref = stem(x).detach()  # autograd on: the nn.Conv2d
    with torch.no_grad():
        out = stem(x)
    assert out.shape == ref.shape and max_abs(out, ref) <= 1e-5


# ------------------------------------------------------------------ conv + GELU fused (oneDNN post-op), token form


def _fused_ok():
    from msconv.layers import forms

    return forms.use_fast_form('fused', torch.zeros(1)) if not torch.is_grad_enabled() else False


@pytest.mark.parametrize('form', ['plain', 'fused'])
@pytest.mark.parametrize(
    'kernel,stride,groups,bias', [(1, 1, 1, True), (1, 2, 1, False), (7, 1, 16, True), (5, 2, 16, True)]
)
@pytest.mark.parametrize('channels_last', [False, True])
def test_conv_gelu_forms_match_conv_then_gelu(form, kernel, stride, groups, bias, channels_last):
    from msconv.layers import forms
    from msconv.layers.fast_ops import conv_gelu

    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16 if groups > 1 else 24, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=bias)
    x = torch.randn(2, 16, 15, 13)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = nn.functional.gelu(conv(x))
        if form == 'fused' and not _fused_ok():
            pytest.skip('no oneDNN here: the fused form is not allowed')
        with forms.forced_choices(conv_gelu=form):
            out = conv_gelu(conv, x)
    assert out.shape == ref.shape
    assert max_abs(out, ref) <= EVAL_TOL * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize('form', ['plain', 'fused'])
@pytest.mark.parametrize('routing', ['official', 'cross_scale'])
@pytest.mark.parametrize('in_dim,out_dim,stride', [(24, 24, 1), (24, 36, 2), (36, 36, 2)])
def test_channels_last_token_form_matches_reference(form, routing, in_dim, out_dim, stride, monkeypatch):
    """A reparameterized SCSC block given a channels-last input runs its token form: same result as the plain
    form within the eval tolerance, channels-last output, the caller's tensor untouched."""
    from msconv.layers import forms

    torch.manual_seed(0)
    block = CrossScaleBottleneck(in_dim, out_dim, (3, 5, 7), groups=2, stride=stride, routing=routing).eval()
    mixer = SpatialCrossScaleConv(in_dim, (3, 5), groups=2, routing=routing).eval()
    calls = []
    original = SpatialCrossScaleConv._forward_tokens
    monkeypatch.setattr(SpatialCrossScaleConv, '_forward_tokens', lambda self, x: calls.append(1) or original(self, x))
    for m in (block, mixer):
        randomize_bn(m)
        m.reparameterize()
        x = torch.randn(2, in_dim, 11, 10)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            ref = m.forward_reference(x)
            if form == 'fused' and not _fused_ok():
                pytest.skip('no oneDNN here: the fused form is not allowed')
            with forms.forced_choices(conv_gelu=form):
                out = m(x_cl)
        assert calls, 'the token form did not run'
        calls.clear()
        assert torch.equal(x_cl, x)
        assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
        assert max_abs(out, ref) <= EVAL_TOL * max(1.0, ref.abs().max().item())


def test_fresh_face_iresnet50_is_well_scaled_so_every_stem_form_meets_the_contract():
    """timm's contract compares an FX graph (the plain forms) with eager (the forms the autotuner picked: on an
    Intel Xeon with AMX the im2col stem) elementwise at rtol 1e-4, atol 1e-5. With insightface's init (every conv
    N(0, 0.1), nothing at zero) a fresh model's eval output is ~1e26 and the stem forms' rounding differences failed
    ~1% of the 512 outputs; with the residual branches starting at zero it is O(1) and every form passes."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 112, 112)
    with torch.inference_mode():
        insightface = msconv.create_model('face_iresnet50', zero_init_last=False).eval()
        assert insightface(x).abs().max() > 1e20  # the explosion in eval the default init avoids
        del insightface
        model = msconv.create_model('face_iresnet50').eval()
        graph = torch.fx.symbolic_trace(model)(x)
        assert graph.abs().max() < 10
        for form in forms.TUNED['stem_conv'].candidates:
            with forms.forced_choices(stem_conv=form):
                torch.testing.assert_close(graph, model(x), rtol=1e-4, atol=1e-5)
