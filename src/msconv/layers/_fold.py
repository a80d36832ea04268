"""Small helpers shared by the operators' inference forms."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

__all__ = ['bn_scale_shift', 'bn_folded_weights', 'channels_last_only', 'fold_bn_into_conv']


def bn_scale_shift(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``bn(x) == x * scale + shift`` in eval mode (running statistics)."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def bn_folded_weights(
    weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.BatchNorm2d
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of a convolution computing ``bn(conv(x))`` (``conv`` of ``weight`` and ``bias``), the
    BatchNorm in eval mode (running statistics)."""
    scale, shift = bn_scale_shift(bn)
    w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    return w, (shift + bias * scale if bias is not None else shift)


@torch.no_grad()
def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d computing ``bn(conv(x))`` with the BatchNorm in eval mode (running statistics)."""
    weight, bias = bn_folded_weights(conv.weight, conv.bias, bn)
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
    fused.weight.copy_(weight)
    fused.bias.copy_(bias)
    return fused


def channels_last_only(x: torch.Tensor) -> bool:
    """True for a 4-D tensor laid out channels-last and not also plain contiguous (so not when C or H*W is 1)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
