"""RoI feature extraction as mmdetection's ``SingleRoIExtractor`` + mmcv ``RoIAlign`` (the configs' ``roi_layer``).

torchvision's :class:`~torchvision.ops.MultiScaleRoIAlign` calls ``roi_align`` with ``aligned=False``; mmcv's
``RoIAlign`` defaults to ``aligned=True`` (box corners shifted by half a pixel before sampling, as Detectron2's
``ROIAlignV2``), which moves the R-CNN outputs by tens of percent for the same weights. :class:`AlignedRoIAlign`
is torchvision's module with ``aligned=True`` and mmdet's level rule:

    level = clamp(floor(log2(sqrt(w h) / finest_scale + 1e-6)), 0, L - 1),  finest_scale = 56

(torchvision's ``LevelMapper`` is ``floor(4 + log2(sqrt(w h) / 224) + 1e-6) - 2``: the same levels but for the
epsilon's place). Sampling ratio 0 (adaptive: ceil(bin size) samples per bin side) as the configs.

Inference on the CPU (fp32, autograd off, no graph capture) may pool a level with :func:`roi_align_gemm` instead of
torchvision's kernel: the same samples and bilinear weights written as a sparse matrix and multiplied with the
feature map read channels-last (the FPN's maps are channels-last after an msconv backbone; the kernel copies such a
map to NCHW on every call, then walks each channel plane). Which of the two runs is measured per key
(``msconv.layers.forms.tuned('roi_align', ...)``); both agree to float rounding.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _filter_input, _setup_scales

from ..layers.forms import tunable, tuned

__all__ = ['AlignedRoIAlign', 'mmdet_roi_levels', 'roi_align_gemm']


def mmdet_roi_levels(boxes: torch.Tensor, num_levels: int, finest_scale: float = 56.0) -> torch.Tensor:
    """mmdet ``SingleRoIExtractor.map_roi_levels`` for (N, 4) XYXY boxes: level index per box (int64)."""
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


def _sample_axis(
    start: torch.Tensor, bin_size: torch.Tensor, bins: int, grid: int, size: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bilinear taps along one axis, as torchvision's ``pre_calc_for_bilinear_interpolate``: for (R,) RoI starts and
    bin sizes, ``grid`` samples per bin, the (R, bins, grid, 2) low/high pixel indices and their weights (0 for a
    sample beyond -1 or ``size``)."""
    p = torch.arange(bins, device=start.device, dtype=start.dtype)
    i = torch.arange(grid, device=start.device, dtype=start.dtype)
    s = (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]) + (i + 0.5) * bin_size[:, None, None] / grid
    inside = (s >= -1.0) & (s <= size)
    s = s.clamp(min=0)
    low = s.to(torch.int64)  # truncation: the floor of s >= 0
    top = low >= size - 1
    low = low.clamp(max=size - 1)
    s = torch.where(top, low.to(s.dtype), s)
    high = torch.where(top, low, low + 1)
    frac = s - low
    return torch.stack([low, high], -1), torch.stack([1 - frac, frac], -1) * inside[..., None]


