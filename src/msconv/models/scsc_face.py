"""FaceResNet + SCSC, and the plain face ResNet baseline it is compared with (IResNet-50 layout).

Paper: Wang, Chu, Han, Zhang, "SCSC: Spatial Cross-scale Convolution Module to Strengthen both CNNs and
Transformers", ICCV 2023 Workshops (NIVT), arXiv 2308.07110. The abstract claims that FaceResNet with SCSC
improves by 2.7% with 68% fewer FLOPs and 79% fewer parameters. The official repository has no face code, and
the paper's face configuration is not available to us, so the configuration below is OUR choice:

- Input: 112x112 aligned face crops, normalised with mean = std = 0.5 (the insightface convention).
- Output: a 512-d embedding from the insightface head BN2d -> Dropout -> Flatten -> Linear -> BN1d. Train it with
  a margin head (``msconv.layers.ArcFace`` / ``CosFace``); ``num_classes`` is the embedding size (so the timm
  contract "num_classes = output width" holds), and ``pretrained_cfg['classifier']`` names the embedding Linear.
- Baseline ``face_iresnet50``: the insightface IResNet-50 layout (3x3 stride-1 stem 64 + BN + PReLU; pre-BN basic
  blocks BN-conv3x3-BN-PReLU-conv3x3-BN with 1x1 projection shortcuts, depths 3,4,14,3, widths 64/128/256/512,
  every stage stride 2, 7x7 final map): 43.59M params, 6.31 GMACs. Initialised as insightface does (every conv
  N(0, 0.1), BNs 1/0) except that the last BN of each residual branch starts at zero (``zero_init_last``, timm's
  ResNet default; insightface's ``zero_init_residual`` option): with N(0, 0.1) a 3x3 conv multiplies the variance
  by 0.09 x its input channels (5.8 at 64, 46 at 512), which BatchNorm undoes in training but not in eval with fresh
  running statistics, so a fresh insightface-initialised IResNet-50 gives eval outputs of ~1e26 (an IResNet-100
  overflows to inf). With the residual branches at zero a fresh model's eval outputs are O(1), so comparisons of
  two exact forms of it (a capture against eager, timm's contract tests) see rounding, not a 1e26 lever on it.
  ``zero_init_last=False`` gives insightface's init exactly.
- ``scsc_faceresnet``: the same stem position (stride 1, PReLU) and the same depths 3,4,14,3 and four stride-2
  stages, with every basic block replaced by the residual SCSC block of ResNet+SCSC (kernel sizes (3,9,13),
  (3,7,11), (3,5,7), (3,5), 4 gate groups); widths 336/384/480/192 after a 96-channel stem. The widths were chosen
  so that the ratios against the baseline match the paper's claim: 9.21M params (-79%) and 2.01 GMACs (-68%).
  The narrow last stage keeps the flatten-FC embedding (the bulk of any face ResNet's parameters) small.

With ``num_classes=0`` the head returns globally average-pooled features (B, C), as every timm model does; with
``global_pool=''`` it returns the unpooled map. The flatten embedding needs the configured ``img_size``.
"""

import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs

from ..layers._fold import fold_bn_into_conv
from ..layers.cross_scale import STAGE_KERNEL_SIZES
from . import scsc_swin
from ._builder import check_image_input, factory_kwargs
from ._registry import register_model
from .scsc_resnet import ConvStem, ConvTrunk, make_cross_scale_stages

__all__ = ['FaceEmbeddingHead', 'IRBlock', 'CrossScaleFaceNet', 'FaceIResNet']


