"""SMT: Scale-Aware Modulation Transformer.

Paper: "Scale-Aware Modulation Meet Transformer", Weifeng Lin, Ziheng Wu, Jiayu Chen, Jun Huang, Lianwen Jin,
ICCV 2023 (arXiv 2307.08579).

A clean-room implementation that is numerically identical to the official code (github.com/AFeng-x/SMT,
commit 11e954d, ``models/smt.py``) and loads its released checkpoints (MIT license) through
``checkpoint_filter_fn``. Differences from the official module tree, none of which change the maths:
timm-style names (``stem``, ``stages.i.{downsample,blocks,norm}``), tokens kept channels-last (B, H, W, C) so
that switching between token and image views is free, MHMC as one depthwise convolution, no activation
shuffle (the interleave is folded into weights), ``F.scaled_dot_product_attention`` in the MSA blocks, no
stored modulator side effect, and ``in_chans`` honoured by the stem.

Evolutionary Hybrid Network layout: stages 1-2 are SAM blocks, stage 3 alternates SAM (even index) and MSA
(odd index), stage 4 is MSA.
"""

import math
import re
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, LayerScale, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._manipulate import checkpoint_seq, named_apply

from ..layers._fold import bn_folded_weights, fold_bn_into_conv
from ..layers.fast_ops import conv_gelu, map_images
from ..layers.fast_ops import linear as _linear
from ..layers.forms import autocast_dtype, tunable, tuned, tuned_training, use_fast_form
from ..layers.linear import Linear
from ..layers.mixed_conv import ScaleAwareModulation
from ._builder import MsconvModel, factory_kwargs
from ._registry import register_converter, register_model

__all__ = ['SMT']

_PAPER = 'SMT (ICCV 2023)'


