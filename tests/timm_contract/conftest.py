"""Harness that runs timm's own ``tests/test_models.py`` against msconv's models.

``run.py`` beside this file copies timm's test file (from the source distribution of the installed timm version,
never committed here) next to this conftest and runs pytest on it. This conftest, loaded before the test module:

* registers msconv's models (``import msconv``);
* narrows ``timm.list_models`` / ``timm.list_pretrained`` (which the test module calls at import time to
  parametrize its tests) to the msconv models selected by ``MSCONV_TIMM_MODELS``: ``micro`` (the ``test_*``
  variants, default), ``full`` (the full-size models of the capture checks) or a comma-separated list of names;
* adds msconv's model modules to every ``list_models(module=...)`` call, i.e. to the test file's
  ``FEAT_INTER_FILTERS`` (models with ``forward_intermediates``), without editing timm's file;
* deselects the tests that are not about an msconv model (timm's tests of named timm models) and the tests that
  download from the Hugging Face hub.
"""

import os

import pytest
import timm

import msconv

FULL_SIZE = ('smt_tiny', 'scsc_swin_tiny', 'scsc_resnet50', 'shiftwise_tiny', 'scsc_faceresnet', 'face_iresnet50')
MSCONV_MODULES = ['smt', 'shiftwise_net', 'scsc_swin', 'scsc_resnet', 'scsc_face']
HUB_TESTS = ('test_model_inference', 'test_model_load_pretrained', 'test_model_features_pretrained')


def _selected() -> set:
    spec = os.environ.get('MSCONV_TIMM_MODELS', 'micro')
    if spec == 'micro':
        return set(msconv.list_models('test_*'))
    if spec == 'full':
        return set(FULL_SIZE)
    names = {n.strip() for n in spec.split(',') if n.strip()}
    unknown = names - set(msconv.list_models())
    if unknown:
        raise pytest.UsageError(f"MSCONV_TIMM_MODELS names models msconv does not register: {sorted(unknown)}")
    return names


SELECTED = _selected()
_list_models, _list_pretrained = timm.list_models, timm.list_pretrained


def _msconv_only(names):
    return [n for n in names if n.split('.')[0] in SELECTED]


def list_models(filter='', module='', pretrained=False, exclude_filters='', name_matches_cfg=False, include_tags=None):
    if module:
        module = ([module] if isinstance(module, str) else list(module)) + MSCONV_MODULES
    return _msconv_only(
        _list_models(
            filter=filter,
            module=module,
            pretrained=pretrained,
            exclude_filters=exclude_filters,
            name_matches_cfg=name_matches_cfg,
            include_tags=include_tags,
        )
    )


def list_pretrained(filter='', exclude_filters=''):
    return _msconv_only(_list_pretrained(filter=filter, exclude_filters=exclude_filters))


timm.list_models, timm.list_pretrained = list_models, list_pretrained


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, 'callspec', None), 'params', {})
        name = str(params.get('model_name', '')).split('.')[0]
        if name in SELECTED and item.originalname not in HUB_TESTS:
            keep.append(item)
        else:
            drop.append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
