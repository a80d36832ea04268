"""Parameters and MACs of the dense models, counted as the papers' tables count them.

mmdetection's and mmsegmentation's ``get_flops`` run a model's ``forward_dummy`` on one image (COCO: 1280x800,
ADE20K: 2048x512); this module builds the same dummy pass around our detectors and segmenters and hands it to
:func:`msconv.tools.profile.profile` (torch's ``FlopCounterMode``, so it also runs on the meta device):

* two-stage detectors: backbone + FPN + RPN head on every level, then the box head on 1000 RoIs and the mask head
  on the first 100 (Cascade: every stage's box head on 1000 RoIs and every stage's mask head on 100);
* RetinaNet, ATSS: backbone + FPN + head on every level;
* Sparse R-CNN: backbone + FPN, then the six stages on the ``num_proposals`` learnable proposals (mmdet's
  ``SparseRoIHead.forward_dummy``); the proposal features enter as activations (mmcv's hooks count every linear
  layer whatever its input), and the dynamic convolution's two batched matmuls per proposal, which mmcv's hooks
  do not see either, are counted as attention;
* UperNet: backbone + decode head (the auxiliary head is training-only and not counted, as mmseg).

RoIAlign, NMS and the box decoding carry no multiply-accumulates in either counter and are left out (the RoI
features are zeros of the right shape). ``macs_conv_linear`` is the number comparable with the papers, whose
counter (mmcv / ptflops hooks) does not see the attention matmuls; ``macs`` adds them.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

from .profile import profile

__all__ = ['DenseFlopsView', 'profile_dense', 'profile_system', 'PAPER_INPUT_SIZES']

PAPER_INPUT_SIZES = {'detection': (3, 1280, 800), 'segmentation': (3, 512, 2048)}


class DenseFlopsView(nn.Module):
    """``forward(x)`` runs the mmdet/mmseg ``forward_dummy`` computation of a dense model (module docstring)."""

    def __init__(self, model: nn.Module, num_rois: int = 1000, num_mask_rois: int = 100) -> None:
        super().__init__()
        self.model = model
        self.num_rois, self.num_mask_rois = num_rois, num_mask_rois

    def _roi_features(self, features: Dict[str, torch.Tensor], pool: nn.Module, n: int) -> torch.Tensor:
        size = pool.output_size if not isinstance(pool.output_size, int) else (pool.output_size,) * 2
        ref = next(iter(features.values()))
        return ref.new_zeros((n, ref.shape[1], *size)) + ref.flatten()[0]  # derived from the input (activation)

    def forward(self, x: torch.Tensor) -> Any:
        from msconv.dense.cascade import CascadeRoIHeads
        from msconv.dense.segmentation import UperNet
        from msconv.dense.sparse_rcnn import SparseRCNN

        m = self.model
        if isinstance(m, UperNet):
            return m.decode_head(m.backbone(x))
        features = m.backbone(x)
        if isinstance(m, SparseRCNN):
            sizes = [tuple(x.shape[-2:])] * x.shape[0]
            boxes, feats = m.initial_proposals(sizes)
            feats = feats + next(iter(features.values())).flatten()[0]  # an activation, as mmcv counts it
            n = x.shape[0] * m.num_proposals
            outs = []
            for t in range(len(m.stages)):
                roi_feat = self._roi_features(features, m.roi_pool, n)
                logits, boxes, feats = m.run_stage(t, features, boxes, feats, sizes, roi_feat=roi_feat)
                outs.append(logits)
            return outs
        if hasattr(m, 'rpn'):
            m.rpn.head(list(features.values()))
            heads = m.roi_heads
            box_feats = self._roi_features(features, heads.box_roi_pool, self.num_rois)
            mask_feats = (
                self._roi_features(features, heads.mask_roi_pool, self.num_mask_rois) if heads.has_mask() else None
            )
            stages = heads.stages if isinstance(heads, CascadeRoIHeads) else [heads]
            outs = []
            for stage in stages:
                outs.append(stage.box_predictor(stage.box_head(box_feats)))
                if mask_feats is not None:
                    outs.append(stage.mask_predictor(stage.mask_head(mask_feats)))
            return outs
        return m.head(list(features.values()))  # RetinaNet, ATSS


def profile_dense(
    model: nn.Module, input_size: Sequence[int] = PAPER_INPUT_SIZES['detection'], device: Any = 'meta'
) -> Dict[str, Any]:
    """:func:`msconv.tools.profile.profile` of a detector / segmenter's dummy pass (module docstring).

    ``params`` counts the whole model (auxiliary head included); ``params_inference`` leaves the UperNet
    auxiliary head out. Default ``device='meta'``: full-size models at the papers' sizes count in seconds.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a detector or segmenter nn.Module, got {type(model).__name__}")
    stats = profile(DenseFlopsView(model), input_size=tuple(input_size), device=device)
    aux = getattr(model, 'auxiliary_head', None)
    stats['params_inference'] = stats['params'] - (sum(p.numel() for p in aux.parameters()) if aux is not None else 0)
    return stats


def profile_system(
    backbone: str,
    arch: str,
    num_classes: Optional[int] = None,
    input_size: Optional[Sequence[int]] = None,
    **kwargs: Any,
) -> Dict[str, Any]:
    """Build ``arch`` on ``backbone`` on the meta device and profile it at the paper's input size.

    ``arch``: a detector (``'mask_rcnn'``, ``'cascade_mask_rcnn'``, ``'retinanet'``, ``'atss'``, ``'sparse_rcnn'``;
    COCO, 80 classes, 1280x800)
    or ``'upernet'`` (ADE20K, 150 classes, 2048x512). ``kwargs`` go to the builder (e.g. ``n_paths=1``).
    """
    from msconv.dense import DETECTOR_ARCHS, SEGMENTER_ARCHS, create_detector, create_segmenter

    if arch not in DETECTOR_ARCHS + SEGMENTER_ARCHS:
        raise ValueError(f"arch must be one of {DETECTOR_ARCHS + SEGMENTER_ARCHS}, got {arch!r}")
    segmentation = arch in SEGMENTER_ARCHS
    with torch.device('meta'):
        if segmentation:
            model = create_segmenter(backbone, arch, 150 if num_classes is None else num_classes, **kwargs)
        else:
            model = create_detector(backbone, arch, 80 if num_classes is None else num_classes, **kwargs)
    size = input_size or PAPER_INPUT_SIZES['segmentation' if segmentation else 'detection']
    return profile_dense(model, size, device='meta')
