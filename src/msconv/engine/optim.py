"""The optimizer's parameter groups: what the trainer and the recipe tables (``grn_decay``) both ask."""

from __future__ import annotations

from typing import Any, Dict, List

import torch.nn as nn
from timm.optim import param_groups_weight_decay

__all__ = ['weight_decay_groups']


def weight_decay_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """timm's parameter groups (no decay for 1-D parameters, biases and ``model.no_weight_decay()``), except that
    parameters a module lists in ``force_weight_decay()`` (ShiftWise GRN gamma/beta, 4-D and decayed in the
    official model) are decayed."""
    skip = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else set()
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
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
