"""What `msconv demo` says: no classifier-dropped warning when a dense backbone starts from the classification demo's
10-class weights (the backbone has no classifier to keep), and one line, once, when matplotlib is missing."""

from __future__ import annotations

import sys
import warnings

import pytest
from safetensors.torch import save_file

import msconv
from msconv.dense import create_backbone
from msconv.engine.demo import DEMO_MODELS, demo

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.mark.parametrize('name', ['test_smt', 'test_scsc_swin', 'test_scsc_resnet', 'test_shiftwise'])
def test_a_backbone_loads_a_classifier_checkpoint_of_any_size_without_a_warning(tmp_path, name):
    path = tmp_path / 'w.safetensors'
    classifier = msconv.create_model(name, num_classes=10)
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the classifier-dropped UserWarning would fail here
        body = msconv.create_model(name, checkpoint_path=path, features_only=True)
        if name != 'test_scsc_resnet':  # create_backbone takes the dense systems' families
            create_backbone(name, checkpoint_path=path)
    trunk = {k: v for k, v in classifier.state_dict().items() if not k.startswith(classifier._classifier_name())}
    loaded = {k[len('model.') :]: v for k, v in body.state_dict().items()}
    assert all((loaded[k] == v).all() for k, v in trunk.items() if k in loaded) and len(loaded) > 0
    # a classifier of another size is still announced where the model keeps one
    with pytest.warns(UserWarning, match='classifier tensors'):
        msconv.create_model(name, checkpoint_path=path, num_classes=5)


def test_demo_without_matplotlib_says_so_once_and_finishes(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # as when it is not installed
    spec = DEMO_MODELS['smt']
    monkeypatch.setitem(DEMO_MODELS, 'smt', dict(spec, overrides=dict(spec['overrides'], keep_last=1)))
    lines = []
    res = demo(families=['smt'], output=str(tmp_path), epochs=1, max_steps=2, progress=False, print_fn=lines.append)
    out = capsys.readouterr().out.splitlines() + lines
    said = [s for s in out if 'matplotlib' in s or 'curves.png' in s]
    assert said == [
        'curves.png needs matplotlib, which is not installed: pip install "msconv[plots]"; the demo goes on without it'
    ]
    assert res['curves'] is None and [r['family'] for r in res['rows']] == ['smt']
    assert not list(tmp_path.rglob('curves.png'))
