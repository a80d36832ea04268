"""ResNet + SCSC (the official "CBTNet"): every bottleneck replaced by a residual spatial cross-scale block.

Paper: Wang, Chu, Han, Zhang, "SCSC: Spatial Cross-scale Convolution Module to Strengthen both CNNs and
Transformers", ICCV 2023 Workshops (NIVT), arXiv 2308.07110. Official code: github.com/megvii-research/SCSC
(``cbtnet.py``). No official weights are published.

Macro design (official): 3x3 stride-2 stem conv 3->96 + BN + ReLU, no max-pool; four stages whose first block
downsamples (stride-2 depthwise and routing convs, 1x1 stride-2 conv + BN projection shortcut); block output
widths 288/576/1152/1536 (expansion 3 of 96/192/384/512); kernel sizes (3,9,13), (3,7,11), (3,5,7), (3,5) with 4
gate groups; global average pooling and a Linear head. ``scsc_resnet50`` = ``cbtnet50`` (depths 3,5,12,3):
25.57M params, 4.56 GMACs at 224.

Fixed official bugs: the released block's forward reads an attribute that is never set (it crashes as
shipped), and it hard-codes ``H // 2`` after a stride-2 conv, so inputs whose stage resolution becomes odd
(e.g. 112x112) crash. Here the spatial size is always taken from the conv output (``ceil(H / 2)``), so any
input of at least 32x32 runs (224, 160, 128, 112, 100, ...), with identical results where the official code runs.
"""

import re
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs

from ..layers._fold import fold_bn_into_conv
from ..layers.cross_scale import STAGE_KERNEL_SIZES, CrossScaleBottleneck, convert_scsc_official
from ..layers.fast_ops import bn_train_backward, bn_train_forward, conv_im2col
from ..layers.forms import tunable, tuned, tuned_training, use_fast_form
from . import scsc_swin
from ._builder import MsconvModel, factory_kwargs
from ._registry import register_converter, register_model

__all__ = ['CrossScaleResNet', 'checkpoint_filter_fn', 'convert_scsc']


class ConvStem(nn.Module):
    """3x3 conv (stride 2 by default) + BN + activation; ``reparameterize()`` folds the BN."""

    def __init__(self, in_chans: int, out_chs: int, stride: int = 2, act_layer: type = nn.ReLU) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = act_layer(out_chs) if act_layer is nn.PReLU else act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fast_form('inplace', x):
            return self._forward_inference(x)
        if not torch.jit.is_scripting() and self._lean_wanted(x):
            return self._forward_tuned_train(x)
        return self.forward_reference(x)

    @torch.jit.unused
    def _lean_wanted(self, x: torch.Tensor) -> bool:
        """A training step where the gate allows the ``scsc_stem_train`` operation's lean form and the stem's own
        conditions hold (``_lean_ok``)."""
        return torch.is_grad_enabled() and tunable('scsc_stem_train', x) and self._lean_ok()

    @torch.jit.unused
    def _forward_tuned_train(self, x: torch.Tensor) -> torch.Tensor:
        """The stem in a training step: autograd through its modules or the lean function (``_LeanStem``), whichever
        ``forms.tuned_training`` measures faster (forward + backward) on the running machine."""
        return tuned_training('scsc_stem_train', (x,), _STEM_TRAIN_FORMS, module=self)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    @torch.jit.unused
    def _lean_ok(self) -> bool:
        """The stem's own conditions for the lean training function: a bias-free 3x3 conv with zero padding 1
        (ungrouped, undilated, square stride), a plain BatchNorm in training mode tracking statistics, a ReLU."""
        conv, bn = self.conv, self.bn
        return (
            type(conv) is nn.Conv2d
            and conv.kernel_size == (3, 3)
            and conv.padding == (1, 1)
            and conv.dilation == (1, 1)
            and conv.groups == 1
            and conv.padding_mode == 'zeros'
            and conv.stride[0] == conv.stride[1]
            and conv.bias is None
            and type(bn) is nn.BatchNorm2d
            and bn.training
            and bn.track_running_stats
            and bn.affine
            and type(self.act) is nn.ReLU
        )

    @torch.jit.unused
    def _forward_lean(self, x: torch.Tensor) -> torch.Tensor:
        return _LeanStem.apply(self, x, self.conv.weight, self.bn.weight, self.bn.bias)

    @torch.jit.unused
    def _conv_tuned(self, x: torch.Tensor) -> torch.Tensor:
        """``conv(x)`` with autograd off: the conv or its im2col GEMMs (the ``stem_conv`` operation's choice)."""
        conv = self.conv
        if not tunable('stem_conv', x):
            return conv(x)
        return tuned(
            'stem_conv',
            x,
            {'conv': lambda: conv(x), 'im2col': lambda: conv_im2col(conv, x)},
            extra=f"{conv.out_channels}/s{conv.stride[0]}{'+b' if conv.bias is not None else ''}",
        )

    @torch.jit.unused
    def _forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        """Without autograd: the conv, or where the gate allows the ``stem_conv`` operation's im2col form (CPU fp32,
        a contiguous input) and it measures faster (an RGB stem: K = in_chans * 9 is thin for oneDNN's NCHW kernel),
        im2col GEMMs; a ReLU in place on the fresh output."""
        y = self.bn(self._conv_tuned(x))
        if type(self.act) is nn.ReLU:
            return torch.relu_(y)  # y is ours: no fresh activation-sized allocation
        return self.act(y)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if not isinstance(self.bn, nn.Identity):
            self.conv, self.bn = fold_bn_into_conv(self.conv, self.bn), nn.Identity()


