"""Official dense checkpoints (mmdetection 2.x / mmsegmentation 0.x, SMT and ShiftwiseConv repositories) -> msconv.

:func:`convert_official_dense` is a pure function of a state dict (the ``state_dict`` entry of an mmcv checkpoint,
or the checkpoint itself): it recognises the system by its keys and returns the state dict of the matching
:func:`~msconv.dense.create_detector` / :func:`~msconv.dense.create_segmenter` model, which loads it strictly.

* backbone ``backbone.*``: the family's own converter (``msconv.convert_official``, SMT or ShiftwiseConv), under
  the dense backbone's ``body.model.`` prefix; ShiftwiseConv's output norms ``norm0..3`` -> ``out_norms.0..3``;
* FPN (mmdet ``neck``): ``lateral_convs.i.conv`` -> ``fpn.inner_blocks.i.0``, ``fpn_convs.i.conv`` ->
  ``fpn.layer_blocks.i.0``; RetinaNet's extra ``fpn_convs.3`` / ``.4`` -> ``fpn.extra_blocks.p6`` / ``p7``;
* RPN: ``rpn_conv`` / ``rpn_cls`` / ``rpn_reg`` -> torchvision ``RPNHead``'s ``conv.0.0`` / ``cls_logits`` /
  ``bbox_pred``;
* R-CNN box heads: ``shared_convs.i.{conv,bn}`` -> ``box_head.i.{0,1}``, ``shared_fcs`` -> ``fc6``/``fc7``
  (Mask R-CNN) or the conv head's last linear; **classes in torchvision's order**: mmdet's classifier puts the
  background last (row K), torchvision first, so ``fc_cls`` rows become ``[K, 0..K-1]``; mmdet's class-specific
  regressor (4K rows) and mask logits (K rows) have no background: a zero background block is put first (their
  background outputs are never read: torchvision regresses and masks by the object class);
* mask heads: ``convs.i.conv`` -> ``mask_head.i.0``, ``upsample`` -> ``mask_predictor.conv5_mask``,
  ``conv_logits`` -> ``mask_predictor.mask_fcn_logits``; Cascade: one box and one mask head per stage
  (``roi_head.{bbox,mask}_head.t`` -> ``roi_heads.stages.t``);
* RetinaNet: ``cls_convs`` / ``reg_convs`` / ``retina_cls`` / ``retina_reg`` -> torchvision ``RetinaNetHead``
  (sigmoid classes, the same order);
* ATSS (:mod:`msconv.dense.atss`): ``bbox_head.{cls,reg}_convs.i.{conv,gn}`` -> ``head.{cls,reg}_convs.i.{0,1}``,
  ``atss_cls`` / ``atss_reg`` / ``atss_centerness`` keep their names, ``scales.i.scale`` -> ``head.scales.i``; the
  extra FPN convs ``fpn_convs.3`` / ``.4`` -> ``fpn.extra_blocks.p6`` / ``p7`` (sigmoid classes, the same order);
* Sparse R-CNN (:mod:`msconv.dense.sparse_rcnn`): ``rpn_head.init_proposal_{bboxes,features}`` ->
  ``proposal_{boxes,features}``, ``roi_head.bbox_head.t.*`` -> ``stages.t.*`` with mmcv's attention and FFN wrappers
  unwrapped (``attention.attn.*`` -> ``attention.*``, ``ffn.layers.0.0`` / ``ffn.layers.1`` -> ``ffn.0`` /
  ``ffn.2``); sigmoid classes, the same order;
* UperNet (mmseg ``ConvModule`` ``.conv`` / ``.bn`` -> ``.0`` / ``.1``): ``psp_modules.i.1`` -> ``ppm.stages.i.1``,
  ``bottleneck``, ``lateral_convs``, ``fpn_convs``, ``fpn_bottleneck``, ``conv_seg``, auxiliary ``convs.0``.
"""

from __future__ import annotations

import re
from typing import Dict, Mapping, Tuple

import torch

__all__ = ['convert_official_dense', 'detect_official_system']


