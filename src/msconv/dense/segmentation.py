"""ADE20K semantic segmentation with msconv backbones: UperNet (Xiao et al., ECCV 2018) as in the official
``upernet_smt_s.py`` / ``upernet_SW.py`` mmsegmentation 0.x configs.

The head is written here: segmentation-models-pytorch's ``UPerNetDecoder`` has the same PPM/FPN/fusion convs but
puts a LayerNorm on every input level (not configurable) and has no auxiliary FCN head, so it cannot be configured
to the papers' head. The maths follows mmseg's ``UPerHead`` + ``FCNHead``:

* PPM on the last level: adaptive average pools 1/2/3/6, each a 1x1 ConvBNReLU to 512, bilinear upsampling,
  concatenated with the input and fused by a 3x3 ConvBNReLU (``bottleneck``);
* FPN: 1x1 ConvBNReLU laterals (512) on levels 0-2, top-down bilinear addition, 3x3 ConvBNReLU on each, all
  levels upsampled to stride 4, concatenated and fused by a 3x3 ConvBNReLU (``fpn_bottleneck``);
* dropout 0.1 and a 1x1 classifier; auxiliary ``FCNHead`` on level 2: one 3x3 ConvBNReLU to 256, dropout 0.1,
  1x1 classifier, loss weight 0.4;
* losses: cross-entropy with ignore index 255 on logits upsampled bilinearly (``align_corners=False``) to the
  label size, **averaged over all pixels** (ignored ones count as zero: mmseg 0.30's ``avg_non_ignore=False``,
  the configs' default; averaging over the non-ignored pixels instead scales the loss by the inverse of the
  labelled fraction of each batch). Convs before BatchNorm have no bias (mmcv ``ConvModule``) and start
  Kaiming-normal (fan out, ReLU) as ``ConvModule``'s init; the classifiers N(0, 0.01) with zero bias (mmseg's
  ``BaseDecodeHead``). BN is plain BatchNorm2d here (the configs use SyncBN:
  ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` for DDP).

Interface for the engine's task strategy: ``build_model = create_segmenter``; datasets from :mod:`msconv.data.ade`
(``images`` float (B, 3, H, W) in [0, 1], ``masks`` int64 (B, H, W) with 255 ignored); ``model.loss(images,
masks)`` -> dict of losses; ``model(images)`` -> logits at the input size; ``evaluate_segmentation`` from
:mod:`msconv.dense.evaluation` (whole / slide inference, multi-scale + flip).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .necks import MsconvBackbone, create_backbone

__all__ = [
    'ConvBNReLU',
    'PyramidPoolingModule',
    'UperHead',
    'FCNHead',
    'UperNet',
    'create_segmenter',
    'SEGMENTER_ARCHS',
    'IGNORE_INDEX',
    'seg_cross_entropy',
]

SEGMENTER_ARCHS = ('upernet',)
IGNORE_INDEX = 255
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class ConvBNReLU(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU: mmcv's ``ConvModule`` with ``norm_cfg=BN``."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(inplace=True),
        )
        nn.init.kaiming_normal_(self[0].weight, mode='fan_out', nonlinearity='relu')


def _classifier(in_chs: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_chs, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


def seg_cross_entropy(logits: torch.Tensor, masks: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """mmseg 0.30's ``CrossEntropyLoss`` (``avg_non_ignore=False``): per-pixel cross-entropy, ignored pixels 0,
    averaged over all pixels."""
    return F.cross_entropy(logits, masks, ignore_index=ignore_index, reduction='none').mean()


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


class PyramidPoolingModule(nn.Module):
    """PSPNet's pyramid pooling: pooled branches upsampled back to the input size, (B, C, H, W) -> list."""

    def __init__(self, in_chs: int, channels: int, pool_scales: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            [nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_chs, channels, 1)) for s in pool_scales]
        )

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [_resize(stage(x), x.shape[2:]) for stage in self.stages]


