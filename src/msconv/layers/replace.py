"""Shift-wise convolution in any large-kernel CNN: :func:`replace_large_kernels`.

The ShiftwiseConv paper (Li et al., CVPR 2025, arXiv 2401.12736) closes with the claim that 3x3 shift-wise
convolutions can replace the large depthwise convolutions of existing large-kernel CNNs with comparable effect. This
module gives that as one call: every depthwise ``nn.Conv2d`` (``groups == in_channels == out_channels``; timm's
``create_conv2d`` layers included: ``Conv2dSame``, ``StdConv2d``, the parts of a ``MixedConv2d``) whose kernel is at
least ``min_kernel_size`` becomes a :class:`ShiftWiseConv2d` emulating the same kernel size with the paper's
defaults, as the SW-T configs use them (official ``SW_v2_unirep.py``: small kernel 3, ghost ratio 0.23, two paths,
four shuffled placements, the identity inside the operator, seed 123), in input channel order so that it is a
drop-in for the conv it replaces.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import CondConv2d

from .shiftwise import ShiftWiseConv2d

__all__ = ['replace_large_kernels']

_ON_UNSUPPORTED = ('raise', 'skip')
_FOLDING_METHODS = ('reparameterize', 'fuse', 'switch_to_deploy')
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _check_int(name: str, value: object, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


def _conv_kind(module: nn.Module) -> Optional[str]:
    """'conv2d' for an ``nn.Conv2d`` (and subclasses), 'condconv' for timm's per-sample ``CondConv2d``, else None."""
    if isinstance(module, nn.Conv2d):
        return 'conv2d'
    if isinstance(module, CondConv2d):
        return 'condconv'
    return None


def _is_depthwise(module: nn.Module) -> bool:
    c = getattr(module, 'in_channels', None)
    return isinstance(c, int) and c > 0 and module.groups == c == module.out_channels


def _keeps_size(conv: nn.Conv2d, kernel: Tuple[int, int]) -> bool:
    """Whether ``conv`` maps an H x W input to H x W, run on the meta device (so that ``Conv2dSame``-style layers,
    which pad in ``forward``, are judged by what they do); by its padding where its forward cannot run there."""
    h, w = kernel[0] + 3, kernel[1] + 4  # an odd and an even size, larger than the kernel
    try:
        with torch.no_grad():
            out = copy.deepcopy(conv).to('meta')(torch.empty(1, conv.in_channels, h, w, device='meta'))
    except Exception:
        pad = conv.padding
        if isinstance(pad, str):
            return pad == 'same'
        return all(2 * p == k - 1 for p, k in zip(pad, kernel))
    return tuple(out.shape[-2:]) == (h, w)


def _folding_ancestor(names: List[str], modules: Dict[str, nn.Module]) -> Optional[str]:
    """The first of the conv's two nearest non-container ancestors (the root excluded) that re-parameterizes
    itself: such a module folds its convs' weights (e.g. SMT's mixed-conv heads, RepVGG-style blocks)."""
    seen = 0
    for depth in range(len(names) - 1, 0, -1):
        name = '.'.join(names[:depth])
        module = modules[name]
        if isinstance(module, _CONTAINERS):
            continue
        if any(callable(getattr(module, m, None)) for m in _FOLDING_METHODS):
            return name
        seen += 1
        if seen == 2:
            break
    return None


def _unsupported(conv: nn.Module, kind: str, kernel: Tuple[int, int]) -> Optional[str]:
    """Why ``conv`` cannot become a ShiftWiseConv2d computing the same shapes (None when it can)."""
    if kind == 'condconv':
        return f"it is a CondConv2d (per-sample mixtures of {conv.num_experts} expert kernels)"
    if kernel[0] != kernel[1]:
        return f"its kernel {kernel[0]}x{kernel[1]} is not square (a shift-wise conv emulates a K x K kernel)"
    if tuple(conv.stride) != (1, 1):
        return f"stride {tuple(conv.stride)}: shift-wise convolution is defined for stride 1"
    if tuple(conv.dilation) != (1, 1):
        return f"dilation {tuple(conv.dilation)}: shift-wise convolution emulates an undilated kernel"
    if getattr(conv, 'padding_mode', 'zeros') != 'zeros':
        return f"padding_mode {conv.padding_mode!r}: shift-wise convolution pads with zeros"
    if not _keeps_size(conv, kernel):
        return f"padding {conv.padding!r} changes the spatial size (shift-wise convolution keeps it: 'same' padding)"
    if not conv.weight.is_floating_point():
        return f"its weight dtype {conv.weight.dtype} is not floating point"
    return None


