"""The timm model contract, run over every registered msconv model.

Tiny ``test_*`` variants run the numeric checks (forward, backward, features, intermediates, compile);
every registered model is built on the meta device for the config and feature checks.
"""

from __future__ import annotations

import pytest
import timm
import torch

import msconv

TEST_MODELS = msconv.list_models('test_*')
ALL_MODELS = msconv.list_models()


def _input_size(model) -> tuple:
    return tuple(model.pretrained_cfg.get('test_input_size', (3, 64, 64)))


def _x(model, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, *_input_size(model))


def test_every_family_has_a_test_variant():
    families = {msconv.model_family(n) for n in TEST_MODELS}
    assert families == {msconv.model_family(n) for n in ALL_MODELS}


@pytest.mark.parametrize('name', TEST_MODELS)
def test_forward_backward_every_param_gets_grad(name):
    model = msconv.create_model(name, num_classes=7)
    model.train()
    out = model(_x(model))
    assert out.shape == (2, 7)
    out.float().pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize('name', TEST_MODELS)
def test_eval_deterministic_and_timm_entrypoint(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = _x(model)
    x_before = x.clone()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)
    assert torch.equal(x, x_before), 'the in-place inference forms must never write into the input'
    assert a.shape == (2, model.num_classes)


@pytest.mark.parametrize('name', TEST_MODELS)
def test_head_api(name):
    model = msconv.create_model(name).eval()
    x = _x(model)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.dim() == 4 and feats.shape[1] == model.num_features
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        assert model.get_classifier() is not None
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.num_classes == 5
        model.reset_classifier(0)
        assert model(x).shape == (2, model.head_hidden_size) == pre.shape
        model.reset_classifier(0, '')
        assert model(x).dim() == 4
    unpooled = msconv.create_model(name, num_classes=0, global_pool='').eval()
    with torch.no_grad():
        assert unpooled(x).dim() == 4


@pytest.mark.parametrize('name', TEST_MODELS)
def test_a_classifier_without_pooling_is_refused(name):
    """Issue 22 item 9: ``global_pool=''`` with a classifier. Before: SMT, SCSC-Swin and SCSC-ResNet failed at
    forward ('mat1 and mat2 shapes cannot be multiplied'), ShiftWise returned per-position logits (2, 1000, 2, 2);
    timm's heads refuse pooling off with a Linear classifier. Refused at construction and in reset_classifier,
    naming the option; the face models' embedding head already asked for 'flatten'."""
    face = name in ('test_scsc_faceresnet', 'test_face_iresnet')  # an embedding head: 'flatten' or no embedding
    message = r"global_pool must be 'flatten' for an embedding head" if face else r"global_pool='' \(no pooling\)"
    with pytest.raises(ValueError, match=message + r".*(num_classes=10|got '')"):
        msconv.create_model(name, num_classes=10, global_pool='')
    with pytest.raises(ValueError, match=r"global_pool='' \(no pooling\) cannot feed a classifier \(num_classes=3\)"):
        msconv.create_model(name, num_classes=5).reset_classifier(3, '')
    model = msconv.create_model(name, num_classes=0, global_pool='').eval()
    with torch.no_grad():
        assert model(_x(model)).dim() == 4
        # a classifier asked for without saying how to pool gets the pooling back (timm keeps '', and its Linear head
        # then fails or returns logits per position), as the face models' embedding head gets its flatten back
        model.reset_classifier(3)
        assert model(_x(model)).shape == (2, 3)


@pytest.mark.parametrize('name', TEST_MODELS)
def test_features_only(name):
    model = msconv.create_model(name, features_only=True).eval()
    x = _x(model)
    with torch.no_grad():
        feats = model(x)
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(feats) == len(channels) >= 3
    for f, c, r in zip(feats, channels, reductions):
        assert f.shape[1] == c
        assert abs(f.shape[-1] - x.shape[-1] / r) <= 1 and abs(f.shape[-2] - x.shape[-2] / r) <= 1
    sub = msconv.create_model(name, features_only=True, out_indices=(1, 3)).eval()
    with torch.no_grad():
        feats13 = sub(x)
    assert [f.shape[1] for f in feats13] == [channels[1], channels[3]]


