"""SCSC's lean training forms (kind ``lean_recompute``): the SCSC module's and the Swin+SCSC MLP's custom autograd
functions equal the plain form in values (1e-5), gradients (1e-4) and BatchNorm running statistics, save less for
backward, and step aside where they must (autocast, graph captures, ``reference_forms()``, eval BatchNorms). They run
where the ``scsc_train`` tuned operation chooses them: pinned with ``forms.forced_choices`` here, or measured by
``forms.tuned_training`` on copies of the module, so that the step in which the measurement happens is the plain
step too (running statistics, ``num_batches_tracked``, ``.grad``, the random generator). Which form wins on this
machine is never asserted."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import form_step, graph_names, max_abs, randomize_bn
from test_train_forms import _assert_same_step, _ddp_step, _micro_case, _train_step

import msconv
from msconv.layers import forms
from msconv.layers.cross_scale import CrossScaleBottleneck, SpatialCrossScaleConv
from msconv.models.scsc_swin import CrossScaleSwinBlock

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from _common import saved_bytes  # noqa: E402

LEAN = {'_LeanCrossScaleBackward', '_LeanMlpBackward'}


@pytest.fixture
def lean():
    """The lean forms pinned wherever the gate allows them (whatever the autotuner would choose)."""
    with forms.forced_choices(scsc_train='lean'):
        yield


def _nontrivial(module: nn.Module, seed: int) -> nn.Module:
    randomize_bn(module, seed)
    return module.train()


@pytest.mark.parametrize('name', ['test_scsc_swin', 'test_scsc_resnet'])
def test_micro_models_lean_step_equals_plain_step(name, lean):
    model, x, y, ref = _micro_case(name)
    assert '_LeanCrossScaleBackward' in graph_names(copy.deepcopy(model)(x))
    _assert_same_step(_train_step(copy.deepcopy(model), x, y), ref, name)
    plain = copy.deepcopy(model)
    with forms.reference_forms():
        saved_plain = saved_bytes(lambda: F.cross_entropy(plain(x), y))
    saved_lean = saved_bytes(lambda: F.cross_entropy(copy.deepcopy(model)(x), y))
    assert saved_lean < 0.8 * saved_plain


@pytest.mark.parametrize(
    'make,shape',
    [
        (lambda: SpatialCrossScaleConv(96, (3, 9, 13), groups=4), (2, 96, 56, 56)),  # Swin-T stage 1 mixer
        pytest.param(
            lambda: CrossScaleBottleneck(288, 576, (3, 7, 11), groups=4, stride=2),
            (2, 288, 29, 29),  # CBTNet-50 stage 2's first block, at an odd size
            marks=pytest.mark.slow,
        ),
        (lambda: CrossScaleBottleneck(96, 96, (3, 5), groups=4, routing='cross_scale'), (2, 96, 14, 14)),
        pytest.param(
            lambda: CrossScaleSwinBlock(192, (3, 7, 11), groups=4), (2, 192, 28, 28), marks=pytest.mark.slow
        ),  # Swin-T stage 2 block: mixer + lean MLP
    ],
)
def test_layers_at_realistic_shapes(make, shape, lean):
    torch.manual_seed(1)
    module = _nontrivial(make(), 2)
    x, u = torch.randn(shape), None
    with torch.no_grad():
        u = torch.randn_like(module(x))
    module = _nontrivial(make(), 2)  # the statistics from scratch on both sides
    module.load_state_dict(_nontrivial(make(), 2).state_dict())
    ref_module = copy.deepcopy(module)
    got = form_step(module, x, u, reference=False)
    ref = form_step(ref_module, x, u, reference=True)
    _assert_same_step(got, ref, type(module).__name__)
    lean_saved = saved_bytes(lambda: module(x.clone().requires_grad_(True)))
    with forms.reference_forms():
        plain_saved = saved_bytes(lambda: ref_module(x.clone().requires_grad_(True)))
    assert lean_saved < 0.75 * plain_saved


def test_swin_block_runs_both_lean_functions(lean):
    block = _nontrivial(CrossScaleSwinBlock(48, (3, 7, 11), groups=4), 3)
    names = graph_names(block(torch.randn(2, 48, 16, 16, requires_grad=True)))
    assert {'_LeanCrossScaleBackward', '_LeanMlpBackward'} <= names


def test_lean_forms_step_aside(lean):
    """Eval-mode BatchNorms (a frozen fine-tune), autocast and reference_forms() run the plain form, pinned or not."""
    block = _nontrivial(CrossScaleSwinBlock(48, (3, 7, 11), groups=4), 3)
    x = torch.randn(2, 48, 16, 16, requires_grad=True)
    block.norm.eval()
    block.mixer.dw_bn.eval()
    assert not {'_LeanCrossScaleBackward', '_LeanMlpBackward'} & graph_names(block(x))
    block.train()
    # bf16 autocast: the fp32 lean forms step aside; the SCSC module's bf16 lean function is the scsc_train_amp
    # operation's other form (tests/test_scsc_speed_forms.py), its plain form pinned here
    with torch.autocast('cpu', torch.bfloat16), forms.forced_choices(scsc_train_amp='plain'):
        assert not {'_LeanCrossScaleBackward', '_LeanMlpBackward'} & graph_names(block(x))
    with forms.reference_forms():
        assert not {'_LeanCrossScaleBackward', '_LeanMlpBackward'} & graph_names(block(x))


def test_bf16_autocast_step_is_the_plain_one():
    """Under autocast the fp32 lean functions step aside (the 1x1 convs pinned to the convolution on both sides: the
    ``train_gemm`` form's bf16 GEMMs round otherwise; the bf16 lean SCSC function, ``scsc_train_amp``, pinned to the
    plain form: it rounds otherwise too, see tests/test_scsc_speed_forms.py)."""
    torch.manual_seed(0)
    model = msconv.create_model('test_scsc_swin', num_classes=10, drop_path_rate=0.0).train()
    randomize_bn(model)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])

    def step(m, reference):
        with (
            forms.reference_forms(reference),
            forms.forced_choices(pointwise_conv_train='conv', scsc_train_amp='plain'),
        ):
            with torch.autocast('cpu', torch.bfloat16):
                out = m(x)
                loss = F.cross_entropy(out, y)
            loss.backward()
        return out.float().detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    (out_a, g_a), (out_b, g_b) = step(copy.deepcopy(model), False), step(copy.deepcopy(model), True)
    assert max_abs(out_a, out_b) <= 1e-5 * max(1.0, out_b.abs().max().item())
    for n in g_b:
        assert max_abs(g_a[n], g_b[n]) <= 1e-4 * max(1.0, g_b[n].abs().max().item()), n


@pytest.mark.parametrize('pin', ['lean', None])
@pytest.mark.parametrize('name', ['test_scsc_swin', 'test_scsc_resnet'])
def test_gradient_checkpointing(name, pin, clean_tuner):
    """Non-reentrant checkpointing recomputes the lean functions in backward (same saved tensors); both sides
    checkpointed, so the statistics move alike. Unpinned, the first forward measures the forms (on copies, its graphs
    shielded from the checkpoint's hooks) and the recomputation reuses the choice."""
    torch.manual_seed(0)
    model = msconv.create_model(name, num_classes=10, drop_path_rate=0.0).train()
    randomize_bn(model)
    model.set_grad_checkpointing(True)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([3, 4])
    with forms.reference_forms():
        ref = _train_step(copy.deepcopy(model), x, y)
    with forms.forced_choices(**({'scsc_train': pin} if pin else {})):
        _assert_same_step(_train_step(copy.deepcopy(model), x, y), ref, 'checkpointed')


def test_single_process_ddp_matches_the_plain_step(tmp_path, lean):
    model, x, y, ref = _micro_case('test_scsc_swin')
    _assert_same_step(_ddp_step(tmp_path, model, x, y), ref, 'ddp')


def test_fx_capture_in_training_runs_the_plain_form():
    torch.manual_seed(0)
    model = msconv.create_model('test_scsc_resnet', num_classes=10, drop_path_rate=0.0).train()
    randomize_bn(model)
    x = torch.randn(2, 3, 64, 64)
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))
    assert '_LeanCrossScale' not in traced.code
    out = traced(x)
    assert not {'_LeanCrossScaleBackward'} & graph_names(out)
    with forms.reference_forms():
        ref = copy.deepcopy(model)(x)
    assert max_abs(out, ref) <= 1e-5 * max(1.0, ref.abs().max().item())


