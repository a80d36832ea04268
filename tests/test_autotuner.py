"""The autotuner (``msconv.layers.forms.tuned``): its table of tuned operations, what is timed, how often, what is
kept and under which key.

These count calls, never time: which candidate wins on this machine is not asserted anywhere.
"""

from __future__ import annotations

import pytest
import torch

import msconv
from msconv.inference import inference_model
from msconv.layers import forms

#: operations of these tests only, declared beside the real ones: a plain form and one in-place form each
TEST_OPS = {
    'op': {'plain': (), 'fast': ('inplace',)},
    'outer': {'plain': (), 'nested': ('inplace',)},
    'inner': {'i1': (), 'i2': ('inplace',)},
}


@pytest.fixture
def fresh_tuner(clean_tuner, monkeypatch):
    for name, cands in TEST_OPS.items():
        monkeypatch.setitem(forms.TUNED, name, forms.TunedOp(name, cands, key='', where='tests'))
    yield


def _counting(calls: dict, name: str, fn=None):
    def run() -> torch.Tensor:
        calls[name] = calls.get(name, 0) + 1
        if fn is not None:
            fn()
        return torch.zeros(1)

    return run


def test_each_candidate_is_timed_three_times_and_the_choice_is_kept(fresh_tuner):
    calls: dict = {}
    x = torch.zeros(2, 3)
    cands = {'plain': _counting(calls, 'plain'), 'fast': _counting(calls, 'fast')}
    with torch.no_grad():
        forms.tuned('op', x, cands)
        forms.tuned('op', x, cands)
    choice = forms.autotune_choices()[next(iter(forms.autotune_choices()))]
    assert calls[choice] == 3 + 1 and sum(calls.values()) == 7


def test_a_run_that_measured_an_inner_operation_is_run_again(fresh_tuner):
    """The first run of a candidate that contains a tuned operation also times that operation's forms: it is not
    a timing of the candidate, so the candidate gets one more run (as inference_model's layouts do)."""
    calls: dict = {}
    x = torch.zeros(2, 3)
    inner = {'i1': _counting(calls, 'i1'), 'i2': _counting(calls, 'i2')}
    outer = {
        'plain': _counting(calls, 'plain'),
        'nested': _counting(calls, 'nested', lambda: forms.tuned('inner', x, inner)),
    }
    with torch.no_grad():
        forms.tuned('outer', x, outer)
    assert calls['plain'] == 3
    assert calls['nested'] == 3 + 1, 'the run that measured the inner operation does not count'
    assert calls['i1'] + calls['i2'] == 6 + 3, 'inner: measured once (3 + 3 runs), then its choice on 3 more runs'
    assert len(forms.autotune_choices()) == 2


def test_long_runs_are_timed_fewer_times(fresh_tuner, monkeypatch):
    """The rounds after the first clean one stay within a time budget: with none left, each form runs once."""
    monkeypatch.setattr(forms, '_ROUNDS_BUDGET_S', 0.0)
    calls: dict = {}
    with torch.no_grad():
        out = forms.tuned('op', torch.zeros(2), {'plain': _counting(calls, 'plain'), 'fast': _counting(calls, 'fast')})
    assert calls == {'plain': 1, 'fast': 1} and out.shape == (1,)


def test_inference_model_layout_choice_is_timed_without_inner_measurements(fresh_tuner, monkeypatch):
    """On its first call inference_model times both layouts of the whole model; the runs in which the model's
    inner operations were being measured are repeated, so each layout has clean timings."""
    timed: list = []
    real = forms._measure

    def spy(cands, rounds=3):
        if 'channels_last' in cands:
            counts = {n: 0 for n in cands}
            wrapped = {n: (lambda n=n, f=f: counts.__setitem__(n, counts[n] + 1) or f()) for n, f in cands.items()}
            result = real(wrapped, rounds)
            timed.append(counts)
            return result
        return real(cands, rounds)

    monkeypatch.setattr(forms, '_measure', spy)
    model = msconv.create_model('test_scsc_resnet').eval()
    with torch.no_grad():
        inference_model(model)(torch.randn(2, 3, 64, 64))
    ((counts),) = timed
    assert all(n >= 3 for n in counts.values()), counts
    assert any(n > 3 for n in counts.values()), 'the inner operations were measured inside the layout runs'


