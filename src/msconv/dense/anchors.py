"""Anchors as mmdetection 2.x's ``AnchorGenerator`` lays them out and ``MaxIoUAssigner`` matches them, with
torchvision's interfaces.

torchvision's :class:`~torchvision.models.detection.anchor_utils.AnchorGenerator` rounds its base anchors to whole
pixels and derives each level's stride from ``image_size // grid_size``. mmdet 2.x (the SMT and ShiftwiseConv
configs) keeps the base anchors unrounded (a 0.5-ratio anchor of size 32 spans 45.25 x 22.63 pixels, not 46 x 22)
and uses the configured strides, which differ from the quotient when a level's map is rounded up (a 352-pixel
image has a 6-cell P6 map: stride 64, not 352 // 6 = 58). Anchor ``a`` of cell ``(y, x)`` of a level with stride
``s``, base size ``b`` and centre offset 0 is

    (x s - w_a / 2, y s - h_a / 2, x s + w_a / 2, y s + h_a / 2),  w_a = b r_w scale,  h_a = b r_h scale

with ``r_h = sqrt(ratio)``, ``r_w = 1 / r_h`` and the anchors of a cell ordered ratio-major, scale-minor, cells
row-major: mmdet's order, which torchvision's heads also assume.

* R-CNN RPNs: ``scales=[8]``, ``ratios=[0.5, 1, 2]``, strides 4-64 (sizes 32-512);
* RetinaNet: ``octave_base_scale=4``, ``scales_per_octave=3`` (scales 4, 4 * 2^(1/3), 4 * 2^(2/3): sizes 32, 40.3,
  50.8 at stride 8), same ratios, strides 8-128.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

__all__ = ['MMDetAnchorGenerator', 'MaxIoUMatcher', 'rpn_anchor_generator', 'retinanet_anchor_generator']


class MMDetAnchorGenerator(AnchorGenerator):
    """mmdet 2.x anchors (unrounded, configured strides) behind torchvision's ``AnchorGenerator`` interface.

    Args:
        strides: the stride of each feature level (also the base anchor size of the level, as mmdet's default).
        scales: anchor scales, multiples of the stride (the same at every level).
        ratios: height / width ratios.
    """

    def __init__(self, strides: Sequence[int], scales: Sequence[float], ratios: Sequence[float]) -> None:
        strides = tuple(int(s) for s in strides)
        if not strides or any(s < 1 for s in strides):
            raise ValueError(f"strides must be positive ints, got {strides!r}")
        # torchvision's bookkeeping: sizes (as floats) and ratios per level, for num_anchors_per_location
        sizes = tuple(tuple(float(s * c) for c in scales) for s in strides)
        super().__init__(sizes, (tuple(float(r) for r in ratios),) * len(strides))
        self.strides = strides
        # mmdet builds the scales as a float64 array cast to float32 (torch.Tensor(np.array(...)))
        self._scales = torch.tensor([float(c) for c in scales], dtype=torch.float64).float()
        self._ratios = torch.tensor([float(r) for r in ratios], dtype=torch.float32)
        self.cell_anchors = [self._base_anchors(s) for s in strides]

    def _base_anchors(self, base_size: int) -> torch.Tensor:
        h_ratios = torch.sqrt(self._ratios)
        w_ratios = 1 / h_ratios
        ws = (base_size * w_ratios[:, None] * self._scales[None, :]).view(-1)
        hs = (base_size * h_ratios[:, None] * self._scales[None, :]).view(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)  # (A, 4), unrounded

    def forward(self, image_list: ImageList, feature_maps: List[torch.Tensor]) -> List[torch.Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature maps (one per stride), got {len(feature_maps)}")
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        levels = []
        for fmap, stride, base in zip(feature_maps, self.strides, self.cell_anchors):
            h, w = fmap.shape[-2:]
            shift_x = torch.arange(0, w, device=device).to(dtype) * stride
            shift_y = torch.arange(0, h, device=device).to(dtype) * stride
            yy, xx = torch.meshgrid(shift_y, shift_x, indexing='ij')
            shifts = torch.stack([xx.reshape(-1), yy.reshape(-1), xx.reshape(-1), yy.reshape(-1)], dim=-1)
            levels.append((shifts[:, None, :] + base.to(dtype=dtype, device=device)[None]).reshape(-1, 4))
        anchors = torch.cat(levels)
        return [anchors for _ in image_list.image_sizes]


def rpn_anchor_generator() -> MMDetAnchorGenerator:
    """The R-CNN configs' RPN anchors: ``scales=[8]``, ``ratios=[0.5, 1.0, 2.0]``, ``strides=[4, 8, 16, 32, 64]``."""
    return MMDetAnchorGenerator((4, 8, 16, 32, 64), (8.0,), (0.5, 1.0, 2.0))


def retinanet_anchor_generator() -> MMDetAnchorGenerator:
    """RetinaNet's: ``octave_base_scale=4``, ``scales_per_octave=3``, ``ratios=[0.5, 1.0, 2.0]``, strides 8-128."""
    scales = [4 * 2 ** (i / 3) for i in range(3)]
    return MMDetAnchorGenerator((8, 16, 32, 64, 128), scales, (0.5, 1.0, 2.0))


class MaxIoUMatcher(Matcher):
    """torchvision's ``Matcher`` with mmdet's ``MaxIoUAssigner`` rule for low-quality matches.

    Both match each anchor to its best ground truth (foreground at IoU >= ``high``, background below ``low``,
    ignored between) and then give each ground truth the anchors at its highest IoU. mmdet does the latter only
    for ground truths whose highest IoU reaches ``min_pos_iou`` (0.3 for the RPNs, 0 for RetinaNet: a 12-pixel
    object, at IoU 0.14 with its best 32-pixel anchor, has no positive anchor in the RPN), and assigns such an
    anchor to that ground truth (the last one, if it is the best anchor of several); torchvision does it for every
    ground truth and keeps the anchor's own best ground truth.
    """

    def __init__(self, high: float, low: float, min_pos_iou: float) -> None:
        super().__init__(high, low, allow_low_quality_matches=True)
        self.min_pos_iou = float(min_pos_iou)

    def set_low_quality_matches_(
        self, matches: torch.Tensor, all_matches: torch.Tensor, match_quality_matrix: torch.Tensor
    ) -> None:
        highest = match_quality_matrix.max(dim=1).values  # (G,)
        best = (match_quality_matrix == highest[:, None]) & (highest[:, None] >= self.min_pos_iou)  # (G, N)
        order = torch.arange(1, best.shape[0] + 1, device=best.device)[:, None]
        last = (best.long() * order).max(dim=0).values  # 1 + the last ground truth an anchor is best for; 0: none
        hit = last > 0
        matches[hit] = last[hit] - 1