def _identity_folded(wd: torch.Tensor) -> torch.Tensor:
    """A copy of the depthwise kernel ``wd`` with 1 added to its centre tap: ``h + dwconv(h)`` as one convolution."""
    k = wd.shape[-1]
    wd = wd.clone()
    wd[:, 0, k // 2, k // 2] += 1.0
    return wd


class _ConvMlpLean(torch.autograd.Function):
    """The training form of :class:`ConvMlp` without dropout: ``fc2(GELU(h + dwconv(h)))``, ``h = fc1(x)`` on
    (B, H, W, C) tokens, with the identity folded into the depthwise kernel's centre tap (``h + dwconv(h)`` is one
    convolution: no add pass forward or backward) and only ``x``, ``h`` and the GELU input saved for backward; the
    GELU output, which the plain form keeps for ``fc2``'s weight gradient, is recomputed there (one pass over the
    hidden tensor instead of a hidden-sized tensor held from forward to backward). With ``per_image`` forward and
    backward run image by image (the weight gradients accumulated over the images in place): each image's hidden
    tensors stay cache-sized from one op to the next, where the batch's are several times the last-level cache on
    SMT's first stage. Under autocast it computes in the autocast dtype like the plain form's linears and conv (GELU
    in that dtype too) and returns gradients in the inputs' dtypes. Not twice differentiable."""

    @staticmethod
    def forward(ctx, per_image: bool, x, w1, b1, wd, bd, w2, b2):
        device = x.device.type
        dtype = autocast_dtype(x) or x.dtype
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (x, w1, b1, wd, bd, w2, b2))
        x, w1, b1, wd, bd, w2, b2 = (t.to(dtype) if t is not None else None for t in (x, w1, b1, wd, bd, w2, b2))
        k = wd.shape[-1]
        wd = _identity_folded(wd)
        parts = x.split(1) if per_image else (x,)
        hs, acts, outs = [], [], []
        with torch.autocast(device, enabled=False):
            for xi in parts:
                h = _linear(xi, w1, b1)
                a = F.conv2d(h.permute(0, 3, 1, 2), wd, bd, padding=k // 2, groups=wd.shape[0])
                outs.append(_linear(F.gelu(a).permute(0, 2, 3, 1), w2, b2))
                hs.append(h)
                acts.append(a)
        ctx.save_for_backward(x, w1, wd, w2, *hs, *acts)
        ctx.has_bias = (b1 is not None, bd is not None, b2 is not None)
        ctx.parts = len(parts)
        return torch.cat(outs) if per_image else outs[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, w1, wd, w2, *saved = ctx.saved_tensors
        n = ctx.parts
        hs, acts = saved[:n], saved[n:]
        need = ctx.needs_input_grad[1:]
        k, hidden = wd.shape[-1], wd.shape[0]
        grad = grad.to(x.dtype).contiguous()
        grads = [None] * 7
        grad_x = []
        xs, gs = (x.split(1), grad.split(1)) if n > 1 else ((x,), (grad,))

        def acc(i: int, a: torch.Tensor, b: torch.Tensor) -> None:  # grads[i] (+)= a @ b
            grads[i] = a.mm(b) if grads[i] is None else grads[i].addmm_(a, b)

        def add(i: int, t: Optional[torch.Tensor]) -> None:  # grads[i] (+)= t
            if t is not None:
                grads[i] = t if grads[i] is None else grads[i].add_(t)

        for xi, gi, h, a in zip(xs, gs, hs, acts):
            g2 = gi.reshape(-1, gi.shape[-1])
            if need[5]:
                acc(5, g2.t(), F.gelu(a).permute(0, 2, 3, 1).reshape(-1, hidden))
            # d/da through the GELU, as (B, C, H, W) channels-last like ``a``
            ga = _linear(gi, w2.t()).permute(0, 3, 1, 2)
            ga = torch.ops.aten.gelu_backward.grad_input(ga, a, grad_input=ga)  # in place into the fresh product
            gh, gwd, gbd = torch.ops.aten.convolution_backward(
                ga, h.permute(0, 3, 1, 2), wd, [hidden] if ctx.has_bias[1] else None, (1, 1), (k // 2, k // 2),
                (1, 1), False, (0, 0), hidden, (True, need[3], need[4] and ctx.has_bias[1]),
            )  # fmt: skip
            add(3, gwd)
            add(4, gbd)
            gh = gh.permute(0, 2, 3, 1).reshape(-1, hidden)
            if need[0]:
                grad_x.append(_linear(gh, w1.t()).view(xi.shape))
            if need[1]:
                acc(1, gh.t(), xi.reshape(-1, xi.shape[-1]))
            if need[2] and ctx.has_bias[0]:
                add(2, gh.sum(0))
        if need[6] and ctx.has_bias[2]:
            grads[6] = grad.reshape(-1, grad.shape[-1]).sum(0)
        if need[0]:
            grads[0] = torch.cat(grad_x) if n > 1 else grad_x[0]
        return (None, *(g.to(dt) if g is not None else None for g, dt in zip(grads, ctx.dtypes)))


class ConvMlp(nn.Module):
    """MLP with a depthwise 3x3 conv inside: ``fc2(drop(GELU(h + dwconv(h))))`` with ``h = fc1(x)``."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)
        self.fc2 = Linear(hidden_dim, dim)
        self.residual_folded = False

    _band_bytes = 4 << 20  #: the ``bands`` form's hidden rows per band: about this many bytes (at least 4 rows)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Inference form: the identity of ``h + dwconv(h)`` folded into the kernel's centre tap."""
        if not self.residual_folded:
            self.dwconv.weight[:, 0, 1, 1] += 1.0
            self.residual_folded = True

    @torch.jit.unused
    def _forward_inplace(self, x: torch.Tensor) -> torch.Tensor:
        if tunable('smt_mlp_bands', x) and self._bands_ok(x):
            return tuned(
                'smt_mlp_bands',
                x,
                {'plain': lambda: self._forward_whole(x), 'bands': lambda: self._forward_bands(x)},
                extra=f'{self.fc1.in_features}->{self.fc1.out_features}->{self.fc2.out_features}',
            )
        return self._forward_whole(x)

    @torch.jit.unused
    def _bands_ok(self, x: torch.Tensor) -> bool:
        conv = self.dwconv
        return (
            x.dim() == 4
            and type(self.act) is nn.GELU
            and self.act.approximate == 'none'
            and conv.kernel_size == (3, 3)
            and conv.padding == (1, 1)
            and conv.stride == (1, 1)
            and conv.dilation == (1, 1)
            and conv.padding_mode == 'zeros'
            and conv.bias is not None
            and self.fc1.bias is not None
            and self.fc2.bias is not None
            and conv.weight.dtype == x.dtype
        )

    @torch.jit.unused
    def _forward_bands(self, x: torch.Tensor) -> torch.Tensor:
        """The ``bands`` inference form: the MLP one band of rows at a time (each image, about 4 MiB of the hidden
        tensor per band, fc1 recomputed on the depthwise conv's one-row halo), the depthwise conv with the GELU as
        one oneDNN call (the identity folded into its centre tap), fc2 written into the output's rows: the 4x-wide
        hidden tensor stays cache-sized on large maps (SMT's first stages at detection sizes)."""
        B, H, W = x.shape[0], x.shape[1], x.shape[2]
        hidden = self.fc1.out_features
        wd = self.dwconv.weight if self.residual_folded else _identity_folded(self.dwconv.weight)
        w1t, b1, w2t, b2 = self.fc1.weight.t(), self.fc1.bias, self.fc2.weight.t(), self.fc2.bias
        out = x.new_empty(B, H, W, self.fc2.out_features)
        rows = max(4, self._band_bytes // max(1, W * hidden * x.element_size()))
        for i in range(B):
            for r0 in range(0, H, rows):
                r1 = min(r0 + rows, H)
                lo, hi = max(r0 - 1, 0), min(r1 + 1, H)
                # fc1 as one addmm on the band's token matrix (the GEMM F.linear runs for it)
                h = torch.addmm(b1, x[i, lo:hi].reshape(-1, x.shape[-1]), w1t).view(1, hi - lo, W, hidden)
                a = torch.ops.mkldnn._convolution_pointwise(
                    h.permute(0, 3, 1, 2), wd, self.dwconv.bias, [1, 1], [1, 1], [1, 1], hidden, 'gelu', [], 'none'
                )  # fmt: skip
                a = a[:, :, r0 - lo : r1 - lo].permute(0, 2, 3, 1).reshape(-1, hidden)
                torch.addmm(b2, a, w2t, out=out[i, r0:r1].view(-1, out.shape[-1]))
        return out

    @torch.jit.unused
    def _forward_whole(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.residual_folded and type(self.act) is nn.GELU and self.act.approximate == 'none':
            hc = h.permute(0, 3, 1, 2)  # channels-last view
            return self.fc2(conv_gelu(self.dwconv, hc).permute(0, 2, 3, 1))  # GELU(dwconv(h)), measured form
        c = self.dwconv(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.fc2(torch.ops.aten.gelu_(c if self.residual_folded else c.add_(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        if not self.training and use_fast_form('inplace', x):  # same maths without hidden-sized temporaries
            return self._forward_inplace(x)
        if torch.is_grad_enabled() and use_fast_form('lean', x) and self._lean_ok():
            return self._forward_train(x)
        return self.forward_reference(x)

    @torch.jit.unused
    def _lean_ok(self) -> bool:
        return (
            not self.residual_folded
            and (self.drop.p == 0.0 or not self.training)
            and type(self.act) is nn.GELU
            and self.act.approximate == 'none'
            and self.dwconv.padding_mode == 'zeros'
        )

    @torch.jit.unused
    def _forward_train(self, x: torch.Tensor) -> torch.Tensor:
        """The lean autograd function (:class:`_ConvMlpLean`): the plain form's values and gradients, about a third
        less saved for backward; on the batch or image by image, whichever the tuned training operation
        ``smt_mlp_train`` measures faster for the shape."""
        args = (x, self.fc1.weight, self.fc1.bias, self.dwconv.weight, self.dwconv.bias, self.fc2.weight, self.fc2.bias)
        return tuned_training(
            'smt_mlp_train',
            args,
            {'batched': lambda *a: _ConvMlpLean.apply(False, *a), 'per_image': lambda *a: _ConvMlpLean.apply(True, *a)},
            extra=f'{self.fc1.in_features}->{self.fc1.out_features}->{self.fc2.out_features}',
        )

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        c = self.dwconv(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.drop(self.fc2(self.drop(self.act(c if self.residual_folded else h + c))))


class Attention(nn.Module):
    """MSA: global multi-head self-attention plus a depthwise 3x3 "local enhancement" of V."""

    __constants__ = ['fused_qkv']  # TorchScript compiles only the projections present

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: Optional[float] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by sa_num_heads ({num_heads})")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.q = Linear(dim, dim, bias=qkv_bias)
        self.kv = Linear(dim, dim * 2, bias=qkv_bias)
        self.local_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.attn_drop = attn_drop
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.qkv: Optional[nn.Linear] = None  # inference form: q and kv as one projection
        self.fused_qkv = False

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Inference form: ``q`` and ``kv`` merged into one ``qkv`` linear (one GEMM instead of two)."""
        if self.fused_qkv:
            return
        dim = self.q.in_features
        qkv = Linear(dim, 3 * dim, bias=self.q.bias is not None, device=self.q.weight.device, dtype=self.q.weight.dtype)
        qkv.weight.copy_(torch.cat([self.q.weight, self.kv.weight]))
        if self.q.bias is not None:
            qkv.bias.copy_(torch.cat([self.q.bias, self.kv.bias]))
        self.qkv = qkv
        self.fused_qkv = True
        del self.q, self.kv

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        out, local = self._attend(x)
        if use_fast_form('inplace', x):
            return self.proj_drop(self.proj(out.add_(local)))  # out: a fresh copy (reshape)
        return self.proj_drop(self.proj(out + local))

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        out, local = self._attend(x)
        return self.proj_drop(self.proj(out + local))

    @torch.jit.unused
    def _math_ok(self, q: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and torch.is_autocast_enabled(q.device.type)

    @torch.jit.unused
    def _attention_math(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention without dropout as two batched GEMMs and a softmax (the ``attention_math`` form): in a bf16
        autocast training step ``scaled_dot_product_attention``'s fused CPU kernel has a slow backward."""
        return torch.matmul((q @ k.transpose(-2, -1)).mul_(self.scale).softmax(-1), v)

    @torch.jit.unused
    def _attention_tuned(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Eval attention (tuned ``smt_attention``): ``scaled_dot_product_attention`` on the strided views of the
        projection's output, or on contiguous (B, h, N, d) copies of them, which its fused CPU kernel reads faster
        than the copies cost on large maps (the same kernel: the same numbers)."""
        return tuned(
            'smt_attention',
            q,
            {
                'views': lambda: F.scaled_dot_product_attention(q, k, v, scale=self.scale),
                'contiguous': lambda: F.scaled_dot_product_attention(
                    q.contiguous(), k.contiguous(), v.contiguous(), scale=self.scale
                ),
            },
            extra=f'{q.shape[1]}x{q.shape[-1]}',
        )

    def _attend(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Attention output and the local enhancement of V, both (B, H, W, C)."""
        B, H, W, C = x.shape[0], x.shape[1], x.shape[2], x.shape[3]  # indexed: FX cannot unpack a Proxy
        h = self.num_heads
        if self.fused_qkv:
            qkv = self.qkv(x).reshape(B, H * W, 3, C)
            q, kv = qkv[:, :, 0].unflatten(-1, (h, C // h)).transpose(1, 2), qkv[:, :, 1:]
        else:
            q = self.q(x).reshape(B, H * W, h, C // h).transpose(1, 2)  # (B, h, N, d)
            kv = self.kv(x).reshape(B, H * W, 2, C)  # K then V, each head-major
        k = kv[:, :, 0].unflatten(-1, (h, C // h)).transpose(1, 2)
        v_tokens = kv[:, :, 1]  # (B, N, C)
        v = v_tokens.unflatten(-1, (h, C // h)).transpose(1, 2)
        if self.training and self.attn_drop == 0.0 and use_fast_form('attention_math', q) and self._math_ok(q):
            out = self._attention_math(q, k, v)
        elif not self.training and not torch.jit.is_scripting() and tunable('smt_attention', q):
            out = self._attention_tuned(q, k, v)
        else:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                dropout_p=self.attn_drop if self.training else 0.0,
                scale=self.scale,
            )
        out = out.transpose(1, 2).reshape(B, H, W, C)
        local = self.local_conv(v_tokens.reshape(B, H, W, C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return out, local


class Block(nn.Module):
    """Pre-norm residual block; the token mixer is SAM (``ca_attention=1``) or MSA (``ca_attention=0``)."""

    __constants__ = ['sam_mixer']

    def __init__(
        self,
        dim: int,
        ca_num_heads: int,
        sa_num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: Optional[float] = None,
        use_layerscale: bool = False,
        layerscale_value: float = 1e-4,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        ca_attention: int = 1,
        expand_ratio: int = 2,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.sam_mixer = ca_attention == 1
        if ca_attention == 1:
            self.attn: nn.Module = ScaleAwareModulation(
                dim,
                num_heads=ca_num_heads,
                expand_ratio=expand_ratio,
                qkv_bias=qkv_bias,
                proj_drop=drop,
            )
        else:
            self.attn = Attention(
                dim,
                num_heads=sa_num_heads,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                attn_drop=attn_drop,
                proj_drop=drop,
            )
        self.ls1 = LayerScale(dim, layerscale_value) if use_layerscale else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop=drop)
        self.ls2 = LayerScale(dim, layerscale_value) if use_layerscale else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Inference form: layer-scale gammas folded into the last linear of the token mixer and the MLP."""
        for ls_name, linear in (('ls1', self.attn.proj), ('ls2', self.mlp.fc2)):
            ls = getattr(self, ls_name)
            if isinstance(ls, LayerScale):
                linear.weight.mul_(ls.gamma.unsqueeze(1))
                linear.bias.mul_(ls.gamma)
                setattr(self, ls_name, nn.Identity())

    def _mix(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) tokens; SAM's own forward is NCHW
        if self.sam_mixer:
            return self.attn.forward_nhwc(x)
        return self.attn(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        x = x + self.drop_path1(self.ls1(self._mix(self.norm1(x))))
        mlp = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        if use_fast_form('inplace', x):
            return x.add_(mlp)  # x was created just above
        return x + mlp

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self._mix(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class Stem(nn.Module):
    """Stride-4 stem: conv(k, s2, no bias) -> BN -> ReLU -> conv(2x2, s2) -> LayerNorm (eps 1e-5)."""

    def __init__(self, in_chans: int, dim: int, head_conv: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim, head_conv, stride=2, padding=head_conv // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(dim)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(dim, dim, 2, stride=2)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Inference form: the BatchNorm folded into the first conv."""
        if isinstance(self.bn1, nn.BatchNorm2d):
            self.conv1 = fold_bn_into_conv(self.conv1, self.bn1)
            self.bn1 = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, H/4, W/4, C)
        # channels-last from the start: both convs run ~2.5x faster on CPU and the tokens come out contiguous
        x = x.contiguous(memory_format=torch.channels_last)
        if use_fast_form('inplace', x) and tunable('smt_stem', x) and self._fused_ok(x):
            x = self._first_tuned(x)
        else:
            x = self._first(x)
        return self.norm(self.conv2(x).permute(0, 2, 3, 1))

    @torch.jit.unused
    def _first_tuned(self, x: torch.Tensor) -> torch.Tensor:
        return tuned('smt_stem', x, {'plain': lambda: self._first(x), 'fused': lambda: self._first_fused(x)})

    def _first(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn1(self.conv1(x)))

    @torch.jit.unused
    def _fused_ok(self, x: torch.Tensor) -> bool:
        bn = self.bn1
        return (
            type(self.act) is nn.ReLU
            and self.conv1.padding_mode == 'zeros'
            and self.conv1.weight.dtype == x.dtype
            and (
                type(bn) is nn.Identity
                or (type(bn) is nn.BatchNorm2d and not bn.training and bn.affine and bn.running_mean is not None)
            )
        )

    @torch.jit.unused
    def _first_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The ``fused`` inference form of conv1 -> BN -> ReLU: the BatchNorm (eval statistics) folded into conv1's
        weight at call time and the ReLU as a post-op of one oneDNN convolution (no BatchNorm or ReLU pass over the
        stride-2 map)."""
        conv, w, b = self.conv1, self.conv1.weight, self.conv1.bias
        if isinstance(self.bn1, nn.BatchNorm2d):
            w, b = bn_folded_weights(w, b, self.bn1)
        return torch.ops.mkldnn._convolution_pointwise(
            x, w.contiguous(), b, list(conv.padding), list(conv.stride), list(conv.dilation), 1, 'relu', [], 'none'
        )  # fmt: skip


class Downsample(nn.Module):
    """Overlapping patch embedding between stages: conv 3x3 stride 2 -> LayerNorm (eps 1e-5)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C_in) -> (B, H/2, W/2, C)
        return self.norm(self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class SmtStage(nn.Module):
    """Optional downsample, a sequence of blocks, and the stage LayerNorm (eps 1e-6)."""

    def __init__(self, in_dim: int, dim: int, blocks: Sequence[nn.Module], downsample: bool = True):
        super().__init__()
        self.downsample = Downsample(in_dim, dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) channels-last
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        elif not self.training and tunable('smt_stage', x):
            x = self._blocks_per_image(x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    @torch.jit.unused
    def _blocks_per_image(self, x: torch.Tensor) -> torch.Tensor:
        """Eval blocks treat images independently; on CPU, one image at a time keeps every temporary (the 4x-wide
        MLP hidden tensors above all) small and cache-resident; measured against the batched blocks per shape."""
        return map_images(self.blocks, x, 'smt_stage')


def _as_tuple(value: Union[int, float, Sequence], n: int, name: str) -> tuple:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
    if len(values) != n:
        raise ValueError(f"{name} must have one entry per stage ({n}), got {len(values)}: {values}")
    return values


class SMT(MsconvModel):
    """Scale-Aware Modulation Transformer.

    Keyword arguments keep the official names and defaults (``SMT(**official_kwargs)`` builds the same model).

    Args:
        in_chans: input channels (the official stem hard-codes 3; here it is honoured).
        num_classes: classifier outputs; 0 for no classifier.
        global_pool: 'avg' (token mean, as the official head) or '' (no pooling).
        embed_dims: channels of the four stages.
        depths: blocks per stage.
        ca_num_heads: MHMC heads per stage (for SAM blocks).
        sa_num_heads: attention heads per stage (for MSA blocks).
        mlp_ratios: MLP expansion per stage.
        qkv_bias: bias in the v/s and q/kv projections.
        qk_scale: attention scale override (default head_dim ** -0.5).
        use_layerscale: per-channel residual scales (the SMT-L configs train with it).
        layerscale_value: initial value of the layer scales.
        drop_rate: dropout in the MLPs and after token-mixer projections.
        attn_drop_rate: attention dropout.
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        ca_attentions: 1 = SAM, 0 = MSA for each stage; stage 3 (index 2) alternates SAM/MSA regardless.
        num_stages: must be 4.
        head_conv: stem kernel size (3 for T/S, 7 for B/L).
        expand_ratio: SAA expansion.
        img_size: accepted for compatibility and ignored (SMT has no position embeddings).
    """

    family = 'smt'
    final_norm_group = r'^stages\.(\d+)\.norm'
    intermediate_formats = ('NCHW', 'NHWC')

    @factory_kwargs
    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = 'avg',
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 2, 8, 1),
        ca_num_heads: Sequence[int] = (4, 4, 4, -1),
        sa_num_heads: Sequence[int] = (-1, -1, 8, 16),
        mlp_ratios: Sequence[float] = (8, 6, 4, 2),
        qkv_bias: bool = False,
        qk_scale: Optional[float] = None,
        use_layerscale: bool = False,
        layerscale_value: float = 1e-4,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        ca_attentions: Sequence[int] = (1, 1, 1, 0),
        num_stages: int = 4,
        head_conv: int = 3,
        expand_ratio: int = 2,
        img_size: Optional[Union[int, Tuple[int, int]]] = None,
    ):
        super().__init__()
        if num_stages != 4:
            raise ValueError(f"num_stages must be 4 (the SMT layout), got {num_stages}")
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.check_pooling(num_classes, global_pool)
        if head_conv not in (3, 5, 7):
            raise ValueError(f"head_conv must be 3, 5 or 7, got {head_conv}")
        embed_dims = _as_tuple(embed_dims, 4, 'embed_dims')
        depths = _as_tuple(depths, 4, 'depths')
        ca_num_heads = _as_tuple(ca_num_heads, 4, 'ca_num_heads')
        sa_num_heads = _as_tuple(sa_num_heads, 4, 'sa_num_heads')
        mlp_ratios = _as_tuple(mlp_ratios, 4, 'mlp_ratios')
        ca_attentions = _as_tuple(ca_attentions, 4, 'ca_attentions')
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.min_input_size = 32  # total stride

        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()  # meta-device safe
        self.stem = Stem(in_chans, embed_dims[0], head_conv)
        stages, cur, self.feature_info = [], 0, []
        for i in range(4):
            blocks = [
                Block(
                    embed_dims[i],
                    ca_num_heads=ca_num_heads[i],
                    sa_num_heads=sa_num_heads[i],
                    mlp_ratio=mlp_ratios[i],
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    use_layerscale=use_layerscale,
                    layerscale_value=layerscale_value,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[cur + j],
                    expand_ratio=expand_ratio,
                    ca_attention=0 if (i == 2 and j % 2 == 1) else ca_attentions[i],
                )
                for j in range(depths[i])
            ]
            stages.append(SmtStage(embed_dims[i - 1] if i else embed_dims[0], embed_dims[i], blocks, downsample=i > 0))
            cur += depths[i]
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2**i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool)
        named_apply(_init_weights, self)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None and global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        super().reset_classifier(num_classes, global_pool)
        self.global_pool = self._head_pooling()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            self.check_input(x)
        x = self.stages(self.stem(x))
        return x.permute(0, 3, 1, 2)  # (B, C, H/32, W/32)

    def _intermediate(self, x: torch.Tensor, index: int, norm: bool, output_fmt: str) -> torch.Tensor:
        """Stage outputs are (B, H, W, C) tokens, each after its stage LayerNorm (as the official model passes them
        on): ``norm`` has nothing to add."""
        return x.permute(0, 3, 1, 2) if output_fmt == 'NCHW' else x

    def _final_features(self, x: torch.Tensor, complete: bool) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


def _init_weights(module: nn.Module, name: str = '') -> None:
    """The official init: trunc-normal(0.02) linears, He-normal (fan-out) convs, zero biases."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# official checkpoint -> msconv ------------------------------------------------------------------------------------

_OFFICIAL_MODEL_KEY = re.compile(r'^(patch_embed\d|block\d)\.')
_STEM = {'conv.0': 'conv1', 'conv.1': 'bn1', 'conv.3': 'conv2', 'norm': 'norm'}


def _convert_module_key(key: str) -> str:
    """Renames inside a block (or any official module): valid on keys relative to any prefix."""
    parts, out = key.split('.'), []
    for i, p in enumerate(parts):
        m = re.fullmatch(r'local_conv_(\d+)', p)
        if m:  # SAM's per-head depthwise convs
            out += ['mhmc', 'convs', str(int(m.group(1)) - 1)]
        elif p in ('proj0', 'bn', 'proj1') and (not out or out[-1] != 'saa'):
            out += ['saa', p]
        elif p == 'dw_conv':  # the downstream repos' name of MSA's local conv
            out.append('local_conv')
        elif p == 'dwconv' and i + 1 < len(parts) and parts[i + 1] == 'dwconv':
            continue  # Mlp.dwconv.dwconv -> ConvMlp.dwconv
        elif p in ('gamma_1', 'gamma_2') and i == len(parts) - 1:
            out += ['ls' + p[-1], 'gamma']
        else:
            out.append(p)
    return '.'.join(out)


def _convert_model_key(key: str) -> str:
    m = re.match(r'^patch_embed1\.(conv\.\d|norm)\.(.+)$', key)
    if m:
        return f'stem.{_STEM[m.group(1)]}.{m.group(2)}'
    m = re.match(r'^patch_embed(\d)\.(.+)$', key)
    if m:
        return f'stages.{int(m.group(1)) - 1}.downsample.{m.group(2)}'
    m = re.match(r'^block(\d)\.(\d+)\.(.+)$', key)
    if m:
        return f'stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.{_convert_module_key(m.group(3))}'
    m = re.match(r'^norm(\d)\.(.+)$', key)
    if m:
        return f'stages.{int(m.group(1)) - 1}.norm.{m.group(2)}'
    return key


_HEAD = re.compile(r'^head\.(weight|bias)$')  # the official Linear head (and msconv's before timm's ClassifierHead)


def convert_official_smt(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official SMT keys -> msconv keys, for a whole model (``patch_embed1.*``, ``block1.0.*``, ...) or for one
    official module (an ``Attention``, ``Block`` or ``Mlp`` state dict). Identity on msconv state dicts."""
    whole_model = any(_OFFICIAL_MODEL_KEY.match(k) for k in state_dict)
    convert = _convert_model_key if whole_model else _convert_module_key
    return {_HEAD.sub(r'head.fc.\1', convert(k)): v for k, v in state_dict.items()}


register_converter('smt', convert_official_smt)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: SMT) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: unwrap ``{'model': sd}`` and convert official keys."""
    state_dict = state_dict.get('model', state_dict)
    return convert_official_smt(state_dict)


def _create_smt(variant: str, pretrained: bool = False, **kwargs) -> SMT:
    return build_model_with_cfg(
        SMT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls='getter'),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (7, 7),
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv1',
        'classifier': 'head.fc',
        'license': 'mit',
        'paper_ids': 'arXiv:2307.08579',
        'paper_name': 'Scale-Aware Modulation Meet Transformer',
        'origin_url': 'https://github.com/AFeng-x/SMT',
        **kwargs,
    }


_RELEASE = 'https://github.com/AFeng-x/SMT/releases/download/v1.0.0/'

default_cfgs = generate_default_cfgs(
    {
        'smt_tiny.in1k': _cfg(_RELEASE + 'smt_tiny.pth'),
        'smt_small.in1k': _cfg(_RELEASE + 'smt_small.pth'),
        'smt_base.in1k': _cfg(_RELEASE + 'smt_base.pth'),
        'smt_large.in22k_ft_in1k': _cfg(_RELEASE + 'smt_large_22k_224_ft.pth'),
        'smt_large.in22k_ft_in1k_384': _cfg(
            _RELEASE + 'smt_large_22k_384_ft.pth',
            input_size=(3, 384, 384),
            pool_size=(12, 12),
            crop_pct=1.0,
        ),
        'smt_large.in22k': _cfg(_RELEASE + 'smt_large_22k.pth', num_classes=21841),
        'test_smt.untrained': _cfg(input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0),
    }
)

_COMMON = dict(
    ca_num_heads=(4, 4, 4, -1), sa_num_heads=(-1, -1, 8, 16), ca_attentions=(1, 1, 1, 0), qkv_bias=True, expand_ratio=2
)


@register_model('smt', paper_top1=82.2, paper=_PAPER)
def smt_tiny(pretrained: bool = False, **kwargs) -> SMT:
    args = dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 1), mlp_ratios=(4, 4, 4, 2), head_conv=3, **_COMMON)
    return _create_smt('smt_tiny', pretrained, **dict(args, **kwargs))


@register_model('smt', paper_top1=83.7, paper=_PAPER)
def smt_small(pretrained: bool = False, **kwargs) -> SMT:
    args = dict(embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 2), mlp_ratios=(4, 4, 4, 2), head_conv=3, **_COMMON)
    return _create_smt('smt_small', pretrained, **dict(args, **kwargs))


@register_model('smt', paper_top1=84.3, paper=_PAPER)
def smt_base(pretrained: bool = False, **kwargs) -> SMT:
    args = dict(embed_dims=(64, 128, 256, 512), depths=(4, 6, 28, 2), mlp_ratios=(8, 6, 4, 2), head_conv=7, **_COMMON)
    return _create_smt('smt_base', pretrained, **dict(args, **kwargs))


@register_model('smt', paper_top1=87.1, paper=_PAPER, paper_top1_note='ImageNet-22K pre-trained')
def smt_large(pretrained: bool = False, **kwargs) -> SMT:
    """SMT-L with layer scale, as every official SMT-L config trains it (22K pre-trained, 87.1 at 224)."""
    args = dict(
        embed_dims=(96, 192, 384, 768),
        depths=(4, 6, 28, 4),
        mlp_ratios=(8, 6, 4, 2),
        head_conv=7,
        use_layerscale=True,
        **_COMMON,
    )
    return _create_smt('smt_large', pretrained, **dict(args, **kwargs))


@register_model('smt')
def test_smt(pretrained: bool = False, **kwargs) -> SMT:
    """Tiny SMT for tests: every block type (SAM, alternating stage 3, MSA) at 64x64."""
    args = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), mlp_ratios=(2, 2, 2, 2), head_conv=3, **_COMMON)
    return _create_smt('test_smt', pretrained, **dict(args, **kwargs))
