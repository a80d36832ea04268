"""SMT parity with the official implementation (../shared/fixtures/smt) and its layers."""

from __future__ import annotations

import json
import pickle
import warnings

import pytest
import timm
import torch
import torch.nn as nn
from conftest import FIXTURES, load_fixture, max_abs, official_state_dict
from safetensors.torch import save_file

import msconv
from msconv.layers import MultiHeadMixedConv, ScaleAwareModulation
from msconv.models.smt import SMT, Block

EVAL_FIXTURES = ['smt_micro', 'smt_micro_ls_k7', 'smt_micro_eps']


def _our_key(official_key: str) -> str:
    """Our name for an official whole-model key (all keys the fixtures name are recognisably model-level)."""
    return next(iter(msconv.convert_official({official_key: torch.empty(0)}, 'smt')))


@pytest.mark.parametrize('name', EVAL_FIXTURES)
def test_eval_logits_and_stage_features_match_official(name, tmp_path, gemm):
    t, meta = load_fixture('smt', name)
    ckpt = tmp_path / 'official.pth'
    torch.save({'model': official_state_dict(t), 'epoch': 300}, ckpt)
    model = msconv.create_model('smt_tiny', checkpoint_path=ckpt, **meta['constructor_kwargs']).eval()
    with torch.no_grad():
        logits = model(t['input'])
        feats = model.forward_intermediates(t['input'], intermediates_only=True)
    assert max_abs(logits, t['logits']) <= meta['atol']
    for i, f in enumerate(feats):
        assert max_abs(f, t[f'features.{i + 1}']) <= meta['atol'], f'stage {i + 1}'


def test_features_only_through_create_model_match_official(tmp_path):
    t, meta = load_fixture('smt', 'smt_micro')
    ckpt = tmp_path / 'official.safetensors'
    save_file(official_state_dict(t), str(ckpt))  # a bare official state dict as safetensors
    backbone = msconv.create_model(
        'smt_tiny',
        checkpoint_path=ckpt,
        features_only=True,
        out_indices=(1, 2, 3),
        **meta['constructor_kwargs'],
    ).eval()
    with torch.no_grad():
        feats = backbone(t['input'])
    assert backbone.feature_info.channels() == [32, 64, 128]
    for f, i in zip(feats, (2, 3, 4)):
        assert max_abs(f, t[f'features.{i}']) <= meta['atol']


def test_train_step_loss_grads_and_bn_stats_match_official(gemm):
    t, meta = load_fixture('smt', 'smt_micro_train_step')
    kwargs = dict(meta['constructor_kwargs'])
    model = SMT(**kwargs)
    model.load_state_dict(official_state_dict(t))
    model.train()
    logits = model(t['input'])
    loss = nn.CrossEntropyLoss()(logits, t['targets'])
    loss.backward()
    atol = 1e-4
    assert max_abs(logits, t['logits']) <= atol
    assert abs(loss.item() - t['loss'].item()) <= atol
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    grads = [k for k in t if k.startswith('grad.')]
    afters = [k for k in t if k.startswith('after.')]
    assert grads and afters
    strict = meta.get('strict_atol_per_tensor', {})
    for k in grads:
        ours = _our_key(k[len('grad.') :])
        tol = min(atol, strict.get(k, atol)) if isinstance(strict, dict) else atol
        assert max_abs(params[ours].grad, t[k]) <= tol, k
    for k in afters:
        ours = _our_key(k[len('after.') :])
        assert max_abs(buffers[ours].double(), t[k].double()) <= atol, k


@pytest.mark.parametrize('variant,name', [('t', 'smt_tiny'), ('s', 'smt_small'), ('b', 'smt_base'), ('l', 'smt_large')])
def test_official_key_manifest_converts_exactly(variant, name):
    manifest = json.loads((FIXTURES / 'smt' / f'keys_smt_{variant}.json').read_text())
    official = {k: torch.empty(shape, device='meta') for k, shape, _ in manifest['keys']}
    with torch.device('meta'):
        model = msconv.create_model(name)
    converted = msconv.convert_official(official, 'smt')
    ours = model.state_dict()
    assert set(converted) == set(ours), set(converted) ^ set(ours)
    assert all(tuple(converted[k].shape) == tuple(ours[k].shape) for k in ours)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == manifest['num_params']


