"""A stand-in for mmcv-full 1.7.2's compiled module ``mmcv._ext``, for the reference environment only.

mmcv-full built with ``MMCV_WITH_OPS=0`` has no ``mmcv._ext``; ``mmcv.ops`` then fails at import. The dense
fixtures (``make_dense_fixtures.py``) need only two of its kernels, and both are torchvision's on the CPU:

* ``roi_align_forward`` / ``roi_align_backward``: ``torchvision.ops.roi_align`` is the same algorithm as mmcv's
  ``RoIAlign`` (average of ``sampling_ratio`` x ``sampling_ratio`` bilinear samples per bin, adaptive when 0, the
  half-pixel offset when ``aligned``);
* ``nms``: greedy NMS suppressing IoU > threshold. mmcv's CPU kernel visits boxes in the order of
  ``scores.sort(0, descending=True)`` (not a stable sort); torchvision's sorts stably. Boxes are put in mmcv's
  order first, so that tied scores are visited as mmcv visits them.

Every other kernel name that ``mmcv.ops`` modules ask for at import resolves to a function that raises.
``install()`` puts this module in ``sys.modules['mmcv._ext']`` (before ``mmcv.ops`` is imported).
"""

from __future__ import annotations

import sys
import types

import torch
import torchvision


def roi_align_forward(
    input, rois, output, argmax_y, argmax_x, aligned_height, aligned_width, spatial_scale, sampling_ratio, pool_mode,
    aligned,
):  # fmt: skip
    if pool_mode != 1:
        raise NotImplementedError('only pool_mode=1 (avg) is provided by this stand-in')
    out = torchvision.ops.roi_align(
        input, rois, (aligned_height, aligned_width), spatial_scale, sampling_ratio, bool(aligned)
    )
    output.copy_(out)


def roi_align_backward(
    grad_output, rois, argmax_y, argmax_x, grad_input, aligned_height, aligned_width, spatial_scale, sampling_ratio,
    pool_mode, aligned,
):  # fmt: skip
    if pool_mode != 1:
        raise NotImplementedError('only pool_mode=1 (avg) is provided by this stand-in')
    with torch.enable_grad():
        x = torch.zeros_like(grad_input, requires_grad=True)
        out = torchvision.ops.roi_align(
            x, rois, (aligned_height, aligned_width), spatial_scale, sampling_ratio, bool(aligned)
        )
        (g,) = torch.autograd.grad(out, x, grad_output)
    grad_input.copy_(g)


def nms(bboxes, scores, iou_threshold, offset):
    if offset != 0:
        raise NotImplementedError('only offset=0 is provided by this stand-in')
    if bboxes.numel() == 0:
        return bboxes.new_zeros(0, dtype=torch.long)
    order = scores.sort(0, descending=True)[1]  # mmcv's nms_cpu order
    keep = torchvision.ops.nms(bboxes[order], scores[order], float(iou_threshold))
    return order[keep]


def _missing(name):
    def fn(*args, **kwargs):
        raise NotImplementedError(f'mmcv._ext.{name} is not provided by the reference stand-in')

    fn.__name__ = name
    return fn


def install() -> types.ModuleType:
    """Register this module as ``mmcv._ext`` (any other kernel name resolves to a raising function)."""
    module = sys.modules[__name__]
    sys.modules['mmcv._ext'] = module
    return module


def __getattr__(name: str):
    if name.startswith('__'):
        raise AttributeError(name)
    return _missing(name)