def test_a_dispatch_mode_sees_the_plain_form_even_with_a_cached_choice(fresh_tuner):
    """A FlopCounterMode (msconv profile, the benchmarks' MAC columns) counts the same operations whether or not the
    autotuner has already chosen, in this process or on disk; a forced_choices pin still wins."""
    from torch.utils.flop_counter import FlopCounterMode

    calls: dict = {}
    x = torch.zeros(2, 3)
    cands = {'plain': _counting(calls, 'plain'), 'fast': _counting(calls, 'fast')}
    with forms.forced_choices(op='fast'), torch.no_grad():
        forms.tuned('op', x, cands)  # the forced path stores nothing
    forms._CHOICES['op|(2, 3)|c|float32|cpu|%d|' % torch.get_num_threads()] = 'fast'
    calls.clear()
    with torch.no_grad():
        forms.tuned('op', x, cands)
        assert calls == {'fast': 1}, 'the cached choice runs'
        with FlopCounterMode(display=False):
            forms.tuned('op', x, cands)
            with forms.forced_choices(op='fast'):
                forms.tuned('op', x, cands)
    assert calls == {'fast': 2, 'plain': 1}


# ---- the table: names are checked, the gate is asked, every declared form computes what the plain form does ------


def test_forced_choices_refuses_unknown_names():
    with pytest.raises(ValueError, match=r"unknown tuned operation 'lineer'.*'linear'"):
        with forms.forced_choices(lineer='onednn'):
            pass
    with pytest.raises(ValueError, match=r"'linear' has the forms \['blas', 'onednn'\], got 'mkl'"):
        with forms.forced_choices(linear='mkl'):
            pass
    assert not forms._FORCED


def test_tuned_refuses_what_is_not_declared(fresh_tuner):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"unknown tuned operation 'nope'.*'smt_stage'"):
        forms.tuned('nope', x, {'plain': lambda: x})
    with pytest.raises(ValueError, match=r"'op' has the forms \['plain', 'fast'\], got \['fast', 'plain'\]"):
        forms.tuned('op', x, {'fast': lambda: x, 'plain': lambda: x})
    with pytest.raises(ValueError, match="'smt_stage' is timed per module: pass module="):
        forms.tuned('smt_stage', x, {'batched': lambda: x, 'per_image': lambda: x})


def test_the_plain_form_runs_wherever_the_fast_one_is_not_allowed(fresh_tuner):
    """Inside reference_forms() (even when pinned), and where the gate refuses what a form needs (here: in-place
    writes with autograd on) nothing is measured and a pin falls back to the plain form."""
    calls: dict = {}
    x = torch.zeros(2, 3)
    cands = {'plain': _counting(calls, 'plain'), 'fast': _counting(calls, 'fast')}
    with torch.no_grad(), forms.reference_forms(), forms.forced_choices(op='fast'):
        forms.tuned('op', x, cands)
    with forms.forced_choices(op='fast'):
        forms.tuned('op', x, cands)  # autograd on: 'inplace' is not allowed
    forms.tuned('op', x, cands)
    assert calls == {'plain': 3} and not forms.autotune_choices()
    assert not forms.tunable('op', x) and forms.tunable('smt_stage', x) is False
    with torch.no_grad():
        assert forms.tunable('op', x)


def _stem():
    from msconv.models.scsc_resnet import ConvStem

    stem = ConvStem(3, 16, stride=2).eval()
    with torch.no_grad():
        stem.bn.running_mean.uniform_(-0.2, 0.2)
        stem.bn.running_var.uniform_(0.5, 1.5)
    return stem


