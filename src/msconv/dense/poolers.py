"""RoI feature extraction as mmdetection's ``SingleRoIExtractor`` + mmcv ``RoIAlign`` (the configs' ``roi_layer``).

torchvision's :class:`~torchvision.ops.MultiScaleRoIAlign` calls ``roi_align`` with ``aligned=False``; mmcv's
``RoIAlign`` defaults to ``aligned=True`` (box corners shifted by half a pixel before sampling, as Detectron2's
``ROIAlignV2``), which moves the R-CNN outputs by tens of percent for the same weights. :class:`AlignedRoIAlign`
is torchvision's module with ``aligned=True`` and mmdet's level rule:

    level = clamp(floor(log2(sqrt(w h) / finest_scale + 1e-6)), 0, L - 1),  finest_scale = 56

(torchvision's ``LevelMapper`` is ``floor(4 + log2(sqrt(w h) / 224) + 1e-6) - 2``: the same levels but for the
epsilon's place). Sampling ratio 0 (adaptive: ceil(bin size) samples per bin side) as the configs.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _filter_input, _setup_scales

__all__ = ['AlignedRoIAlign', 'mmdet_roi_levels']


def mmdet_roi_levels(boxes: torch.Tensor, num_levels: int, finest_scale: float = 56.0) -> torch.Tensor:
    """mmdet ``SingleRoIExtractor.map_roi_levels`` for (N, 4) XYXY boxes: level index per box (int64)."""
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


class AlignedRoIAlign(MultiScaleRoIAlign):
    """:class:`~torchvision.ops.MultiScaleRoIAlign` with mmcv's ``aligned=True`` and mmdet's level mapping.

    Args:
        featmap_names, output_size, sampling_ratio: as torchvision's (the FPN levels pooled from, finest first).
        finest_scale: mmdet's ``finest_scale`` (56: boxes up to 112 pixels pool from the finest level).
        aligned: half-pixel box alignment (mmcv's default ``True``; ``False`` gives torchvision's sampling).
    """

    def __init__(
        self,
        featmap_names: Sequence[str],
        output_size,
        sampling_ratio: int = 0,
        finest_scale: float = 56.0,
        aligned: bool = True,
    ) -> None:
        super().__init__(list(featmap_names), output_size, sampling_ratio)
        self.finest_scale = float(finest_scale)
        self.aligned = aligned

    def forward(
        self, x: Dict[str, torch.Tensor], boxes: List[torch.Tensor], image_shapes: List[Tuple[int, int]]
    ) -> torch.Tensor:
        feats = _filter_input(x, self.featmap_names)
        if self.scales is None:
            self.scales, self.map_levels = _setup_scales(
                feats, image_shapes, self.canonical_scale, self.canonical_level
            )
        scales: Optional[List[float]] = self.scales
        assert scales is not None
        rois = torch.cat(
            [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)], dim=0
        )  # (N, 5): image index, x1, y1, x2, y2
        out_size = tuple(self.output_size)
        result = feats[0].new_zeros((rois.shape[0], feats[0].shape[1]) + out_size)
        levels = mmdet_roi_levels(rois[:, 1:], len(feats), self.finest_scale)
        for level, (feat, scale) in enumerate(zip(feats, scales)):
            # every level joins the graph, also one with no RoI (zero gradients, as mmdet's SingleRoIExtractor gives
            # it): under DDP each process must produce a gradient for every FPN parameter
            idx = torch.where(levels == level)[0]
            result[idx] = roi_align(feat, rois[idx], out_size, scale, self.sampling_ratio, self.aligned).to(
                result.dtype
            )
        return result