class FaceEmbeddingHead(nn.Module):
    """insightface embedding head: BN2d -> Dropout -> Flatten -> Linear -> BN1d (``pool_type='flatten'``).

    ``num_classes`` is the embedding size; the pre-logits are the flattened, normalised map (``hidden_size`` wide).
    With ``num_classes=0`` the head returns those pre-logits; ``pool_type='avg'`` pools instead and ``''`` passes
    the map through (neither uses the BN2d, which is then removed).
    """

    def __init__(
        self,
        in_chs: int,
        feat_size: Tuple[int, int],
        num_classes: int = 512,
        drop_rate: float = 0.0,
        pool_type: str = 'flatten',
    ) -> None:
        super().__init__()
        self.in_chs, self.feat_size, self.drop_rate = in_chs, tuple(feat_size), drop_rate
        self.pool_type = 'flatten'
        self.norm: nn.Module = nn.BatchNorm2d(in_chs)
        self.drop = nn.Dropout(drop_rate)
        self.reset(num_classes, pool_type)

    @property
    def flat_features(self) -> int:
        return self.in_chs * self.feat_size[0] * self.feat_size[1]

    @property
    def hidden_size(self) -> int:
        """Width of the pre-logits (what the head returns with ``num_classes=0``)."""
        return self.flat_features if self.pool_type == 'flatten' else self.in_chs

    def reset(self, num_classes: int, pool_type: Optional[str] = None) -> None:
        """New embedding layers on the device and dtype of the current ones. ``pool_type=None`` keeps the pooling,
        or, for an embedding (``num_classes > 0``), restores the flatten it needs."""
        if pool_type is None:
            pool_type = 'flatten' if num_classes > 0 else self.pool_type
        if pool_type not in ('flatten', 'avg', ''):
            raise ValueError(f"global_pool must be 'flatten', 'avg' or '', got {pool_type!r}")
        if num_classes > 0 and pool_type != 'flatten':
            raise ValueError(
                f"global_pool must be 'flatten' for an embedding head (num_classes > 0), got {pool_type!r}"
            )
        ref = next(self.parameters(), None)
        dd = dict(device=ref.device, dtype=ref.dtype) if ref is not None else {}
        self.pool_type = pool_type
        if pool_type != 'flatten':
            self.norm = nn.Identity()
        elif not isinstance(self.norm, nn.BatchNorm2d):
            self.norm = nn.BatchNorm2d(self.in_chs, **dd)
        if num_classes > 0:
            self.fc: nn.Module = nn.Linear(self.flat_features, num_classes, bias=True, **dd)
            self.features: nn.Module = nn.BatchNorm1d(num_classes, **dd)
        else:
            self.fc, self.features = nn.Identity(), nn.Identity()
        self.num_classes = num_classes

    @torch.jit.unused
    def _check_size(self, x: torch.Tensor) -> None:
        if isinstance(x, torch.Tensor) and tuple(x.shape[-2:]) != self.feat_size:
            raise ValueError(
                f"the flatten embedding head expects a {self.feat_size} feature map (the configured img_size), got "
                f"{tuple(x.shape[-2:])}"
            )

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.pool_type == '':
            return x
        if self.pool_type == 'avg':
            return x.mean((2, 3))
        if not torch.jit.is_scripting():
            self._check_size(x)
        x = self.drop(self.norm(x)).flatten(1)
        if pre_logits:
            return x
        return self.features(self.fc(x))


