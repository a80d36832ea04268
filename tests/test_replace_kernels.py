"""``msconv.replace_large_kernels``: shift-wise convolutions in place of the large depthwise convs of any model.

Micro timm ConvNeXts (7x7 depthwise, layer scale 1 so that every block counts) and plain torch models; the
captures reuse ``test_captures``' checks (eager against trace, script, FX, export, compile and ONNX at 1e-5).
"""

import pytest
import timm
import torch
import torch.nn as nn
from test_captures import CAPTURES, RTOL, _eager_refs, _rel, check_compile
from timm.layers import CondConv2d, Conv2dSame, MixedConv2d

import msconv
from msconv.layers import ShiftWiseConv2d, reference_forms, replace_large_kernels
from msconv.tools.export import check_onnx, export_onnx

SIZE = (3, 32, 32)


def _convnext(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    kwargs = dict(dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=10, ls_init_value=1.0), **kwargs)
    return timm.create_model('convnext_tiny', **kwargs)


def _randomize(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affines and shift-wise biases, so that folding is exercised."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, lo, hi in ((m.running_mean, -0.2, 0.2), (m.running_var, 0.5, 1.5), (m.weight, 0.5, 1.5)):
                    t.copy_(torch.empty(t.shape).uniform_(lo, hi, generator=gen))
            if isinstance(m, ShiftWiseConv2d) and m.bias is not None:
                m.bias.copy_(torch.empty(m.bias.shape).uniform_(-0.5, 0.5, generator=gen))
    return model


def _sw_layers(model: nn.Module):
    return {n: m for n, m in model.named_modules() if isinstance(m, ShiftWiseConv2d)}


def _inputs(batches=(1, 2, 3)):
    gen = torch.Generator().manual_seed(1)
    return {b: torch.randn(b, *SIZE, generator=gen) for b in batches}


def test_convnext_depthwise_convs_become_shiftwise_with_the_paper_defaults():
    model = replace_large_kernels(_convnext())
    layers = _sw_layers(model)
    assert sorted(layers) == [f'stages.{i}.blocks.0.conv_dw' for i in range(4)]
    for (_, sw), c in zip(sorted(layers.items()), (8, 16, 24, 32)):
        assert (sw.channels, sw.kernel_size, sw.small_kernel, sw.n_paths, sw.n_reps, sw.seed) == (c, 7, 3, 2, 4, 123)
        assert sw.ghost_ratio == 0.23 and sw.bias is not None and not sw.official_order
    assert not any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())
    assert model(torch.randn(2, *SIZE)).shape == (2, 10)


def test_31x31_variant_from_timm_kwargs_on_meta():
    with torch.device('meta'):
        model = timm.create_model('convnext_tiny', kernel_sizes=31)
    before = sum(p.numel() for p in model.parameters())
    replace_large_kernels(model)
    layers = _sw_layers(model)
    assert len(layers) == 18 and {m.kernel_size for m in layers.values()} == {31}
    assert all(p.device.type == 'meta' for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) < before


def test_only_large_square_depthwise_convs_are_matched():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 9, padding=4),  # dense
        nn.Conv2d(8, 8, 5, padding=2, groups=8),  # small
        nn.Conv2d(8, 16, 9, padding=4, groups=8),  # channel multiplier
        nn.Conv2d(16, 16, 9, padding=4, groups=16, bias=False),  # replaced
        nn.Conv2d(16, 16, 7, padding='same', groups=16),  # replaced
        Conv2dSame(16, 16, 8, groups=16),  # replaced: pads in forward, keeps the size
    )
    replace_large_kernels(model)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ['Conv2d', 'Conv2d', 'Conv2d', 'ShiftWiseConv2d', 'ShiftWiseConv2d', 'ShiftWiseConv2d']
    assert model[3].bias is None and model[4].bias is not None and model[5].kernel_size == 8
    assert model(torch.randn(1, 3, 20, 20)).shape == (1, 16, 20, 20)


def test_mixed_conv_parts_and_shared_modules():
    mixed = MixedConv2d(24, 24, [3, 7, 9], depthwise=True)
    replace_large_kernels(mixed)
    assert [type(m).__name__ for m in mixed.values()] == ['Conv2d', 'ShiftWiseConv2d', 'ShiftWiseConv2d']
    assert mixed(torch.randn(1, 24, 16, 16)).shape == (1, 24, 16, 16)
    conv = nn.Conv2d(8, 8, 7, padding=3, groups=8)
    shared = nn.Sequential(conv, nn.GELU(), conv)
    replace_large_kernels(shared)
    assert shared[0] is shared[2] and isinstance(shared[0], ShiftWiseConv2d)


