"""Run folders and checkpoint hygiene: one run per folder, validity decides what is resumed and kept, no mixed
histories, crash leftovers cleaned, atomic rewrites."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_engine_train import TINY, make_image_folder

from msconv.engine import evaluate, train
from msconv.engine.checkpoint import list_checkpoints, load_checkpoint

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('imgs'))


def _train_steps(run: Path):
    return [
        json.loads(line)['step']
        for line in (run / 'metrics.jsonl').read_text().splitlines()
        if json.loads(line)['kind'] == 'train'
    ]


def _corrupt(ckpt: Path) -> None:
    f = ckpt / 'model.safetensors'
    f.write_bytes(f.read_bytes()[:64])


def test_same_command_twice_refuses_instead_of_mixing_runs(tmp_path, folder):
    common = dict(TINY, data=str(folder), output=str(tmp_path), ckpt_every=2)
    first = train(dict(common, max_steps=4))
    run = Path(first['run_dir'])
    files = lambda: {p: p.read_bytes() for p in run.rglob('*') if p.is_file() and p.name != '.lock'}  # noqa: E731
    before = files()
    with pytest.raises(ValueError, match=r"already holds a run.*--resume auto.*--overwrite"):
        train(dict(common, max_steps=2, lr=0.5))
    assert files() == before  # nothing of the first run was touched (.lock names its last holder)
    # --overwrite starts afresh: one run's history, config and checkpoints only
    train(dict(common, max_steps=2, lr=0.5, overwrite=True))
    assert _train_steps(run) == [2]
    assert [p.name for p in list_checkpoints(run)] == ['step-00000002']
    assert 'lr: 0.5' in (run / 'config.yaml').read_text()


def test_eval_of_a_run_folder_names_the_checkpoint_it_used(tmp_path, folder):
    res = train(dict(TINY, data=str(folder), output=str(tmp_path), name='r', max_steps=4, ckpt_every=2, keep_last=3))
    run = Path(res['run_dir'])
    _corrupt(run / 'checkpoints' / 'step-00000004')
    with pytest.warns(UserWarning, match='step-00000004'):
        ev = evaluate('test_smt', checkpoint=run, data=str(folder))
    assert Path(ev['checkpoint']).name == 'step-00000002' and ev['step'] == 2
    # the accuracy is that of the step-2 weights, computed independently from the loaded file
    w = load_checkpoint(run / 'checkpoints' / 'step-00000002')[0]['model']
    ev2 = evaluate(
        'test_smt',
        checkpoint=run / 'checkpoints' / 'step-00000002' / 'model.safetensors',
        data=str(folder),
        num_classes=3,
    )
    assert ev['top1'] == ev2['top1'] and ev['val_loss'] == pytest.approx(ev2['val_loss'])
    assert set(w) and ev['count'] == 12


def test_resume_auto_with_only_corrupt_checkpoints_refuses(tmp_path, folder):
    common = dict(TINY, data=str(folder), output=str(tmp_path), name='c', ckpt_every=2, keep_last=2)
    train(dict(common, max_steps=4))
    run = tmp_path / 'c'
    for p in list_checkpoints(run):
        _corrupt(p)
    history = (run / 'metrics.jsonl').read_text()
    with (
        pytest.raises(ValueError, match=r"no valid checkpoint.*step-00000004.*--overwrite"),
        pytest.warns(UserWarning, match='truncated or corrupt'),
    ):
        train(dict(common, max_steps=6, resume='auto'))
    assert (run / 'metrics.jsonl').read_text() == history
    # told to start afresh: the history is replaced, not appended to; good checkpoints are kept over bad ones
    with pytest.warns(UserWarning, match='truncated or corrupt'):
        res = train(dict(common, max_steps=6, resume='auto', overwrite=True))
    assert res['steps'] == 6 and _train_steps(run) == [2, 4, 6]
    assert [p.name for p in list_checkpoints(run)] == ['step-00000004', 'step-00000006']
    for p in list_checkpoints(run):
        load_checkpoint(p)  # all valid


def test_corrupt_newer_checkpoint_never_outranks_a_good_one(tmp_path, folder):
    common = dict(TINY, data=str(folder), output=str(tmp_path), name='k', ckpt_every=2, keep_last=2)
    train(dict(common, max_steps=6))
    run = tmp_path / 'k'
    _corrupt(run / 'checkpoints' / 'step-00000006')  # newest corrupt, step 4 good
    with pytest.warns(UserWarning, match='step-00000006'):
        res = train(dict(common, max_steps=5, resume='auto'))
    assert res['steps'] == 5
    names = [p.name for p in list_checkpoints(run)]
    assert names == ['step-00000004', 'step-00000005'], names  # the good ones; the corrupt step 6 is gone
    for p in list_checkpoints(run):
        load_checkpoint(p)
    assert _train_steps(run) == [2, 4, 5]


def test_crash_leftovers_are_cleaned_and_rewrites_are_atomic(tmp_path, folder, monkeypatch):
    common = dict(TINY, data=str(folder), output=str(tmp_path), name='t', ckpt_every=2, keep_last=3)
    train(dict(common, max_steps=2))
    run = tmp_path / 't'
    leftover = run / 'checkpoints' / '.tmp-step-00000004-12345'
    leftover.mkdir()
    (leftover / 'model.safetensors').write_bytes(b'partial')
    (run / '.metrics.jsonl.tmp-999').write_text('partial')
    # every rewrite of a run file goes through a temporary + rename
    import msconv.engine.checkpoint as ck

    replaced = []
    real_replace = ck.os.replace

    def spy(src, dst):
        replaced.append(Path(dst).name)
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, 'replace', spy)
    train(dict(common, max_steps=4, resume='auto', plot=True))
    assert not leftover.exists() and not (run / '.metrics.jsonl.tmp-999').exists()
    assert {'metrics.jsonl', 'metrics.csv', 'config.yaml', 'curves.png'} <= set(replaced)
    assert _train_steps(run) == [2, 4]


def test_resume_from_a_checkpoint_continues_that_run_only(tmp_path, folder):
    common = dict(TINY, data=str(folder), output=str(tmp_path), ckpt_every=2, keep_last=3)
    train(dict(common, name='a', max_steps=4))
    ckpt = tmp_path / 'a' / 'checkpoints' / 'step-00000002'
    with pytest.raises(ValueError, match=r"belongs to run folder .*/a'.*--name b"):
        train(dict(common, name='b', max_steps=6, resume=str(ckpt)))
    assert not (tmp_path / 'b').exists()
    res = train(dict(common, name='a', max_steps=6, resume=str(ckpt)))
    assert res['steps'] == 6
    # the steps after the resumed checkpoint were redone once, and its later checkpoint replaced
    assert _train_steps(tmp_path / 'a') == [2, 4, 6]
    assert [p.name for p in list_checkpoints(tmp_path / 'a')] == ['step-00000002', 'step-00000004', 'step-00000006']
