"""Backbones and necks for dense prediction: an msconv ``features_only`` network followed by an FPN.

The FPN is torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork` (1x1 laterals and 3x3 outputs with bias,
nearest top-down upsampling: mmdetection's ``FPN`` maths). The extra levels follow the official configs:

* two-stage detectors (Mask R-CNN, Cascade Mask R-CNN): FPN over C2-C5 with 256 channels and ``num_outs=5``,
  the fifth level a stride-2 max-pool of P5 (``LastLevelMaxPool``);
* RetinaNet: FPN over C3-C5 (``start_level=1``) and P6/P7 from 3x3 stride-2 convs, P6 on the C5 *input*
  (``add_extra_convs='on_input'``), P7 on P6 itself (the config sets no ``relu_before_extra_convs``; torchvision's
  ``LastLevelP6P7`` would take ReLU(P6)): :class:`LastLevelP6P7OnInput`;
* ATSS: FPN over C3-C5 and P6/P7 from 3x3 stride-2 convs on the P5 *output* (``add_extra_convs='on_output'``),
  P7 on P6 without ReLU: :class:`LastLevelP6P7OnOutput`;
* Sparse R-CNN: FPN over C2-C5, no extra level (``num_outs=4``).

Every FPN conv (laterals, outputs, extra convs) starts Xavier-uniform with zero bias, as mmdet's ``FPN``
(``init_cfg=dict(type='Xavier', layer='Conv2d', distribution='uniform')``); torchvision's FPN uses Kaiming-uniform
(a=1).

``ShiftwiseConv``'s official downstream backbone puts a channels-first LayerNorm (eps 1e-6) on each output level
(``norm0..norm3`` in ``SW_v2_unirep.py``); SMT's own stage norms already end each stage, so nothing is added there.
:func:`create_backbone` picks this per family (``out_norm=None``) or as asked.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from ..layers.forms import is_capturing

__all__ = [
    'LayerNorm2d',
    'MsconvBackbone',
    'BackboneWithFPN',
    'LastLevelP6P7OnInput',
    'LastLevelP6P7OnOutput',
    'create_backbone',
    'create_backbone_fpn',
]

_OUT_NORM_FAMILIES = ('shiftwise',)  # official downstream code norms every output level
_SPARSE_FAMILIES = ('shiftwise',)  # official downstream configs: sparse=True
_DROP_PATH_MODE = {'smt': 'element'}  # official SMT dense backbones: drop_path = nn.Dropout(p)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (ConvNeXt's ``channels_first`` LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class MsconvBackbone(nn.Module):
    """An msconv ``features_only`` network returning its four stage maps (strides 4/8/16/32), optionally normed.

    Args:
        body: the ``features_only`` network.
        out_norm: a channels-first LayerNorm (eps 1e-6) on each returned level.
        sparse: keep the body's pruned weights pruned, as the official ShiftwiseConv downstream backbone with
            ``sparse=True``: the zeros of the weights present at construction (or at the latest
            ``load_state_dict``) become fixed masks, multiplied into the weights before every forward pass, so
            that the pruned kernels stay at zero while the detector trains (the optimizer may move them in
            between; the state dict saves them masked). Masked: every weight of two or more dimensions and the GRN
            parameters (four-dimensional in the official code), as the official ``init_weights``.

    Attributes:
        channels: channels of each returned level; ``reductions``: their strides.
    """

    def __init__(self, body: nn.Module, out_norm: bool = False, sparse: bool = False) -> None:
        super().__init__()
        self.body = body
        self.channels: List[int] = list(body.feature_info.channels())
        self.reductions: List[int] = list(body.feature_info.reduction())
        self.out_norms = nn.ModuleList([LayerNorm2d(c, eps=1e-6) for c in self.channels]) if out_norm else None
        self.sparse = bool(sparse)
        self._masks: Dict[str, torch.Tensor] = {}
        if self.sparse:
            self.update_masks()
            self.register_load_state_dict_post_hook(_update_masks_after_load)
            self._register_state_dict_hook(_save_masked)

    def _maskable(self) -> Iterator[Tuple[str, nn.Parameter]]:
        from timm.layers.grn import GlobalResponseNorm

        grn = {
            f'{n}.{p}'
            for n, m in self.body.named_modules()
            if isinstance(m, GlobalResponseNorm)
            for p in ('weight', 'bias')
        }
        for name, param in self.body.named_parameters():
            if param.dim() >= 2 or name in grn:
                yield name, param

    @torch.no_grad()
    def update_masks(self) -> None:
        """Take the current zeros of the maskable weights as the sparsity masks."""
        self._masks = {name: param != 0 for name, param in self._maskable()}

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned weights (in place, outside autograd, as the official ``apply_mask``)."""
        for name, param in self._maskable():
            mask = self._masks.get(name)
            if mask is not None:
                param.mul_(mask.to(param.device))

    def sparsity(self) -> float:
        """Fraction of the maskable weights that are pruned (0 without masks)."""
        total = sum(m.numel() for m in self._masks.values())
        return 1.0 - sum(int(m.sum()) for m in self._masks.values()) / total if total else 0.0

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if self.sparse and not is_capturing():
            self.apply_masks()
        feats = list(self.body(x))
        if self.out_norms is not None:
            feats = [norm(f) for norm, f in zip(self.out_norms, feats)]
        return feats


def _update_masks_after_load(module: MsconvBackbone, incompatible_keys) -> None:
    module.update_masks()


def _save_masked(module: MsconvBackbone, state_dict, prefix: str, local_metadata) -> None:
    """state_dict hook: the pruned weights are saved as zeros (so that loading re-derives the same masks)."""
    for name, mask in module._masks.items():
        key = f'{prefix}body.{name}'
        if key in state_dict:
            state_dict[key] = state_dict[key] * mask.to(state_dict[key].device)