def _official_and_dropin():
    torch.manual_seed(0)
    official = _randomize(ShiftWiseConv2d(12, 9))
    dropin = ShiftWiseConv2d(12, 9, bias=True, official_order=False)
    dropin.load_state_dict(official.state_dict(), strict=False)  # all but the bias
    with torch.no_grad():
        dropin.bias.uniform_(-0.5, 0.5)
    return official, dropin


def test_input_order_and_bias_against_the_official_order():
    """Output channel c of the drop-in is input channel c's: the official-order output gathered by input_index,
    plus the bias, in every form (reference, lean training, folded eval, deployed)."""
    x = torch.randn(2, 12, 15, 15)
    official, dropin = _official_and_dropin()  # training forms (batch statistics)
    with reference_forms():
        want = official(x)[:, dropin.input_index] + dropin.bias.view(1, -1, 1, 1)
        assert _rel(dropin(x), want) <= RTOL
    assert _rel(dropin(x), want) <= RTOL
    official, dropin = _official_and_dropin()  # eval forms (running statistics) and the deployed form
    official.eval(), dropin.eval()
    with torch.no_grad():
        want = official(x)[:, dropin.input_index] + dropin.bias.view(1, -1, 1, 1)
        assert _rel(dropin(x), want) <= RTOL
        with reference_forms():
            assert _rel(dropin(x), want) <= RTOL
        dropin.reparameterize()
        assert dropin.deployed and not dropin.official_order and dropin.bias is None
        assert _rel(dropin(x), want) <= RTOL
        with reference_forms():
            assert _rel(dropin(x), want) <= RTOL


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_dtype_device_mode_and_grad_are_kept(dtype):
    model = nn.Sequential(nn.Conv2d(16, 16, 7, padding=3, groups=16)).to(dtype).eval()
    model.requires_grad_(False)
    bias = model[0].bias.detach().clone()
    replace_large_kernels(model)
    sw = model[0]
    assert sw.weight.dtype == dtype and sw.bias.dtype == dtype and not sw.training
    assert sw.rep_index.dtype == torch.long and not any(p.requires_grad for p in sw.parameters())
    assert torch.equal(sw.bias, bias)
    assert model(torch.randn(1, 16, 9, 9, dtype=dtype)).dtype == dtype


def test_features_only_and_forward_intermediates():
    feats = replace_large_kernels(_convnext(features_only=True)).eval()
    assert len(_sw_layers(feats)) == 4
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        outs = feats(x)
    assert [tuple(o.shape[1:]) for o in outs] == [(8, 8, 8), (16, 4, 4), (24, 2, 2), (32, 1, 1)]
    model = replace_large_kernels(_convnext()).eval()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert [t.shape[1] for t in inter] == [8, 16, 24, 32]
        assert _rel(final, model.forward_features(x)) <= RTOL
    # the same weights (same seed before the replacement, which draws the shift-wise weights) give the same maps
    for a, b in zip(outs, inter):
        assert _rel(a, b) <= RTOL


@pytest.mark.parametrize('form', ['training', 'inference'])
@pytest.mark.parametrize('capture', list(CAPTURES))
def test_captures_match_eager(capture, form):
    model = _randomize(replace_large_kernels(_convnext())).eval()
    if form == 'inference':
        msconv.reparameterize(model, inplace=True)
        assert all(m.deployed for m in _sw_layers(model).values())
    xs = _inputs()
    assert CAPTURES[capture](model, xs, _eager_refs(model, xs)) <= RTOL


def test_compile_matches_eager_inference_form():
    model = msconv.reparameterize(_randomize(replace_large_kernels(_convnext())))
    xs = _inputs()
    assert check_compile(model, xs, _eager_refs(model, xs)) <= RTOL


def test_reparameterize_keeps_the_outputs():
    model = _randomize(replace_large_kernels(_convnext())).eval()
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        want = model(x)
        deployed = msconv.reparameterize(model)
        assert _rel(deployed(x), want) <= RTOL
    assert not any(hasattr(m, 'bn_h') for m in _sw_layers(deployed).values())


