"""Registration of msconv models into timm's registry, and the per-family official-checkpoint converters.

Every family module (``smt.py``, ``shiftwise_net.py``, ...) declares its entry points with ``@register_model``
from this file (a thin wrapper of timm's decorator that also records the family) and registers one pure
``convert(state_dict) -> state_dict`` function with ``register_converter``. The converter must accept an
official state dict of a whole model *or* of one official module (keys relative to it), and must leave
keys that are already in msconv form unchanged (it is applied on every ``load_state_dict``).
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from timm.models import register_model as _timm_register_model

from ._features import with_feature_getter
from ._weights import with_weights_messages

__all__ = [
    'register_model',
    'register_converter',
    'convert_official',
    'list_models',
    'model_family',
    'model_info',
    'FAMILIES',
]

FAMILIES = ('smt', 'shiftwise', 'scsc')

_MODEL_FAMILY: Dict[str, str] = {}
_MODEL_PAPER: Dict[str, Dict[str, Any]] = {}
_CONVERTERS: Dict[str, Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = {}


def register_model(
    family: str, paper_top1: Optional[float] = None, paper: Optional[str] = None, paper_top1_note: Optional[str] = None
) -> Callable:
    """Decorator: register a model entry point in timm's registry and record its msconv family, and, for the
    variants a paper reports, its ImageNet-1K top-1 (%) and the paper (timm's PretrainedCfg has no such field);
    ``paper_top1_note`` says how that top-1 was obtained when it is not ImageNet-1K training from scratch."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")

    def _decorate(fn: Callable) -> Callable:
        _MODEL_FAMILY[fn.__name__] = family
        _MODEL_PAPER[fn.__name__] = {'paper_top1': paper_top1, 'paper': paper, 'paper_top1_note': paper_top1_note}
        # pretrained=True's one-line errors (_weights.py); features_only with set_grad_checkpointing (_features.py)
        return _timm_register_model(with_feature_getter(with_weights_messages(fn)))

    return _decorate


def register_converter(family: str, fn: Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    _CONVERTERS[family] = fn


def model_family(model_name: str) -> str:
    """Family ('smt', 'shiftwise', 'scsc') of a registered msconv model name (a ``name.tag`` is accepted)."""
    base = model_name.split('.')[0]
    if base not in _MODEL_FAMILY:
        raise ValueError(unknown_model_message(model_name))
    return _MODEL_FAMILY[base]


def model_info(model_name: str) -> Dict[str, Any]:
    """``{'family', 'paper', 'paper_top1'}`` of a registered msconv model (paper fields may be None)."""
    return {'family': model_family(model_name), **_MODEL_PAPER[model_name.split('.')[0]]}


def unknown_model_message(model_name: str) -> str:
    close = difflib.get_close_matches(str(model_name), list(_MODEL_FAMILY), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ''
    shown = sum(not n.startswith('test_') for n in _MODEL_FAMILY)  # as many as `msconv list` shows
    return (
        f"model_name {model_name!r} is not an msconv model.{hint} Run `msconv list` to see the {shown} models "
        f"(`msconv list --all` or msconv.list_models() adds the {len(_MODEL_FAMILY) - shown} test_ micro models)."
    )


def list_models(pattern: str = '*', family: str | None = None) -> List[str]:
    """Sorted names of the registered msconv models, filtered by a glob ``pattern`` and/or ``family``."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} or None, got {family!r}")
    return sorted(
        n for n, f in _MODEL_FAMILY.items() if fnmatch.fnmatch(n, pattern) and (family is None or f == family)
    )


def convert_official(state_dict: Mapping[str, torch.Tensor], family: str) -> Dict[str, torch.Tensor]:
    """Convert an official state dict of ``family`` ('smt', 'shiftwise' or 'scsc') to msconv keys and layouts.

    A pure function: the input is not modified. Works on the state dict of a whole official model or of a
    single official module (keys relative to that module), and is the identity on msconv state dicts.
    """
    if family not in _CONVERTERS:
        raise ValueError(f"family must be one of {sorted(_CONVERTERS)}, got {family!r}")
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    return _CONVERTERS[family](dict(state_dict))