def _examples():
    """For every tuned operation: ``(run, probe)``: ``run()`` computes something through the operation (under
    no_grad), ``probe`` is a tensor like the one it meets (to ask the gate whether a form may run here)."""
    from msconv.inference import inference_model
    from msconv.layers import fast_ops

    g = torch.Generator().manual_seed(0)
    tokens, w, b = torch.randn(2, 7, 5, 16, generator=g), torch.randn(24, 16, generator=g), torch.randn(24)
    dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    fmap = torch.randn(2, 8, 9, 9, generator=g)
    pw = torch.nn.Conv2d(16, 24, 1, stride=2)
    pmap = torch.randn(2, 16, 13, 13, generator=g)
    stem, rgb = _stem(), torch.randn(2, 3, 33, 33, generator=g)
    models = {n: msconv.create_model(n).eval() for n in ('test_smt', 'test_shiftwise', 'test_scsc_swin')}
    models['test_shiftwise'].reparameterize()
    images = torch.randn(2, 3, 64, 64, generator=g)
    fast = inference_model(msconv.create_model('test_scsc_resnet'))
    cl = torch.empty(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    scsc = msconv.layers.SpatialCrossScaleConv(24, (3, 5, 7), groups=2)
    feats, gate = torch.randn(2, 24, 5, 6, generator=g).bfloat16(), torch.rand(2, 6, 5, 6, generator=g).bfloat16()
    from msconv.layers.fast_ops import depthwise_grad_input, depthwise_grad_weight

    strip, gz = torch.randn(8, 1, 3, 7, generator=g), torch.randn(2, 8, 9, 9, generator=g)
    from msconv.models.shiftwise_net import ShiftWiseBlock, lean_mlp_train

    sw_block = ShiftWiseBlock(16, 7)
    sw_gate = torch.rand(2, 16, 1, 1, generator=g)
    sw_map = torch.randn(2, 16, 6, 5, generator=g).contiguous(memory_format=torch.channels_last)
    from msconv.dense.poolers import AlignedRoIAlign

    roi_pool = AlignedRoIAlign(['0', '1'], output_size=7)
    pyramid = {str(i): torch.randn(1, 8, 16 >> i, 12 >> i, generator=g) for i in range(2)}
    roi_boxes = [torch.tensor([[1.0, 2.0, 30.0, 40.0], [0.0, 0.0, 60.0, 45.0], [5.0, 5.0, 6.0, 9.0]])]
    scsc_train = msconv.layers.CrossScaleBottleneck(24, 24, (3, 5, 7), groups=2).train()  # batch statistics
    smap = torch.randn(2, 24, 9, 9, generator=g)
    from conftest import randomize_bn

    saa = msconv.layers.mixed_conv.ScaleAwareAggregation(16, 4, 2).eval()
    randomize_bn(saa)
    saa_map = torch.randn(2, 16, 5, 6, generator=g).contiguous(memory_format=torch.channels_last)
    from msconv.models.smt import ConvMlp

    smt_mlp = ConvMlp(16, 24).eval()
    smt_tokens = torch.randn(2, 11, 6, 16, generator=g)
    smt_stem = msconv.models.smt.Stem(3, 16).eval()
    randomize_bn(smt_stem)
    swin_block = msconv.models.scsc_swin.CrossScaleSwinBlock(24, (3, 5, 7), groups=2).train()
    scsc_tokens = msconv.layers.CrossScaleBottleneck(24, 24, (3, 5, 7), groups=2).eval()
    scsc_tokens.reparameterize()
    smap_cl = smap.contiguous(memory_format=torch.channels_last)
    from msconv.layers.cross_scale import _dw_grad_weight

    dw_s2 = torch.nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8, bias=False)
    dw_x, dw_g = torch.randn(2, 8, 9, 9, generator=g), torch.randn(2, 8, 5, 5, generator=g)
    from msconv.models.scsc_resnet import ConvStem, _stem_grad_weight

    stem_train = ConvStem(3, 16).train()  # batch statistics
    randomize_bn(stem_train)
    stem_gz = torch.randn(2, 16, 17, 17, generator=g)
    from msconv.layers.cross_scale import _branch_conv

    branch13 = torch.nn.Conv2d(8, 8, 13, padding=6, groups=8, bias=False)
    branch_map = torch.randn(2, 8, 11, 10, generator=g).contiguous(memory_format=torch.channels_last)
    from msconv.layers.mixed_conv import grouped_pointwise, grouped_pointwise_grad_weight

    gp_map = torch.randn(2, 32, 5, 6, generator=g).contiguous(memory_format=torch.channels_last)
    gp_w, gp_b = torch.randn(64, 4, 1, 1, generator=g), torch.randn(64, generator=g)
    gp_grad = torch.randn(2, 64, 5, 6, generator=g).contiguous(memory_format=torch.channels_last)
    smt_mlp_train = ConvMlp(16, 24).train()
    smt_attention = msconv.models.smt.Attention(16, 4).eval()
    smt_attention.reparameterize()
    from msconv.layers.cross_scale import _lean_gemm, _lean_gemm_backward

    lean_x, lean_w = torch.randn(3, 16, 5, 6, generator=g), torch.randn(24, 16, 1, 1, generator=g)
    lean_g = torch.randn(3, 24, 5, 6, generator=g)
    return {
        'linear': (lambda: fast_ops.linear(tokens, w, b), tokens),
        'linear_gelu': (lambda: fast_ops.linear_gelu(tokens, w, b), tokens),
        'conv_gelu': (lambda: fast_ops.conv_gelu(dw, fmap), fmap),
        'pointwise_conv': (lambda: fast_ops.pointwise_conv(pw, pmap), pmap),
        'pointwise_conv_train': (lambda: fast_ops.pointwise_conv_train(pw, pmap), pmap),
        'stem_conv': (lambda: stem(rgb), rgb),
        'smt_stage': (lambda: models['test_smt'](images), cl),
        'shiftwise_block': (lambda: models['test_shiftwise'](images), cl),
        'scsc_swin_block': (lambda: models['test_scsc_swin'](images), fmap),
        'inference_model.memory_format': (lambda: fast(images), images),
        # bf16: the fp32 tail rounds once where the plain form rounds after each of its 3 ops (see test_scsc.py)
        'scsc_routing': (lambda: scsc.route_fast(feats, gate), feats, 2.0**-8 * 3),
        'depthwise_grad_input': (lambda: depthwise_grad_input(gz, fmap, strip, (1, 3)), gz),
        'depthwise_grad_weight': (lambda: depthwise_grad_weight(gz, fmap, strip, (1, 3)), gz),
        'shiftwise_mlp_train': (
            lambda: lean_mlp_train(sw_map, sw_gate, sw_block.fc1, sw_block.grn, sw_block.fc2),
            sw_map,
        ),
        'roi_align': (lambda: roi_pool(pyramid, roi_boxes, [(64, 48)]), pyramid['0']),
        'scsc_train': (lambda: scsc_train._forward_tuned_train(smap), smap),
        'saa_fused': (lambda: saa(saa_map, interleaved=True), saa_map),
        'smt_mlp_bands': (lambda: smt_mlp(smt_tokens), smt_tokens),
        'smt_stem': (lambda: smt_stem(rgb), rgb),
        'scsc_swin_mlp_train': (lambda: swin_block._mlp_lean(smap), smap),
        'scsc_tokens': (lambda: scsc_tokens(smap_cl), smap_cl),
        # bf16 autocast: the lean function and the plain form round differently (bf16 activations)
        'scsc_train_amp': (lambda: _amp(lambda: scsc_train._forward_tuned_train(smap)), smap, 0.05),
        'scsc_dw_grad_weight': (lambda: _dw_grad_weight(dw_g, dw_x, dw_s2), dw_g),
        'scsc_stem_train': (lambda: stem_train._forward_tuned_train(rgb), rgb),
        'stem_conv_grad_weight': (lambda: _stem_grad_weight(stem_train.conv, stem_gz, rgb), rgb),
        'scsc_branch_conv': (lambda: _branch_conv(branch13, branch_map), branch_map),
        'grouped_pointwise': (lambda: grouped_pointwise(gp_map, gp_w, gp_b, 8), gp_map),
        'grouped_pointwise_grad_weight': (lambda: grouped_pointwise_grad_weight(gp_grad, gp_map, gp_w, 8), gp_grad),
        'smt_mlp_train': (lambda: smt_mlp_train._forward_train(smt_tokens), smt_tokens),
        'smt_attention': (lambda: smt_attention(smt_tokens), smt_tokens),
        'scsc_lean_gemm': (lambda: _lean_gemm(lean_w, lean_x), lean_x),
        'scsc_lean_gemm_backward': (
            lambda: torch.cat([t.reshape(-1) for t in _lean_gemm_backward(lean_g, lean_w, lean_x)]),
            lean_g,
        ),
    }


