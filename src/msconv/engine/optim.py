"""The optimizer's parameter groups: what the trainer and the recipe tables (``grn_decay``) both ask.

* :func:`weight_decay_groups`: which parameters decay. timm's rule (1-D parameters, biases and
  ``no_weight_decay()`` exempt: the ImageNet recipes and the ShiftwiseConv dense configs) or mmcv's
  ``DefaultOptimizerConstructor`` (every parameter decays except names containing one of its ``custom_keys`` with
  ``decay_mult=0``: the SMT dense configs).
* :func:`layer_decay_groups` with :func:`shiftwise_layer_id`: the layer-wise learning-rate decay of the
  ShiftwiseConv dense configs (their ``LearningRateDecayOptimizerConstructor``), as ``lr_scale`` per group, which
  timm's schedulers multiply into each group's learning rate.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Sequence

import torch.nn as nn
from timm.optim import param_groups_weight_decay

__all__ = ['weight_decay_groups', 'layer_decay_groups', 'shiftwise_layer_id']


def weight_decay_groups(
    model: nn.Module, weight_decay: float, exclude_1d: bool = True, exclude_keys: Sequence[str] = ()
) -> List[Dict[str, Any]]:
    """Parameter groups with and without weight decay.

    Args:
        exclude_1d: timm's rule: no decay for 1-D parameters, biases and ``model.no_weight_decay()``, except that
            parameters a module lists in ``force_weight_decay()`` (ShiftWise GRN gamma/beta, 4-D and decayed in the
            official model) are decayed. False: mmcv's ``DefaultOptimizerConstructor``, every parameter decays
            (biases and norms included) but those of ``exclude_keys``.
        exclude_keys: no decay for parameters whose full name contains one of these strings (mmcv's
            ``paramwise_cfg=dict(custom_keys={key: dict(decay_mult=0.)})``, matched as substrings).
    """
    patterns = [f"*{key}*" for key in exclude_keys]
    if not exclude_1d:
        return param_groups_weight_decay(
            model, weight_decay, weight_decay_exclude_1d=False, no_weight_decay_list=patterns
        )
    skip = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip | set(patterns))
    forced = set()
    for prefix, module in model.named_modules():
        if hasattr(module, 'force_weight_decay'):
            forced |= {f"{prefix}.{n}" if prefix else n for n in module.force_weight_decay()}
    if not forced or not weight_decay:
        return groups
    params = dict(model.named_parameters())
    forced_ids = {id(params[n]) for n in forced if n in params}
    moved = []
    for g in groups:
        if g['weight_decay'] == 0.0:
            moved += [p for p in g['params'] if id(p) in forced_ids]
            g['params'] = [p for p in g['params'] if id(p) not in forced_ids]
    decay = next((g for g in groups if g['weight_decay'] > 0 and not g.get('use_fallback')), None)
    if decay is None:
        decay = {'params': [], 'weight_decay': weight_decay}
        groups.append(decay)
    decay['params'] += moved
    return [g for g in groups if g['params']]


def layer_decay_groups(
    groups: List[Dict[str, Any]],
    layer_of: Dict[int, int],
    decay_rate: float,
    num_layers: int,
) -> List[Dict[str, Any]]:
    """``groups`` split by layer, each with ``lr_scale = decay_rate ** (num_layers + 1 - layer)``: the
    ``LearningRateDecayOptimizerConstructor`` of the ShiftwiseConv dense configs (``num_layers`` is its
    ``paramwise_cfg['num_layers']``; it counts ``num_layers + 2`` ids, the last, ``num_layers + 1``, for every
    parameter outside the backbone's downsampling layers and stages, at scale 1).

    Args:
        layer_of: ``id(parameter) -> layer id`` for the parameters with one (:func:`shiftwise_layer_id`); the
            others get ``num_layers + 1``.
    """
    out: Dict[tuple, Dict[str, Any]] = {}
    for i, g in enumerate(groups):
        for p in g['params']:
            layer = layer_of.get(id(p), num_layers + 1)
            key = (i, layer)
            if key not in out:
                out[key] = dict(
                    {k: v for k, v in g.items() if k != 'params'},
                    params=[],
                    lr_scale=float(decay_rate) ** (num_layers + 1 - layer),
                )
            out[key]['params'].append(p)
    return [out[k] for k in sorted(out, key=lambda k: (k[1], k[0]))]


_STAGE = re.compile(r'^stages\.(\d+)\.(downsample|blocks\.(\d+))\.')


def shiftwise_layer_id(name: str, num_layers: int) -> int:
    """The layer id the ShiftwiseConv dense configs' optimizer constructor gives a backbone parameter
    (``get_layer_id_for_convnext``, ``downstream/detection/mmdet/core/optimizers/layer_decay_optimizer_constructor.py
    :10-50`` at lidc54/shift-wiseConv@2202e6b), from its name in :class:`msconv.models.shiftwise_net.ShiftWiseNet`:
    the stem (official ``downsample_layers.0``) 0; the downsampling before stages 1, 2, 3 -> 2, 3, ``num_layers``;
    the blocks of stage 0 -> 1, of stage 1 -> 2, block b of stage 2 -> ``3 + b // 3``, of stage 3 -> ``num_layers``;
    anything else ``num_layers + 1``."""
    if name.startswith('stem.'):
        return 0
    m = _STAGE.match(name)
    if m is None:
        return num_layers + 1
    stage = int(m.group(1))
    if m.group(3) is None:  # the downsampling layer in front of the stage
        return {0: 0, 1: 2, 2: 3}.get(stage, num_layers)
    return {0: 1, 1: 2, 2: 3 + int(m.group(3)) // 3}.get(stage, num_layers)
