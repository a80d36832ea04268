"""Face mode: margin head on a folder of identities, embedding checkpoints, verification at each evaluation;
ShiftWise sparse training through the trainer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import msconv
from msconv.engine import train
from msconv.engine.checkpoint import list_checkpoints, load_checkpoint

pytestmark = pytest.mark.usefixtures('one_thread')


def _face_data(root: Path, ids: int = 3, per_id: int = 4, size: int = 64):
    from PIL import Image

    from msconv.data.face import save_bin

    rng = np.random.RandomState(0)
    for i in range(ids):
        d = root / 'train' / f'id{i}'
        d.mkdir(parents=True)
        for j in range(per_id):
            Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f'{j}.png')
    images = torch.from_numpy(rng.randint(0, 255, (20, 3, size, size), dtype=np.uint8))  # 10 pairs: 10 folds
    save_bin(root / 'pairs.bin', images, torch.tensor([True, False] * 5))
    return root / 'train', root / 'pairs.bin'


@pytest.mark.parametrize('margin', ['arcface', 'cosface'])
def test_face_task_trains_margin_head_and_checkpoints_embedding(tmp_path, margin):
    data, pairs = _face_data(tmp_path)
    res = train(
        dict(
            model='test_face_iresnet',
            task='face',
            preset='demo',
            data=str(data),
            margin=margin,
            margin_m=0.3 if margin == 'cosface' else 0.5,
            embedding_size=32,
            image_size=None,
            face_val_bins=[str(pairs)],
            batch_size=4,
            max_steps=3,
            progress=False,
            plot=True,
            output=str(tmp_path),
            name='face',
        )
    )
    assert res['status'] == 'finished' and res['steps'] == 3
    ver = res['last_eval']['verification']['pairs']
    weights, state, meta = load_checkpoint(list_checkpoints(tmp_path / 'face')[-1])
    assert set(weights) == {'model', 'head'}
    # the embedding network alone loads by name, with the embedding size as num_classes
    net = msconv.create_model('test_face_iresnet', num_classes=32)
    net.load_state_dict(weights['model'])
    # the reported verification is that of the saved embedding network, scored again from the .bin file
    from msconv.data.face import load_bin
    from msconv.engine.verification import evaluate_verification

    images, issame = load_bin(pairs, image_size=(64, 64))
    again = evaluate_verification(net, images, issame, batch_size=4)
    assert ver['accuracy'] == pytest.approx(again['accuracy']) and ver['num_pairs'] == 10
    assert weights['head']['weight'].shape == (3, 32)  # (identities, embedding)
    recs = [json.loads(line) for line in (tmp_path / 'face' / 'metrics.jsonl').read_text().splitlines()]
    assert any(r['kind'] == 'val' and 'verification_acc' in r for r in recs)


def test_face_task_needs_a_folder(tmp_path):
    with pytest.raises(ValueError, match="task 'face' needs --data"):
        train(dict(model='test_face_iresnet', task='face', data='digits'))


def test_shiftwise_sparsity_is_applied_and_checkpointed(tmp_path):
    res = train(
        dict(
            model='test_shiftwise',
            preset='demo',
            data='digits',
            batch_size=8,
            max_steps=2,
            progress=False,
            plot=False,
            output=str(tmp_path),
            name='sw',
            sparsity=dict(target=0.3, interval=1, prune_rate=0.3, gap=0),
        )
    )
    assert res['status'] == 'finished', res
    weights, state, _ = load_checkpoint(list_checkpoints(tmp_path / 'sw')[-1])
    assert 'sparsity' in state
    from msconv.layers.shiftwise import ShiftWiseConv2d

    net = msconv.create_model('test_shiftwise', num_classes=10)
    net.load_state_dict(weights['model'])
    for name, m in net.named_modules():
        if isinstance(m, ShiftWiseConv2d):
            w = m.weight.detach()  # masked kernels are exactly zero
            zero = (w.flatten(-2).abs().sum(-1) == 0).float().mean().item()
            assert zero == pytest.approx(0.3, abs=0.1), name
