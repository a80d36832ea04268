"""A channels-last ``Linear`` whose GEMM runs through oneDNN on CPU.

For fp32 on CPU, ``F.linear`` calls the BLAS ``sgemm`` (MKL in the PyPI wheels), while a 1x1 convolution over a
channels-last tensor is a oneDNN matmul. The two compute the same products; on the 2-core AVX-512 machine we
measure on, oneDNN runs the token-mixer and MLP shapes of these models 1.5x-2.1x faster forward and 1.6x-2.0x
forward + backward (e.g. 3136 x 80 -> 320: 0.82 ms vs 0.43 ms; ``benchmarks/bench_cpu_linear.py`` prints the table
for the machine at hand). A contiguous (..., C) tensor viewed as (1, C, M, 1) or, for (B, H, W, C) tokens, as
(B, C, H, W) is channels-last already, so the detour costs no copy, and autograd goes through the convolution's
own backward. (bf16 needs no detour: ``F.linear`` already runs bf16 GEMMs on oneDNN.)

Which of the two runs is measured, not assumed: on another machine of the same kind the same shapes ran 0.75x-1.08x
(slower on 9 of 10), so where ``msconv.layers.forms.use_fast_form('onednn', x)`` allows the oneDNN form (fp32 CPU,
oneDNN enabled, no autocast, no graph capture, not inside ``reference_forms()``), ``msconv.layers.forms.tuned``
times both on the first call for each shape in eager inference and keeps the faster. With autograd on (training),
under captures and everywhere else it is ``F.linear``.
"""

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .forms import tuned, use_fast_form

__all__ = ['Linear', 'linear', 'linear_gelu']


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` of shape (..., in_features), as a BLAS or a oneDNN GEMM, whichever
    is faster here (see the module docstring)."""
    if not (
        use_fast_form('onednn', x)
        and x.dim() >= 2
        and x.is_contiguous()
        and weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
    ):
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
    if not (use_fast_form('fused', x) and x.dim() >= 2 and x.is_contiguous() and weight.dtype == x.dtype):
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


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fast_form('onednn', x):
            return self._forward_fast(x)
        return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @torch.jit.unused
    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
