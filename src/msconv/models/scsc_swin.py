"""Swin + SCSC: the Swin-T macro design with spatial cross-scale convolution as the token mixer.

Paper: Wang, Chu, Han, Zhang, "SCSC: Spatial Cross-scale Convolution Module to Strengthen both CNNs and
Transformers", ICCV 2023 Workshops (NIVT), arXiv 2308.07110. Official code: github.com/megvii-research/SCSC
(``scsc_swin.py``, derived from DWNet). No official weights are published.

Each block is ``x = x + DropPath(SCSC(x)); x = x + DropPath(MLP(BN(x)))``: window attention is replaced by
SCSC (no pre-norm, no windows, no position bias) and the MLP's pre-norm is a BatchNorm. The network keeps
Swin's 4x4 patch embedding + LayerNorm, patch merging (LayerNorm + bias-free Linear) between stages, a final
LayerNorm, global average pooling and a Linear head.

Layout: the official code keeps tokens (B, L, C) and permutes to NCHW and back around every mixer and every
BatchNorm. Here the whole trunk stays NCHW (contiguous): the MLP is a pair of 1x1 convs, so blocks contain no
permute at all; only the LayerNorms of the stem, the three patch mergings and the final norm permute. On CPU
the depthwise convs and the routing are much faster on contiguous NCHW than on a channels-last view.

Differences from the released code (behaviour-preserving at the official 224x224): any input size >= 32 works
(patch merging pads odd sizes like timm's Swin), and ``reparameterize()`` folds every BatchNorm (three per mixer,
the MLP pre-norm into ``fc1``).
"""

import re
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, LayerNorm2d, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs
from timm.models._features import feature_take_indices
from timm.models.swin_transformer import PatchMerging

from ..layers._fold import bn_scale_shift
from ..layers.cross_scale import STAGE_KERNEL_SIZES, SpatialCrossScaleConv, convert_scsc_official
from ..layers.fast_ops import (
    bn_recompute,
    bn_train_backward,
    bn_train_forward,
    pointwise_conv_train,
)
from ..layers.forms import tunable, tuned, tuned_training, use_fast_form
from ..layers.linear import Linear
from ._builder import MsconvModel, factory_kwargs
from ._registry import register_model

__all__ = ['CrossScaleSwin', 'CrossScaleSwinBlock', 'checkpoint_filter_fn']

_CONV1X1 = ((0, 0), (1, 1), (1, 1), 1)  # padding, stride, dilation, groups of torch.mkldnn_convolution


class PatchEmbed(nn.Module):
    """4x4 stride-4 conv + LayerNorm over channels; NCHW in and out (contiguous)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int = 4) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.norm = LayerNorm2d(embed_dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fast_form('token_norm', x):
            return self._forward_tokens(x)
        return self.norm(self.proj(x)).contiguous()

    @torch.jit.unused
    def _forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` with the conv run channels-last, so that its output is the contiguous (B, H, W, C) token map
        the LayerNorm reads (and its backward writes) without a copy: one copy to NCHW at the end, where the plain form
        copies before and after the norm and again in backward."""
        if type(self.norm) is not LayerNorm2d:
            return self.norm(self.proj(x)).contiguous()
        t = self.proj(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)
        norm = self.norm
        return F.layer_norm(t, norm.normalized_shape, norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2).contiguous()