@pytest.mark.parametrize('name', TEST_MODELS)
def test_forward_intermediates_match_forward_features(name):
    model = msconv.create_model(name).eval()
    x = _x(model)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        ref = model.forward_features(x)
        only = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    assert torch.allclose(final, ref, atol=1e-6)
    assert len(inter) == len(model.feature_info)
    assert torch.allclose(only[1], inter[2], atol=1e-6)
    assert [t.shape[1] for t in inter] == [i['num_chs'] for i in model.feature_info]


@pytest.mark.parametrize('name', TEST_MODELS)
def test_grad_checkpointing_same_output_and_gradients(name):
    """Gradient checkpointing recomputes the stages in backward: same outputs and parameter gradients (training
    mode, autograd on, dropout-free micro models; BN statistics are reset between the two runs)."""
    model = msconv.create_model(name).train()
    x = _x(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    model.set_grad_checkpointing(True)
    stage0 = model.stages[0]
    block = (stage0.blocks if hasattr(stage0, 'blocks') else stage0)[0]
    calls, block_forward = [], block.forward
    block.forward = lambda *args: calls.append(1) or block_forward(*args)  # (checkpoint recomputes without hooks)
    out_ckpt = model(x)
    assert len(calls) == 1
    out_ckpt.square().mean().backward()
    assert len(calls) == 2  # checkpointed: backward recomputed the block
    assert torch.allclose(out_ckpt, out, atol=1e-5)
    for n, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {n} with checkpointing"
        assert torch.allclose(p.grad, grads[n], rtol=1e-4, atol=1e-6), n


@pytest.mark.parametrize('name', TEST_MODELS)
def test_compile_fullgraph(name):
    """torch.compile(fullgraph=True) captures the whole forward with no graph break (aot_eager backend:
    the same Dynamo + AOTAutograd capture as inductor, without spending minutes in C++ codegen on CPU).
    We test compile rather than torch.jit.script: TorchScript is in maintenance mode upstream and the
    models use Python features (shape checks with f-string errors, timm's checkpoint_seq) it cannot script."""
    torch._dynamo.reset()
    model = msconv.create_model(name).eval()
    x = _x(model)
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)
    model.train()
    compiled(x).sum().backward()


@pytest.mark.parametrize('name', TEST_MODELS)
def test_bad_input_raises_value_error(name):
    model = msconv.create_model(name).eval()
    c, h, w = _input_size(model)
    with pytest.raises(ValueError, match=rf"\(B, {c}, H, W\)"):
        model(torch.randn(1, c + 1, h, w))
    with pytest.raises(ValueError, match=rf"\(B, {c}, H, W\)"):
        model(torch.randn(c, h, w))
    with pytest.raises(ValueError, match='at least'):
        model(torch.randn(1, c, 8, 8))


@pytest.mark.parametrize('name', ALL_MODELS)
def test_config_and_feature_info_on_meta(name):
    with torch.device('meta'):
        model = msconv.create_model(name)
    cfg = model.pretrained_cfg
    for key in ('input_size', 'crop_pct', 'interpolation', 'mean', 'std', 'first_conv', 'classifier', 'num_classes'):
        assert key in cfg, f"pretrained_cfg lacks {key!r}"
    keys = model.state_dict().keys()
    assert cfg['first_conv'] + '.weight' in keys
    assert cfg['classifier'] + '.weight' in keys
    modules = dict(model.named_modules())
    for info in model.feature_info:
        assert info['module'] in modules, f"feature_info names missing module {info['module']!r}"
    assert model.num_features > 0 and model.head_hidden_size > 0
    assert isinstance(model.no_weight_decay(), set)
    matcher = model.group_matcher()
    assert set(matcher) >= {'stem', 'blocks'}