def detect_official_system(state_dict: Mapping[str, torch.Tensor]) -> Tuple[str, str]:
    """``(family, arch)`` of an official dense state dict: family ``'smt'`` / ``'shiftwise'``, arch ``'mask_rcnn'``,
    ``'cascade_mask_rcnn'``, ``'retinanet'``, ``'atss'``, ``'sparse_rcnn'`` or ``'upernet'``."""
    keys = list(state_dict)
    if any(k.startswith('backbone.patch_embed1.') for k in keys):
        family = 'smt'
    elif any(k.startswith('backbone.downsample_layers.') for k in keys):
        family = 'shiftwise'
    else:
        raise ValueError(
            "state_dict must hold an official SMT (backbone.patch_embed1.*) or ShiftwiseConv "
            "(backbone.downsample_layers.*) backbone"
        )
    if any(k.startswith('decode_head.') for k in keys):
        arch = 'upernet'
    elif any(k.startswith('bbox_head.retina_cls.') for k in keys):
        arch = 'retinanet'
    elif any(k.startswith('bbox_head.atss_cls.') for k in keys):
        arch = 'atss'
    elif any(k.startswith('rpn_head.init_proposal_bboxes') for k in keys):
        arch = 'sparse_rcnn'
    elif any(k.startswith('roi_head.bbox_head.0.') for k in keys):
        arch = 'cascade_mask_rcnn'
    elif any(k.startswith('roi_head.bbox_head.') for k in keys):
        arch = 'mask_rcnn'
    else:
        raise ValueError(
            "state_dict must hold an mmdet detector (roi_head.*, bbox_head.retina_cls.*, bbox_head.atss_cls.*) or an "
            "mmseg segmenter (decode_head.*)"
        )
    return family, arch


def _background_first(key: str, val: torch.Tensor) -> torch.Tensor:
    """mmdet class rows -> torchvision's: classifier ``[bg last] -> [bg first]``, regressor / mask logits get a
    zero background block first."""
    if key.endswith('box_predictor.cls_score.weight') or key.endswith('box_predictor.cls_score.bias'):
        return torch.cat([val[-1:], val[:-1]], dim=0)
    if key.endswith('box_predictor.bbox_pred.weight') or key.endswith('box_predictor.bbox_pred.bias'):
        return torch.cat([val.new_zeros((4,) + val.shape[1:]), val], dim=0)
    if key.endswith('mask_predictor.mask_fcn_logits.weight') or key.endswith('mask_predictor.mask_fcn_logits.bias'):
        return torch.cat([val.new_zeros((1,) + val.shape[1:]), val], dim=0)
    return val


_CONV_MODULE = (
    (r'\.conv\.(weight|bias)$', r'.0.\1'),
    (r'\.bn\.(weight|bias|running_mean|running_var|num_batches_tracked)$', r'.1.\1'),
)


def _conv_module(key: str) -> str:
    for pat, rep in _CONV_MODULE:
        key = re.sub(pat, rep, key)
    return key


def _atss_key(key: str) -> str:
    m = re.match(r'bbox_head\.(cls|reg)_convs\.(\d+)\.(conv|gn)\.(.*)', key)
    if m:
        return f"head.{m.group(1)}_convs.{m.group(2)}.{0 if m.group(3) == 'conv' else 1}.{m.group(4)}"
    m = re.match(r'bbox_head\.scales\.(\d+)\.scale$', key)
    if m:
        return f'head.scales.{m.group(1)}'
    m = re.match(r'bbox_head\.(atss_cls|atss_reg|atss_centerness)\.(.*)', key)
    if m:
        return f'head.{m.group(1)}.{m.group(2)}'
    raise ValueError(f"unexpected official key {key!r}")


_SPARSE_RENAMES = (
    (r'^attention\.attn\.', 'attention.'),
    (r'^ffn\.layers\.0\.0\.', 'ffn.0.'),
    (r'^ffn\.layers\.1\.', 'ffn.2.'),
)


def _sparse_rcnn_key(key: str) -> str:
    m = re.match(r'rpn_head\.init_proposal_(bboxes|features)\.weight$', key)
    if m:
        return f"proposal_{'boxes' if m.group(1) == 'bboxes' else 'features'}.weight"
    m = re.match(r'roi_head\.bbox_head\.(\d+)\.(.*)', key)
    if not m:
        raise ValueError(f"unexpected official key {key!r}")
    rest = m.group(2)
    for pat, rep in _SPARSE_RENAMES:
        rest = re.sub(pat, rep, rest)
    return f'stages.{m.group(1)}.{rest}'


