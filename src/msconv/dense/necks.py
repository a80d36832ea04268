"""Backbones and necks for dense prediction: an msconv ``features_only`` network followed by an FPN.

The FPN is torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork` (1x1 laterals and 3x3 outputs with bias,
nearest top-down upsampling: mmdetection's ``FPN`` maths). The extra levels follow the official configs:

* two-stage detectors (Mask R-CNN, Cascade Mask R-CNN): FPN over C2-C5 with 256 channels and ``num_outs=5``,
  the fifth level a stride-2 max-pool of P5 (``LastLevelMaxPool``);
* RetinaNet: FPN over C3-C5 (``start_level=1``) and P6/P7 from 3x3 stride-2 convs, P6 on the C5 *input*
  (``add_extra_convs='on_input'``), P7 on ReLU(P6) (``LastLevelP6P7`` with ``use_P5=False``).

``ShiftwiseConv``'s official downstream backbone puts a channels-first LayerNorm (eps 1e-6) on each output level
(``norm0..norm3`` in ``SW_v2_unirep.py``); SMT's own stage norms already end each stage, so nothing is added there.
:func:`create_backbone` picks this per family (``out_norm=None``) or as asked.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

__all__ = ['LayerNorm2d', 'MsconvBackbone', 'BackboneWithFPN', 'create_backbone', 'create_backbone_fpn']

_OUT_NORM_FAMILIES = ('shiftwise',)  # official downstream code norms every output level


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (ConvNeXt's ``channels_first`` LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class MsconvBackbone(nn.Module):
    """An msconv ``features_only`` network returning its four stage maps (strides 4/8/16/32), optionally normed.

    Attributes:
        channels: channels of each returned level; ``reductions``: their strides.
    """

    def __init__(self, body: nn.Module, out_norm: bool = False) -> None:
        super().__init__()
        self.body = body
        self.channels: List[int] = list(body.feature_info.channels())
        self.reductions: List[int] = list(body.feature_info.reduction())
        self.out_norms = nn.ModuleList([LayerNorm2d(c, eps=1e-6) for c in self.channels]) if out_norm else None

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = list(self.body(x))
        if self.out_norms is not None:
            feats = [norm(f) for norm, f in zip(self.out_norms, feats)]
        return feats


def create_backbone(
    model_name: str,
    checkpoint_path: Optional[Union[str, os.PathLike]] = None,
    drop_path_rate: Optional[float] = None,
    out_norm: Optional[bool] = None,
    **kwargs,
) -> MsconvBackbone:
    """The four-level backbone of a dense model from any msconv model name.

    Args:
        model_name: a registered msconv model (``msconv.list_models()``), e.g. ``'smt_small'``.
        checkpoint_path: an ImageNet checkpoint (official or msconv format), loaded as ``msconv.create_model``
            loads it; the classifier is dropped.
        drop_path_rate: stochastic depth of the backbone (the configs: SMT-S/B 0.2, SW-T 0.4).
        out_norm: LayerNorm on each output level; ``None`` follows the family's official downstream backbone.
        **kwargs: further model keyword arguments.
    """
    import msconv
    from msconv.models._registry import _MODEL_FAMILY

    if not isinstance(model_name, str) or model_name.split('.')[0] not in _MODEL_FAMILY:
        raise ValueError(
            f"model_name must be a registered msconv model name (see msconv.list_models()), got {model_name!r}"
        )
    if drop_path_rate is not None:
        if not isinstance(drop_path_rate, (int, float)) or not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be a float in [0, 1), got {drop_path_rate!r}")
        kwargs['drop_path_rate'] = float(drop_path_rate)
    body = msconv.create_model(
        model_name, checkpoint_path=checkpoint_path, features_only=True, out_indices=(0, 1, 2, 3), **kwargs
    )
    if out_norm is None:
        out_norm = _MODEL_FAMILY[model_name.split('.')[0]] in _OUT_NORM_FAMILIES
    return MsconvBackbone(body, out_norm=out_norm)


class BackboneWithFPN(nn.Module):
    """Backbone + FPN with the torchvision detection interface: ``forward(x) -> OrderedDict`` of maps named
    ``'0', '1', ...`` (FPN levels, finest first) plus the extra levels' names, and ``out_channels``.

    Args:
        backbone: an :class:`MsconvBackbone`.
        in_levels: which backbone levels feed the FPN (``(0, 1, 2, 3)`` for R-CNNs, ``(1, 2, 3)`` for RetinaNet).
        out_channels: FPN width (256 in every config).
        extra: ``'pool'`` (P6 = max-pool of P5) or ``'p6p7'`` (P6/P7 convs on C5) or ``None``.
    """

    def __init__(
        self,
        backbone: MsconvBackbone,
        in_levels: Sequence[int] = (0, 1, 2, 3),
        out_channels: int = 256,
        extra: Optional[str] = 'pool',
    ) -> None:
        super().__init__()
        n = len(backbone.channels)
        in_levels = tuple(in_levels)
        if (
            not in_levels
            or any(not isinstance(i, int) or not 0 <= i < n for i in in_levels)
            or list(in_levels) != sorted(set(in_levels))
        ):
            raise ValueError(f"in_levels must be increasing level indices in [0, {n}), got {in_levels!r}")
        extra_block: Optional[ExtraFPNBlock]
        if extra == 'pool':
            extra_block = LastLevelMaxPool()
        elif extra == 'p6p7':
            extra_block = LastLevelP6P7(backbone.channels[in_levels[-1]], out_channels)
            extra_block.use_P5 = False  # mmdet add_extra_convs='on_input', whatever the channel counts
        elif extra is None:
            extra_block = None
        else:
            raise ValueError(f"extra must be 'pool', 'p6p7' or None, got {extra!r}")
        self.backbone = backbone
        self.in_levels = in_levels
        self.fpn = FeaturePyramidNetwork(
            [backbone.channels[i] for i in in_levels], out_channels, extra_blocks=extra_block
        )
        self.out_channels = out_channels
        self.strides = [backbone.reductions[i] for i in in_levels] + {
            'pool': [backbone.reductions[in_levels[-1]] * 2],
            'p6p7': [backbone.reductions[in_levels[-1]] * 2, backbone.reductions[in_levels[-1]] * 4],
        }.get(extra, [])

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.backbone(x)
        return self.fpn(OrderedDict((str(k), feats[i]) for k, i in enumerate(self.in_levels)))


def create_backbone_fpn(
    model_name: str,
    extra: Optional[str] = 'pool',
    in_levels: Sequence[int] = (0, 1, 2, 3),
    out_channels: int = 256,
    **backbone_kwargs,
) -> BackboneWithFPN:
    """:func:`create_backbone` followed by an FPN (see :class:`BackboneWithFPN`)."""
    return BackboneWithFPN(create_backbone(model_name, **backbone_kwargs), in_levels, out_channels, extra)
