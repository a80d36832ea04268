"""Generic fast operators: standard ops (a linear, a 1x1 or 3x3 convolution, a convolution followed by GELU, a spatial
mean, a block mapped over images) computed in a fast form where ``msconv.layers.forms`` allows it.

None of them is tied to one paper: the operators and models of SMT, SCSC and ShiftwiseConv call them. Each computes
exactly what its docstring names; which of its forms runs is decided by the gate (``forms.use_fast_form``) and, where
the fastest depends on the machine, measured by the autotuner (``forms.tuned``, under the operation's name in
``forms.TUNED``).
"""

from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import depthwise as _depthwise
from .forms import tunable, tuned, tuned_training, use_fast_form

__all__ = [
    'linear',
    'linear_gelu',
    'linear_1x1',
    'pointwise_conv',
    'pointwise_conv_train',
    'is_pointwise',
    'conv_gelu',
    'conv_im2col',
    'depthwise_conv2d',
    'depthwise_grad_input',
    'depthwise_grad_weight',
    'depthwise_grad_weight_per_image',
    'map_images',
    'spatial_mean',
    'spatial_l2_norms',
    'bn_train_forward',
    'bn_recompute',
    'bn_train_backward',
    'pointwise_gemm',
    'pointwise_gemm_backward',
]


