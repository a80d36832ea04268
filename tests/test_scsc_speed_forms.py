"""SCSC inference speed forms (issue 24): the token form's routing on each branch in place (``scsc_tokens``: runs of
adjacent channels in a reordered copy of the reduced channels, with one gate per token or the gates copied out per
channel) and the SE product fused with the residual add, against the plain form."""

from __future__ import annotations

import pytest
import torch
from conftest import max_abs, randomize_bn

from msconv.layers import CrossScaleBottleneck, SpatialCrossScaleConv, forms

EVAL_TOL = 1e-5
FORMS = ('concat', 'runs', 'expanded')

# (in, out, kernel sizes, groups, stride): cp % m == 0 and != 0 (the Swin+SCSC widths), m = 2 and 3, stride 2
CONFIGS = [
    (36, 36, (3, 5, 7), 3, 1),  # cp 12: branch blocks and gate groups of 4 (aligned)
    (72, 72, (3, 9, 13), 4, 1),  # cp 24: blocks of 8, gate groups of 6 (runs cut at both)
    (48, 48, (3, 5, 7), 4, 1),  # cp 16, m 3 does not divide it: concatenated pairs straddle branches
    (60, 90, (3, 7, 11), 4, 2),  # cp 20, stride 2, projection shortcut
    (64, 64, (3, 5), 4, 1),  # m 2
]


def _module(kind, cfg, routing, seed=0):
    torch.manual_seed(seed)
    c_in, c_out, ks, groups, stride = cfg
    if kind == 'block':
        m = CrossScaleBottleneck(c_in, c_out, ks, groups=groups, stride=stride, routing=routing)
    else:
        m = SpatialCrossScaleConv(c_in, ks, groups=groups, routing=routing)
    randomize_bn(m, seed)
    m.eval().reparameterize()
    return m


@pytest.mark.parametrize('routing', ['official', 'cross_scale'])
@pytest.mark.parametrize('kind', ['block', 'mixer'])
@pytest.mark.parametrize('cfg', CONFIGS, ids=lambda c: f'{c[0]}-{c[1]}-m{len(c[2])}-g{c[3]}-s{c[4]}')
def test_token_forms_match_the_plain_form_fp32(cfg, kind, routing, monkeypatch):
    """Every ``scsc_tokens`` form of a reparameterized module on a channels-last input equals the plain form (eval
    tolerance); the two in-place routings do the same products in the same order: bit-identical."""
    m = _module(kind, cfg, routing)
    calls = []
    original = SpatialCrossScaleConv._token_route
    monkeypatch.setattr(
        SpatialCrossScaleConv, '_token_route', lambda self, *a, **k: calls.append(k) or original(self, *a, **k)
    )
    x = torch.randn(2, cfg[0], 11, 9)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        with forms.reference_forms():
            ref = m.forward_reference(x)
        outs = {}
        for form in FORMS:
            with forms.forced_choices(scsc_tokens=form):
                outs[form] = m(x_cl)
    assert torch.equal(x_cl, x)
    for form, out in outs.items():
        assert out.is_contiguous(memory_format=torch.channels_last), form
        assert max_abs(out, ref) <= EVAL_TOL * max(1.0, ref.abs().max().item()), form
    assert torch.equal(outs['runs'], outs['expanded'])
    assert calls == [{'expanded': False}, {'expanded': True}]  # the two in-place forms ran, concat did not


