"""ShiftWise sparse training rules against the official code (lidc54/shift-wiseConv sparse_core.py, funcs.py,
optim_factory.py), on tiny tensors: SNIP densities, prune-then-random-regrowth, path alignment, which optimizer
state is zeroed, and the GRN weight-decay grouping."""

from __future__ import annotations

import math

import pytest
import torch

import msconv
from msconv.engine.optim import weight_decay_groups
from msconv.engine.sparsity import SparsityScheduler

pytestmark = pytest.mark.usefixtures('one_thread')


def _model():
    torch.manual_seed(0)
    return msconv.create_model('test_shiftwise', num_classes=4)


def _official_densities(scores, target):
    """default_SNIP (sparse_core.py:105-162): keep int(N * keep_ratio) scores; kept means strictly above the
    last kept one; each layer's density is its kept fraction."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    threshold = torch.sort(flat, descending=True).values[int(flat.numel() * (1 - target)) - 1]
    return {n: (s > threshold).float().mean().item() for n, s in scores.items()}


def test_snip_densities_random_masks_and_dense_layers():
    model = _model()
    sched = SparsityScheduler(model, target=0.3, seed=3)
    names = list(sched.layers)
    gen = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(sched.layers[n].weight.shape[:2], generator=gen) for n in names}
    scores[names[0]] = scores[names[0]] + 10.0  # every kernel of the first layer scores above the threshold
    expected = _official_densities(scores, 0.3)
    assert expected[names[0]] == 1.0
    ref = torch.Generator().manual_seed(3)  # the masks: Bernoulli(density) from the scheduler's generator
    draws = {n: torch.rand(sched.layers[n].weight.shape[1], generator=ref) < expected[n] for n in names}
    sched.generator.manual_seed(3)  # (the uniform masks drawn at construction used it)
    sched.init_from_scores(scores)
    assert sched.init == 'snip'
    assert sched.dense_layers == [names[0]]  # >= 0.99 density: no mask, never pruned, never zeroed
    assert names[0] not in sched.masks and names[0] not in sched.layers
    for n in names[1:]:
        m = sched.masks[n]
        assert all(torch.equal(m[0], m[p]) for p in range(m.shape[0]))  # the same mask on every path
        assert torch.equal(m[0], draws[n])
        l1 = sched.layers[n].weight.detach().abs().sum((-2, -1))
        assert (l1[~m] == 0).all()
    w0 = model.get_submodule(names[0]).weight.detach().clone()
    sched.interval = 1
    sched.total_steps = 10
    sched.step()
    assert torch.equal(model.get_submodule(names[0]).weight.detach(), w0)  # the dense layer is never touched
    # checkpoints carry the dense layers
    other = SparsityScheduler(_model(), target=0.3)
    other.load_state_dict(sched.state_dict())
    assert other.dense_layers == [names[0]] and set(other.masks) == set(names[1:])


def test_snip_scores_come_from_the_copy_that_ran_backward():
    import copy

    model = _model()
    sched = SparsityScheduler(model, target=0.3)
    net = copy.deepcopy(model)
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    scores = sched.snip_scores(net)
    for n, layer in net.named_modules():
        if n in scores:
            assert torch.allclose(scores[n], (layer.weight * layer.weight.grad).abs().mean((-2, -1)))
    assert all(p.grad is None for p in model.parameters())  # the real model is untouched
    with pytest.raises(ValueError, match='no gradient'):
        sched.snip_scores()


def test_prune_by_magnitude_then_random_regrowth():
    model = _model()
    sched = SparsityScheduler(model, target=0.3, seed=5)
    mask = torch.tensor([True, True, False, True, True, True, False, True, True, True])
    score = torch.tensor([0.5, 0.1, 0.0, 0.9, 0.3, 0.05, 0.0, 0.7, 0.2, 0.8])
    rate = 0.3
    live = 8
    n_remove = math.ceil(rate * live)  # 3: the three smallest live scores 0.05, 0.1, 0.2
    pruned = mask.clone()
    pruned[[5, 1, 8]] = False
    removed, dead = 3, 5
    ref = torch.Generator().manual_seed(5)
    sched.generator.manual_seed(5)
    expected = pruned | (torch.rand(10, generator=ref) < removed / dead)
    out = sched._prune_regrow(mask, score, rate)
    assert n_remove == 3 and torch.equal(out, expected)
    assert out[[0, 3, 4, 7, 9]].all()  # the kept large ones stay
    # rate 0 changes nothing
    assert torch.equal(sched._prune_regrow(mask, score, 0.0), mask)


def test_alignment_prunes_path0_on_summed_norm_and_copies():
    model = _model()
    sched = SparsityScheduler(model, target=0.3, interval=1, total_steps=100, gap=1, seed=2)
    name = next(iter(sched.layers))
    layer = sched.layers[name]
    masks_before = sched.masks[name].clone()
    w_l1 = layer.weight.detach().abs().sum((-2, -1)).float()
    sched.steps = 1  # the update after step 1 uses the cosine-decayed rate of step 1
    rate = sched.current_prune_rate()
    sched.generator.manual_seed(11)
    expected = sched._prune_regrow(masks_before[0], w_l1.sum(0), rate)
    sched.steps = 0
    sched.generator.manual_seed(11)
    sched.step()  # update 1, gap 1: aligned
    m = sched.masks[name]
    assert torch.equal(m[0], expected) and all(torch.equal(m[0], m[p]) for p in range(m.shape[0]))


def test_only_sgd_momentum_of_masked_kernels_is_zeroed():
    for opt_cls, key, zeroed in ((torch.optim.SGD, 'momentum_buffer', True), (torch.optim.AdamW, 'exp_avg', False)):
        model = _model()
        kw = dict(lr=1e-2, momentum=0.9) if opt_cls is torch.optim.SGD else dict(lr=1e-2)
        opt = opt_cls(model.parameters(), **kw)
        sched = SparsityScheduler(model, target=0.3, interval=1000, total_steps=2000, optimizer=opt)
        model(torch.randn(2, 3, 32, 32)).square().mean().backward()
        opt.step()
        sched.step()
        for name, layer in sched.layers.items():
            state = opt.state[layer.weight][key].abs().sum((-2, -1))
            masked = ~sched.masks[name]
            assert (layer.weight.detach().abs().sum((-2, -1))[masked] == 0).all()
            if zeroed:
                assert (state[masked] == 0).all(), name
            else:
                assert (state[masked] > 0).any(), name  # Adam moments are left alone, as officially


def test_sparsity_held_on_average_over_updates():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    sched = SparsityScheduler(model, target=0.3, interval=1, total_steps=100, gap=4, optimizer=opt, seed=1)
    seen = []
    for _ in range(12):  # weights move as if trained (the rule reads only their norms)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.05)
        sched.step()
        seen.append(sched.sparsity())
    assert sched.updates == 12
    assert abs(sum(seen) / len(seen) - 0.3) < 0.1  # Bernoulli regrowth: held on average, not exactly


def test_grn_gamma_beta_are_decayed_and_keep_their_shapes():
    model = _model()
    groups = weight_decay_groups(model, 0.05)
    decay = {id(p) for g in groups if g['weight_decay'] > 0 for p in g['params']}
    n_grn = 0
    for name, p in model.named_parameters():
        if name.rsplit('.', 2)[-2] == 'grn':
            assert id(p) in decay and p.ndim == 1, name
            n_grn += 1
        elif p.ndim <= 1 or name.endswith('.bias'):
            assert id(p) not in decay, name
        else:
            assert id(p) in decay, name
    assert n_grn == 2 * 5  # 5 blocks in test_shiftwise
    # no other family forces decay
    smt = msconv.create_model('test_smt')
    groups = weight_decay_groups(smt, 0.05)
    no_decay = {id(p) for g in groups if g['weight_decay'] == 0 for p in g['params']}
    assert all((id(p) in no_decay) == (p.ndim <= 1 or n.endswith('.bias')) for n, p in smt.named_parameters())
    # the official checkpoint conversion still maps the 4-D official GRN tensors onto the 1-D ones
    import re

    from msconv.models.shiftwise_net import checkpoint_filter_fn

    sd = model.state_dict()
    official = {}
    for k, v in sd.items():
        m = re.fullmatch(r'stages\.(\d+)\.blocks\.(\d+)\.grn\.(weight|bias)', k)
        if m:
            name = 'gamma' if m.group(3) == 'weight' else 'beta'
            official[f'stages.{m.group(1)}.{m.group(2)}.act.1.{name}'] = v.view(1, 1, 1, -1)
    converted = checkpoint_filter_fn(official, model)
    assert len(converted) == n_grn
    for k, v in converted.items():
        assert torch.equal(v, sd[k]), k


def test_trainer_runs_the_snip_init_when_asked(tmp_path, capsys):
    from test_engine_train import make_image_folder

    from msconv.engine import train
    from msconv.engine.checkpoint import list_checkpoints, load_checkpoint

    data = make_image_folder(tmp_path / 'imgs', n_train=4, n_val=1)
    res = train(
        dict(
            model='test_shiftwise',
            preset='demo',
            data=str(data),
            batch_size=4,
            max_steps=1,
            progress=False,
            plot=False,
            num_workers=0,
            output=str(tmp_path),
            name='snip',
            sparsity=dict(target=0.3, interval=100, gap=131, init='snip'),
        )
    )
    assert res['status'] == 'finished'
    assert 'sparsity: SNIP init over 5 layer(s)' in capsys.readouterr().out
    weights, state, _ = load_checkpoint(list_checkpoints(tmp_path / 'snip')[-1])
    sp = state['sparsity']
    assert sp['init'] == 'snip' and set(sp['masks']) | set(sp['dense_layers']) == {
        n for n, m in msconv.create_model('test_shiftwise').named_modules() if type(m).__name__ == 'ShiftWiseConv2d'
    }
    for name, mask in sp['masks'].items():
        w = weights['model'][f'{name}.weight']
        assert (w.abs().sum((-2, -1))[~mask] == 0).all(), name