class PatchMergingNCHW(PatchMerging):
    """timm's Swin patch merging (2x2 neighbours -> LayerNorm(4C) -> Linear 4C->2C, odd sizes padded), NCHW in/out.
    The reduction is an ``msconv.layers.Linear`` (same parameter; its CPU GEMM runs on oneDNN)."""

    def __init__(self, dim: int, out_dim: Optional[int] = None) -> None:
        super().__init__(dim, out_dim)
        self.reduction = Linear(4 * dim, self.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, out_dim, ceil(H/2), ceil(W/2))
        if use_fast_form('token_norm', x, 'contiguous'):
            return self._forward_gather(x)
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        B, H, W, C = x.shape
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))  # odd sizes: one zero row / column, as timm's Swin
        x = x.reshape(B, (H + 1) // 2, 2, (W + 1) // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x)).permute(0, 3, 1, 2).contiguous()

    @torch.jit.unused
    def _forward_gather(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` for a contiguous NCHW ``x``: the 2x2 neighbours gathered into the (B, H/2, W/2, 4C) tokens
        straight from the NCHW map by one copy (the plain form permutes, pads and copies twice; in backward the gather's
        gradient comes back as one contiguous NCHW copy)."""
        B, C, H, W = x.shape
        if H % 2 or W % 2:  # odd sizes: one zero row / column, as timm's Swin
            x = F.pad(x, (0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        t = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 5, 3, 1).reshape(B, H // 2, W // 2, 4 * C)
        return self.reduction(self.norm(t)).permute(0, 3, 1, 2).contiguous()


class CrossScaleSwinBlock(nn.Module):
    """SCSC token mixer + BatchNorm-pre-norm MLP (1x1 convs), both residual; NCHW in and out."""

    def __init__(
        self,
        dim: int,
        kernel_sizes: Sequence[int],
        groups: int = 4,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path: float = 0.0,
        routing: str = 'official',
    ) -> None:
        super().__init__()
        self.mixer = SpatialCrossScaleConv(dim, kernel_sizes, groups=groups, routing=routing)
        self.norm = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop_rate, use_conv=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and use_fast_form('inplace', x):
            return self._forward_inplace(x)
        if torch.is_grad_enabled() and tunable('scsc_train', x) and self._lean_ok():
            return self._forward_train(x, tuned=True)
        if torch.is_grad_enabled() and tunable('pointwise_conv_train', x):
            return self._forward_train(x, tuned=False)
        return self.forward_reference(x)

    @torch.jit.unused
    def _lean_ok(self) -> bool:
        """The block's own conditions for the lean MLP: a plain training-mode BatchNorm pre-norm, 1x1 convs with
        biases, exact GELU, no norm or dropout inside the MLP (the mixer asks its own)."""
        bn, mlp = self.norm, self.mlp
        return (
            type(bn) is nn.BatchNorm2d
            and bn.training
            and bn.track_running_stats
            and bn.affine
            and mlp.fc1.bias is not None
            and mlp.fc2.bias is not None
            and type(mlp.act) is nn.GELU
            and mlp.act.approximate == 'none'
            and isinstance(mlp.norm, nn.Identity)
            and all(
                isinstance(d, nn.Identity) or (isinstance(d, nn.Dropout) and d.p == 0) for d in (mlp.drop1, mlp.drop2)
            )
        )

    @torch.jit.unused
    def _mlp_lean(self, x: torch.Tensor) -> torch.Tensor:
        """``x + drop_path(self.mlp(self.norm(x)))`` as one lean autograd function (``_LeanMlp``, the residual add
        inside it where there is no drop path), in the layout ``forms.tuned_training`` measures faster for this block's
        structure and input shape (``scsc_swin_mlp_train``: image by image, or batched over all tokens)."""
        return tuned_training('scsc_swin_mlp_train', (x,), _MLP_LAYOUTS, module=self)

    @torch.jit.unused
    def _mlp_lean_form(self, x: torch.Tensor, batched: bool) -> torch.Tensor:
        mlp = self.mlp
        params = (self.norm.weight, self.norm.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
        residual = isinstance(self.drop_path, nn.Identity)
        y = _LeanMlp.apply(self, x, batched, residual, *params)
        return y if residual else x + self.drop_path(y)

    @torch.jit.unused
    def _mlp_train(self, x: torch.Tensor) -> torch.Tensor:
        """``self.mlp(self.norm(x))`` with the two 1x1 convs through ``fast_ops.pointwise_conv_train``."""
        mlp = self.mlp
        h = mlp.drop1(mlp.act(pointwise_conv_train(mlp.fc1, self.norm(x))))
        return mlp.drop2(pointwise_conv_train(mlp.fc2, mlp.norm(h)))

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mixer(x))
        x = x + self.drop_path(self.mlp(self.norm(x)))
        return x

    @torch.jit.unused
    def _forward_train(self, x: torch.Tensor, tuned: bool = False) -> torch.Tensor:
        """``forward_reference`` with the MLP's two 1x1 convs through ``fast_ops.pointwise_conv_train`` (the
        convolution or batched GEMMs, whichever trains faster here: the official code's token Linears are GEMMs); with
        ``tuned``, the MLP (pre-norm and residual add included) in the form ``forms.tuned_training`` measures faster
        for this block's structure and input shape: that one, or the lean autograd function (the mixer chooses its own
        form)."""
        x = x + self.drop_path(self.mixer(x))
        if tuned:
            return tuned_training('scsc_train', (x,), _MLP_TRAIN_FORMS, module=self)
        return x + self.drop_path(self._mlp_train(x))

    @torch.jit.unused
    def _forward_inplace(self, x: torch.Tensor) -> torch.Tensor:
        """Eval without autograd: ``forward_reference`` with the residual adds in place; where
        ``use_fast_form('per_image')`` allows, the MLP may run one image at a time, as two BLAS GEMMs on the
        (C, H*W) view (the residual add as the second GEMM's accumulate) or, where ``use_fast_form('onednn')``
        allows, as oneDNN 1x1 convs, with the GELU in place, so the 4x-wide hidden activation is a per-image,
        cache-sized buffer instead of a fresh whole-batch allocation. Which form runs is measured per shape."""
        fc1, fc2 = self.mlp.fc1, self.mlp.fc2
        if fc1.bias is None or fc2.bias is None or type(self.mlp.act) is not nn.GELU:
            return self._inplace_form(x, 'batched')
        forms = ('batched', 'per_image_gemm', 'per_image_onednn')
        return tuned('scsc_swin_block', x, {f: (lambda f=f: self._inplace_form(x, f)) for f in forms}, module=self)

    def _inplace_form(self, x: torch.Tensor, mlp: str) -> torch.Tensor:
        x = self.mixer(x).add_(x)  # fresh: the residual adds below write into it
        if mlp == 'batched':
            return x.add_(self.mlp(self.norm(x)))
        fc1, fc2 = self.mlp.fc1, self.mlp.fc2
        xn = x if isinstance(self.norm, nn.Identity) else self.norm(x)
        if mlp == 'per_image_onednn':
            w1, w2 = fc1.weight.contiguous(), fc2.weight.contiguous()
            for xi, xni in zip(x.split(1), xn.split(1)):
                h = torch.ops.aten.gelu_(torch.mkldnn_convolution(xni, w1, fc1.bias, *_CONV1X1))
                xi.add_(torch.mkldnn_convolution(h, w2, fc2.bias, *_CONV1X1))
            return x
        w1, b1 = fc1.weight.flatten(1), fc1.bias.unsqueeze(1)
        w2, b2 = fc2.weight.flatten(1), fc2.bias.unsqueeze(1)
        for xi, xni in zip(x.split(1), xn.split(1)):  # (1, C, H, W) views; as (C, H*W) matrices below
            h = torch.ops.aten.gelu_(torch.addmm(b1, w1, xni.flatten(2)[0]))
            xi.flatten(2)[0].addmm_(w2, h).add_(b2)  # the residual add is the GEMM's accumulate
        return x

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the MLP's BatchNorm pre-norm into ``mlp.fc1`` (the mixer folds itself)."""
        if isinstance(self.norm, nn.Identity):
            return
        bn, fc = self.norm, self.mlp.fc1
        scale, shift = bn_scale_shift(bn)
        fc.bias.add_(fc.weight.flatten(1) @ shift)
        fc.weight.mul_(scale.reshape(1, -1, 1, 1))
        self.norm = nn.Identity()


def _no_dropout(m: nn.Module) -> bool:
    return isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and m.p == 0)


class _LeanMlp(torch.autograd.Function):
    """``block.mlp(block.norm(x))`` in training mode as one autograd function (a CPU form), with the block's residual
    add when ``residual`` (``x + mlp(norm(x))``, for a block without drop path). It saves the input and the first 1x1
    conv's output (5 activation maps of ``C`` channels where autograd keeps 10): backward recomputes the BN output
    from the batch statistics and the GELU output from the saved pre-activation. Two layouts of the same GEMMs:

    * ``batched=False``: image by image on the (C, H*W) views, the 4C-wide temporaries of forward and backward
      image-sized buffers that stay in cache (batch-sized ones above glibc's mmap threshold are fresh pages, faulted in
      on every call) and the weight gradients accumulated by the GEMMs; best on large maps.
    * ``batched=True``: every image at once on a (C, B*H*W) copy of the input (channel-major tokens: one GEMM per
      weight over all B*H*W tokens, as the official code's token Linears): on small maps (14x14, 7x7) the per-image
      GEMMs are skinny and run well below the BLAS's speed.

    The BN and GELU backward are the ops autograd runs (in the batched layout the BN runs on the (1, C, B*H*W) view:
    the same statistics over the same values, the running statistics moved once)."""

    @staticmethod
    def forward(ctx, block, x: torch.Tensor, batched: bool, residual: bool, *params: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = block.mlp.fc1, block.mlp.fc2
        B, C, H, W = x.shape
        w1, b1 = fc1.weight.flatten(1), fc1.bias.unsqueeze(1)
        w2, b2 = fc2.weight.flatten(1), fc2.bias.unsqueeze(1)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        if batched:
            xc = x.reshape(B, C, H * W).transpose(0, 1).reshape(1, C, B * H * W)  # (1, C, N): channel-major tokens
            xn, mean, invstd = bn_train_forward(block.norm, xc)
            h = torch.addmm(b1, w1, xn[0])
            del xn
            o = torch.addmm(b2, w2, torch.nn.functional.gelu(h)).view(C, B, H * W).transpose(0, 1).view_as(x)
            if residual:
                torch.add(x, o, out=out)
            else:
                out.copy_(o)
            saved = xc
        else:
            xn, mean, invstd = bn_train_forward(block.norm, x)
            h = torch.empty(B, fc1.out_channels, H * W, dtype=x.dtype, device=x.device)
            a = torch.empty_like(h[0])  # image-sized, reused
            for xni, hi, oi, xi in zip(xn.flatten(2), h, out.flatten(2), x.flatten(2)):
                torch.addmm(b1, w1, xni, out=hi)
                torch.addmm(b2, w2, torch.ops.aten.gelu.out(hi, out=a), out=oi)
                if residual:
                    oi.add_(xi)
            del xn
            saved = x
        ctx.block, ctx.batched, ctx.residual = block, batched, residual
        ctx.save_for_backward(saved, h, mean, invstd)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        block = ctx.block
        saved, h, mean, invstd = ctx.saved_tensors
        fc1, fc2, bn = block.mlp.fc1, block.mlp.fc2, block.norm
        w1, w2 = fc1.weight.flatten(1), fc2.weight.flatten(1)
        grad = grad.contiguous()
        B, C, H, W = grad.shape
        if ctx.batched:
            gc = grad.reshape(B, C, H * W).transpose(0, 1).reshape(C, B * H * W)
            g_b2 = gc.sum(1)
            buf = torch.nn.functional.gelu(h)  # the GELU output again, then its gradient in the same buffer
            g_w2 = torch.mm(gc, buf.t())
            g_h = torch.ops.aten.gelu_backward.grad_input(torch.mm(w2.t(), gc, out=buf), h, grad_input=buf)
            del gc
            g_b1 = g_h.sum(1)
            xn = bn_recompute(saved, bn.weight, bn.bias, mean, invstd)[0]
            g_w1 = torch.mm(g_h, xn.t())
            g_xn = torch.mm(w1.t(), g_h, out=xn).view(1, C, B * H * W)
            del g_h, buf
            g_xc, g_wn, g_bn = bn_train_backward(g_xn, saved, bn, mean, invstd)
            g_x = g_xc.view(C, B, H * W).transpose(0, 1).view_as(grad)
            g_x = grad + g_x if ctx.residual else g_x.contiguous()
        else:
            g_b2 = grad.sum((0, 2, 3))
            xn = bn_recompute(saved, bn.weight, bn.bias, mean, invstd)
            # image by image, the weight gradients accumulated by the GEMMs, the BN output's gradient written over it
            g_w1, g_w2 = torch.zeros_like(w1), torch.zeros_like(w2)
            g_b1 = torch.zeros_like(fc1.bias)
            a = torch.empty_like(h[0])
            for gi, hi, xi in zip(grad.flatten(2), h, xn.flatten(2)):
                g_w2.addmm_(gi, torch.ops.aten.gelu.out(hi, out=a).t())
                g_hi = torch.ops.aten.gelu_backward.grad_input(torch.mm(w2.t(), gi, out=a), hi, grad_input=a)
                g_b1 += g_hi.sum(1)
                g_w1.addmm_(g_hi, xi.t())
                torch.mm(w1.t(), g_hi, out=xi)
            g_x, g_wn, g_bn = bn_train_backward(xn, saved, bn, mean, invstd)
            del xn
            if ctx.residual:
                g_x += grad
        g_w1, g_w2 = g_w1.view_as(fc1.weight), g_w2.view_as(fc2.weight)
        return None, g_x, None, None, g_wn, g_bn, g_w1, g_b1, g_w2, g_b2


#: The candidates of the ``scsc_train`` tuned operation for a block's MLP and its residual add (called with the block,
#: or with the autotuner's copy of it, and the input).
_MLP_TRAIN_FORMS = {
    'plain': lambda block, x: x + block.drop_path(block._mlp_train(x)),
    'lean': lambda block, x: block._mlp_lean(x),
}

#: The candidates of the ``scsc_swin_mlp_train`` tuned operation: the lean MLP's two layouts.
_MLP_LAYOUTS = {
    'per_image': lambda block, x: block._mlp_lean_form(x, batched=False),
    'batched': lambda block, x: block._mlp_lean_form(x, batched=True),
}


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: a stage's output feeds a permute (the next patch
    merging, the final LayerNorm2d), whose backward hands a channels-last gradient to every residual add and block of
    the stage; one copy here instead of one in every block's backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class CrossScaleSwinStage(nn.Module):
    def __init__(
        self,
        dim_in: int,
        dim: int,
        depth: int,
        kernel_sizes: Sequence[int],
        downsample: bool,
        drop_path: Sequence[float],
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = PatchMergingNCHW(dim_in, dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(
            *[CrossScaleSwinBlock(dim, kernel_sizes, drop_path=drop_path[i], **block_kwargs) for i in range(depth)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        if torch.is_grad_enabled() and use_fast_form('lean_recompute', x, 'contiguous'):
            x = self._contiguous_grad(x)
        return x

    @torch.jit.unused
    def _contiguous_grad(self, x: torch.Tensor) -> torch.Tensor:
        return _ContiguousGrad.apply(x)


class CrossScaleSwin(MsconvModel):
    """Swin + SCSC. Keyword arguments follow the official ``SCSC_Swin`` defaults (Swin-T: 21.94M params)."""

    family = 'scsc'
    intermediate_formats = ('NCHW', 'NHWC')

    @factory_kwargs
    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        kernel_sizes: Sequence[Sequence[int]] = STAGE_KERNEL_SIZES,
        groups: int = 4,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        routing: str = 'official',
        global_pool: str = 'avg',
    ) -> None:
        super().__init__()
        self.check_pooling(num_classes, global_pool)
        if not isinstance(depths, (list, tuple)) or not depths or not all(isinstance(d, int) and d > 0 for d in depths):
            raise ValueError(f"depths must be a non-empty sequence of positive ints, got {depths!r}")
        if not isinstance(kernel_sizes, (list, tuple)) or len(kernel_sizes) != len(depths):
            raise ValueError(
                f"kernel_sizes must hold one tuple of kernel sizes per stage ({len(depths)} stages), "
                f"got {kernel_sizes!r}"
            )
        if not isinstance(embed_dim, int) or embed_dim <= 0:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        num_stages = len(depths)
        dims = [embed_dim * 2**i for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]
        self.min_input_size = 4 * 2 ** (num_stages - 1)

        self.stem = PatchEmbed(in_chans, embed_dim)
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device='cpu').split(list(depths))]
        self.stages = nn.Sequential(
            *[
                CrossScaleSwinStage(
                    dims[max(i - 1, 0)],
                    dims[i],
                    depths[i],
                    kernel_sizes[i],
                    downsample=i > 0,
                    drop_path=dpr[i],
                    groups=groups,
                    mlp_ratio=mlp_ratio,
                    drop_rate=drop_rate,
                    routing=routing,
                )
                for i in range(num_stages)
            ]
        )
        self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2**i, module=f'stages.{i}') for i in range(num_stages)]
        self.norm = LayerNorm2d(self.num_features, eps=1e-5)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(_init_weights)

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        if prune_norm or max_index < len(self.stages) - 1:  # the final norm only fits the last stage
            self.norm = nn.Identity()
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        self.stages = self.stages[: max_index + 1]
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            self.check_input(x)
        x = self.stages(self.stem(x))
        return self.norm(x)

    def _intermediate(self, x: torch.Tensor, index: int, norm: bool, output_fmt: str) -> torch.Tensor:
        """Stage outputs (NCHW, before the next patch merging); ``norm``: the last one through the final norm."""
        y = self.norm(x) if norm and index == len(self.stages) - 1 else x
        return y if output_fmt == 'NCHW' else y.permute(0, 2, 3, 1)

    def _final_features(self, x: torch.Tensor, complete: bool) -> torch.Tensor:
        return self.norm(x) if complete else x


def _init_weights(module: nn.Module) -> None:
    """The official init: trunc-normal(.02) Linear with zero bias, LayerNorm 1/0, PyTorch defaults elsewhere;
    the SE FCs (Linear in the official code, 1x1 convs here) also get trunc-normal(.02)."""
    if isinstance(module, Mlp):  # 1x1 convs here, Linear in the official code
        for fc in (module.fc1, module.fc2):
            trunc_normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)
    elif isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif hasattr(module, 'fc1') and hasattr(module, 'gate'):  # timm SEModule (Linear in the official code)
        trunc_normal_(module.fc1.weight, std=0.02)
        trunc_normal_(module.fc2.weight, std=0.02)


_OFFICIAL_SWIN_RENAMES = [
    (r'^patch_embed\.(proj|norm)\.(.+)$', r'stem.\1.\2'),
    (r'^layers\.(\d+)\.blocks\.(\d+)\.attn2conv\.(.+)$', r'stages.\1.blocks.\2.mixer.\3'),
    (r'^layers\.(\d+)\.blocks\.(\d+)\.bn\.(.+)$', r'stages.\1.blocks.\2.norm.\3'),
    (r'^layers\.(\d+)\.blocks\.(\d+)\.mlp\.(.+)$', r'stages.\1.blocks.\2.mlp.\3'),
    (r'^head\.(weight|bias)$', r'head.fc.\1'),
]


def checkpoint_filter_fn(
    state_dict: Dict[str, torch.Tensor], model: Optional[nn.Module] = None
) -> Dict[str, torch.Tensor]:
    """Official ``SCSC_Swin`` state dict (whole model, or one ``SCSC_block``) -> ours; identity on msconv keys."""
    out = {}
    for k, v in state_dict.items():
        m = re.match(r'^layers\.(\d+)\.downsample\.(.+)$', k)
        if m:  # the official merge closes stage s, ours opens stage s + 1
            out[f'stages.{int(m.group(1)) + 1}.downsample.{m.group(2)}'] = v
            continue
        for pat, rep in _OFFICIAL_SWIN_RENAMES:
            if re.match(pat, k):
                k = re.sub(pat, rep, k)
                if '.mlp.fc' in k and k.endswith('.weight') and v.dim() == 2:
                    v = v.reshape(*v.shape, 1, 1)  # Linear -> 1x1 conv
                break
        out[k] = v
    return convert_scsc_official(out)


def _create_scsc_swin(variant: str, pretrained: bool = False, **kwargs: Any) -> CrossScaleSwin:
    return build_model_with_cfg(
        CrossScaleSwin,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls='getter'),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    """The pretrained-config defaults of every SCSC network (the CNNs and face networks override a few)."""
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (7, 7),
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'fixed_input_size': False,
        'mean': (0.485, 0.456, 0.406),
        'std': (0.229, 0.224, 0.225),
        'first_conv': 'stem.proj',
        'classifier': 'head.fc',
        'paper_ids': 'arXiv:2308.07110',
        'license': 'apache-2.0',
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        'scsc_swin_tiny': _cfg(),
        'scsc_swin_small': _cfg(),
        'test_scsc_swin': _cfg(num_classes=10, input_size=(3, 64, 64), pool_size=(2, 2), test_input_size=(3, 64, 64)),
    }
)


@register_model('scsc', paper='SCSC (ICCVW 2023)')
def scsc_swin_tiny(pretrained: bool = False, **kwargs: Any) -> CrossScaleSwin:
    """Swin-T + SCSC (the official ``SCSC_Swin()`` defaults): 21.94M params, 3.30 GMACs at 224."""
    args = dict(embed_dim=96, depths=(2, 2, 6, 2), kernel_sizes=STAGE_KERNEL_SIZES, groups=4, drop_path_rate=0.1)
    return _create_scsc_swin('scsc_swin_tiny', pretrained=pretrained, **dict(args, **kwargs))


@register_model('scsc', paper='SCSC (ICCVW 2023)')
def scsc_swin_small(pretrained: bool = False, **kwargs: Any) -> CrossScaleSwin:
    """Swin-S + SCSC (depths 2,2,18,2; not in the official code, Swin-S's drop-path 0.3): 37.77M params."""
    args = dict(embed_dim=96, depths=(2, 2, 18, 2), kernel_sizes=STAGE_KERNEL_SIZES, groups=4, drop_path_rate=0.3)
    return _create_scsc_swin('scsc_swin_small', pretrained=pretrained, **dict(args, **kwargs))


@register_model('scsc')
def test_scsc_swin(pretrained: bool = False, **kwargs: Any) -> CrossScaleSwin:
    """Tiny Swin + SCSC for tests (embed 24, depths 1,1,2,1 as in the official micro fixture)."""
    args = dict(embed_dim=24, depths=(1, 1, 2, 1), kernel_sizes=STAGE_KERNEL_SIZES, groups=4, num_classes=10)
    return _create_scsc_swin('test_scsc_swin', pretrained=pretrained, **dict(args, **kwargs))
