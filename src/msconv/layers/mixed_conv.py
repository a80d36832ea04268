"""Scale-Aware Modulation (SAM) from SMT: Multi-Head Mixed Convolution + Scale-Aware Aggregation.

Paper: "Scale-Aware Modulation Meet Transformer", Lin et al., ICCV 2023 (arXiv 2307.08579).

The three operators are NCHW in and out and keep the official parameter layout (one depthwise kernel per head,
the grouped/dense 1x1 pair of SAA, head-major channel order of the ``s`` projection), so official weights load
with ``msconv.convert_official(sd, 'smt')``.

Channel orders. MHMC splits C channels into ``h`` heads of ``Ch = C / h`` contiguous channels ("head-major",
channel ``i * Ch + j`` is channel ``j`` of head ``i``). SAA first interleaves them (new channel ``j * h + i``) so
that each group of the grouped 1x1 conv sees one channel of every head. ``ScaleAwareModulation`` never shuffles
activations: it permutes the rows of the tiny ``s`` weight and of the depthwise kernels instead, so the
convolution output is produced directly in interleaved order (the same maths, no copy).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.depthwise import depthwise_conv2d, triton_available
from ._fold import fold_bn_into_conv, use_inplace_inference
from ._forms import reference_forms_enabled
from .linear import Linear, linear

__all__ = ['MultiHeadMixedConv', 'ScaleAwareAggregation', 'ScaleAwareModulation']


def _interleave_rows(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder dim 0 from head-major (i * Ch + j) to interleaved (j * h + i)."""
    return t.unflatten(0, (num_heads, -1)).transpose(0, 1).flatten(0, 1)