class IRBlock(nn.Module):
    """insightface basic block: BN -> conv3x3 -> BN -> PReLU -> conv3x3 (stride) -> BN, plus the shortcut."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act = nn.PReLU(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.conv2(self.act(self.bn2(self.conv1(self.bn1(x))))))
        return y + self.shortcut(x)

    def zero_init_last(self) -> None:
        """Start the residual branch at zero (its last BN's scale): a fresh block is its shortcut."""
        if isinstance(self.bn3, nn.BatchNorm2d):
            nn.init.zeros_(self.bn3.weight)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the BNs that follow a conv (``bn1`` precedes a zero-padded conv and stays)."""
        if isinstance(self.bn2, nn.Identity):
            return
        self.conv1, self.bn2 = fold_bn_into_conv(self.conv1, self.bn2), nn.Identity()
        self.conv2, self.bn3 = fold_bn_into_conv(self.conv2, self.bn3), nn.Identity()
        if isinstance(self.shortcut, nn.Sequential):
            self.shortcut = fold_bn_into_conv(self.shortcut[0], self.shortcut[1])


class _FaceNetBase(ConvTrunk):
    """Shared trunk plumbing: stride-1 stem, four stride-2 stages, embedding head."""

    def _build_head(
        self, img_size: Union[int, Tuple[int, int]], num_classes: int, drop_rate: float, global_pool: str
    ) -> None:
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if len(size) != 2 or not all(isinstance(s, int) and s >= self.min_input_size for s in size):
            raise ValueError(f"img_size must be an int or (H, W) of ints >= {self.min_input_size}, got {img_size!r}")
        feat = list(size)
        for _ in range(len(self.stages)):
            feat = [math.ceil(s / 2) for s in feat]
        self.img_size = size
        self.num_features = self.feature_info[-1]['num_chs']
        self.head = FaceEmbeddingHead(self.num_features, tuple(feat), num_classes, drop_rate, global_pool)
        self.head_hidden_size = self.head.hidden_size

    def _head_hidden_size(self) -> int:
        return self.head.hidden_size

    @torch.jit.unused
    def _check_face_input(self, x: torch.Tensor) -> None:
        if self.head.pool_type != 'flatten':
            return
        check_image_input(x, self.in_chans, min(self.img_size), type(self).__name__)
        if isinstance(x, torch.Tensor) and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"{type(self).__name__}: the embedding head needs inputs of exactly img_size={self.img_size}, "
                f"got shape {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            self._check_face_input(x)
        return self.forward_head(self.forward_features(x))


class CrossScaleFaceNet(_FaceNetBase):
    """FaceResNet + SCSC: stride-1 PReLU stem, four stride-2 stages of residual SCSC blocks, embedding head."""

    @factory_kwargs
    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 512,
        img_size: Union[int, Tuple[int, int]] = 112,
        depths: Sequence[int] = (3, 4, 14, 3),
        kernel_sizes: Sequence[Sequence[int]] = STAGE_KERNEL_SIZES,
        groups: int = 4,
        stem_width: int = 96,
        widths: Sequence[int] = (336, 384, 480, 192),
        routing: str = 'official',
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = 'flatten',
    ) -> None:
        super().__init__()
        self.num_classes, self.in_chans, self.grad_checkpointing = num_classes, in_chans, False
        self.min_input_size = 2 ** len(widths)
        self.stem = ConvStem(in_chans, stem_width, stride=1, act_layer=nn.PReLU)
        self.stages = make_cross_scale_stages(stem_width, widths, depths, kernel_sizes, groups, routing, drop_path_rate)
        self.feature_info = [
            dict(num_chs=w, reduction=2 ** (i + 1), module=f'stages.{i}') for i, w in enumerate(widths)
        ]
        self._build_head(img_size, num_classes, drop_rate, global_pool)
        se_convs = {id(c) for m in self.modules() if hasattr(m, 'fc1') and hasattr(m, 'gate') for c in (m.fc1, m.fc2)}
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and id(m) not in se_convs:
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')


class FaceIResNet(_FaceNetBase):
    """Plain face ResNet baseline in the insightface IResNet layout (pre-BN basic blocks, PReLU).

    ``zero_init_last`` (default True) starts each residual branch's last BN at zero (see the module docstring: a
    fresh model's eval outputs stay O(1)); False gives insightface's init exactly.
    """

    @factory_kwargs
    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 512,
        img_size: Union[int, Tuple[int, int]] = 112,
        depths: Sequence[int] = (3, 4, 14, 3),
        stem_width: int = 64,
        widths: Sequence[int] = (64, 128, 256, 512),
        drop_rate: float = 0.0,
        global_pool: str = 'flatten',
        zero_init_last: bool = True,
    ) -> None:
        super().__init__()
        if len(widths) != len(depths) or not all(isinstance(d, int) and d > 0 for d in depths):
            raise ValueError(f"depths must be positive ints, one per entry of widths, got {depths!r} and {widths!r}")
        self.num_classes, self.in_chans, self.grad_checkpointing = num_classes, in_chans, False
        self.min_input_size = 2 ** len(widths)
        self.stem = ConvStem(in_chans, stem_width, stride=1, act_layer=nn.PReLU)
        stages, in_chs = [], stem_width
        for w, d in zip(widths, depths):
            stages.append(
                nn.Sequential(*[IRBlock(in_chs if b == 0 else w, w, stride=2 if b == 0 else 1) for b in range(d)])
            )
            in_chs = w
        self.stages = nn.Sequential(*stages)
        self.feature_info = [
            dict(num_chs=w, reduction=2 ** (i + 1), module=f'stages.{i}') for i, w in enumerate(widths)
        ]
        self._build_head(img_size, num_classes, drop_rate, global_pool)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)  # insightface's IResNet init
            elif isinstance(m, IRBlock) and zero_init_last:
                m.zero_init_last()


def _create(cls: type, variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return build_model_with_cfg(
        cls,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls='getter'),
        **kwargs,
    )


_FACE_CFG = dict(
    num_classes=512,
    input_size=(3, 112, 112),
    crop_pct=1.0,
    interpolation='bilinear',
    fixed_input_size=True,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    first_conv='stem.conv',
)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return scsc_swin._cfg(**{**_FACE_CFG, **kwargs})


_TEST = dict(num_classes=64, input_size=(3, 64, 64), pool_size=(4, 4), test_input_size=(3, 64, 64))
default_cfgs = generate_default_cfgs(
    {
        'scsc_faceresnet': _cfg(),
        'face_iresnet50': _cfg(
            paper_ids='arXiv:2004.04989',
            paper_name='Improved Residual Networks for Image and Video Recognition',
        ),
        'test_scsc_faceresnet': _cfg(**_TEST),
        'test_face_iresnet': _cfg(**_TEST),
    }
)


@register_model('scsc', paper='SCSC (ICCVW 2023)')
def scsc_faceresnet(pretrained: bool = False, **kwargs: Any) -> CrossScaleFaceNet:
    """FaceResNet + SCSC, 112x112 -> 512-d: 9.21M params, 2.01 GMACs (-79% / -68% vs ``face_iresnet50``)."""
    return _create(CrossScaleFaceNet, 'scsc_faceresnet', pretrained, **kwargs)


@register_model('scsc', paper='IResNet (the insightface baseline)')
def face_iresnet50(pretrained: bool = False, **kwargs: Any) -> FaceIResNet:
    """Baseline face ResNet (insightface IResNet-50 layout), 112x112 -> 512-d: 43.59M params, 6.31 GMACs."""
    return _create(FaceIResNet, 'face_iresnet50', pretrained, **kwargs)


@register_model('scsc')
def test_scsc_faceresnet(pretrained: bool = False, **kwargs: Any) -> CrossScaleFaceNet:
    """Tiny FaceResNet + SCSC for tests: 64x64 -> 64-d."""
    args = dict(num_classes=64, img_size=64, depths=(1, 1, 1, 1), stem_width=24, widths=(72, 144, 288, 96))
    return _create(CrossScaleFaceNet, 'test_scsc_faceresnet', pretrained, **dict(args, **kwargs))


@register_model('scsc')
def test_face_iresnet(pretrained: bool = False, **kwargs: Any) -> FaceIResNet:
    """Tiny face IResNet for tests: 64x64 -> 64-d."""
    args = dict(num_classes=64, img_size=64, depths=(1, 1, 1, 1), stem_width=16, widths=(16, 32, 64, 64))
    return _create(FaceIResNet, 'test_face_iresnet', pretrained, **dict(args, **kwargs))
