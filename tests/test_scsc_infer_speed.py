"""SCSC inference forms (issue 24 item 5): the token form keeps its reordered conv copies (``_token_convs``) only where
a ``runs`` or ``expanded`` choice uses them; a module whose ``scsc_tokens`` choice is ``concat`` drops them."""

from __future__ import annotations

import torch
from conftest import max_abs, randomize_bn

from msconv.layers import CrossScaleBottleneck, SpatialCrossScaleConv, forms

EVAL_TOL = 1e-5


def _block(seed=0):
    torch.manual_seed(seed)
    m = CrossScaleBottleneck(72, 72, (3, 9, 13), groups=4)
    randomize_bn(m, seed)
    m.eval().reparameterize()
    return m


def _find(m):
    return next(mod for mod in m.modules() if isinstance(mod, SpatialCrossScaleConv))


def test_concat_choice_drops_the_reordered_copies_runs_keeps_them():
    """A measurement (every form runs) leaves the copies; a later call that runs ``concat`` alone drops them; a
    ``runs`` call rebuilds them and from then on they stay, also across ``concat`` calls (another input size of the
    same module may choose either). Every output equals the plain form."""
    m = _block()
    mod = _find(m)
    x = torch.randn(2, 72, 10, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        with forms.reference_forms():
            ref = m(x.contiguous())
        tol = EVAL_TOL * max(1.0, ref.abs().max().item())
        mod._token_convs()  # what a measurement leaves behind
        assert mod.__dict__.get('_token_cache') is not None
        mod._drop_unused_token_convs(['concat', 'runs', 'expanded'])  # a measurement: nothing dropped
        assert mod.__dict__.get('_token_cache') is not None
        with forms.forced_choices(scsc_tokens='concat'):
            assert max_abs(m(x), ref) <= tol
        assert mod.__dict__.get('_token_cache') is None
        with forms.forced_choices(scsc_tokens='runs'):
            assert max_abs(m(x), ref) <= tol
        assert mod.__dict__.get('_token_cache') is not None
        with forms.forced_choices(scsc_tokens='concat'):
            assert max_abs(m(x), ref) <= tol
        assert mod.__dict__.get('_token_cache') is not None  # a reordered form was chosen once: kept


def test_autotuned_concat_leaves_no_copies(monkeypatch):
    """Through the autotuner: when ``concat`` is measured fastest, the copies built for the measurement are gone
    after the next call."""
    m = _block(1)
    mod = _find(m)
    monkeypatch.setattr(forms, '_CHOICES', {})
    monkeypatch.setattr(forms, '_disk', lambda: {})
    monkeypatch.setattr(forms, '_store', lambda key, choice: None)

    def measure(cands):  # every form runs once, as in a measurement; concat (or the plain form elsewhere) wins
        outs = {name: f() for name, f in cands.items()}
        name = 'concat' if 'concat' in outs else next(iter(outs))
        return name, outs[name]

    monkeypatch.setattr(forms, '_measure', measure)
    x = torch.randn(2, 72, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert forms.tunable('scsc_tokens', x)
        m(x)
        assert mod.__dict__.get('_token_cache') is not None
        m(x)
    assert mod.__dict__.get('_token_cache') is None
