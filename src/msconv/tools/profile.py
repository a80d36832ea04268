"""Parameters, multiply-accumulates (MACs) and activations of a model's forward pass.

Counted at the dispatcher level with :class:`torch.utils.flop_counter.FlopCounterMode`, so functional calls
(``F.conv2d``, ``@``, ``torch.einsum``, ``F.scaled_dot_product_attention``) are seen as well as modules, and
grouped/depthwise convolutions are counted from their weight shape. Units:

* ``macs``: multiply-accumulates of the whole forward pass (``FlopCounterMode`` FLOPs / 2). This is the
  number papers print as "FLOPs" (SMT's "2.4G", fvcore, timm's ``gmacs``).
* ``macs_conv_linear``: convolutions and ``mm``/``addmm`` (linear layers: a weight times activations).
* ``macs_attention``: batched matmuls (``bmm``/``baddbmm``, i.e. ``q @ k^T`` and ``attn @ v``) and fused
  scaled-dot-product attention: activations times activations. Official model cards usually leave these out
  (SMT's README numbers are ``macs_conv_linear``).
* ``activations``: output elements of the convolution, linear and matmul ops (fvcore's
  ``ActivationCountAnalysis`` convention, timm's ``macts``); fused attention counts as its two matmuls
  (``B*H*L*S + B*H*L*Ev``) so that it matches the same attention written with ``@``.

Operators are counted in their plain reference form (``msconv.layers.reference_forms()``), so the numbers are
the architecture's: MHMC's fast form runs its 3/5/7 kernels zero-padded to 9x9, but costs are counted for the
real kernel sizes (SMT-T: 2.38 G conv+linear, as the paper).

Run it on the meta device (``device='meta'``, or a model built under ``torch.device('meta')``) to profile
full-size models in well under a second with no memory: only shapes are computed.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from ..layers import reference_forms
from ._common import build_model

__all__ = ['profile', 'format_profile']

aten = torch.ops.aten

_SDPA_OPS = tuple(
    getattr(aten, name) for name in (
        '_scaled_dot_product_efficient_attention',
        '_scaled_dot_product_flash_attention',
        '_scaled_dot_product_flash_attention_for_cpu',
        '_scaled_dot_product_cudnn_attention',
    ) if hasattr(aten, name)
)
_ATTENTION_OPS = (aten.bmm, aten.baddbmm) + _SDPA_OPS
_CONV_LINEAR_OPS = (aten.mm, aten.addmm, aten.convolution, aten._convolution)
_ACTIVATION_OPS = (aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.convolution, aten._convolution)


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of softmax(q k^T) v: two batched matmuls (used when this torch has no formula for the CPU op)."""
    b, h, l, e = query_shape
    s, ev = key_shape[-2], value_shape[-1]
    return 2 * b * h * l * s * e + 2 * b * h * l * s * ev


def _custom_mapping() -> Dict[Any, Any]:
    op = getattr(aten, '_scaled_dot_product_flash_attention_for_cpu', None)
    if op is not None and op not in flop_registry:  # torch < 2.5 counted CPU SDPA as zero
        return {op: _sdpa_cpu_flop}
    return {}


class _ActivationCounter(TorchDispatchMode):
    """Sums the output elements of conv / linear / matmul ops (fused attention: its two matmul outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = getattr(func, 'overloadpacket', None)
        if packet in _ACTIVATION_OPS:
            self.count += out.numel()
        elif packet in _SDPA_OPS:
            q, k, v = args[:3]
            b, h, l = q.shape[0], q.shape[1], q.shape[2]
            self.count += b * h * l * k.shape[-2] + b * h * l * v.shape[-1]
        return out


def _check_input_size(input_size: Any) -> tuple:
    if (not isinstance(input_size, (tuple, list)) or len(input_size) != 3
            or not all(isinstance(v, int) and v > 0 for v in input_size)):
        raise ValueError(f"input_size must be a (C, H, W) tuple of 3 positive ints, got {input_size!r}")
    return tuple(input_size)


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device('cpu')


@torch.no_grad()
def profile(
        model: Union[nn.Module, str],
        input_size: Sequence[int] = (3, 224, 224),
        batch_size: int = 1,
        device: Optional[Union[str, torch.device]] = None,
) -> Dict[str, Any]:
    """Count the parameters, MACs and activations of one forward pass of ``model`` in eval mode.

    Args:
        model: an ``nn.Module``, or a model name (msconv or timm), which is then built on the meta device.
        input_size: ``(C, H, W)`` of one image.
        batch_size: images per forward pass; MACs and activations are totals for the batch.
        device: where to run the counting pass. Default: the model's own device. ``'meta'`` counts shapes only
            (fast, no memory); a model on another device is then deep-copied to meta, the original is untouched.

    Returns:
        a dict with ``params``, ``macs``, ``macs_conv_linear``, ``macs_attention``, ``macs_other``, ``flops``
        (= 2 x macs), ``activations``, ``by_op`` (MACs per aten op), ``input_size`` and ``batch_size``.
    """
    input_size = _check_input_size(input_size)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(model, str):
        model = build_model(model, meta=True)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module or a model name, got {type(model).__name__}")
    target = torch.device(device) if device is not None else _model_device(model)
    if target != _model_device(model):
        model = copy.deepcopy(model).to(target)

    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    x = torch.zeros(batch_size, *input_size, device=target)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
        acts = _ActivationCounter()
        with counter, acts, reference_forms():  # architecture MACs: e.g. MHMC's 3/5/7/9 taps, not zero padding
            model(x)
    finally:
        model.train(was_training)

    by_op = {op: int(n) for op, n in counter.get_flop_counts().get('Global', {}).items()}
    attention = sum(n for op, n in by_op.items() if op in _ATTENTION_OPS)
    conv_linear = sum(n for op, n in by_op.items() if op in _CONV_LINEAR_OPS)
    total = sum(by_op.values())
    return dict(
        params=params,
        macs=total // 2,
        macs_conv_linear=conv_linear // 2,
        macs_attention=attention // 2,
        macs_other=(total - attention - conv_linear) // 2,
        flops=total,
        activations=acts.count,
        by_op={str(op): n // 2 for op, n in by_op.items()},
        input_size=input_size,
        batch_size=batch_size,
    )


def format_profile(stats: Dict[str, Any], name: str = '') -> str:
    """A few human-readable lines (M params, G MACs, M activations)."""
    c, h, w = stats['input_size']
    head = f"{name} " if name else ''
    return '\n'.join([
        f"{head}input {stats['batch_size']}x{c}x{h}x{w}",
        f"  params             {stats['params'] / 1e6:10.2f} M",
        f"  MACs (total)       {stats['macs'] / 1e9:10.3f} G",
        f"    conv + linear    {stats['macs_conv_linear'] / 1e9:10.3f} G",
        f"    attention matmul {stats['macs_attention'] / 1e9:10.3f} G",
        f"  activations        {stats['activations'] / 1e6:10.2f} M",
    ])