def replace_large_kernels(
    model: nn.Module,
    min_kernel_size: int = 7,
    *,
    small_kernel: int = 3,
    ghost_ratio: float = 0.23,
    n_paths: int = 2,
    n_reps: int = 4,
    seed: int = 123,
    on_unsupported: str = 'raise',
) -> nn.Module:
    """Swap every large depthwise convolution of ``model`` for a :class:`ShiftWiseConv2d` of the same kernel size.

    A depthwise conv (``groups == in_channels == out_channels``) whose kernel is at least ``min_kernel_size`` in
    either dimension becomes ``ShiftWiseConv2d(C, K, small_kernel, ghost_ratio, n_paths, n_reps, seed,
    bias=conv has one, official_order=False)``: the same channels, spatial size and channel order, on the conv's
    device and dtype, in its train/eval mode and with its ``requires_grad``; a conv bias keeps its values. The
    shift-wise weights are fresh (a K x K kernel has no exact shift-wise form): fine-tune or train the result. The
    model is changed in place and returned; a module reached twice (shared) is replaced once.

    Afterwards timm's ``features_only`` / ``forward_intermediates``, graph captures, ONNX export and
    ``msconv.reparameterize`` (each shift-wise layer folded into one cross-shaped depthwise kernel plus bias,
    in input channel order) work as before; :class:`msconv.SparsityScheduler` can sparsify the new layers.

    A large depthwise conv a shift-wise conv cannot stand in for (stride or dilation other than 1, padding that
    changes the spatial size or is not zeros, a non-square kernel, timm's ``CondConv2d``, a conv inside a module
    that folds its convs' weights when re-parameterized, too few channels for ``ghost_ratio``) raises a
    ``ValueError`` naming the layer, or is left as it is with ``on_unsupported='skip'``. Depthwise convs with a
    channel multiplier (``out_channels = m * in_channels``) are not depthwise in this sense and are left alone.

    Args:
        model: any ``nn.Module`` (timm, torchvision, msconv or your own).
        min_kernel_size: smallest kernel size replaced (>= ``small_kernel``).
        small_kernel, ghost_ratio, n_paths, n_reps, seed: the :class:`ShiftWiseConv2d` options (the paper's
            defaults).
        on_unsupported: 'raise' (default) or 'skip' for the layers described above.

    Returns:
        ``model``, with the replaced layers. A model with no depthwise conv of ``min_kernel_size`` or more raises
        a ``ValueError`` (nothing to replace usually means a wrong model or size).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_int('small_kernel', small_kernel, 1)
    if small_kernel % 2 != 1:
        raise ValueError(f"small_kernel must be odd (shift-wise convolution is defined for odd k), got {small_kernel}")
    _check_int('min_kernel_size', min_kernel_size, small_kernel)
    if on_unsupported not in _ON_UNSUPPORTED:
        raise ValueError(f"on_unsupported must be one of {_ON_UNSUPPORTED}, got {on_unsupported!r}")
    if isinstance(model, ShiftWiseConv2d):
        raise ValueError("model is a ShiftWiseConv2d already: pass the model that contains convolutions")
    options = dict(small_kernel=small_kernel, ghost_ratio=ghost_ratio, n_paths=n_paths, n_reps=n_reps, seed=seed)
    ShiftWiseConv2d(64, small_kernel, **options)  # the options' own checks, one-line ValueErrors, before any change

    modules = dict(model.named_modules(remove_duplicate=False))
    replacement: Dict[int, nn.Module] = {}
    plan: List[Tuple[str, nn.Module]] = []  # applied once every layer is known to be replaceable
    largest = matched = 0
    for name, module in modules.items():
        kind = _conv_kind(module)
        if kind is None or not _is_depthwise(module):
            continue
        kernel = tuple(module.kernel_size)
        largest = max(largest, *kernel)
        if max(kernel) < min_kernel_size:
            continue
        matched += 1
        if id(module) not in replacement:
            new, reason = _replacement(module, kind, kernel, name, modules, options)
            if reason is not None:
                if on_unsupported == 'skip':
                    continue
                raise ValueError(
                    f"cannot replace {name or 'model'} ({type(module).__name__}, {module.in_channels} channels, "
                    f"kernel {kernel[0]}x{kernel[1]}) by a ShiftWiseConv2d: {reason} (on_unsupported='skip' leaves "
                    f"such layers as they are)"
                )
            replacement[id(module)] = new
        plan.append((name, replacement[id(module)]))
    for name, new in plan:
        parent_name, _, attr = name.rpartition('.')
        setattr(modules[parent_name], attr, new)
    if not matched:
        found = f"the largest depthwise kernel is {largest}" if largest else "it has no depthwise nn.Conv2d"
        raise ValueError(
            f"model has no depthwise convolution with a kernel >= min_kernel_size={min_kernel_size} ({found})"
        )
    return model


def _replacement(
    conv: nn.Module, kind: str, kernel: Tuple[int, int], name: str, modules: Dict[str, nn.Module], options: dict
) -> Tuple[Optional[ShiftWiseConv2d], Optional[str]]:
    """``(the ShiftWiseConv2d for conv, None)``, or ``(None, why it cannot be replaced)``."""
    reason = _unsupported(conv, kind, kernel)
    if reason is None:
        ancestor = _folding_ancestor(name.split('.'), modules)
        if ancestor is not None:
            kind_name = type(modules[ancestor]).__name__
            reason = f"it sits in {ancestor} ({kind_name}), which folds its convs' weights when re-parameterized"
    if reason is not None:
        return None, reason
    try:
        return _shiftwise_like(conv, kernel[0], options), None
    except ValueError as err:  # e.g. too few channels for ghost_ratio
        return None, str(err)


def _shiftwise_like(conv: nn.Conv2d, kernel_size: int, options: dict) -> ShiftWiseConv2d:
    """The ShiftWiseConv2d that stands in for ``conv``: its channels, kernel size, bias, device, dtype, mode."""
    weight = conv.weight
    sw = ShiftWiseConv2d(conv.in_channels, kernel_size, bias=conv.bias is not None, official_order=False, **options)
    if conv.bias is not None and conv.bias.device.type != 'meta':
        with torch.no_grad():
            sw.bias.copy_(conv.bias.detach())
    sw = sw.to(device=weight.device, dtype=weight.dtype)
    sw.train(conv.training)
    if not weight.requires_grad:
        sw.requires_grad_(False)
    return sw