def _stem_grad_weight(conv: nn.Conv2d, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The weight gradient of the stem's 3x3 conv (padding 1, no bias) at input ``x`` for the output gradient ``g``
    (autograd off): the convolution's backward, or per image a GEMM of the output gradient with the unfolded patches
    (the ``stem_conv_grad_weight`` operation's choice; an RGB stem's K = in_chans * 9 is thin for oneDNN's kernel)."""
    s = conv.stride[0]

    def backward() -> torch.Tensor:
        return torch.ops.aten.convolution_backward(
            g, x, conv.weight, None, conv.stride, conv.padding, conv.dilation, False, [0, 0], 1, [False, True, False]
        )[1]

    def im2col() -> torch.Tensor:
        B, n_out, Ho, Wo = g.shape
        gw = torch.zeros(n_out, conv.weight[0].numel(), dtype=g.dtype, device=g.device)
        gv = g.reshape(B, n_out, Ho * Wo)
        for i in range(B):
            gw.addmm_(gv[i], F.unfold(x[i : i + 1], 3, padding=1, stride=s)[0].t())
        return gw.view(conv.weight.shape)

    if not tunable('stem_conv_grad_weight', x):
        return backward()
    return tuned('stem_conv_grad_weight', x, {'backward': backward, 'im2col': im2col}, extra=f'{g.shape[1]}/s{s}')


class _LeanStem(torch.autograd.Function):
    """``ConvStem.forward_reference`` in training mode (3x3 conv, BatchNorm with batch statistics, ReLU) as one
    autograd function: the conv through the ``stem_conv`` operation's choice (the conv or im2col GEMMs), the ReLU in
    place on the BatchNorm's fresh output (no third stem-sized map), backward with the ops autograd runs for the BN and
    ReLU and the weight gradient through ``stem_conv_grad_weight``. Saves what autograd saves (the conv output for the
    BN, the output for the ReLU's mask, which the next block keeps anyway); the BN moves its running statistics once."""

    @staticmethod
    def forward(ctx, stem: 'ConvStem', x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        z = stem._conv_tuned(x)
        a, mean, invstd = bn_train_forward(stem.bn, z)
        y = torch.relu_(a)
        ctx.stem = stem
        ctx.save_for_backward(x, z, y, mean, invstd)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        stem = ctx.stem
        x, z, y, mean, invstd = ctx.saved_tensors
        g_a = torch.ops.aten.threshold_backward(grad, y, 0)
        g_z, g_bw, g_bb = bn_train_backward(g_a, z, stem.bn, mean, invstd)
        del g_a
        conv = stem.conv
        g_x = None
        if ctx.needs_input_grad[1]:
            g_x = torch.ops.aten.convolution_backward(
                g_z, x, conv.weight, None, conv.stride, conv.padding, conv.dilation, False, [0, 0], 1,
                [True, False, False],
            )[0]  # fmt: skip
        g_w = _stem_grad_weight(conv, g_z, x) if ctx.needs_input_grad[2] else None
        return None, g_x, g_w, g_bw, g_bb


#: The candidates of the ``scsc_stem_train`` tuned operation (called with the stem, or the autotuner's copy, and x).
_STEM_TRAIN_FORMS = {
    'plain': lambda stem, x: stem.forward_reference(x),
    'lean': lambda stem, x: stem._forward_lean(x),
}


def make_cross_scale_stages(
    in_chs: int,
    widths: Sequence[int],
    depths: Sequence[int],
    kernel_sizes: Sequence[Sequence[int]],
    groups: int,
    routing: str,
    drop_path_rate: float,
) -> nn.Sequential:
    """Stages of ``CrossScaleBottleneck``; each stage's first block has stride 2 and a projection shortcut."""
    if not (len(widths) == len(depths) == len(kernel_sizes)):
        raise ValueError(
            f"widths, depths and kernel_sizes must have one entry per stage, got {len(widths)}, {len(depths)} and "
            f"{len(kernel_sizes)}"
        )
    if not all(isinstance(d, int) and d > 0 for d in depths):
        raise ValueError(f"depths must be positive ints, got {depths!r}")
    dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
    stages, n = [], 0
    for width, depth, ks in zip(widths, depths, kernel_sizes):
        blocks = []
        for b in range(depth):
            blocks.append(
                CrossScaleBottleneck(
                    in_chs if b == 0 else width,
                    width,
                    ks,
                    groups=groups,
                    stride=2 if b == 0 else 1,
                    routing=routing,
                    drop_path=dpr[n],
                )
            )
            n += 1
        stages.append(nn.Sequential(*blocks))
        in_chs = width
    return nn.Sequential(*stages)


class ConvTrunk(MsconvModel):
    """What the SCSC CNNs (this file's ResNet and ``scsc_face``'s networks) share beyond ``MsconvModel``: stages that
    are ``nn.Sequential`` of blocks (no downsample of their own, hence their ``group_matcher``) and one
    ``grad_checkpointing`` flag for the model; subclasses build ``stem``, ``stages`` and ``head`` and set
    ``in_chans``, ``min_input_size``, ``feature_info`` and ``grad_checkpointing``."""

    family = 'scsc'

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            self.check_input(x)
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for stage in self.stages:
                x = checkpoint_seq(stage, x)
        else:
            x = self.stages(x)
        return x

    def _forward_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return checkpoint_seq(stage, x) if self.grad_checkpointing else stage(x)


class CrossScaleResNet(ConvTrunk):
    """ResNet + SCSC (official CBTNet design). ``widths`` are the block output widths (3 x the official planes)."""

    @factory_kwargs
    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 5, 12, 3),
        kernel_sizes: Sequence[Sequence[int]] = STAGE_KERNEL_SIZES,
        groups: int = 4,
        stem_width: int = 96,
        widths: Sequence[int] = (288, 576, 1152, 1536),
        routing: str = 'official',
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = 'avg',
    ) -> None:
        super().__init__()
        self.check_pooling(num_classes, global_pool)
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.stem = ConvStem(in_chans, stem_width, stride=2)
        self.stages = make_cross_scale_stages(stem_width, widths, depths, kernel_sizes, groups, routing, drop_path_rate)
        self.grad_checkpointing = False
        self.min_input_size = 2 ** (len(widths) + 1)
        self.feature_info = [
            dict(num_chs=w, reduction=2 ** (i + 2), module=f'stages.{i}') for i, w in enumerate(widths)
        ]
        self.num_features = self.head_hidden_size = widths[-1]
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        _init_weights(self)


def _init_weights(model: nn.Module) -> None:
    """The official init: kaiming-normal (fan_out, relu) convs, BN 1/0; the SE FCs (Linear in the official code)
    and the classifier keep PyTorch's default init."""
    se_convs = {id(c) for m in model.modules() if hasattr(m, 'fc1') and hasattr(m, 'gate') for c in (m.fc1, m.fc2)}
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and id(m) not in se_convs:
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def checkpoint_filter_fn(
    state_dict: Dict[str, torch.Tensor], model: Optional[nn.Module] = None
) -> Dict[str, torch.Tensor]:
    """Official ``CBTNet`` state dict (whole model, or one ``CNN_Trans_block``) -> ours; identity on msconv keys."""
    whole_model = 'conv1.weight' in state_dict and any(k.startswith('layer1.') for k in state_dict)
    out = {}
    for k, v in state_dict.items():
        if whole_model:
            if k == 'conv1.weight':
                k = 'stem.conv.weight'
            elif k.startswith('bn1.'):
                k = 'stem.bn.' + k[len('bn1.') :]
            elif k.startswith('fc.'):
                k = 'head.fc.' + k[len('fc.') :]
            else:
                m = re.match(r'^layer(\d)\.(\d+)\.(.+)$', k)
                if m:
                    k = f'stages.{int(m.group(1)) - 1}.{m.group(2)}.{m.group(3)}'
        out[k] = v
    return convert_scsc_official(out)


def convert_scsc(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The family converter: official Swin+SCSC or CBTNet (whole model or one module) -> msconv keys."""
    return checkpoint_filter_fn(scsc_swin.checkpoint_filter_fn(state_dict))


register_converter('scsc', convert_scsc)


def _create_scsc_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> CrossScaleResNet:
    return build_model_with_cfg(
        CrossScaleResNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls='getter'),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return scsc_swin._cfg(**{'first_conv': 'stem.conv', **kwargs})


default_cfgs = generate_default_cfgs(
    {
        'scsc_resnet50': _cfg(),
        'scsc_resnet101': _cfg(),
        'scsc_resnet152': _cfg(),
        'test_scsc_resnet': _cfg(num_classes=10, input_size=(3, 64, 64), pool_size=(2, 2), test_input_size=(3, 64, 64)),
    }
)


@register_model('scsc', paper='SCSC (ICCVW 2023)')
def scsc_resnet50(pretrained: bool = False, **kwargs: Any) -> CrossScaleResNet:
    """ResNet-50 + SCSC (official ``cbtnet50``, depths 3,5,12,3): 25.57M params, 4.56 GMACs at 224."""
    args = dict(depths=(3, 5, 12, 3), kernel_sizes=STAGE_KERNEL_SIZES, groups=4)
    return _create_scsc_resnet('scsc_resnet50', pretrained=pretrained, **dict(args, **kwargs))


@register_model('scsc', paper='SCSC (ICCVW 2023)')
def scsc_resnet101(pretrained: bool = False, **kwargs: Any) -> CrossScaleResNet:
    """ResNet-101 + SCSC (official ``cbtnet101``, depths 3,4,23,3): 37.28M params."""
    args = dict(depths=(3, 4, 23, 3), kernel_sizes=STAGE_KERNEL_SIZES, groups=4)
    return _create_scsc_resnet('scsc_resnet101', pretrained=pretrained, **dict(args, **kwargs))


@register_model('scsc', paper='SCSC (ICCVW 2023)')
def scsc_resnet152(pretrained: bool = False, **kwargs: Any) -> CrossScaleResNet:
    """ResNet-152 + SCSC (official ``cbtnet152``, depths 3,8,36,3): 52.69M params."""
    args = dict(depths=(3, 8, 36, 3), kernel_sizes=STAGE_KERNEL_SIZES, groups=4)
    return _create_scsc_resnet('scsc_resnet152', pretrained=pretrained, **dict(args, **kwargs))


@register_model('scsc')
def test_scsc_resnet(pretrained: bool = False, **kwargs: Any) -> CrossScaleResNet:
    """Tiny ResNet + SCSC for tests (stem 24, widths 72/144/288/384, depths 1,2,1,1)."""
    args = dict(
        depths=(1, 2, 1, 1),
        kernel_sizes=STAGE_KERNEL_SIZES,
        groups=4,
        stem_width=24,
        widths=(72, 144, 288, 384),
        num_classes=10,
    )
    return _create_scsc_resnet('test_scsc_resnet', pretrained=pretrained, **dict(args, **kwargs))
