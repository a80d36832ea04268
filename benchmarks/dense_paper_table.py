"""Parameters and MACs of the dense systems next to the SMT / ShiftwiseConv tables (meta device: a few seconds).

    PYTHONPATH=src python benchmarks/dense_paper_table.py

COCO systems are counted at 1280x800 and ADE20K systems at 2048x512 with mmdet/mmseg's ``forward_dummy``
convention (see ``msconv.tools.dense_profile``). "conv+lin" is what the papers' counter sees; "+attn" adds the
attention matmuls that it misses (SMT's global attention in stages 3-4).
"""

from __future__ import annotations

import torch

from msconv.dense import create_detector, create_segmenter
from msconv.tools.dense_profile import PAPER_INPUT_SIZES, profile_dense

# backbone, system, paper params (M), paper GFLOPs (MACs), source (None: the paper has no row; SMT-B ATSS and
# Sparse R-CNN have configs in the repository but no published figures)
SYSTEMS = [
    ('smt_small', 'mask_rcnn', 40.0, 265.0, 'SMT README'),
    ('smt_base', 'mask_rcnn', 52.0, 328.0, 'SMT README'),
    ('smt_small', 'cascade_mask_rcnn', 78.0, 744.0, 'SMT README'),
    ('smt_small', 'retinanet', 30.0, 247.0, 'SMT README'),
    ('smt_small', 'atss', 28.0, 214.0, 'SMT README'),
    ('smt_base', 'atss', None, None, 'SMT-B config, no paper row'),
    ('smt_small', 'sparse_rcnn', 102.0, 171.0, 'SMT README (300 proposals, the 3x config)'),
    ('smt_base', 'sparse_rcnn', None, None, 'SMT-B config, no paper row'),
    ('shiftwise_tiny', 'cascade_mask_rcnn', 86.89, 751.21, 'SW get_flops log'),
    ('smt_small', 'upernet', 50.0, 935.0, 'SMT README'),
    ('smt_base', 'upernet', 62.0, 1004.0, 'SMT README'),
    ('shiftwise_tiny', 'upernet', 62.51, 953.81, 'SW get_flops log (rep2)'),
]


def main() -> None:
    print(
        f"{'system':36s} {'params M':>9s} {'paper':>7s} {'diff':>6s}   {'GMACs conv+lin':>14s} {'paper':>7s} "
        f"{'diff':>6s} {'+attn':>7s}"
    )
    for backbone, arch, p_params, p_macs, source in SYSTEMS:
        with torch.device('meta'):
            model = create_segmenter(backbone, arch, 150) if arch == 'upernet' else create_detector(backbone, arch, 80)
        size = PAPER_INPUT_SIZES['segmentation' if arch == 'upernet' else 'detection']
        s = profile_dense(model, size)
        params, macs = s['params'] / 1e6, s['macs_conv_linear'] / 1e9
        if p_params is None:
            paper_p = paper_m = f"{'-':>7s} {'-':>6s}"
        else:
            paper_p = f"{p_params:7.2f} {100 * (params / p_params - 1):+5.1f}%"
            paper_m = f"{p_macs:7.1f} {100 * (macs / p_macs - 1):+5.1f}%"
        print(
            f"{backbone + ' ' + arch:36s} {params:9.2f} {paper_p}   {macs:14.1f} {paper_m} {s['macs'] / 1e9:7.1f}  "
            f"({source})"
        )


if __name__ == '__main__':
    main()
