"""SCSC speed forms (issue 24), against the plain form: in inference, the token form's routing on each branch in place
(``scsc_tokens``: runs of adjacent channels in a reordered copy of the reduced channels, with one gate per token or the
gates copied out per channel) and the SE product fused with the residual add; in training, the lean autograd function
under bf16 autocast (``scsc_train_amp``, kind ``lean_recompute_amp``)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from conftest import max_abs, randomize_bn

from msconv.layers import CrossScaleBottleneck, SpatialCrossScaleConv, forms

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from _common import saved_bytes  # noqa: E402

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


# ---- the lean training function under bf16 autocast (scsc_train_amp) ---------------------------------------------


def _amp_step(module, x, u, form):
    """One forward + backward of ``module`` under bf16 autocast (``form`` None: fp32, no autocast)."""
    x = (x.float() if form is None else x).detach().clone().requires_grad_(True)
    saved = {}
    if form is None:
        with forms.forced_choices(scsc_train='plain'):
            y = module(x)
    else:
        with torch.autocast('cpu', dtype=torch.bfloat16), forms.forced_choices(scsc_train_amp=form):
            y = module(x)
    saved['grad_fn'] = {type(f[0]).__name__ for f in y.grad_fn.next_functions if f[0] is not None}
    (y.float() * u).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    buffers = {n: b.clone() for n, b in module.named_buffers() if b.is_floating_point()}
    return y.detach().float(), dict(grads, input=x.grad.float()), buffers, saved['grad_fn'], y.dtype


def _rel(a, b):
    return max_abs(a.float(), b.float()) / max(b.abs().max().item(), 1e-12)


@pytest.mark.parametrize('routing', ['official', 'cross_scale'])
@pytest.mark.parametrize('cfg', [(72, 72, 1), (48, 96, 2)], ids=['identity', 'projection-s2'])
@pytest.mark.parametrize('in_dtype', [torch.float32, torch.bfloat16])
def test_lean_function_under_bf16_autocast_matches_the_plain_autocast_step(cfg, routing, in_dtype):
    """The lean function under bf16 autocast: what the plain form computes under autocast within bf16 rounding, and
    as close to the fp32 step as the plain autocast step is (values, input and weight gradients, BN running
    statistics); fp32 weight gradients; the output dtype of the plain form; fewer bytes saved for backward."""
    torch.manual_seed(0)
    c_in, c_out, stride = cfg
    base = CrossScaleBottleneck(c_in, c_out, (3, 5, 7), groups=4, stride=stride, routing=routing).train()
    randomize_bn(base)
    x = torch.randn(4, c_in, 12, 10).to(in_dtype)
    u = torch.randn(4, c_out, 12 // stride, 10 // stride)
    runs = {form: _amp_step(copy.deepcopy(base), x, u, form) for form in (None, 'plain', 'lean')}
    (y32, g32, b32, _, _), (yp, gp, bp, fp, dp), (yl, gl, bl, fl, dl) = runs[None], runs['plain'], runs['lean']
    assert '_LeanCrossScaleBackward' in fl and '_LeanCrossScaleBackward' not in fp
    assert dl == dp
    assert _rel(yl, yp) <= 0.02 and _rel(yl, y32) <= 2 * _rel(yp, y32) + 0.01
    for n in gp:
        assert gl[n].dtype == gp[n].dtype, n
        assert _rel(gl[n], gp[n]) <= 0.1, n
        assert _rel(gl[n], g32[n]) <= 2 * _rel(gp[n], g32[n]) + 0.02, n
    for n in bp:
        assert _rel(bl[n], bp[n]) <= 1e-3 and _rel(bl[n], b32[n]) <= 2 * _rel(bp[n], b32[n]) + 1e-3, n

    def forward(form):
        m = copy.deepcopy(base)
        with torch.autocast('cpu', dtype=torch.bfloat16), forms.forced_choices(scsc_train_amp=form):
            return m(x.clone().requires_grad_(True))

    assert saved_bytes(lambda: forward('lean')) < 0.6 * saved_bytes(lambda: forward('plain'))


def test_lean_function_under_autocast_with_gradient_checkpointing():
    """Non-reentrant checkpointing replays the lean function under the autocast state of the forward: the same
    gradients as without checkpointing (the statistics move once more in the replay, as for any BatchNorm)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    base = CrossScaleBottleneck(48, 48, (3, 5, 7), groups=4).train()
    randomize_bn(base)
    x, u = torch.randn(2, 48, 9, 9), torch.randn(2, 48, 9, 9)
    grads = []
    for ckpt in (False, True):
        m = copy.deepcopy(base)
        xi = x.clone().requires_grad_(True)
        with forms.forced_choices(scsc_train_amp='lean'):  # the replay in backward runs the same form
            with torch.autocast('cpu', dtype=torch.bfloat16):
                y = checkpoint(m, xi, use_reentrant=False) if ckpt else m(xi)
            (y.float() * u).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()} | {'input': xi.grad})
    for n in grads[0]:
        assert _rel(grads[1][n], grads[0][n]) <= 1e-2, n


def test_lean_autocast_form_steps_aside_where_it_must():
    """No lean function in fp16 autocast, with autograd off or under ``reference_forms()``; the fp32 lean kind does
    not run under autocast."""
    m = CrossScaleBottleneck(48, 48, (3, 5, 7), groups=4).train()
    x = torch.randn(2, 48, 8, 8, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.float16):
        assert m._train_op(x) is None
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert m._train_op(x) == 'scsc_train_amp'
        with forms.reference_forms():
            assert m._train_op(x) is None
        with torch.no_grad():
            assert m._train_op(x) is None
    assert m._train_op(x) == 'scsc_train'
    assert not forms.use_fast_form('lean_recompute', x) or not torch.is_autocast_enabled('cpu')


def test_token_form_with_inference_tensor_weights():
    """A module built or reparameterized under ``torch.inference_mode`` holds inference tensors (no version
    counter): the reordered copies are keyed by storage alone there and the forms still agree."""
    with torch.inference_mode():
        m = _module('block', CONFIGS[1], 'official')
        x = torch.randn(2, 72, 8, 8).contiguous(memory_format=torch.channels_last)
        assert m.reduce.weight.is_inference()
        with forms.reference_forms():
            ref = m.forward_reference(x.contiguous())
        for form in FORMS:
            with forms.forced_choices(scsc_tokens=form):
                assert max_abs(m(x), ref) <= EVAL_TOL * max(1.0, ref.abs().max().item()), form
