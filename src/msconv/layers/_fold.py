"""Small helpers shared by the operators' inference forms."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

__all__ = ['bn_scale_shift', 'channels_last_only', 'fold_bn_into_conv', 'spatial_mean']


def bn_scale_shift(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``bn(x) == x * scale + shift`` in eval mode (running statistics)."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


@torch.no_grad()
def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d computing ``bn(conv(x))`` with the BatchNorm in eval mode (running statistics)."""
    scale, shift = bn_scale_shift(bn)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    fused.bias.copy_(shift + (conv.bias * scale if conv.bias is not None else 0))
    return fused


def channels_last_only(x: torch.Tensor) -> bool:
    """True for a 4-D tensor laid out channels-last and not also plain contiguous (so not when C or H*W is 1)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def spatial_mean(y: torch.Tensor) -> torch.Tensor:
    """``y.mean((2, 3), keepdim=True)`` for a (B, C, H, W) ``y`` (any memory layout), e.g. a squeeze-excitation's
    statistic. On CPU, ATen reduces bf16/fp16 by first copying the whole tensor to fp32: a batch-sized temporary
    (29 MB for scsc_resnet50's 8x288x56x56), freshly page-faulted in on every call. This reduces image by image
    instead: the same fp32 sums (bit-identical results) through an image-sized copy."""
    if y.device.type != 'cpu' or y.dtype not in (torch.bfloat16, torch.float16) or y.shape[0] == 1:
        return y.mean((2, 3), keepdim=True)
    out = y.new_empty(y.shape[0], y.shape[1], 1, 1)
    for i in range(y.shape[0]):
        torch.mean(y[i : i + 1], (2, 3), keepdim=True, out=out[i : i + 1])
    return out