class UperHead(nn.Module):
    """UperNet's decode head over the four backbone levels (finest first); returns logits at stride 4."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.ppm = PyramidPoolingModule(in_channels[-1], channels, pool_scales)
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList([ConvBNReLU(c, channels, 1) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = _classifier(channels, num_classes)

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        laterals.append(self.bottleneck(torch.cat([top] + self.ppm(top), dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        outs = [outs[0]] + [_resize(o, outs[0].shape[2:]) for o in outs[1:]]
        x = self.fpn_bottleneck(torch.cat(outs, dim=1))  # (B, 512, H/4, W/4)
        return self.conv_seg(self.dropout(x))


class FCNHead(nn.Module):
    """The auxiliary head: ``num_convs`` 3x3 ConvBNReLU, dropout, 1x1 classifier (``concat_input=False``)."""

    def __init__(
        self, in_chs: int, num_classes: int, channels: int = 256, num_convs: int = 1, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[ConvBNReLU(in_chs if i == 0 else channels, channels, 3) for i in range(num_convs)])
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = _classifier(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


class UperNet(nn.Module):
    """Encoder-decoder segmenter: msconv backbone, :class:`UperHead`, auxiliary :class:`FCNHead` on level 2.

    ``forward(images)`` takes float images in [0, 1] (normalized inside with the ImageNet mean/std) and returns
    decode-head logits upsampled to the input size; ``loss(images, masks)`` (or ``forward(images, masks)``)
    returns ``loss_decode`` and ``loss_aux`` (already weighted).
    """

    def __init__(
        self,
        backbone: MsconvBackbone,
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        aux_channels: int = 256,
        aux_level: int = 2,
        aux_weight: float = 0.4,
        dropout: float = 0.1,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.decode_head = UperHead(backbone.channels, num_classes, channels, pool_scales, dropout)
        self.aux_level = aux_level
        self.aux_weight = aux_weight
        self.auxiliary_head = (
            FCNHead(backbone.channels[aux_level], num_classes, aux_channels, 1, dropout) if aux_weight > 0 else None
        )
        self.register_buffer('mean', torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def _check(self, images: Any) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a float tensor of shape (B, 3, H, W) in [0, 1], got {shape}")

    def _features(self, images: torch.Tensor) -> List[torch.Tensor]:
        self._check(images)
        return self.backbone((images - self.mean) / self.std)

    def forward(self, images: torch.Tensor, masks: Optional[torch.Tensor] = None):
        """Logits (B, K, H, W) at the input size; with ``masks``, the loss dict of :meth:`loss` (so that a
        ``DistributedDataParallel`` wrapper sees the training forward)."""
        if masks is not None:
            return self.loss(images, masks)
        return _resize(self.decode_head(self._features(images)), images.shape[2:])

    def loss(self, images: torch.Tensor, masks: torch.Tensor) -> Dict[str, torch.Tensor]:
        if not isinstance(masks, torch.Tensor) or masks.dim() != 3 or masks.shape[0] != images.shape[0]:
            raise ValueError(
                f"masks must be an int64 tensor of shape (B, H, W) matching images "
                f"{tuple(images.shape)}, got {getattr(masks, 'shape', type(masks).__name__)}"
            )
        feats = self._features(images)
        size = masks.shape[1:]
        masks = masks.long()
        losses = {'loss_decode': seg_cross_entropy(_resize(self.decode_head(feats), size), masks, self.ignore_index)}
        if self.auxiliary_head is not None:
            aux = _resize(self.auxiliary_head(feats[self.aux_level]), size)
            losses['loss_aux'] = self.aux_weight * seg_cross_entropy(aux, masks, self.ignore_index)
        return losses


def create_segmenter(
    backbone: str,
    arch: str = 'upernet',
    num_classes: int = 150,
    *,
    checkpoint_path: Optional[Union[str, os.PathLike]] = None,
    drop_path_rate: Optional[float] = None,
    aux_head: bool = True,
    channels: int = 512,
    aux_channels: int = 256,
    classifier_init: str = 'mmseg',
    **backbone_kwargs: Any,
) -> UperNet:
    """A segmenter of the papers on an msconv backbone (see the module docstring for the interface).

    Args:
        backbone: msconv model name, e.g. ``'smt_small'`` (``'test_smt'`` for tests).
        arch: ``'upernet'``.
        num_classes: 150 for ADE20K.
        checkpoint_path: ImageNet checkpoint of the backbone.
        drop_path_rate: backbone stochastic depth; default: the configs' value (SMT 0.2, SW 0.4).
        aux_head: the auxiliary FCN head on stage 3 (training only; it has no effect on predictions).
        channels, aux_channels: widths of the decode and auxiliary heads (the configs: 512 and 256; smaller
            values only for CPU tests and demos).
        classifier_init: the 1x1 classifiers' initialisation: ``'mmseg'`` (the configs': N(0, 0.01), zero bias) or
            ``'torch'`` (``nn.Conv2d``'s default). The digits demo uses ``'torch'``: with mmseg's, its 64-channel
            UperNet settles on the background class in 1000 steps (mIoU 0.10).
    """
    from .detection import config_drop_path_rate

    if arch not in SEGMENTER_ARCHS:
        raise ValueError(f"arch must be one of {SEGMENTER_ARCHS}, got {arch!r}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    for name, value in (('channels', channels), ('aux_channels', aux_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if drop_path_rate is None and isinstance(backbone, str):
        drop_path_rate = config_drop_path_rate(backbone)
    if classifier_init not in ('mmseg', 'torch'):
        raise ValueError(f"classifier_init must be 'mmseg' or 'torch', got {classifier_init!r}")
    body = create_backbone(backbone, checkpoint_path=checkpoint_path, drop_path_rate=drop_path_rate, **backbone_kwargs)
    model = UperNet(
        body, num_classes, channels=channels, aux_channels=aux_channels, aux_weight=0.4 if aux_head else 0.0
    )
    if classifier_init == 'torch':
        for head in (model.decode_head, model.auxiliary_head):
            if head is not None:
                head.conv_seg.reset_parameters()
    return model