@pytest.mark.parametrize('routing', ['official', 'cross_scale'])
@pytest.mark.parametrize('cfg', CONFIGS[1:4], ids=lambda c: f'{c[0]}-m{len(c[2])}-s{c[4]}')
def test_token_forms_in_bf16_match_the_plain_bf16_form(cfg, routing):
    """In bf16 every form is within bf16 rounding of the plain form in bf16 and of the fp32 result; the in-place
    routings round after each product and sum in the same order (bit-identical to each other)."""
    m32 = _module('block', cfg, routing)
    m16 = _module('block', cfg, routing).to(torch.bfloat16)
    x = torch.randn(2, cfg[0], 10, 12)
    with torch.no_grad():
        with forms.reference_forms():
            ref32 = m32.forward_reference(x)
            ref16 = m16.forward_reference(x.bfloat16()).float()
        outs = {}
        for form in FORMS:
            with forms.forced_choices(scsc_tokens=form):
                outs[form] = m16(x.bfloat16().contiguous(memory_format=torch.channels_last))
    scale = ref32.abs().max().item()
    for form, out in outs.items():
        assert out.dtype == torch.bfloat16
        assert max_abs(out.float(), ref16) <= 0.05 * scale, form
        assert max_abs(out.float(), ref32) <= 0.05 * scale, form
    assert torch.equal(outs['runs'], outs['expanded'])


def test_reordered_copies_follow_the_weights():
    """The reordered conv copies of the ``runs`` forms are rebuilt when a weight changes in place or is replaced;
    the module's own parameters and state dict are untouched by them."""
    m = _module('mixer', CONFIGS[1], 'official')
    keys = set(m.state_dict())
    x = torch.randn(2, 72, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), forms.forced_choices(scsc_tokens='runs'):
        m(x)
        m.reduce.weight.mul_(0.5)
        m.dw[1].weight.add_(0.1)
        m.router.weight.mul_(-1.0)
        out = m(x)
        with forms.reference_forms():
            ref = m.forward_reference(x.contiguous())
        assert max_abs(out, ref) <= EVAL_TOL * max(1.0, ref.abs().max().item())
        m.load_state_dict({k: v * 1.5 if k.endswith('weight') else v for k, v in m.state_dict().items()})
        out = m(x)
        with forms.reference_forms():
            ref = m.forward_reference(x.contiguous())
        assert max_abs(out, ref) <= EVAL_TOL * max(1.0, ref.abs().max().item())
    assert set(m.state_dict()) == keys


@pytest.mark.parametrize('routing', ['official', 'cross_scale'])
@pytest.mark.parametrize('m_scales,cp,groups', [(3, 24, 4), (3, 16, 4), (3, 20, 4), (2, 32, 4), (3, 12, 3), (1, 8, 2)])
def test_route_runs_cover_every_product_once_in_route_fast_order(routing, m_scales, cp, groups):
    """The runs of the in-place routing: every (routed channel, j) product exactly once, j = 0 first for each routed
    channel and then in increasing j, each reading the concatenated channel its routing pairs it with."""
    ks = (3, 5, 7)[:m_scales]
    mod = SpatialCrossScaleConv(cp * m_scales, ks, groups=groups, routing=routing)
    order = mod._official_order()[0] if routing == 'official' and m_scales > 1 else list(range(cp))
    for expanded in (False, True):
        seen = {}
        for j, a, n, b, c, gc in mod._route_runs(split_groups=not expanded):
            for i in range(n):
                q = a + i
                assert (q, j) not in seen
                assert all(seen.get((q, jj)) is not None for jj in range(j))
                seen[(q, j)] = True
                concat_channel = b * cp + order[c + i]
                want = q * m_scales + j if routing == 'official' else j * cp + q
                assert concat_channel == want
                if not expanded:
                    assert gc == j * groups + q // (cp // groups)
        assert len(seen) == cp * m_scales


def test_token_forms_step_aside_with_autograd_and_under_capture():
    m = _module('block', CONFIGS[1], 'official')
    x = torch.randn(2, 72, 8, 8).contiguous(memory_format=torch.channels_last)
    assert not forms.tunable('scsc_tokens', x)  # autograd on
    with torch.no_grad():
        assert forms.tunable('scsc_tokens', x)
        traced = torch.jit.trace(m, x)
        with forms.reference_forms():
            ref = m.forward_reference(x)
        assert max_abs(traced(x), ref) <= EVAL_TOL * max(1.0, ref.abs().max().item())