def _detector_key(key: str, arch: str) -> str:  # noqa: C901 (one rename table)
    m = re.match(r'neck\.lateral_convs\.(\d+)\.conv\.(.*)', key)
    if m:
        return f'backbone.fpn.inner_blocks.{m.group(1)}.0.{m.group(2)}'
    m = re.match(r'neck\.fpn_convs\.(\d+)\.conv\.(.*)', key)
    if m:
        i = int(m.group(1))
        if arch in ('retinanet', 'atss') and i >= 3:
            return f'backbone.fpn.extra_blocks.{"p6" if i == 3 else "p7"}.{m.group(2)}'
        return f'backbone.fpn.layer_blocks.{i}.0.{m.group(2)}'
    if arch == 'atss':
        return _atss_key(key)
    if arch == 'sparse_rcnn':
        return _sparse_rcnn_key(key)
    m = re.match(r'rpn_head\.(rpn_conv|rpn_cls|rpn_reg)\.(.*)', key)
    if m:
        return (
            'rpn.head.'
            + {'rpn_conv': 'conv.0.0', 'rpn_cls': 'cls_logits', 'rpn_reg': 'bbox_pred'}[m.group(1)]
            + '.'
            + m.group(2)
        )
    m = re.match(r'bbox_head\.(cls|reg)_convs\.(\d+)\.conv\.(.*)', key)
    if m:
        branch = 'classification_head' if m.group(1) == 'cls' else 'regression_head'
        return f'head.{branch}.conv.{m.group(2)}.0.{m.group(3)}'
    m = re.match(r'bbox_head\.retina_(cls|reg)\.(.*)', key)
    if m:
        return (
            'head.'
            + ('classification_head.cls_logits' if m.group(1) == 'cls' else 'regression_head.bbox_reg')
            + '.'
            + m.group(2)
        )
    if arch == 'cascade_mask_rcnn':
        m = re.match(r'roi_head\.(bbox|mask)_head\.(\d+)\.(.*)', key)
        if not m:
            raise ValueError(f"unexpected official key {key!r}")
        prefix, rest, num_convs = f'roi_heads.stages.{m.group(2)}.', m.group(3), 4
        head = m.group(1)
    else:
        m = re.match(r'roi_head\.(bbox|mask)_head\.(.*)', key)
        if not m:
            raise ValueError(f"unexpected official key {key!r}")
        prefix, rest, num_convs, head = 'roi_heads.', m.group(2), 0, m.group(1)
    if head == 'bbox':
        m = re.match(r'shared_convs\.(\d+)\.(.*)', rest)
        if m:
            return _conv_module(f'{prefix}box_head.{m.group(1)}.{m.group(2)}')
        m = re.match(r'shared_fcs\.(\d+)\.(.*)', rest)
        if m:
            i = int(m.group(1))
            name = f'box_head.{num_convs + 1 + i}' if num_convs else f'box_head.fc{6 + i}'
            return f'{prefix}{name}.{m.group(2)}'
        m = re.match(r'fc_(cls|reg)\.(.*)', rest)
        if m:
            return f'{prefix}box_predictor.' + ('cls_score' if m.group(1) == 'cls' else 'bbox_pred') + '.' + m.group(2)
    else:
        m = re.match(r'convs\.(\d+)\.conv\.(.*)', rest)
        if m:
            return f'{prefix}mask_head.{m.group(1)}.0.{m.group(2)}'
        m = re.match(r'(upsample|conv_logits)\.(.*)', rest)
        if m:
            return (
                f'{prefix}mask_predictor.'
                + ('conv5_mask' if m.group(1) == 'upsample' else 'mask_fcn_logits')
                + '.'
                + m.group(2)
            )
    raise ValueError(f"unexpected official key {key!r}")


def _segmenter_key(key: str) -> str:
    m = re.match(r'decode_head\.psp_modules\.(\d+)\.1\.(.*)', key)
    if m:
        return _conv_module(f'decode_head.ppm.stages.{m.group(1)}.1.{m.group(2)}')
    if re.match(r'(decode_head|auxiliary_head)\.conv_seg\.', key):
        return key
    if re.match(r'decode_head\.(bottleneck|lateral_convs\.\d+|fpn_convs\.\d+|fpn_bottleneck)\.(conv|bn)\.', key):
        return _conv_module(key)
    if re.match(r'auxiliary_head\.convs\.\d+\.(conv|bn)\.', key):
        return _conv_module(key)
    raise ValueError(f"unexpected official key {key!r}")


def convert_official_dense(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """An official SMT / ShiftwiseConv mmdet or mmseg state dict (or mmcv checkpoint) -> the state dict of the
    msconv system of the same backbone and arch (see the module docstring). Pure: the input is not modified."""
    from msconv.models._registry import convert_official

    if isinstance(state_dict, Mapping) and isinstance(state_dict.get('state_dict'), Mapping):
        state_dict = state_dict['state_dict']
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    state_dict = {k[len('module.') :] if k.startswith('module.') else k: v for k, v in state_dict.items()}
    family, arch = detect_official_system(state_dict)
    backbone_prefix = 'backbone.' if arch == 'upernet' else 'backbone.backbone.'
    body, out = {}, {}
    for key, val in state_dict.items():
        if key.startswith('backbone.'):
            m = re.match(r'backbone\.norm(\d)\.(weight|bias)$', key)
            if family == 'shiftwise' and m:
                out[f'{backbone_prefix}out_norms.{m.group(1)}.{m.group(2)}'] = val
            else:
                body[key[len('backbone.') :]] = val
        elif arch == 'upernet':
            out[_segmenter_key(key)] = val
        else:
            new = _detector_key(key, arch)
            out[new] = _background_first(new, val)
    for key, val in convert_official(body, family).items():
        out[f'{backbone_prefix}body.model.{key}'] = val
    return out