def create_backbone(
    model_name: str,
    checkpoint_path: Optional[Union[str, os.PathLike]] = None,
    drop_path_rate: Optional[float] = None,
    out_norm: Optional[bool] = None,
    sparse: Optional[bool] = None,
    drop_path_mode: Optional[str] = None,
    **kwargs,
) -> MsconvBackbone:
    """The four-level backbone of a dense model from any msconv model name.

    Args:
        model_name: a registered msconv model (``msconv.list_models()``), e.g. ``'smt_small'``.
        checkpoint_path: an ImageNet checkpoint (official or msconv format), loaded as ``msconv.create_model``
            loads it; the classifier is dropped.
        drop_path_rate: stochastic depth of the backbone (the configs: SMT-S/B 0.2, SW-T 0.4).
        out_norm: LayerNorm on each output level; ``None`` follows the family's official downstream backbone.
        sparse: keep the checkpoint's pruned weights at zero (:class:`MsconvBackbone`); ``None`` follows the
            family's official downstream configs (ShiftwiseConv: ``sparse=True``).
        drop_path_mode: ``'sample'`` (stochastic depth: a whole residual branch dropped per sample, timm's
            ``DropPath``) or ``'element'`` (``nn.Dropout`` on the branch: each element dropped on its own, the
            official SMT detection and segmentation backbones' ``drop_path``, with which the papers' dense
            numbers were trained); ``None`` follows the family's official downstream code (SMT: ``'element'``,
            ShiftwiseConv: ``'sample'``).
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
    if drop_path_mode not in (None, 'sample', 'element'):
        raise ValueError(f"drop_path_mode must be 'sample', 'element' or None, got {drop_path_mode!r}")
    family = _MODEL_FAMILY[model_name.split('.')[0]]
    body = msconv.create_model(
        model_name, checkpoint_path=checkpoint_path, features_only=True, out_indices=(0, 1, 2, 3), **kwargs
    )
    if (drop_path_mode or _DROP_PATH_MODE.get(family, 'sample')) == 'element':
        _elementwise_drop_path(body)
    if out_norm is None:
        out_norm = family in _OUT_NORM_FAMILIES
    if sparse is None:
        sparse = family in _SPARSE_FAMILIES
    return MsconvBackbone(body, out_norm=out_norm, sparse=sparse)


def _elementwise_drop_path(body: nn.Module) -> None:
    """Replace every timm ``DropPath(p)`` of ``body`` by ``nn.Dropout(p)`` (same rate, same 1/(1-p) scaling)."""
    from timm.layers import DropPath

    for parent in list(body.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DropPath):
                setattr(parent, name, nn.Dropout(child.drop_prob))


class LastLevelP6P7OnInput(ExtraFPNBlock):
    """mmdet ``FPN(add_extra_convs='on_input')`` extra levels: P6 = conv3x3/2(C_last), P7 = conv3x3/2(P6), no
    ReLU in between (``relu_before_extra_convs=False``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)

    def forward(self, p: List[torch.Tensor], c: List[torch.Tensor], names: List[str]):
        p6 = self.p6(c[-1])
        p.extend([p6, self.p7(p6)])
        names.extend(['p6', 'p7'])
        return p, names


class LastLevelP6P7OnOutput(LastLevelP6P7OnInput):
    """mmdet ``FPN(add_extra_convs='on_output')`` extra levels: P6 = conv3x3/2(P_last), P7 = conv3x3/2(P6), no
    ReLU in between (torchvision's ``LastLevelP6P7`` with ``in_channels == out_channels`` would take ReLU(P6))."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels)

    def forward(self, p: List[torch.Tensor], c: List[torch.Tensor], names: List[str]):
        p6 = self.p6(p[-1])
        p.extend([p6, self.p7(p6)])
        names.extend(['p6', 'p7'])
        return p, names


def xavier_init_(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every conv of ``module`` (mmdet's FPN init)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class BackboneWithFPN(nn.Module):
    """Backbone + FPN with the torchvision detection interface: ``forward(x) -> OrderedDict`` of maps named
    ``'0', '1', ...`` (FPN levels, finest first) plus the extra levels' names, and ``out_channels``.

    Args:
        backbone: an :class:`MsconvBackbone`.
        in_levels: which backbone levels feed the FPN (``(0, 1, 2, 3)`` for R-CNNs, ``(1, 2, 3)`` for RetinaNet).
        out_channels: FPN width (256 in every config).
        extra: ``'pool'`` (P6 = max-pool of P5), ``'p6p7'`` (P6/P7 convs on C5), ``'p6p7_on_output'`` (P6/P7 convs
            on P5) or ``None``.
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
            extra_block = LastLevelP6P7OnInput(backbone.channels[in_levels[-1]], out_channels)
        elif extra == 'p6p7_on_output':
            extra_block = LastLevelP6P7OnOutput(out_channels)
        elif extra is None:
            extra_block = None
        else:
            raise ValueError(f"extra must be 'pool', 'p6p7', 'p6p7_on_output' or None, got {extra!r}")
        self.backbone = backbone
        self.in_levels = in_levels
        self.fpn = FeaturePyramidNetwork(
            [backbone.channels[i] for i in in_levels], out_channels, extra_blocks=extra_block
        )
        xavier_init_(self.fpn)
        self.out_channels = out_channels
        self.strides = [backbone.reductions[i] for i in in_levels] + {
            'pool': [backbone.reductions[in_levels[-1]] * 2],
            'p6p7': [backbone.reductions[in_levels[-1]] * 2, backbone.reductions[in_levels[-1]] * 4],
            'p6p7_on_output': [backbone.reductions[in_levels[-1]] * 2, backbone.reductions[in_levels[-1]] * 4],
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