@pytest.mark.parametrize('name', TEST_MODELS)
def test_eval_forward_on_meta_runs_the_plain_forms(name):
    """Shapes without data: an eval forward on the meta device, outside reference_forms() and any dispatch mode, asks
    the fast-form gate like any other call; the gate answers plain (it asked autocast about the meta device, which
    raised 'unknown device type for autocast' in the ShiftWise models' inference forms)."""
    with torch.device('meta'):
        model = msconv.create_model(name).eval()
    size = model.pretrained_cfg['input_size']
    with torch.no_grad():
        out = model(torch.empty(2, *size, device='meta'))
    assert out.device.type == 'meta' and out.shape[0] == 2


def test_read_checkpoint_names_files_that_are_not_checkpoints(tmp_path):
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(bytes(range(7, 200)) * 3)  # random bytes: not a zip archive, not a pickle
    for trust in (False, True):
        with pytest.raises(ValueError, match=r"junk\.pth' is not a torch checkpoint") as info:
            msconv.read_checkpoint(junk, trust_pickle=trust)
        assert 'trust_pickle' not in str(info.value)
    bad_pickle = tmp_path / 'bad.pth'
    bad_pickle.write_bytes(b'\x80\x04' + b'\xff' * 64)  # a pickle header, then garbage
    with pytest.raises(ValueError, match=r"bad\.pth' could not be unpickled"):
        msconv.read_checkpoint(bad_pickle, trust_pickle=True)


def test_checkpoint_of_another_model_fails_before_any_classifier_warning():
    import warnings

    other = msconv.create_model('test_scsc_swin').state_dict()
    model = msconv.create_model('test_smt')
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no "classifier tensors were dropped" warning first
        with pytest.raises(RuntimeError, match=r'another model\?\): \d+ (missing keys|shapes differ): stem\.'):
            model.load_state_dict(other)
    ten_classes = msconv.create_model('test_smt', num_classes=10).state_dict()
    with pytest.warns(UserWarning, match='classifier tensors'):  # same trunk, other classifier: dropped, loads
        model.load_state_dict(ten_classes)
    assert torch.equal(model.stem.conv1.weight, ten_classes['stem.conv1.weight'])


@pytest.mark.parametrize('name', TEST_MODELS)
def test_model_surface_device_dtype_reset_and_reparameterize(name):
    """timm's factory arguments, a classifier rebuilt on the model's device/dtype/mode, reparameterize() in eval."""
    model = timm.create_model(name, device='meta', dtype=torch.float64)
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.device.type == 'meta' for t in tensors)
    assert all(t.dtype == torch.float64 for t in tensors if t.is_floating_point())
    model = msconv.create_model(name).double().eval()
    model.reset_classifier(3)
    fc = model.get_classifier()
    assert all(p.dtype == torch.float64 for p in fc.parameters()) and not any(m.training for m in model.modules())
    with torch.no_grad():
        assert model(_x(model).double()).dtype == torch.float64
    model = msconv.create_model(name).train()
    assert model.reparameterize() is model and not model.training
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize('name', TEST_MODELS)
def test_pruned_model_uses_every_parameter(name):
    """What prune_intermediate_layers keeps is used (DDP needs it): the face heads' BN2d goes with the head."""
    model = msconv.create_model(name).train()
    x = _x(model)
    take = model.prune_intermediate_layers([1])
    feats = model.forward_intermediates(x, indices=take, intermediates_only=True)
    sum(f.sum() for f in feats).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, unused


@pytest.mark.parametrize('name', TEST_MODELS)
def test_bf16_autocast_inference_in_both_forms(name):
    """Every model runs under CPU bf16 autocast without autograd (the in-place forms step aside for mixed dtypes),
    training form and reparameterized, within bf16 accuracy of fp32: bf16 keeps 8 mantissa bits (2^-8 = 0.4%
    per rounding) and a micro model rounds a few dozen times along its path, so 5% of the largest logit."""
    torch.manual_seed(0)
    model = msconv.create_model(name).eval()
    x = _x(model)
    with torch.no_grad():
        ref = model(x)
        for m in (model, msconv.reparameterize(model)):
            with torch.autocast('cpu', dtype=torch.bfloat16):
                out = m(x)
            assert out.dtype == torch.bfloat16
            assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()
