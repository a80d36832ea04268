"""SyncBatchNorm where the official dense configs use SyncBN, and nowhere else.

=======================  ========================================================  =================================
system                   the configs' SyncBN                                       converted here
=======================  ========================================================  =================================
SMT Cascade Mask R-CNN   the box heads' ``norm_cfg=dict(type='SyncBN')``           ``roi_heads`` (the box heads'
                         (``cascade_mask_rcnn_ressa_..._3x_coco.py:24,43,62``)      BatchNorm; the mask heads have
                                                                                   none)
SMT UperNet              ``norm_cfg = dict(type='SyncBN')`` of both heads          ``decode_head``, ``auxiliary_head``
                         (``upernet_smt_s.py:2``)
SMT Mask R-CNN,          none (the heads have no BatchNorm; ATSS's head has        nothing
RetinaNet, ATSS,         GroupNorm, Sparse R-CNN's LayerNorm)
Sparse R-CNN
ShiftwiseConv, any       the backbone's ``use_sync_bn = True``                     the whole model
                         (``SW_v2_unirep.py:29`` / ``:27``) and the heads'
                         SyncBN (Cascade box heads, UperNet heads)
=======================  ========================================================  =================================

The SMT dense backbones build their BatchNorm layers (the stem, the attention's ``bn``) as plain ``nn.BatchNorm2d``
(``detection/mmdet/models/backbones/smt.py:88,219``): they stay BatchNorm, normalising over each GPU's images. Other
backbones (SCSC: no official dense config) convert whole.

torch's SyncBatchNorm computes only on CUDA; the engine converts under torchrun on CUDA devices
(:func:`msconv.engine.distributed.sync_bn_plan`).
"""

from __future__ import annotations

from typing import Tuple

import torch.nn as nn

__all__ = ['sync_bn_scope', 'convert_sync_batchnorm']

# (family, arch) -> the submodules whose BatchNorm layers the configs make SyncBN ('' : the whole model)
_SCOPE = {
    ('smt', 'cascade_mask_rcnn'): ('roi_heads',),
    ('smt', 'upernet'): ('decode_head', 'auxiliary_head'),
    ('smt', 'mask_rcnn'): (),
    ('smt', 'retinanet'): (),
    ('smt', 'atss'): (),
    ('smt', 'sparse_rcnn'): (),
}


def sync_bn_scope(backbone: str, arch: str) -> Tuple[str, ...]:
    """The submodules of the ``arch`` system on ``backbone`` (an msconv model name) whose BatchNorm layers the
    official configs synchronise (see the module docstring); ``('',)``: the whole model."""
    from msconv.models._registry import _MODEL_FAMILY

    family = _MODEL_FAMILY.get(str(backbone).split('.')[0])
    return _SCOPE.get((family, arch), ('',))


def convert_sync_batchnorm(model: nn.Module, backbone: str, arch: str) -> nn.Module:
    """``model`` (built by ``create_detector`` / ``create_segmenter`` for ``backbone`` and ``arch``) with the
    BatchNorm layers of :func:`sync_bn_scope` replaced by ``nn.SyncBatchNorm`` (statistics and parameters kept);
    the returned module is ``model`` itself unless the whole model is converted."""
    scope = sync_bn_scope(backbone, arch)
    if '' in scope:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name in scope:
        part = getattr(model, name, None)
        if part is not None:
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(part))
    return model
