"""msconv.tools.profile: exact MAC / activation counts on hand-computed toy models, meta == cpu, timm anchors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from msconv.tools.profile import profile


class ToyAttention(nn.Module):
    """conv stem + depthwise conv + functional dw conv + attention (explicit @ or fused SDPA) + linear head."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        self.stem = nn.Conv2d(3, 16, 4, stride=4)  # 16 x 8 x 8 out
        self.dw = nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.dw_weight = nn.Parameter(torch.randn(16, 1, 5, 5))
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.dw(self.stem(x))
        x = F.conv2d(x, self.dw_weight, padding=2, groups=16)
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, N, C)
        q, k, v = self.qkv(t).reshape(b, h * w, 3, 2, 8).permute(2, 0, 3, 1, 4)  # (B, heads=2, N, 8)
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = ((q @ k.transpose(-2, -1)) * 8**-0.5).softmax(-1) @ v
        t = self.proj(o.transpose(1, 2).reshape(b, h * w, c))
        return self.head(t.mean(1))


def _expected(batch: int):
    n = 64  # tokens (8 x 8)
    conv = (16 * 3 * 16) * n + (16 * 49) * n + (16 * 25) * n
    linear = n * 16 * 48 + n * 16 * 16 + 16 * 10
    attention = 2 * (n * n * 8) + 2 * (n * n * 8)  # two heads: q k^T and attn v
    acts = 16 * n * 3 + n * 48 + n * 16 + 10 + 2 * (n * n + n * 8)
    return batch * conv, batch * linear, batch * attention, batch * acts


@pytest.mark.parametrize('fused', [False, True], ids=['matmul', 'sdpa'])
@pytest.mark.parametrize('device', ['cpu', 'meta'])
def test_toy_counts_exact(fused, device):
    conv, linear, attention, acts = _expected(batch=2)
    stats = profile(ToyAttention(fused), input_size=(3, 32, 32), batch_size=2, device=device)
    assert stats['macs_conv_linear'] == conv + linear
    assert stats['macs_attention'] == attention
    assert stats['macs'] == conv + linear + attention
    assert stats['flops'] == 2 * stats['macs']
    assert stats['activations'] == acts
    assert stats['params'] == sum(p.numel() for p in ToyAttention(fused).parameters())


def test_meta_copy_leaves_model_untouched():
    model = ToyAttention(False).train()
    stats = profile(model, input_size=(3, 32, 32), device='meta')
    assert model.training and next(model.parameters()).device.type == 'cpu'
    assert stats['macs'] == sum(_expected(1)[:3])


def test_timm_reference_numbers():
    # timm's published results (fvcore): resnet18 1.82 GMACs / 2.48 M acts, vit_tiny 1.26 / 5.97. fvcore also
    # counts normalisation layers (a few MMACs); conv/linear/matmul MACs and the activations agree.
    r18 = profile('resnet18')
    assert r18['params'] == 11_689_512
    assert round(r18['macs'] / 1e9, 2) == 1.81 and round(r18['activations'] / 1e6, 2) == 2.48
    vit = profile('timm:vit_tiny_patch16_224')
    assert round(vit['macs'] / 1e9, 2) == 1.25 and round(vit['activations'] / 1e6, 2) == 5.97
    assert vit['macs_attention'] == 12 * 3 * 2 * 197 * 197 * 64  # 12 blocks, 3 heads, qk^T + av, d=64


@pytest.mark.parametrize('bad', [(224, 224), (3, 0, 224), [3, 224.0, 224], 'big'])
def test_bad_input_size(bad):
    with pytest.raises(ValueError, match='input_size'):
        profile(nn.Conv2d(3, 3, 1), input_size=bad)


def test_bad_model_and_batch():
    with pytest.raises(ValueError, match='model'):
        profile(object())
    with pytest.raises(ValueError, match='not an msconv model'):
        profile('no_such_model_xyz')
    with pytest.raises(ValueError, match='batch_size'):
        profile(nn.Conv2d(3, 3, 1), batch_size=0)


def test_smt_attention_counted_with_sdpa_on_cpu_and_meta():
    # SMT's MSA blocks use F.scaled_dot_product_attention: fused op on CPU, decomposed matmuls on meta
    import msconv

    model = msconv.create_model('test_smt')
    cpu = profile(model, input_size=(3, 64, 64), batch_size=2)
    meta = profile(model, input_size=(3, 64, 64), batch_size=2, device='meta')
    # stage 3: one MSA block on 4x4 tokens, C=64; stage 4: one MSA block on 2x2 tokens, C=128 (q k^T and attn v)
    expected = 2 * (2 * 16 * 16 * 64 + 2 * 4 * 4 * 128)
    assert cpu['macs_attention'] == meta['macs_attention'] == expected
    assert cpu['macs'] == meta['macs'] and cpu['activations'] == meta['activations']


def test_smt_tiny_full_size_on_meta():
    stats = profile('smt_tiny', input_size=(3, 224, 224))
    assert round(stats['params'] / 1e6, 2) == 11.51
    # stage 3: 4 MSA blocks, 14x14 tokens, C=256; stage 4: 1 MSA block, 7x7 tokens, C=512
    assert stats['macs_attention'] == 4 * 2 * 196 * 196 * 256 + 2 * 49 * 49 * 512


def test_cpu_sdpa_fallback_formula_matches_torch():
    # used only on torch versions without a formula for the CPU fused op; must agree with torch's own sdpa_flop
    from torch.utils.flop_counter import sdpa_flop_count

    from msconv.tools.profile import _sdpa_cpu_flop

    q, k, v = (2, 3, 10, 8), (2, 3, 12, 8), (2, 3, 12, 4)
    assert _sdpa_cpu_flop(q, k, v) == 2 * 2 * 3 * 10 * 12 * 8 + 2 * 2 * 3 * 10 * 12 * 4
    assert _sdpa_cpu_flop(q, k, v) == sdpa_flop_count(q, k, v)


class WeightProducts(nn.Module):
    """A kernel built from two factors on every call (weights only), applied to the input; then y @ y^T."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(6, 4))
        self.b = nn.Parameter(torch.randn(4, 8))

    def forward(self, x):  # x: (B, 3, 2, 8) -> tokens (B, 6, 8)
        t = x.reshape(x.shape[0], 6, 8)
        w = self.a @ self.b  # weights only: 6*4*8 MACs
        y = t @ w.t()  # activation x weight: B*6*8*6
        return y @ y.transpose(1, 2)  # activation x activation: B*6*6*6


@pytest.mark.parametrize('device', ['cpu', 'meta'])
def test_operands_classified_by_data_flow(device):
    stats = profile(WeightProducts(), input_size=(3, 2, 8), batch_size=2, device=device)
    assert stats['macs_other'] == 6 * 4 * 8
    assert stats['macs_conv_linear'] == 2 * 6 * 8 * 6
    assert stats['macs_attention'] == 2 * 6 * 6 * 6
    assert stats['activations'] == 2 * 6 * 6 + 2 * 6 * 6  # weight-only products are not activations
