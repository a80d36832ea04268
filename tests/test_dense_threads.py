"""SMT's dense inference forms at the thread counts the detectors run with (issue 24 item 4): the MLP bands' fc1
exact against the whole-map form, tuned choices kept apart per thread count."""

from __future__ import annotations

import pytest
import torch
from conftest import max_abs

import msconv
from msconv.layers import forms, reference_forms
from msconv.models.smt import ConvMlp


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_smt_mlp_bands_is_bit_identical_to_the_whole_map(clean_tuner, monkeypatch):
    """The bands form's fc1 on each band's token matrix (with the one-row halo) computes what the whole-map form
    computes."""
    torch.manual_seed(0)
    mlp = ConvMlp(16, 40).eval()
    mlp.reparameterize()
    x = torch.randn(2, 11, 6, 16)
    monkeypatch.setattr(ConvMlp, '_band_bytes', 4 * 6 * 40 * 4)  # 4 rows per band: 3 bands per image
    with torch.no_grad():
        with reference_forms():
            ref = mlp(x)
        with forms.forced_choices(smt_mlp_bands='bands'):
            out = mlp(x)
    assert max_abs(out, ref) < 1e-5


def test_tuned_choices_are_kept_per_thread_count(clean_tuner, threads):
    """A choice measured on one thread is not reused on two (the fastest form depends on the thread count)."""
    torch.manual_seed(0)
    model = msconv.create_model('test_smt').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.set_num_threads(1)
        model(x)
        one = set(forms.autotune_choices())
        torch.set_num_threads(2)
        model(x)
    two = set(forms.autotune_choices()) - one
    assert one and two
    assert {k.split('|')[5] for k in one} == {'1'} and {k.split('|')[5] for k in two} == {'2'}

    def without_threads(keys):
        return {'|'.join(k.split('|')[:5] + k.split('|')[6:]) for k in keys}

    assert without_threads(one) == without_threads(two)