# ---- GEMMs over channels-last tokens ------------------------------------------------------------------------------


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` of shape (..., in_features), as a BLAS or a oneDNN GEMM, whichever
    is faster here (see ``msconv.layers.linear``)."""
    if not tunable('linear', x):
        return F.linear(x, weight, bias)
    return linear_tuned(x, weight, bias)


def linear_tuned(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`linear` for a caller that has asked ``tunable('linear', x)`` already (``msconv.layers.Linear``)."""
    if x.dim() < 2 or weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32):
        return F.linear(x, weight, bias)
    return tuned(
        'linear',
        x,
        {'blas': lambda: F.linear(x, weight, bias), 'onednn': lambda: _linear_onednn(x, weight, bias)},
        extra=f"{weight.shape[1]}->{weight.shape[0]}{'+b' if bias is not None else ''}",
    )


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``GELU(F.linear(x, weight, bias))`` (exact GELU) into a fresh tensor, for eager inference without autograd:
    :func:`linear` then the GELU in place, or where ``use_fast_form('fused')`` allows and
    ``msconv.layers.forms.tuned`` measures it faster, one oneDNN 1x1 convolution over the channels-last view of
    ``x`` (no copy) with the GELU as a post-op, so the 4x-wide hidden tensor is written once."""
    plain = lambda: torch.ops.aten.gelu_(linear(x, weight, bias))  # noqa: E731
    if not (tunable('linear_gelu', x) and x.dim() >= 2 and weight.dtype == x.dtype):
        return plain()
    return tuned(
        'linear_gelu',
        x,
        {'plain': plain, 'fused': lambda: _linear_gelu_onednn(x, weight, bias)},
        extra=f"{weight.shape[1]}->{weight.shape[0]}{'+b' if bias is not None else ''}",
    )


def _linear_gelu_onednn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    w4 = weight.contiguous()[:, :, None, None]
    bias = bias.contiguous() if bias is not None else None
    x4 = x.reshape(-1, *x.shape[-3:]) if x.dim() >= 4 else x.reshape(1, -1, 1, x.shape[-1])  # (N, H, W, C) tokens
    out = torch.ops.mkldnn._convolution_pointwise(
        x4.permute(0, 3, 1, 2), w4, bias, [0, 0], [1, 1], [1, 1], 1, 'gelu', [], 'none'
    )  # channels-last in, channels-last out
    return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], weight.shape[0])


def _linear_onednn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    # oneDNN's convolution directly: F.conv2d would route 1x1 convs of small batches to the slow native kernel
    # when torch runs on one thread. It has its own autograd formula.
    w4 = weight.contiguous()[:, :, None, None]  # the oneDNN op reads weight and bias as dense, whatever the strides
    bias = bias.contiguous() if bias is not None else None
    if x.dim() == 4:  # (B, H, W, C) tokens: their NCHW view is channels-last
        out = torch.mkldnn_convolution(x.permute(0, 3, 1, 2), w4, bias, (0, 0), (1, 1), (1, 1), 1)
        return out.permute(0, 2, 3, 1).contiguous()  # a no-op: the output is channels-last too
    x4 = x.reshape(1, -1, 1, x.shape[-1]).permute(0, 3, 1, 2)  # (1, C, M, 1), channels-last
    out = torch.mkldnn_convolution(x4, w4, bias, (0, 0), (1, 1), (1, 1), 1)
    return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], weight.shape[0])


def _register_flop_formula() -> None:
    """Teach ``torch.utils.flop_counter.FlopCounterMode`` the oneDNN convolution op this module calls directly
    (torch registers formulas for ``aten.convolution`` and the cuDNN ops, not for ``aten.mkldnn_convolution``)."""
    from torch.utils import flop_counter

    if torch.ops.aten.mkldnn_convolution in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(torch.ops.aten.mkldnn_convolution)
    def _mkldnn_conv_flop(
        x_shape, w_shape, _bias, _padding, _stride, _dilation, _groups, *args, out_shape=None, **kwargs
    ) -> int:
        return flop_counter.conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


_register_flop_formula()


def linear_1x1(conv: nn.Conv2d, xt: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv (stride already applied) on (B, H, W, C) tokens: one GEMM over all tokens (:func:`linear`)."""
    return linear(xt.contiguous(), conv.weight.flatten(1), conv.bias)


# ---- convolutions -------------------------------------------------------------------------------------------------


def is_pointwise(conv: nn.Conv2d) -> bool:
    """A 1x1 ungrouped, undilated conv without padding and with the same stride along both axes."""
    return (
        conv.kernel_size == (1, 1)
        and conv.padding == (0, 0)
        and conv.groups == 1
        and conv.dilation == (1, 1)
        and conv.stride[0] == conv.stride[1]
    )


def pointwise_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a 1x1 ungrouped conv without padding (stride 1 or 2). Where ``use_fast_form('cpu_gemm')``
    allows it (CPU fp32, autograd off, no capture), it may instead run as a batched GEMM on the contiguous
    (B, C, H*W) view (after subsampling for stride 2): on the machine it was written on that measured 1.5-3x faster
    with few input channels on large maps, and slower for wide inputs, so which of the two runs is measured per
    shape (``msconv.layers.forms.tuned``)."""
    if not (tunable('pointwise_conv', x) and is_pointwise(conv) and conv.stride[0] in (1, 2)):
        return conv(x)
    return tuned(
        'pointwise_conv',
        x,
        {'conv': lambda: conv(x), 'gemm': lambda: _pointwise_gemm(conv, x)},
        extra=f'{conv.in_channels}->{conv.out_channels}/s{conv.stride[0]}',
    )


def _pointwise_gemm(
    conv: nn.Conv2d,
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The 1x1 conv as ``bmm`` (``baddbmm`` with a bias) on the (B, C, H*W) view; ``weight``/``bias`` replace the
    conv's own when given (the autotuner's detached copies)."""
    B, C = x.shape[:2]
    s = conv.stride[0]
    xs = x if s == 1 else x[:, :, ::s, ::s]
    H, W = xs.shape[2:]
    xs = xs.contiguous().view(B, C, H * W)
    w = (conv.weight if weight is None else weight).flatten(1)
    b = conv.bias if weight is None else bias
    if b is None:
        y = torch.bmm(w.expand(B, -1, -1), xs)
    else:
        y = torch.baddbmm(b.view(1, -1, 1).expand(B, -1, H * W), w.expand(B, -1, -1), xs)
    return y.view(B, -1, H, W)


def pointwise_conv_train(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a 1x1 conv in a training step (autograd on): the convolution, or where
    ``use_fast_form('train_gemm')`` allows (CPU, contiguous NCHW), a batched GEMM on the (B, C, H*W) view whose
    backward is GEMMs too (oneDNN's 1x1 convolution backward can be several times slower), whichever
    ``msconv.layers.forms.tuned_training`` measures faster (forward + backward) for this shape."""
    if not (tunable('pointwise_conv_train', x) and is_pointwise(conv) and conv.stride[0] in (1, 2)):
        return conv(x)
    return tuned_training(
        'pointwise_conv_train',
        (x, conv.weight, conv.bias),
        {'conv': lambda x, w, b: conv._conv_forward(x, w, b), 'gemm': lambda x, w, b: _pointwise_gemm(conv, x, w, b)},
        extra=f"{conv.in_channels}->{conv.out_channels}/s{conv.stride[0]}{'+b' if conv.bias is not None else ''}",
    )


def conv_gelu(conv: nn.Conv2d, x: torch.Tensor, plain: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
    """``GELU(conv(x))`` (exact GELU) into a fresh tensor, without autograd: ``plain()`` (default: the conv, then
    the GELU in place), or where ``use_fast_form('fused')`` allows and ``msconv.layers.forms.tuned`` measures it
    faster, one oneDNN convolution with the GELU as a post-op (no second pass over the output). Only call this
    where in-place forms are allowed (``use_fast_form('inplace', x)``)."""
    if plain is None:
        plain = lambda: torch.ops.aten.gelu_(conv(x))  # noqa: E731
    if not (
        tunable('conv_gelu', x)
        and conv.padding_mode == 'zeros'
        and not isinstance(conv.padding, str)
        and conv.weight.dtype == x.dtype
    ):
        return plain()
    return tuned(
        'conv_gelu',
        x,
        {'plain': plain, 'fused': lambda: _conv_gelu_onednn(conv, x)},
        extra=f'{conv.in_channels}->{conv.out_channels}/k{conv.kernel_size[0]}x{conv.kernel_size[1]}'
        f'/s{conv.stride[0]}/g{conv.groups}',
    )


def _conv_gelu_onednn(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._convolution_pointwise(
        x, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
        'gelu', [], 'none',
    )  # fmt: skip


def conv_im2col(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a 3x3 conv with padding 1 (ungrouped, undilated, square stride) as one GEMM per image over the
    unfolded patches (each image's unfolded patches are a cache-sized buffer, hence the loop, which is part of this
    form): 1.5x faster than the oneDNN NCHW conv for a 3-channel input on CPU (8x3x224x224 -> 96 channels: 22 ms vs
    33 ms). Autograd off (the GEMMs write into ``out=``)."""
    B, _, H, W = x.shape
    s = conv.stride[0]
    Ho, Wo = (H + 2 - 3) // s + 1, (W + 2 - 3) // s + 1
    out = x.new_empty(B, conv.out_channels, Ho * Wo)
    w = conv.weight.reshape(conv.out_channels, -1)
    for i in range(B):
        cols = F.unfold(x[i : i + 1], 3, padding=1, stride=s)[0]  # (C * 9, Ho * Wo)
        if conv.bias is None:
            torch.mm(w, cols, out=out[i])
        else:
            torch.addmm(conv.bias.unsqueeze(1), w, cols, out=out[i])
    return out.view(B, conv.out_channels, Ho, Wo)


def depthwise_grad_input(gz: torch.Tensor, x: torch.Tensor, k: torch.Tensor, pad: Tuple[int, int]) -> torch.Tensor:
    """Input gradient of the stride-1 depthwise correlation ``conv2d(x, k, padding=pad, groups=C)`` for the output
    gradient ``gz`` (autograd off): the convolution's backward, or the forward correlation of ``gz`` with the
    flipped kernel (the same sums; oneDNN's forward depthwise kernels are faster for long strips and large kernels),
    whichever the tuned ``depthwise_grad_input`` operation measures faster for this shape (the lean training forms
    of ShiftWise's strips, SMT's MHMC heads and SCSC's branches)."""
    groups = x.shape[1]
    flip_pad = (k.shape[2] - 1 - pad[0], k.shape[3] - 1 - pad[1])

    def backward() -> torch.Tensor:
        return torch.ops.aten.convolution_backward(
            gz, x, k, None, [1, 1], list(pad), [1, 1], False, [0, 0], groups, [True, False, False]
        )[0]

    if min(flip_pad) < 0:
        return backward()
    return tuned(
        'depthwise_grad_input',
        gz,
        {'backward': backward, 'flipped': lambda: F.conv2d(gz, k.flip(2, 3), padding=flip_pad, groups=groups)},
        extra=f'{tuple(k.shape[2:])}/p{tuple(pad)}',
    )


def depthwise_grad_weight(gz: torch.Tensor, x: torch.Tensor, k: torch.Tensor, pad: Tuple[int, int]) -> torch.Tensor:
    """Kernel gradient of the stride-1 depthwise correlation ``conv2d(x, k, padding=pad, groups=C)`` (autograd off):
    the convolution's backward (oneDNN's backward-weights runs long strips 10x-15x slower than its forward on CPU),
    or :func:`depthwise_grad_weight_per_image`, whichever the tuned ``depthwise_grad_weight`` operation measures
    faster for this shape."""
    groups = x.shape[1]

    def backward() -> torch.Tensor:
        return torch.ops.aten.convolution_backward(
            gz, x, k, None, [1, 1], list(pad), [1, 1], False, [0, 0], groups, [False, True, False]
        )[1]

    def per_image() -> torch.Tensor:
        return depthwise_grad_weight_per_image(gz, x, k.shape[2:], (1, 1), pad).view_as(k).to(k.dtype)

    return tuned(
        'depthwise_grad_weight',
        gz,
        {'backward': backward, 'per_image': per_image},
        extra=f'{tuple(k.shape[2:])}/p{tuple(pad)}',
    )


def depthwise_grad_weight_per_image(
    g: torch.Tensor, x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], pad: Sequence[int]
) -> torch.Tensor:
    """Kernel gradient of a depthwise correlation (dilation 1) image by image, as an fp32 (1, C, kh, kw) tensor:
    ``grad_w[c, i, j] = sum_{b, y, x} g[b, c, y, x] * x_pad[b, c, s*y + i, s*x + j]``, one depthwise correlation per
    image (the padded image as input, its output gradient as a kernel dilated by the stride s, only the rows and
    columns the kernel reaches), accumulated in fp32."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    ho, wo = g.shape[2], g.shape[3]
    xp = F.pad(x, (pw, pw, ph, ph))[:, :, : kh + sh * (ho - 1), : kw + sw * (wo - 1)]
    out = torch.zeros(1, x.shape[1], kh, kw, dtype=torch.float32, device=x.device)
    for xi, gi in zip(xp.split(1), g.split(1)):
        out += F.conv2d(xi, gi.transpose(0, 1), groups=x.shape[1], dilation=(sh, sw))
    return out


def depthwise_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    padding: _depthwise.Padding = 0,
    group_kernel_sizes: Optional[Sequence[int]] = None,
    group_interleaved: bool = False,
) -> torch.Tensor:
    """Depthwise 2-D cross-correlation, stride 1, with per-side padding and SMT's mixed kernel sizes
    (``msconv.kernels.depthwise.depthwise_conv2d``, whose docstring gives the arguments): msconv's Triton kernels
    where ``use_fast_form('triton')`` allows (CUDA or Triton's CPU interpreter, fp32/fp16/bf16, no graph capture,
    not inside ``reference_forms()``, ``MSCONV_DISABLE_TRITON`` unset), the PyTorch reference elsewhere."""
    backend = 'triton' if use_fast_form('triton', x) else 'torch'
    return _depthwise.depthwise_conv2d(x, weight, bias, padding, group_kernel_sizes, group_interleaved, backend=backend)


# ---- image by image -----------------------------------------------------------------------------------------------


def map_images(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, op: str) -> torch.Tensor:
    """``fn(x)`` for an ``fn`` that treats images independently (eval mode), computed batched or one image at a time
    (concatenated), whichever :func:`~msconv.layers.forms.tuned` measures faster for ``op`` at this shape, where
    ``per_image`` forms are allowed."""
    if not tunable(op, x):
        return fn(x)
    return tuned(
        op,
        x,
        {'batched': lambda: fn(x), 'per_image': lambda: torch.cat([fn(xi) for xi in x.split(1)])},
        module=fn if isinstance(fn, nn.Module) else None,
    )


def spatial_mean(y: torch.Tensor) -> torch.Tensor:
    """``y.mean((2, 3), keepdim=True)`` for a (B, C, H, W) ``y`` (any memory layout), e.g. a squeeze-excitation's
    statistic. On CPU, ATen reduces bf16/fp16 by first copying the whole tensor to fp32: a batch-sized temporary
    (29 MB for scsc_resnet50's 8x288x56x56), freshly page-faulted in on every call. For those dtypes, where
    ``use_fast_form('per_image')`` allows, this reduces image by image instead: the same fp32 sums (bit-identical
    results) through an image-sized copy. (fp32 needs no copy: there the batched mean is this form already.)"""
    if y.dtype not in (torch.bfloat16, torch.float16) or not use_fast_form('per_image', y):
        return y.mean((2, 3), keepdim=True)
    out = y.new_empty(y.shape[0], y.shape[1], 1, 1)
    for i in range(y.shape[0]):
        torch.mean(y[i : i + 1], (2, 3), keepdim=True, out=out[i : i + 1])
    return out


def spatial_l2_norms(hv: torch.Tensor) -> torch.Tensor:
    """(b, N, C) -> (b, 1, C): L2 norms over N, GRN's statistic, for eager inference without autograd. Where
    ``use_fast_form('per_image')`` allows, squares and sums image by image through one image-sized buffer: ~10x
    faster than ``vector_norm`` over a non-innermost dim on CPU, and no batch-sized temporary (fresh multi-MB buffers
    are page-faulted in on every call: 2.4 ms vs 0.3 ms at 8x196x1280); elsewhere (other devices, with caching
    allocators, or one image: the same sums) one batched pass."""
    if not use_fast_form('per_image', hv):
        return (hv * hv).sum(1, keepdim=True).sqrt_()
    squares = torch.empty_like(hv[0])
    norms = hv.new_empty(hv.shape[0], 1, hv.shape[2])
    for i in range(hv.shape[0]):
        torch.sum(torch.mul(hv[i], hv[i], out=squares), 0, keepdim=True, out=norms[i])
    return norms.sqrt_()


# ---- pieces of the lean training forms (custom autograd functions) -----------------------------------------------


def bn_train_forward(bn: nn.BatchNorm2d, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``bn(x)`` for a ``BatchNorm2d`` in training mode (tracking running statistics), as ``_BatchNorm.forward``
    computes it (``num_batches_tracked`` counted, the cumulative average when ``momentum`` is None, the running
    statistics moved in place), but returning the batch mean and inverse std too: ``(out, mean, invstd)``, what
    :func:`bn_train_backward` and :func:`bn_recompute` need. Call it with autograd off (a lean form's forward)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    return torch.native_batch_norm(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, factor, bn.eps)


def bn_recompute(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor):
    """The training-mode BatchNorm output of ``x`` again, from the batch statistics :func:`bn_train_forward` returned
    (the same affine map, within float rounding): a lean form's backward recomputes it instead of saving it."""
    alpha = invstd * weight
    beta = bias - mean * alpha
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return torch.addcmul(beta.view(shape), x, alpha.view(shape))


def bn_train_backward(
    grad: torch.Tensor, x: torch.Tensor, bn: nn.BatchNorm2d, mean: torch.Tensor, invstd: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of a training-mode BatchNorm (input, weight, bias): the op autograd itself runs for it."""
    return torch.ops.aten.native_batch_norm_backward(
        grad, x, bn.weight, bn.running_mean, bn.running_var, mean, invstd, True, bn.eps, [True, True, True]
    )


def pointwise_gemm(weight: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A 1x1 conv (stride 1) of a contiguous (B, C, H, W) ``x`` as one GEMM per image on its (C, H*W) view, with
    autograd off (a lean form's forward): (B, O, H, W). On CPU the GEMMs write straight into the output, image by
    image (``torch.matmul`` of a matrix and a batch may fold the batch into one GEMM over transposed copies)."""
    B, C, H, W = x.shape
    w = weight.reshape(weight.shape[0], C)
    xs = x.reshape(B, C, H * W)
    if x.device.type != 'cpu':
        y = torch.matmul(w, xs) if bias is None else torch.baddbmm(bias.view(1, -1, 1), w.expand(B, -1, -1), xs)
        return y.view(B, -1, H, W)
    y = x.new_empty(B, w.shape[0], H * W)
    for xi, yi in zip(xs, y):
        if bias is None:
            torch.mm(w, xi, out=yi)
        else:
            torch.addmm(bias.unsqueeze(1), w, xi, out=yi)
    return y.view(B, -1, H, W)


def pointwise_gemm_backward(
    grad: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, input_grad: bool = True
) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Gradients of :func:`pointwise_gemm` (input, weight) for the output gradient ``grad``; on CPU image by image,
    the weight gradient accumulated by the GEMMs into one (O, C) output (no (B, O, C) temporary)."""
    B, C, H, W = x.shape
    out_channels = grad.shape[1]
    g = grad.reshape(B, out_channels, H * W)
    xs = x.reshape(B, C, H * W)
    w = weight.reshape(out_channels, C)
    if x.device.type != 'cpu':
        gw = torch.bmm(g, xs.transpose(1, 2)).sum(0)
        gx = torch.matmul(w.t(), g).view(B, C, H, W) if input_grad else None
        return gx, gw.view(weight.shape)
    gw = torch.zeros_like(w)
    gx = x.new_empty(B, C, H * W) if input_grad else None
    for b in range(B):
        gw.addmm_(g[b], xs[b].t())
        if gx is not None:
            torch.mm(w.t(), g[b], out=gx[b])
    return (gx.view(B, C, H, W) if gx is not None else None), gw.view(weight.shape)
