"""What training and evaluation both build: the model by name, its data configuration, and weights loaded with a
check that they belong to it."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import timm
import torch
import torch.nn as nn
from timm.data import resolve_data_config

from ..models import convert_official, create_model
from .config import family_of

__all__ = ['build_model', 'data_config', 'load_weights']


def build_model(
    name: str,
    num_classes: int,
    drop_path: float = 0.0,
    model_kwargs: Optional[Mapping] = None,
    checkpoint_path: Optional[str] = None,
    class_map: Optional[str] = None,
) -> nn.Module:
    """An msconv model (``msconv.create_model``) or, for other names, a timm model. ``class_map``: keep these rows
    of the checkpoint's classifier (e.g. ImageNet-22K -> 1K, ``msconv.create_model``'s ``class_map``)."""
    kwargs = dict(model_kwargs or {})
    kwargs.setdefault('num_classes', num_classes)
    if drop_path > 0:
        kwargs.setdefault('drop_path_rate', drop_path)
    if family_of(name) is not None:
        if class_map is not None:
            kwargs['class_map'] = class_map
        return create_model(name, checkpoint_path=checkpoint_path, **kwargs)
    if class_map is not None:
        raise ValueError(f"class_map is supported for msconv models only, not for the timm model {name!r}")
    return timm.create_model(name, checkpoint_path=checkpoint_path or '', **kwargs)


def data_config(model: nn.Module, cfg) -> Dict[str, Any]:
    """Input size, mean, std and eval crop fraction: the config's image size, else the model's pretrained_cfg (the
    bundled digits: 32 pixels, no crop)."""
    dc = resolve_data_config({}, model=model)
    size = cfg.image_size or (32 if cfg.data == 'digits' else dc['input_size'][-1])
    crop_pct = 1.0 if cfg.data == 'digits' else dc.get('crop_pct', 0.875)
    return {'size': int(size), 'mean': dc['mean'], 'std': dc['std'], 'crop_pct': crop_pct}


def load_weights(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    model_name: str,
    trained_as: Optional[str] = None,
    shown: int = 3,
) -> None:
    """Load ``state_dict`` strictly, after checking that it is a state dict of this model.

    A checkpoint of another model (or of another number of classes) raises one ``ValueError`` naming ``source``,
    the model it was trained as when known, and the first ``shown`` missing, unexpected and mis-shaped keys.
    """
    fam = family_of(model_name)
    sd = dict(state_dict)
    if fam is not None:
        sd = convert_official(sd, fam)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:

        def first(items):
            return ', '.join(items[:shown]) + (f' (+{len(items) - shown} more)' if len(items) > shown else '')

        parts = [
            f"{len(missing)} keys missing: {first(missing)}" if missing else '',
            f"{len(unexpected)} unexpected keys: {first(unexpected)}" if unexpected else '',
            f"{len(shapes)} shapes differ: {first(shapes)}" if shapes else '',
        ]
        origin = f" (it was trained as {trained_as!r})" if trained_as and trained_as != model_name else ''
        num_classes = getattr(model, 'num_classes', None)
        what = f"{model_name!r}" + (f" with {num_classes} classes" if num_classes is not None else '')
        raise ValueError(
            f"{source} is a checkpoint of another model{origin}, not of {what}: " + '; '.join(p for p in parts if p)
        )
    model.load_state_dict(sd)