@pytest.mark.parametrize('exporter', ['dynamo', 'torchscript'])
def test_onnx_export_matches_eager(exporter, tmp_path):
    pytest.importorskip('onnxruntime')
    model = _randomize(replace_large_kernels(_convnext())).eval()
    path = export_onnx(model, tmp_path / 'model.onnx', SIZE, exporter=exporter)
    diffs = check_onnx(model, path, SIZE, batch_sizes=(1, 3), relative=True)
    assert max(diffs.values()) <= RTOL, diffs


def test_training_step_updates_the_shiftwise_weights_and_statistics():
    model = replace_large_kernels(_convnext())
    sw = model.stages[0].blocks[0].conv_dw
    before, stats = sw.weight.detach().clone(), sw.bn_h.running_mean.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, *SIZE)).logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in sw.parameters())
    opt.step()
    assert not torch.equal(sw.weight, before) and not torch.equal(sw.bn_h.running_mean, stats)


def test_sparsity_scheduler_prunes_the_replaced_layers():
    model = replace_large_kernels(_convnext())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = msconv.SparsityScheduler(model, target=0.3, interval=1, total_steps=10, optimizer=opt, seed=1)
    assert sorted(sched.layers) == sorted(_sw_layers(model)) and abs(sched.sparsity() - 0.3) < 0.05
    model(torch.randn(2, *SIZE)).square().mean().backward()
    opt.step()
    sched.step()
    for name, layer in sched.layers.items():
        assert (layer.weight.detach().abs().sum((-2, -1))[~sched.masks[name]] == 0).all()


@pytest.mark.parametrize(
    'conv, words',
    [
        (nn.Conv2d(8, 8, 7, stride=2, padding=3, groups=8), 'stride (2, 2)'),
        (nn.Conv2d(8, 8, 7, padding=6, dilation=2, groups=8), 'dilation (2, 2)'),
        (nn.Conv2d(8, 8, 7, padding=0, groups=8), 'changes the spatial size'),
        (nn.Conv2d(8, 8, 7, padding=3, groups=8, padding_mode='reflect'), "padding_mode 'reflect'"),
        (nn.Conv2d(8, 8, (1, 7), padding=(0, 3), groups=8), 'not square'),
        (nn.Conv2d(2, 2, 7, padding=3, groups=2), 'shift-wise channels'),
    ],
)
def test_unsupported_layers_raise_naming_the_layer_or_are_skipped(conv, words):
    model = nn.Sequential(nn.Identity(), conv)
    with pytest.raises(ValueError, match=r'cannot replace 1 \(Conv2d') as err:
        replace_large_kernels(model)
    assert words in str(err.value) and '\n' not in str(err.value)
    assert replace_large_kernels(model, on_unsupported='skip')[1] is conv


def test_condconv_is_refused():
    with pytest.raises(ValueError, match=r'cannot replace 0 \(CondConv2d.*per-sample mixtures of 4 expert kernels'):
        replace_large_kernels(nn.Sequential(CondConv2d(8, 8, 7, padding=3, groups=8)))


def test_convs_folded_by_their_parent_are_refused():
    """SMT's mixed-conv heads are merged into one kernel by the block's reparameterize: not replaceable."""
    model = msconv.create_model('test_smt')
    with pytest.raises(ValueError, match='folds its convs'):
        replace_large_kernels(model, min_kernel_size=5)


@pytest.mark.parametrize(
    'kwargs, words',
    [
        (dict(min_kernel_size=2), 'min_kernel_size must be an int >= 3'),
        (dict(min_kernel_size=7.0), 'min_kernel_size must be an int'),
        (dict(small_kernel=4), 'small_kernel must be odd'),
        (dict(ghost_ratio=1.0), 'ghost_ratio must be in [0, 1)'),
        (dict(n_paths=0), 'n_paths must be an int >= 1'),
        (dict(on_unsupported='warn'), 'on_unsupported must be one of'),
        (dict(min_kernel_size=9), 'no depthwise convolution with a kernel >= min_kernel_size=9'),
    ],
)
def test_bad_arguments(kwargs, words):
    model = _convnext()
    with pytest.raises(ValueError) as err:
        replace_large_kernels(model, **kwargs)
    assert words in str(err.value) and '\n' not in str(err.value)
    assert not _sw_layers(model)  # nothing was changed
    with pytest.raises(ValueError, match='model must be a torch.nn.Module'):
        replace_large_kernels('convnext_tiny')


def test_exported_from_msconv():
    assert msconv.replace_large_kernels is replace_large_kernels
