"""One reading of the weights in a run or checkpoint folder (``msconv.engine.checkpoint.read_folder_weights``) for
``msconv eval`` and for the tools (export, erf: ``msconv.tools._common.read_weights``): the same weights, and the same
one-line refusals naming the bad file and the other choice."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_engine_train import TINY, make_image_folder

from msconv.engine import train
from msconv.engine.checkpoint import list_best_checkpoints, list_checkpoints, read_folder_weights
from msconv.engine.evaluate import evaluate
from msconv.tools._common import build_model, read_weights

pytestmark = pytest.mark.usefixtures('one_thread')


def _refusal(fn, *args, **kwargs) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the fall-back warnings of each corrupt checkpoint met
        with pytest.raises(ValueError) as e:
            fn(*args, **kwargs)
    return str(e.value)


def test_eval_and_the_tools_read_a_run_folder_alike(tmp_path):
    folder = make_image_folder(tmp_path / 'imgs', n_train=8, n_val=2)
    run = tmp_path / 'r'
    train(dict(TINY, data=str(folder), output=str(tmp_path), name='r', max_steps=2, model_kwargs={}))
    (step,) = list_checkpoints(run)
    found = read_folder_weights(run)
    assert found['checkpoint'] == str(step) and found['step'] == 2 and found['config'] == run / 'config.yaml'
    tools = read_weights(run)
    assert tools['model'] == 'test_smt' and tools['step'] == 2
    assert all(torch.equal(tools['state_dict'][k], v) for k, v in found['state_dict'].items())
    net = build_model('test_smt', run)  # what export and erf build from a run folder
    assert all(torch.equal(net.state_dict()[k], v) for k, v in found['state_dict'].items())
    ev = evaluate('test_smt', checkpoint=run, data=str(folder))
    assert ev['checkpoint'] == str(step) and ev['step'] == 2 and ev['which'] == 'last'
    no_ema = _refusal(read_weights, run, use_ema=True)
    assert no_ema == _refusal(evaluate, 'test_smt', checkpoint=run, use_ema=True) and "holds no 'ema'" in no_ema

    # the same refusals, word for word (the tools said "holds no valid checkpoint", eval named the bad file)
    (best,) = list_best_checkpoints(run)
    for folder_ in (step, best):
        weights = folder_ / 'model.safetensors'
        weights.write_bytes(weights.read_bytes()[:64])
    for which, other in (('last', 'try --which best'), ('best', 'try --which last')):
        said = _refusal(read_weights, run, which)
        assert said == _refusal(evaluate, 'test_smt', checkpoint=run, which=which, data=str(folder))
        assert "is truncated or corrupt" in said and other in said, said
    assert _refusal(read_weights, step, 'best') == _refusal(evaluate, 'test_smt', checkpoint=step, which='best')