def _full_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """``_train_step`` with every buffer compared afterwards (``num_batches_tracked`` too)."""
    out, grads, _ = _train_step(model, x, y)
    return out, grads, {n: b.clone().double() for n, b in model.named_buffers()}


@pytest.mark.parametrize('name', ['test_scsc_swin', 'test_scsc_resnet'])
def test_the_measuring_step_is_the_plain_step(name, clean_tuner):
    """Nothing pinned: the first training step measures the plain and lean forms of every SCSC module and Swin+SCSC
    MLP on copies. Its logits, gradients, running statistics and ``num_batches_tracked`` are the plain step's (no
    extra moves of the statistics, nothing accumulated into ``.grad``), the global random generator is where it was,
    and the choices are kept per module structure and input shape; the next step reuses them and still agrees."""
    torch.manual_seed(0)
    model = msconv.create_model(name, num_classes=10, drop_path_rate=0.0).train()
    randomize_bn(model)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # the cumulative average: an extra count of num_batches_tracked would show in the means
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    ref_model, got_model = copy.deepcopy(model), copy.deepcopy(model)
    with forms.reference_forms():
        ref = _full_step(ref_model, x, y)
    rng = torch.get_rng_state()
    got = _full_step(got_model, x, y)
    assert torch.equal(torch.get_rng_state(), rng)
    _assert_same_step(got, ref, 'measuring step')
    keys = [k for k in forms.autotune_choices() if k.startswith('scsc_train|')]
    tuned = [m for m in got_model.modules() if isinstance(m, (SpatialCrossScaleConv, CrossScaleSwinBlock))]
    assert keys and {k.split('|')[-1] for k in keys} <= {forms.structure_signature(m) for m in tuned}, keys
    assert all('|amp:off|' in k for k in keys)
    with forms.reference_forms():
        ref = _full_step(ref_model, x.flip(0), y)
    _assert_same_step(_full_step(got_model, x.flip(0), y), ref, 'second step')
    assert [k for k in forms.autotune_choices() if k.startswith('scsc_train|')] == keys  # nothing measured again