@pytest.mark.parametrize(
    'name,millions',
    [
        ('smt_tiny', 11.51),
        ('smt_small', 22.55),
        ('smt_base', 32.04),
        ('smt_large', 80.62),
    ],
)
def test_parameter_counts(name, millions):
    with torch.device('meta'):
        model = msconv.create_model(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions


def test_stage3_alternates_sam_and_msa_and_layerscale_only_for_large():
    with torch.device('meta'):
        model = msconv.create_model('smt_small')
        large = msconv.create_model('smt_large')
    kinds = [[type(b.attn).__name__ for b in s.blocks] for s in model.stages]
    assert set(kinds[0]) == set(kinds[1]) == {'ScaleAwareModulation'}
    assert kinds[2] == ['ScaleAwareModulation', 'Attention'] * 9
    assert set(kinds[3]) == {'Attention'}
    assert not any('ls1' in k for k in model.state_dict())
    assert any(k.endswith('ls1.gamma') for k in large.state_dict())


def test_dw_conv_alias_and_timm_create_model_checkpoint_path(tmp_path):
    t, meta = load_fixture('smt', 'smt_micro')
    sd = {k.replace('attn.local_conv.', 'attn.dw_conv.'): v for k, v in official_state_dict(t).items()}
    assert any('dw_conv' in k for k in sd)
    ckpt = tmp_path / 'det.pth'
    torch.save({'state_dict': sd}, ckpt)
    model = timm.create_model('smt_tiny', checkpoint_path=str(ckpt), **meta['constructor_kwargs']).eval()
    with torch.no_grad():
        assert max_abs(model(t['input']), t['logits']) <= 1e-5


def test_classifier_of_another_size_is_dropped_with_warning(tmp_path):
    t, meta = load_fixture('smt', 'smt_micro')
    ckpt = tmp_path / 'official.pth'
    torch.save({'model': official_state_dict(t)}, ckpt)
    kwargs = dict(meta['constructor_kwargs'], num_classes=3)
    with pytest.warns(UserWarning, match='classifier'):
        model = msconv.create_model('smt_tiny', checkpoint_path=ckpt, **kwargs).eval()
    ref = msconv.create_model('smt_tiny', checkpoint_path=ckpt, **meta['constructor_kwargs']).eval()
    with torch.no_grad():
        assert torch.allclose(model.forward_features(t['input']), ref.forward_features(t['input']))
    assert model(t['input']).shape == (2, 3)


def test_class_map_selects_classifier_rows_like_the_official_22k_to_1k_loader(tmp_path):
    """A checkpoint with a larger head (standing in for SMT-L's 21841-class 22K head) loaded as a smaller model
    with ``class_map``: the logits are the checkpoint model's logits at the mapped classes."""
    t, meta = load_fixture('smt', 'smt_micro')
    sd = official_state_dict(t)
    n = sd['head.weight'].shape[0]
    ckpt = tmp_path / 'official.pth'
    torch.save({'model': sd}, ckpt)
    rows = [n - 1, 0, 3]
    (tmp_path / 'map.txt').write_text(''.join(f'{i}\n' for i in rows) + '\n')
    kwargs = dict(meta['constructor_kwargs'], num_classes=3)
    full = msconv.create_model('smt_tiny', checkpoint_path=ckpt, **meta['constructor_kwargs']).eval()
    for class_map in (rows, tmp_path / 'map.txt'):
        with warnings.catch_warnings():
            warnings.simplefilter('error')  # nothing is dropped
            model = msconv.create_model('smt_tiny', checkpoint_path=ckpt, class_map=class_map, **kwargs).eval()
        with torch.no_grad():
            assert max_abs(model(t['input']), full(t['input'])[:, rows]) < 1e-6
    with pytest.raises(ValueError, match=r'class_map: indices must lie in \[0, '):
        msconv.create_model('smt_tiny', checkpoint_path=ckpt, class_map=[0, n], **kwargs)
    with pytest.raises(ValueError, match='class_map'):
        msconv.create_model('smt_tiny', class_map=rows, **kwargs)
    (tmp_path / 'bad.txt').write_text('1\nx\n')
    with pytest.raises(ValueError, match='one integer class index per line'):
        msconv.create_model('smt_tiny', checkpoint_path=ckpt, class_map=tmp_path / 'bad.txt', **kwargs)


class _NotATensor:  # stands in for the yacs config object an official training checkpoint may carry
    pass


def test_checkpoint_needing_pickle_is_refused_unless_trusted(tmp_path):
    t, meta = load_fixture('smt', 'smt_micro')
    ckpt = tmp_path / 'with_config.pth'
    torch.save({'model': official_state_dict(t), 'config': _NotATensor()}, ckpt)
    with pytest.raises(ValueError, match='trust_pickle'):
        msconv.create_model('smt_tiny', checkpoint_path=ckpt, **meta['constructor_kwargs'])
    model = msconv.create_model('smt_tiny', checkpoint_path=ckpt, trust_pickle=True, **meta['constructor_kwargs'])
    assert model.num_classes == 10


def test_missing_or_corrupt_checkpoint_gives_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='checkpoint_path'):
        msconv.create_model('test_smt', checkpoint_path=tmp_path / 'nope.pth')
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a checkpoint')
    with pytest.raises((ValueError, pickle.UnpicklingError), match='bad.pth'):
        msconv.create_model('test_smt', checkpoint_path=bad)
    with pytest.raises(ValueError, match='smt_tiny'):
        msconv.create_model('smt_tinny')


