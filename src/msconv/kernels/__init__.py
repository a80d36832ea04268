"""msconv operators: usable on their own, NCHW in and out.

``depthwise_conv2d`` is the depthwise convolution behind SMT's multi-head mixed convolution and ShiftwiseConv's
strip kernels: Triton kernels on CUDA (forward and backward) and PyTorch's ``F.conv2d`` as the reference, run as
asked (``backend=``); ``msconv.depthwise_conv2d`` asks msconv's form gate which one.
"""

from .depthwise import (
    channel_kernel_sizes,
    depthwise_conv2d,
    depthwise_conv2d_reference,
    interpreter_active,
    resolve_padding,
    triton_available,
)

__all__ = [
    'depthwise_conv2d',
    'depthwise_conv2d_reference',
    'triton_available',
    'interpreter_active',
    'resolve_padding',
    'channel_kernel_sizes',
]