def _amp(fn):
    with torch.autocast('cpu', dtype=torch.bfloat16):
        return fn().float()


def test_every_declared_form_computes_what_the_plain_form_does(clean_tuner):
    """Iterates forms.TUNED: each candidate of each operation, pinned, against its plain form (a new operation
    needs an example here)."""
    examples = _examples()
    assert set(examples) == set(forms.TUNED), 'every tuned operation needs an example in this test'
    for op, spec in forms.TUNED.items():
        run, probe, *tol = examples[op]
        with torch.no_grad():
            with forms.forced_choices(**{op: spec.plain}):
                ref = run()
            for name, needs in list(spec.candidates.items())[1:]:
                assert name in forms._allowed(spec, probe), f'{op}: {name} needs {needs}, not allowed here'
                with forms.forced_choices(**{op: name}):
                    out = run()
                scale = max(1.0, ref.abs().max().item())
                assert (out.double() - ref.double()).abs().max().item() <= (tol or [1e-5])[0] * scale, (op, name)


def test_per_module_operations_are_keyed_by_the_module_structure(clean_tuner):
    """Two SMT models of other widths meeting the same input shape get their own smt_stage measurement; the same
    structure with other weights shares it; reparameterize() changes it."""
    torch.manual_seed(0)
    a, b = msconv.create_model('test_smt').eval(), msconv.create_model('test_smt').eval()
    other = msconv.create_model('test_smt', mlp_ratios=(3, 3, 3, 3)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for model in (a, b, other):
            model(x)
    stage_keys = [k for k in forms.autotune_choices() if k.startswith('smt_stage|(2, 16, 16, 16)|')]
    assert len(stage_keys) == 2, stage_keys  # a and b share one, other has its own
    sig = forms.structure_signature
    assert sig(a.stages[0]) == sig(b.stages[0]) != sig(other.stages[0])
    before = sig(a.stages[0])
    a.reparameterize()
    assert sig(a.stages[0]) != before


def test_autotune_off_runs_the_plain_forms_bit_for_bit(clean_tuner, monkeypatch):
    """MSCONV_AUTOTUNE=0, the documented switch for results that do not depend on timing: nothing is measured and
    every tuned operation runs its plain form (the output is bit-identical to pinning each one's plain form)."""
    torch.manual_seed(0)
    model = msconv.create_model('test_scsc_swin').eval()
    x = torch.randn(2, 3, 64, 64)
    plain = {op: spec.plain for op, spec in forms.TUNED.items()}
    with torch.no_grad(), forms.forced_choices(**plain):
        ref = model(x)
    monkeypatch.setenv('MSCONV_AUTOTUNE', '0')
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out, ref) and not forms.autotune_choices()


