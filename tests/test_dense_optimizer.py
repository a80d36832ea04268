"""The dense presets' optimizer groups against the official optimizer constructors, parameter by parameter.

``tests/fixtures/dense/optimizer_groups.json`` (``scripts/dense_reference/make_dense_fixtures.py
--optimizer-groups``) holds, for each official config, the learning rate and weight decay that mmcv's
``DefaultOptimizerConstructor`` (SMT: ``custom_keys`` matched as substrings of the full name, or no
``paramwise_cfg``) or the ShiftwiseConv repository's ``LearningRateDecayOptimizerConstructor`` give every
parameter of the model of a reference fixture. Here the official names are mapped to msconv's through
:func:`msconv.dense.convert.convert_official_dense` (each official tensor filled with its own index, so that every
msconv parameter shows which official ones it was made of), and the groups of the msconv system, built by its task
from the preset, must give every parameter the same pair.
"""

from __future__ import annotations

import json
from typing import Dict, List, Tuple

import pytest
import torch
from dense_reference import FIXTURE_DIR, GROUP_CHARS, OPTIMIZER_SYSTEMS, SYSTEMS, build_msconv, load_fixture

from msconv.dense.convert import convert_official_dense
from msconv.engine.config import resolve_config
from msconv.engine.registry import task_class

pytestmark = pytest.mark.usefixtures('one_thread')
OFFICIAL = json.loads((FIXTURE_DIR / 'optimizer_groups.json').read_text())['systems']


def _sources(spec: List[list]) -> Dict[str, List[str]]:
    """msconv state-dict key -> the official keys its tensor was made of."""
    keys = [k for k, _, _ in spec]
    marked = {  # zero-stride views: the converter's renames, reshapes and concatenations keep the marks
        k: torch.tensor(float(i + 1)).expand(shape) if dtype != 'int64' else torch.zeros(shape, dtype=torch.int64)
        for i, (k, shape, dtype) in enumerate(spec)
    }
    out = {}
    for key, val in convert_official_dense(marked).items():
        if val.is_floating_point():
            out[key] = [keys[int(i) - 1] for i in torch.unique(val).tolist() if i != 0]
    return out


def _msconv_pairs(system: str) -> Tuple[Dict[str, Tuple[float, float]], object]:
    fixture, preset = OPTIMIZER_SYSTEMS[system]
    backbone, arch = SYSTEMS[fixture]
    task_name = 'segmentation' if arch == 'upernet' else 'detection'
    cfg = resolve_config(dict(model=backbone, task=task_name, preset=preset, arch=arch), check_paths=False)
    with torch.device('meta'):  # names and groups only
        model = build_msconv(fixture)
    names = {id(p): n for n, p in model.named_parameters()}
    lr = cfg.lr * (1.0 if cfg.lr_base_size is None else cfg.batch_size * cfg.accum_steps / cfg.lr_base_size)
    pairs = {}
    for g in task_class(task_name)(cfg).param_groups(model):
        for p in g['params']:
            pairs[names[id(p)]] = (lr * g.get('lr_scale', 1.0), g['weight_decay'])
    assert len(pairs) == len(names), 'parameters outside the groups'
    return pairs, cfg


@pytest.mark.parametrize('system', sorted(OPTIMIZER_SYSTEMS))
def test_groups_match_the_official_constructor(system):
    official = OFFICIAL[system]
    _, meta = load_fixture(official['fixture'])
    spec = meta['state_dict_spec']
    assert len(official['params']) == len(spec)
    want = {
        k: tuple(official['groups'][GROUP_CHARS.index(c)]) for (k, _, _), c in zip(spec, official['params']) if c != '-'
    }
    ours, cfg = _msconv_pairs(system)
    sources = _sources(spec)
    covered = set()
    for name, (lr, wd) in ours.items():
        assert sources[name], f'{system}: {name} comes from no official parameter'
        for src in sources[name]:
            assert src in want, f'{system}: {name} comes from {src}, which the official optimizer does not train'
            assert (lr, wd) == pytest.approx(want[src], rel=1e-12), (system, name, src)
            covered.add(src)
    assert covered == set(want), f'{system}: official parameters with no msconv one: {sorted(set(want) - covered)[:5]}'
    # what the comparison covered: SW's Cascade spans the constructor's 14 layer scales x decay / no decay
    distinct = {(round(lr, 15), wd) for lr, wd in ours.values()}
    assert len(distinct) == len(official['groups']) and len(covered) > 400