def test_single_official_module_state_dicts_load_into_our_layers():
    t, _ = load_fixture('smt', 'smt_micro')
    sd = official_state_dict(t)
    sam_sd = {k[len('block1.0.attn.') :]: v for k, v in sd.items() if k.startswith('block1.0.attn.')}
    sam = ScaleAwareModulation(16, num_heads=4, expand_ratio=2, qkv_bias=True)
    sam.load_state_dict(msconv.convert_official(sam_sd, 'smt'))
    block_sd = {k[len('block3.1.') :]: v for k, v in sd.items() if k.startswith('block3.1.')}
    block = Block(64, ca_num_heads=4, sa_num_heads=8, mlp_ratio=4, qkv_bias=True, ca_attention=0)
    block.load_state_dict(msconv.convert_official(block_sd, 'smt'))
    # the converter is the identity on our own keys (it runs inside every model's load_state_dict)
    assert msconv.convert_official(block.state_dict(), 'smt').keys() == block.state_dict().keys()


def test_mhmc_single_conv_equals_per_head_loop():
    torch.manual_seed(0)
    mhmc = MultiHeadMixedConv(32, num_heads=4)
    x = torch.randn(2, 32, 9, 11)
    assert mhmc.kernel_sizes == (3, 5, 7, 9)
    assert max_abs(mhmc(x), mhmc.forward_reference(x)) < 1e-5


def test_sam_fast_form_equals_reference_forward_and_backward():
    torch.manual_seed(0)
    sam = ScaleAwareModulation(32, num_heads=4, expand_ratio=2)
    x = torch.randn(2, 32, 7, 9, requires_grad=True)
    y = sam(x)
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in sam.named_parameters()}
    gx = x.grad.clone()
    sam.zero_grad()
    x.grad = None
    y_ref = sam.forward_reference(x)
    y_ref.square().sum().backward()
    assert max_abs(y, y_ref) < 1e-5
    assert max_abs(gx, x.grad) < 1e-4
    for n, p in sam.named_parameters():
        assert max_abs(grads[n], p.grad) < 1e-4, n


def test_layer_bad_dims_raise():
    with pytest.raises(ValueError, match='num_heads'):
        MultiHeadMixedConv(30, num_heads=4)
    with pytest.raises(ValueError, match='embed_dims'):
        SMT(embed_dims=(16, 32, 64))


@pytest.mark.parametrize('name', ['smt_micro', 'smt_micro_ls_k7'])
def test_reparameterized_model_matches_official_outputs(name, gemm):
    t, meta = load_fixture('smt', name)
    model = SMT(**meta['constructor_kwargs'])
    model.load_state_dict(official_state_dict(t))
    deployed = msconv.reparameterize(model)  # a copy; the training form is untouched
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    assert not any(k.endswith('gamma') for k in deployed.state_dict())
    with torch.no_grad():
        assert max_abs(deployed(t['input']), t['logits']) <= meta['atol']
        feats = deployed.forward_intermediates(t['input'], intermediates_only=True)
    assert max_abs(feats[2], t['features.3']) <= meta['atol']
    model.reparameterize()  # in place, and idempotent
    model.reparameterize()
    with torch.no_grad():
        assert max_abs(model(t['input']), t['logits']) <= meta['atol']


def test_reparameterized_model_compiles_fullgraph():
    torch._dynamo.reset()
    model = msconv.create_model('test_smt').reparameterize()
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    with torch.no_grad():
        assert max_abs(compiled(x), model(x)) < 1e-5