def test_measurement_runs_no_hook_and_fills_no_grad(clean_tuner):
    """The measurement takes its gradients on a copy of the module: a tensor hook on a parameter does not run and
    no ``.grad`` appears until the real backward."""
    block = _nontrivial(CrossScaleBottleneck(48, 48, (3, 5, 7), groups=4), 4)
    calls = []
    block.reduce.weight.register_hook(lambda g: calls.append(1))
    x = torch.randn(2, 48, 12, 12, requires_grad=True)
    out = block(x)
    assert any(k.startswith('scsc_train|(2, 48, 12, 12)|') for k in forms.autotune_choices())
    assert not calls and all(p.grad is None for p in block.parameters()) and x.grad is None
    out.sum().backward()
    assert calls == [1] and block.reduce.weight.grad is not None


def test_pins_and_the_switches_choose_the_form(clean_tuner, monkeypatch):
    """``forced_choices(scsc_train=...)`` runs that form in every SCSC module and Swin+SCSC MLP; under autocast
    (the fp32 lean kind does not allow it; the bf16 one is ``scsc_train_amp``'s timed choice, pinned plain here) and
    with ``MSCONV_AUTOTUNE=0`` the plain form runs and nothing is measured."""
    block = _nontrivial(CrossScaleSwinBlock(48, (3, 7, 11), groups=4), 3)
    x = torch.randn(2, 48, 16, 16, requires_grad=True)
    with forms.forced_choices(scsc_train='lean'):
        assert LEAN <= graph_names(block(x))
    with forms.forced_choices(scsc_train='plain'):
        assert not LEAN & graph_names(block(x))
    with torch.autocast('cpu', torch.bfloat16), forms.forced_choices(scsc_train_amp='plain'):
        assert not LEAN & graph_names(block(x))
    monkeypatch.setenv('MSCONV_AUTOTUNE', '0')
    assert not LEAN & graph_names(block(x))
    assert not [k for k in forms.autotune_choices() if k.startswith('scsc_train|')]


def test_per_module_training_operations_need_the_module():
    x = torch.zeros(1, 2, 1, 1, requires_grad=True)
    with pytest.raises(ValueError, match="'scsc_train' is timed per module: pass module="):
        forms.tuned_training('scsc_train', (x,), {'plain': lambda m, x: x, 'lean': lambda m, x: x})
