"""Parameters, multiply-accumulates (MACs) and activations of a model's forward pass.

Counted at the dispatcher level with :class:`torch.utils.flop_counter.FlopCounterMode`, so functional calls
(``F.conv2d``, ``@``, ``torch.einsum``, ``F.scaled_dot_product_attention``) are seen as well as modules, and
grouped/depthwise convolutions are counted from their weight shape. Units:

* ``macs``: multiply-accumulates of the whole forward pass (``FlopCounterMode`` FLOPs / 2). This is the
  number papers print as "FLOPs" (SMT's "2.4G", fvcore, timm's ``gmacs``).
* ``macs_conv_linear``: convolutions and matmuls of a weight with activations (linear layers, 1x1 convs).
* ``macs_attention``: matmuls of two activations (``q @ k^T``, ``attn @ v``) and fused scaled-dot-product
  attention. Official model cards usually leave these out (SMT's README numbers are ``macs_conv_linear``).
* ``macs_other``: the rest, mainly products of weights alone (a fast form building its merged kernel from
  its parameters on every call); activations are tensors computed from the input, followed op by op.
* ``activations``: output elements of the convolution, linear and matmul ops applied to activations (fvcore's
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
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, flop_registry, shape_wrapper
from torch.utils.weak import WeakIdKeyDictionary

from ..layers import reference_forms
from ._common import build_model

__all__ = ['profile', 'format_profile']

aten = torch.ops.aten

_SDPA_OPS = tuple(
    getattr(aten, name)
    for name in (
        '_scaled_dot_product_efficient_attention',
        '_scaled_dot_product_flash_attention',
        '_scaled_dot_product_flash_attention_for_cpu',
        '_scaled_dot_product_cudnn_attention',
    )
    if hasattr(aten, name)
)
_MATMUL_OPS = (aten.mm, aten.addmm, aten.bmm, aten.baddbmm)
_CONV_OPS = (aten.convolution, aten._convolution)


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of softmax(q k^T) v: two batched matmuls (used when this torch has no formula for the CPU op)."""
    b, h, n_q, e = query_shape
    s, ev = key_shape[-2], value_shape[-1]
    return 2 * b * h * n_q * s * e + 2 * b * h * n_q * s * ev


def _custom_mapping() -> Dict[Any, Any]:
    op = getattr(aten, '_scaled_dot_product_flash_attention_for_cpu', None)
    if op is not None and op not in flop_registry:  # torch < 2.5 counted CPU SDPA as zero
        return {op: _sdpa_cpu_flop}
    return {}


def _operands(packet, args) -> tuple:
    """The two multiplied operands of a matmul / conv call (addmm and baddbmm carry the bias first)."""
    if packet in (aten.addmm, aten.baddbmm):
        return args[1], args[2]
    return args[0], args[1]


class _DataFlowCounter(TorchDispatchMode):
    """Classifies every conv / matmul / attention call by what its operands derive from, and counts activations.

    A tensor is an *activation* when it was computed from the model input (tracked op by op from the input
    tensor); parameters, buffers and tensors computed from them alone are *weights*. A product of an activation
    and a weight is conv/linear; of two activations, attention (``q @ k^T``, ``attn @ v``, fused SDPA); of two
    weights, weight preprocessing (e.g. building a merged kernel), reported as "other".
    """

    def __init__(self, x: torch.Tensor, formulas: Dict[Any, Any]) -> None:
        super().__init__()
        self.active = WeakIdKeyDictionary()
        self.active[x] = True
        self.formulas = formulas
        self.flops = {'conv_linear': 0, 'attention': 0, 'other': 0}
        self.activations = 0

    def _is_active(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t in self.active

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat_in = tree_flatten((args, kwargs))[0]
        if any(self._is_active(t) for t in flat_in):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.active[t] = True
                    if t._base is not None:  # an in-place write into a view (a detector batching its images)
                        self.active[t._base] = True
        packet = getattr(func, 'overloadpacket', None)
        if packet in _MATMUL_OPS or packet in _CONV_OPS:
            a, b = _operands(packet, args)
            n_active = self._is_active(a) + self._is_active(b)
            kind = ('other', 'conv_linear', 'attention')[n_active]
            self.flops[kind] += self.formulas[packet](*args, out_val=out, **kwargs)
            if n_active:
                self.activations += out.numel()
        elif packet in _SDPA_OPS:
            q, k, v = args[:3]
            self.flops['attention'] += self.formulas[packet](*args, out_val=out, **kwargs)
            bh_l = q.shape[0] * q.shape[1] * q.shape[2]
            self.activations += bh_l * k.shape[-2] + bh_l * v.shape[-1]  # as its two matmuls
        return out


def _check_input_size(input_size: Any) -> tuple:
    if (
        not isinstance(input_size, (tuple, list))
        or len(input_size) != 3
        or not all(isinstance(v, int) and v > 0 for v in input_size)
    ):
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
        custom = _custom_mapping()
        counter = FlopCounterMode(display=False, custom_mapping=custom)
        flow = _DataFlowCounter(x, {**flop_registry, **{k: shape_wrapper(v) for k, v in custom.items()}})
        with counter, flow, reference_forms():  # architecture MACs: e.g. MHMC's 3/5/7/9 taps, not zero padding
            model(x)
    finally:
        model.train(was_training)

    by_op = {op: int(n) for op, n in counter.get_flop_counts().get('Global', {}).items()}
    total = sum(by_op.values())
    attention, conv_linear = flow.flops['attention'], flow.flops['conv_linear']
    return dict(
        params=params,
        macs=total // 2,
        macs_conv_linear=conv_linear // 2,
        macs_attention=attention // 2,
        macs_other=(total - attention - conv_linear) // 2,
        flops=total,
        activations=flow.activations,
        by_op={str(op): n // 2 for op, n in by_op.items()},
        input_size=input_size,
        batch_size=batch_size,
    )


def format_profile(stats: Dict[str, Any], name: str = '') -> str:
    """A few human-readable lines (M params, G MACs, M activations)."""
    c, h, w = stats['input_size']
    head = f"{name} " if name else ''
    return '\n'.join(
        [
            f"{head}input {stats['batch_size']}x{c}x{h}x{w}",
            f"  params             {stats['params'] / 1e6:10.2f} M",
            f"  MACs (total)       {stats['macs'] / 1e9:10.3f} G",
            f"    conv + linear    {stats['macs_conv_linear'] / 1e9:10.3f} G",
            f"    attention matmul {stats['macs_attention'] / 1e9:10.3f} G",
            f"    other            {stats['macs_other'] / 1e9:10.3f} G",
            f"  activations        {stats['activations'] / 1e6:10.2f} M",
        ]
    )