def roi_align_gemm(
    feat: torch.Tensor,
    rois: torch.Tensor,
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """``torchvision.ops.roi_align(feat, rois, ...)`` (``rois`` (R, 5): image index, x1, y1, x2, y2) computed as a
    sparse matrix product: each output cell is the mean of its bin's bilinear samples, so the (R * ph * pw, B * H * W)
    matrix of sample weights (each sample's four taps, divided by the bin's sample count) times the (B * H * W, C)
    channels-last view of ``feat`` is the pooled features. The samples, their clamping at the borders and the
    weights follow torchvision's CPU kernel; RoIs with the same adaptive grid share one matrix. No autograd."""
    b, c, h, w = feat.shape
    ph, pw = int(output_size[0]), int(output_size[1])
    n = rois.shape[0]
    out = feat.new_empty((n, c, ph, pw))
    if n == 0:
        return out
    rois = rois.to(feat.dtype)
    offset = 0.5 if aligned else 0.0
    x0, y0 = rois[:, 1] * spatial_scale - offset, rois[:, 2] * spatial_scale - offset
    roi_w, roi_h = rois[:, 3] * spatial_scale - offset - x0, rois[:, 4] * spatial_scale - offset - y0
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / ph, roi_w / pw
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full((n,), sampling_ratio, dtype=torch.int64, device=feat.device)
    else:
        grid_h = torch.ceil(roi_h / ph).clamp(min=0).to(torch.int64)
        grid_w = torch.ceil(roi_w / pw).clamp(min=0).to(torch.int64)
    table = feat.permute(0, 2, 3, 1).reshape(b * h * w, c)  # a view of a channels-last map
    image_offset = rois[:, 0].to(torch.int64) * (h * w)
    stride = int(grid_w.max()) + 1
    key = grid_h * stride + grid_w
    groups = torch.unique(key).tolist()
    for k in groups:
        gh, gw = divmod(int(k), stride)
        idx = torch.where(key == k)[0] if len(groups) > 1 else None
        m = n if idx is None else idx.numel()
        sub = (lambda t: t) if idx is None else (lambda t: t[idx])  # noqa: E731
        if gh == 0 or gw == 0:  # an empty or inverted RoI: no sample, zero features (as the kernel)
            res = feat.new_zeros((m, c, ph, pw))
        else:
            rows_y, wy = _sample_axis(sub(y0), sub(bin_h), ph, gh, h)  # (m, ph, gh, 2)
            cols_x, wx = _sample_axis(sub(x0), sub(bin_w), pw, gw, w)  # (m, pw, gw, 2)
            wy = wy / float(gh * gw)
            rows_y = (rows_y * w + sub(image_offset)[:, None, None, None]).to(torch.int32)
            weights = wy[:, :, None, :, None, :, None] * wx[:, None, :, None, :, None, :]  # (m, ph, pw, gh, gw, 2, 2)
            cols = rows_y[:, :, None, :, None, :, None] + cols_x.to(torch.int32)[:, None, :, None, :, None, :]
            taps = gh * gw * 4
            crow = torch.arange(m * ph * pw + 1, device=feat.device, dtype=torch.int32) * taps
            with warnings.catch_warnings():  # torch's one-time note that sparse CSR support is in beta
                warnings.simplefilter('ignore', UserWarning)
                matrix = torch.sparse_csr_tensor(
                    crow, cols.reshape(-1), weights.reshape(-1), size=(m * ph * pw, b * h * w), check_invariants=False
                )
            res = torch.mm(matrix, table).view(m, ph, pw, c).permute(0, 3, 1, 2)
        if idx is None:
            out.copy_(res)
        else:
            out[idx] = res
    return out


def _pow2(n: int) -> int:
    return 0 if n <= 0 else math.ceil(math.log2(n))


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
            if tunable('roi_align', feat):  # inference on the CPU: the measured faster of the two forms
                if idx.numel() == 0:
                    continue  # nothing to pool (the kernel would still copy a channels-last map to NCHW)
                pooled = self._pool_tuned(feat, rois[idx], out_size, scale)
            else:
                pooled = roi_align(feat, rois[idx], out_size, scale, self.sampling_ratio, self.aligned)
            result[idx] = pooled.to(result.dtype)
        return result

    def _pool_tuned(self, feat: torch.Tensor, rois: torch.Tensor, out_size, scale: float) -> torch.Tensor:
        b, c, h, w = feat.shape
        layout = 'cl' if feat.is_contiguous(memory_format=torch.channels_last) else 'c'
        args = (rois, out_size, scale, self.sampling_ratio, self.aligned)
        return tuned(
            'roi_align',
            feat[:1, :, :1, :1],  # keyed by channels, dtype and device (the map's size goes in coarsely below)
            {'kernel': lambda: roi_align(feat, *args), 'sparse_gemm': lambda: roi_align_gemm(feat, *args)},
            extra=f'{layout}|hw~2^{_pow2(b * h * w)}|{out_size}|sr{self.sampling_ratio}|rois~2^{_pow2(rois.shape[0])}',
        )