def test_reference_forms_give_the_same_model_outputs():
    torch.manual_seed(0)
    model = msconv.create_model('test_smt').eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast = model(x)
        with msconv.layers.reference_forms():
            assert msconv.layers.reference_forms_enabled()
            ref = model(x)
    assert not msconv.layers.reference_forms_enabled()
    assert max_abs(fast, ref) < 1e-5


@pytest.mark.parametrize(
    'name,conv_linear,attention',
    [
        ('smt_tiny', 2.38, 0.08),
        ('smt_small', 4.66, 0.18),
        ('smt_base', 7.69, 0.28),
        ('smt_large', 17.48, 0.43),
    ],
)
def test_profile_macs_match_the_official_counts(name, conv_linear, attention):
    """conv+linear GMACs as the official README counts them (ptflops, no attention matmuls), attention apart."""
    stats = msconv.profile(name, input_size=(3, 224, 224))
    assert round(stats['macs_conv_linear'] / 1e9, 2) == conv_linear
    assert round(stats['macs_attention'] / 1e9, 2) == attention
    assert stats['macs'] == stats['macs_conv_linear'] + stats['macs_attention'] + stats['macs_other']


_TRITON_SAM_CHECK = r'''
import torch
from msconv.kernels.depthwise import triton_available
from msconv.layers import ScaleAwareModulation, reference_forms
assert triton_available('cpu'), 'the interpreter should make Triton available on CPU'
torch.manual_seed(0)
sam = ScaleAwareModulation(8, num_heads=4)
x = torch.randn(2, 8, 6, 7, requires_grad=True)
y = sam(x)                                   # MHMC through the Triton mixed-kernel-size kernel
y.square().sum().backward()
g = [p.grad.clone() for p in sam.parameters()] + [x.grad.clone()]
sam.zero_grad(); x.grad = None
with reference_forms():
    y_ref = sam(x)
y_ref.square().sum().backward()
g_ref = [p.grad for p in sam.parameters()] + [x.grad]
assert (y - y_ref).abs().max() < 1e-5, (y - y_ref).abs().max()
assert max((a - b).abs().max().item() for a, b in zip(g, g_ref)) < 1e-4
sam.eval()
with torch.no_grad(), reference_forms():
    y_eval = sam(x)
sam.reparameterize()                         # the inference form also runs MHMC through Triton
with torch.no_grad():
    assert (sam(x) - y_eval).abs().max() < 1e-5
print('ok')
'''


def test_sam_through_triton_kernel_in_interpreter():
    """The CUDA fast path of MHMC (Triton) run by Triton's CPU interpreter equals the reference form."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / 'src'
    env = dict(os.environ, TRITON_INTERPRET='1', PYTHONPATH=f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop('MSCONV_DISABLE_TRITON', None)
    proc = subprocess.run(
        [sys.executable, '-c', _TRITON_SAM_CHECK], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith('ok'), proc.stderr[-3000:]


def test_inference_fast_paths_equal_the_plain_forward(gemm):
    """Under no_grad the model writes in place and, on CPU, may run large maps one image at a time (both stage forms
    pinned in turn); the plain forms (``reference_forms()``: per-head MHMC, out of place, batched) give the same
    numbers. 112x112 makes stage 1 28x28, large enough for the per-image path."""
    from msconv.layers import forms

    torch.manual_seed(0)
    for deployed in (False, True):
        model = msconv.create_model('test_smt').eval()
        if deployed:
            model.reparameterize()
        x = torch.randn(3, 3, 112, 112)
        with torch.no_grad():
            with forms.reference_forms():
                plain = model(x)
            for stage in ('batched', 'per_image'):
                with forms.forced_choices(smt_stage=stage):
                    fast = model(x)
                assert max_abs(fast, plain) < 1e-5


@pytest.mark.parametrize('form', ['plain', 'fused'])
def test_reparameterized_mlp_conv_gelu_forms_match_official(form):
    """The inference MLP's GELU(dwconv(h)): conv then in-place GELU, or one oneDNN conv with a GELU post-op."""
    from msconv.layers import forms

    t, meta = load_fixture('smt', 'smt_micro')
    model = SMT(**meta['constructor_kwargs'])
    model.load_state_dict(official_state_dict(t))
    deployed = msconv.reparameterize(model).eval()
    with torch.no_grad():
        if form == 'fused' and not forms.use_fast_form('fused', t['input']):
            pytest.skip('no oneDNN here: the fused form is not allowed')
        with forms.forced_choices(conv_gelu=form):
            out = deployed(t['input'])
    assert max_abs(out, t['logits']) <= meta['atol']