class MultiHeadMixedConv(nn.Module):
    """MHMC: ``num_heads`` depthwise convolutions of growing kernel size (3, 5, 7, 9 for four heads).

    Head ``i`` convolves the contiguous channels ``[i * C/h, (i + 1) * C/h)`` with a ``(3 + 2i)``-sized kernel.
    ``forward`` runs all heads as ONE depthwise convolution whose smaller kernels are zero-padded to the
    largest size (identical result, one launch, no slicing or concatenation); ``forward_reference`` is the
    plain per-head loop of the paper.

    Args:
        dim: number of channels C (divisible by ``num_heads``).
        num_heads: number of heads h.
        kernel_sizes: odd kernel size per head; defaults to ``3 + 2 * i``.
    """

    def __init__(self, dim: int, num_heads: int = 4, kernel_sizes: Optional[Sequence[int]] = None):
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        kernel_sizes = tuple(kernel_sizes) if kernel_sizes is not None else tuple(3 + 2 * i for i in range(num_heads))
        if len(kernel_sizes) != num_heads or any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel_sizes must be {num_heads} odd sizes, got {kernel_sizes}")
        self.dim = dim
        self.num_heads = num_heads
        self.kernel_sizes = kernel_sizes
        self.max_kernel = max(kernel_sizes)
        head_dim = dim // num_heads
        self.convs = nn.ModuleList([
            nn.Conv2d(head_dim, head_dim, k, padding=k // 2, groups=head_dim) for k in kernel_sizes
        ])

    def merged_kernel(self, interleaved: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """All heads' kernels zero-padded to ``max_kernel`` as one depthwise (C, 1, K, K) weight and (C,) bias,
        in head-major channel order or, with ``interleaved=True``, in SAA's interleaved order."""
        k_max = self.max_kernel
        weight = torch.cat([F.pad(c.weight, [(k_max - c.kernel_size[0]) // 2] * 4) for c in self.convs])
        bias = torch.cat([c.bias for c in self.convs])
        if interleaved:
            weight, bias = _interleave_rows(weight, self.num_heads), _interleave_rows(bias, self.num_heads)
        return weight, bias

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, interleaved: bool) -> torch.Tensor:
        """The merged depthwise convolution: Triton's mixed-kernel-size kernel (each head visits only its own
        taps, one launch) where Triton runs, else ``F.conv2d`` with the zero-padded kernel."""
        if triton_available(x.device):
            return depthwise_conv2d(x, weight, bias, self.max_kernel // 2, group_kernel_sizes=self.kernel_sizes,
                                    group_interleaved=interleaved, backend='triton')
        return F.conv2d(x, weight, bias, padding=self.max_kernel // 2, groups=self.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) head-major -> same
        if reference_forms_enabled():
            return self.forward_reference(x)
        return self.conv(x, *self.merged_kernel(), interleaved=False)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([conv(part) for conv, part in zip(self.convs, x.chunk(self.num_heads, dim=1))], dim=1)


class ScaleAwareAggregation(nn.Module):
    """SAA: interleave the heads' channels, grouped 1x1 conv (groups of ``num_heads`` channels, one from each
    head) -> BatchNorm -> GELU -> dense 1x1 conv back to C channels. Its output is the modulator."""

    def __init__(self, dim: int, num_heads: int = 4, expand_ratio: int = 2):
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.num_heads = num_heads
        self.proj0 = nn.Conv2d(dim, dim * expand_ratio, 1, groups=dim // num_heads)
        self.bn = nn.BatchNorm2d(dim * expand_ratio)
        self.act = nn.GELU()
        self.proj1 = nn.Conv2d(dim * expand_ratio, dim, 1)

    def forward(self, x: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
        """``x``: (B, C, H, W) in head-major order, or already interleaved when ``interleaved=True``."""
        if not interleaved:
            B, C, H, W = x.shape
            x = x.reshape(B, self.num_heads, C // self.num_heads, H, W).transpose(1, 2).reshape(B, C, H, W)
        x = self.bn(self.proj0(x))
        return self.proj1(torch.ops.aten.gelu_(x) if use_inplace_inference() else self.act(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Inference form: the BatchNorm folded into the grouped 1x1 conv (eval statistics)."""
        if isinstance(self.bn, nn.BatchNorm2d):
            self.proj0 = fold_bn_into_conv(self.proj0, self.bn)
            self.bn = nn.Identity()


class ScaleAwareModulation(nn.Module):
    """The SAM token mixer: ``proj(SAA(MHMC(s(x))) * v(x))``.

    ``v`` and ``s`` are per-pixel linear projections; MHMC runs on ``s``, SAA turns the result into the
    modulator, which multiplies ``v`` elementwise before the output projection.

    Args:
        dim: channels C.
        num_heads: MHMC heads (``ca_num_heads`` in the official code).
        expand_ratio: SAA expansion of the grouped 1x1 conv.
        qkv_bias: bias in the ``v`` and ``s`` projections.
        proj_drop: dropout after the output projection.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 4,
            expand_ratio: int = 2,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
    ):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.v = Linear(dim, dim, bias=qkv_bias)
        self.s = Linear(dim, dim, bias=qkv_bias)
        self.mhmc = MultiHeadMixedConv(dim, num_heads)
        self.saa = ScaleAwareAggregation(dim, num_heads, expand_ratio)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.deployed = False

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Inference form: ``s`` stored with interleaved output rows, MHMC as one ``nn.Conv2d`` (smaller kernels
        zero-padded to the largest, rows interleaved) and SAA's BatchNorm folded. Eval outputs are unchanged."""
        if self.deployed:
            return
        h = self.num_heads
        s = Linear(self.dim, self.dim, bias=self.s.bias is not None, device=self.s.weight.device,
                      dtype=self.s.weight.dtype)
        s.weight.copy_(_interleave_rows(self.s.weight, h))
        if self.s.bias is not None:
            s.bias.copy_(_interleave_rows(self.s.bias, h))
        weight, bias = self.mhmc.merged_kernel(interleaved=True)
        self.mhmc.merged = nn.Conv2d(self.dim, self.dim, self.mhmc.max_kernel, padding=self.mhmc.max_kernel // 2,
                                     groups=self.dim, device=weight.device, dtype=weight.dtype)
        self.mhmc.merged.weight.copy_(weight)
        self.mhmc.merged.bias.copy_(bias)
        del self.mhmc.convs
        self.s = s
        self.saa.reparameterize()
        self.deployed = True

    def modulator(self, x: torch.Tensor) -> torch.Tensor:
        """The SAA output for channels-last input ``x`` (B, H, W, C), as (B, H, W, C)."""
        if self.deployed:
            s = self.s(x).permute(0, 3, 1, 2)
            s = self.mhmc.conv(s, self.mhmc.merged.weight, self.mhmc.merged.bias, interleaved=True)
            return self.saa(s, interleaved=True).permute(0, 2, 3, 1)
        h = self.num_heads
        weight_s = _interleave_rows(self.s.weight, h)
        bias_s = _interleave_rows(self.s.bias, h) if self.s.bias is not None else None
        s = linear(x, weight_s, bias_s).permute(0, 3, 1, 2)  # (B, C, H, W), interleaved channels
        s = self.mhmc.conv(s, *self.mhmc.merged_kernel(interleaved=True), interleaved=True)
        return self.saa(s, interleaved=True).permute(0, 2, 3, 1)

    def forward_nhwc(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        if reference_forms_enabled() and not self.deployed:
            return self.forward_reference(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        m = self.modulator(x)  # a fresh tensor: in inference it can take the product in place
        return self.proj_drop(self.proj(m.mul_(self.v(x)) if use_inplace_inference() else m * self.v(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return self.forward_nhwc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Plain form of the paper (head loop, activation interleave), NCHW; used to test ``forward``."""
        if self.deployed:
            raise RuntimeError("forward_reference needs the training form; this module was reparameterized")
        t = x.permute(0, 2, 3, 1)
        s = self.mhmc.forward_reference(self.s(t).permute(0, 3, 1, 2))
        m = self.saa(s, interleaved=False).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(m * self.v(t))).permute(0, 3, 1, 2)
