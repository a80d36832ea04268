"""The autotuner's measuring rules (``msconv.layers.forms.tuned``): what is timed, how often, what is kept.

These count calls, never time: which candidate wins on this machine is not asserted anywhere.
"""

from __future__ import annotations

import pytest
import torch

import msconv
from msconv.inference import inference_model
from msconv.layers import forms


@pytest.fixture
def fresh_tuner(monkeypatch):
    monkeypatch.setattr(forms, '_CHOICES', {})
    monkeypatch.setattr(forms, '_DISK', None)
    monkeypatch.delenv('MSCONV_CACHE_DIR', raising=False)
    monkeypatch.delenv('MSCONV_AUTOTUNE', raising=False)
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
        out = forms.tuned('op', torch.zeros(2), {'a': _counting(calls, 'a'), 'b': _counting(calls, 'b')})
    assert calls == {'a': 1, 'b': 1} and out.shape == (1,)


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
