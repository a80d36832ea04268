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

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.depthwise import depthwise_conv2d
from ._fold import fold_bn_into_conv
from .fast_ops import linear
from .forms import use_fast_form
from .linear import Linear

__all__ = ['MultiHeadMixedConv', 'ScaleAwareAggregation', 'ScaleAwareModulation']


def _interleave_rows(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder dim 0 from head-major (i * Ch + j) to interleaved (j * h + i)."""
    return t.unflatten(0, (num_heads, -1)).transpose(0, 1).flatten(0, 1)


class MultiHeadMixedConv(nn.Module):
    """MHMC: ``num_heads`` depthwise convolutions of growing kernel size (3, 5, 7, 9 for four heads).

    Head ``i`` convolves the contiguous channels ``[i * C/h, (i + 1) * C/h)`` with a ``(3 + 2i)``-sized kernel.
    ``forward`` runs all heads as ONE depthwise convolution whose smaller kernels are zero-padded to the
    largest size (a ``folded`` form: identical result, one launch, no slicing or concatenation);
    ``forward_reference`` is the plain per-head loop of the paper.

    Args:
        dim: number of channels C (divisible by ``num_heads``).
        num_heads: number of heads h.
        kernel_sizes: odd kernel size per head; defaults to ``3 + 2 * i``.
    """

    __constants__ = ['deployed']

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
        self.deployed = False  # set by ScaleAwareModulation.reparameterize: one stored (interleaved) kernel
        head_dim = dim // num_heads
        self.convs = nn.ModuleList(
            [nn.Conv2d(head_dim, head_dim, k, padding=k // 2, groups=head_dim) for k in kernel_sizes]
        )

    def merged_kernel(self, interleaved: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """All heads' kernels zero-padded to ``max_kernel`` as one depthwise (C, 1, K, K) weight and (C,) bias,
        in head-major channel order or, with ``interleaved=True``, in SAA's interleaved order."""
        k_max = self.max_kernel
        weight = torch.cat([F.pad(c.weight, [(k_max - c.kernel_size[0]) // 2] * 4) for c in self.convs])
        bias = torch.cat([c.bias for c in self.convs])
        if interleaved:
            weight, bias = _interleave_rows(weight, self.num_heads), _interleave_rows(bias, self.num_heads)
        return weight, bias

    @torch.jit.unused
    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, interleaved: bool) -> torch.Tensor:
        """The merged depthwise convolution: Triton's mixed-kernel-size kernel (each head visits only its own
        taps, one launch) where ``use_fast_form('triton')`` allows it, else ``F.conv2d`` with the zero-padded
        kernel."""
        if use_fast_form('triton', x):
            return depthwise_conv2d(
                x,
                weight,
                bias,
                self.max_kernel // 2,
                group_kernel_sizes=self.kernel_sizes,
                group_interleaved=interleaved,
                backend='triton',
            )
        return F.conv2d(x, weight, bias, padding=self.max_kernel // 2, groups=self.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) head-major -> same
        if use_fast_form('folded', x):
            return self._forward_merged(x)
        return self.forward_reference(x)

    @torch.jit.unused
    def _forward_merged(self, x: torch.Tensor) -> torch.Tensor:
        if self.deployed:
            return self.conv(x, self.merged.weight, self.merged.bias, interleaved=True)
        weight, bias = self.merged_kernel()
        return self.conv(x, weight, bias, interleaved=False)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The per-head loop of the paper; once deployed (channels interleaved), the stored merged conv."""
        if self.deployed:
            return F.conv2d(x, self.merged.weight, self.merged.bias, padding=self.max_kernel // 2, groups=self.dim)
        ch = self.dim // self.num_heads
        outs: List[torch.Tensor] = []
        for i, conv in enumerate(self.convs):
            outs.append(conv(x[:, i * ch : (i + 1) * ch]))
        return torch.cat(outs, dim=1)


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
        if use_fast_form('inplace', x):
            return self._forward_inplace(x, interleaved)
        return self.forward_reference(x, interleaved)

    def _interleave(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W), head-major -> interleaved channels
        return x.unflatten(1, (self.num_heads, self.dim // self.num_heads)).transpose(1, 2).flatten(1, 2)

    def forward_reference(self, x: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
        if not interleaved:
            x = self._interleave(x)
        return self.proj1(self.act(self.bn(self.proj0(x))))

    @torch.jit.unused
    def _forward_inplace(self, x: torch.Tensor, interleaved: bool) -> torch.Tensor:
        if not interleaved:
            x = self._interleave(x)
        return self.proj1(torch.ops.aten.gelu_(self.bn(self.proj0(x))))

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

    __constants__ = ['deployed']  # TorchScript compiles only the plain form of the current state

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        expand_ratio: int = 2,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
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
        s = Linear(
            self.dim, self.dim, bias=self.s.bias is not None, device=self.s.weight.device, dtype=self.s.weight.dtype
        )
        s.weight.copy_(_interleave_rows(self.s.weight, h))
        if self.s.bias is not None:
            s.bias.copy_(_interleave_rows(self.s.bias, h))
        weight, bias = self.mhmc.merged_kernel(interleaved=True)
        self.mhmc.merged = nn.Conv2d(
            self.dim,
            self.dim,
            self.mhmc.max_kernel,
            padding=self.mhmc.max_kernel // 2,
            groups=self.dim,
            device=weight.device,
            dtype=weight.dtype,
        )
        self.mhmc.merged.weight.copy_(weight)
        self.mhmc.merged.bias.copy_(bias)
        del self.mhmc.convs
        self.mhmc.deployed = True
        self.s = s
        self.saa.reparameterize()
        self.deployed = True

    @torch.jit.unused
    def modulator(self, x: torch.Tensor) -> torch.Tensor:
        """The SAA output for channels-last input ``x`` (B, H, W, C), as (B, H, W, C): ``s`` with interleaved
        rows, MHMC as one merged conv (the ``folded`` form) and SAA without an activation shuffle."""
        if self.deployed:
            return self.saa(self.mhmc(self.s(x).permute(0, 3, 1, 2)), interleaved=True).permute(0, 2, 3, 1)
        h = self.num_heads
        weight_s = _interleave_rows(self.s.weight, h)
        bias_s = _interleave_rows(self.s.bias, h) if self.s.bias is not None else None
        s = linear(x, weight_s, bias_s).permute(0, 3, 1, 2)  # (B, C, H, W), interleaved channels
        weight, bias = self.mhmc.merged_kernel(interleaved=True)
        s = self.mhmc.conv(s, weight, bias, interleaved=True)
        return self.saa(s, interleaved=True).permute(0, 2, 3, 1)

    def forward_nhwc(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        if use_fast_form('folded', x):
            return self._forward_folded_nhwc(x)
        return self.forward_reference_nhwc(x)

    @torch.jit.unused
    def _forward_folded_nhwc(self, x: torch.Tensor) -> torch.Tensor:
        m = self.modulator(x)  # a fresh tensor: in inference it can take the product in place
        return self.proj_drop(self.proj(m.mul_(self.v(x)) if use_fast_form('inplace', x) else m * self.v(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return self.forward_nhwc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return self.forward_reference_nhwc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_reference_nhwc(self, t: torch.Tensor) -> torch.Tensor:
        """The plain form, channels-last tokens: the paper's (per-head MHMC, activation interleave) or, once
        reparameterized, the same maths on the merged weights (``s`` rows interleaved, one depthwise conv)."""
        if self.deployed:
            s = self.mhmc.forward_reference(self.s(t).permute(0, 3, 1, 2))  # one conv, interleaved channels
            m = self.saa.forward_reference(s, interleaved=True).permute(0, 2, 3, 1)
        else:
            s = self.mhmc.forward_reference(self.s(t).permute(0, 3, 1, 2))
            m = self.saa.forward_reference(s, interleaved=False).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(m * self.v(t)))