def test_restored_choices_are_reused_without_measuring(fresh_tuner, monkeypatch):
    """What one process chose (saved with a checkpoint) is taken by another: the same key runs the recorded form
    without a measurement, so a resumed run runs the forms of the run it continues. Entries of unknown operations
    or candidates (another msconv version) are skipped."""
    calls: dict = {}
    x = torch.zeros(2, 3)
    cands = {'plain': _counting(calls, 'plain'), 'fast': _counting(calls, 'fast')}
    with torch.no_grad():
        forms.tuned('op', x, cands)
    saved = forms.autotune_choices()
    ((key, choice),) = saved.items()
    monkeypatch.setattr(forms, '_CHOICES', {})  # a new process
    stale = {'no_such_op|(1,)|c': 'plain', key.replace('op|', 'op|', 1) + '|x': 'gone'}
    assert forms.restore_autotune_choices({**saved, **stale}) == 1
    assert forms.autotune_choices() == saved
    calls.clear()
    with torch.no_grad():
        forms.tuned('op', x, cands)
    assert calls == {choice: 1}  # run once, not timed


class _FakeClock:
    """``time.perf_counter`` for ``forms``: it moves only when a candidate says how long it took."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class _SinOfDouble(torch.autograd.Function):
    """``sin(2x)`` keeping only its input for backward (the plain form below also keeps ``2x``)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sin(2.0 * x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2.0 * g * torch.cos(2.0 * x)


@pytest.fixture
def memory_op(clean_tuner, monkeypatch):
    """A training operation of these tests: ``plain`` keeps an intermediate as large as the input, ``lean`` keeps
    nothing but the input; each advances a fake clock by its entry in the returned dict."""
    monkeypatch.setitem(
        forms.TUNED, 'mem', forms.TunedOp('mem', {'plain': (), 'lean': ()}, key='', where='tests', training=True)
    )
    clock = _FakeClock()
    monkeypatch.setattr(forms, 'time', clock)
    cost = {'plain': 1.0, 'lean': 1.0}

    def plain(x):
        clock.now += cost['plain']
        return torch.sin(x * 2.0)

    def lean(x):
        clock.now += cost['lean']
        return _SinOfDouble.apply(x)

    return cost, {'plain': plain, 'lean': lean}


@pytest.mark.parametrize(
    'lean_cost, slack, chosen',
    [
        (1.02, None, 'lean'),  # within the default 3%: the form keeping fewer bytes
        (0.99, None, 'lean'),
        (1.10, None, 'plain'),  # beyond it: the faster form
        (1.02, '0', 'plain'),  # speed only
        (1.10, '0.2', 'lean'),
    ],
)
def test_training_forms_within_the_memory_slack_go_to_the_one_keeping_less(
    memory_op, monkeypatch, lean_cost, slack, chosen
):
    cost, cands = memory_op
    cost['lean'] = lean_cost
    if slack is not None:
        monkeypatch.setenv('MSCONV_AUTOTUNE_MEMORY_SLACK', slack)
    x = torch.randn(4, 8, requires_grad=True)
    out = forms.tuned_training('mem', (x,), cands)
    assert list(forms.autotune_choices().values()) == [chosen]
    torch.testing.assert_close(out, torch.sin(2.0 * x), rtol=0, atol=0)
    out.sum().backward()  # the winner's real run: its gradient, into the caller's leaf
    torch.testing.assert_close(x.grad, 2.0 * torch.cos(2.0 * x.detach()))


def test_the_bytes_a_training_form_keeps_are_counted_without_the_inputs_and_parameters(monkeypatch):
    x = torch.randn(4, 8, requires_grad=True)
    saved: dict = {}
    forms._forward_backward(lambda x: torch.sin(x * 2.0), (x,), (), saved, 'plain')()
    forms._forward_backward(_SinOfDouble.apply, (x,), (), saved, 'lean')()
    lin = torch.nn.Linear(8, 8)
    forms._forward_backward(lambda m, x: m(x), (x,), (lin,), saved, 'module')()
    assert saved == {'plain': x.nbytes, 'lean': 0, 'module': 0}


@pytest.mark.parametrize('raw', ['-0.1', 'fast', 'nan'])
def test_a_bad_memory_slack_is_refused_by_name(monkeypatch, raw):
    monkeypatch.setenv('MSCONV_AUTOTUNE_MEMORY_SLACK', raw)
    with pytest.raises(ValueError, match=r'MSCONV_AUTOTUNE_MEMORY_SLACK: expected a number >= 0'):
        forms.memory_slack()
