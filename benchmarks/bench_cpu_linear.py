"""CPU GEMMs of the token linears: ``F.linear`` (BLAS sgemm) against ``msconv.layers.fast_ops.linear`` (oneDNN
1x1 conv).

    python benchmarks/bench_cpu_linear.py [--threads 2] [--repeats 20]

Shapes are the per-image (B=1) and batch-8 token linears of smt_tiny and shiftwise_tiny at 224 (M tokens x K
-> N). For each: forward under inference_mode, and forward + backward (input, weight and bias gradients), both
implementations timed alternately in this process; the speed-up is BLAS time / oneDNN time (median / best).
``msconv.layers.Linear`` makes the same measurement at run time (``msconv.layers.forms.tuned``): the last column
is what its autotuner chose on this machine for the inference form.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, print_table, time_interleaved  # noqa: E402

from msconv.layers import fast_ops, forms  # noqa: E402

# (batch, H, W, K, N): smt_tiny stage 1 fc1/fc2 (ratio 8), stage 2 fc1 (ratio 6), stage 3 fc1 and qkv, stage 4;
# shiftwise_tiny stage 1 and stage 3 fc1/fc2
SHAPES = [
    (1, 56, 56, 64, 512),
    (1, 56, 56, 512, 64),
    (1, 28, 28, 128, 768),
    (8, 14, 14, 256, 1024),
    (8, 14, 14, 256, 768),
    (8, 7, 7, 512, 1024),
    (1, 56, 56, 80, 320),
    (8, 14, 14, 320, 1280),
    (8, 14, 14, 1280, 320),
    (8, 7, 7, 64, 64),
]


def _ratio(t) -> str:
    return f"{t['blas'].median / t['onednn'].median:.2f}x / {t['blas'].best / t['onednn'].best:.2f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--repeats', type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for b, h, w, k, n in SHAPES:
        x = torch.randn(b, h, w, k)
        weight, bias = torch.randn(n, k) / k**0.5, torch.randn(n)
        macs = b * h * w * k * n
        onednn = fast_ops._linear_onednn
        with torch.inference_mode():
            err = (onednn(x, weight, bias) - F.linear(x, weight, bias)).abs().max().item()
            fwd = time_interleaved(
                {'blas': lambda: F.linear(x, weight, bias), 'onednn': lambda: onednn(x, weight, bias)},
                warmup=3,
                repeats=args.repeats,
            )
            fast_ops.linear(x, weight, bias)  # the autotuner measures this shape once
        choice = [
            c
            for key, c in forms.autotune_choices().items()
            if key.startswith(f'linear|{tuple(x.shape)}|') and key.endswith(f'|{k}->{n}+b')
        ]
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, weight, bias))
        gy = torch.randn(b, h, w, n)

        def train(fn):
            return lambda: torch.autograd.grad(fn(xg, wg, bg), (xg, wg, bg), gy)

        bwd = time_interleaved(
            {'blas': train(F.linear), 'onednn': train(onednn)}, warmup=2, repeats=max(3, args.repeats // 2)
        )
        rows.append(
            {
                'B,H,W: K->N': f'{b},{h},{w}: {k}->{n}',
                'MMACs': f'{macs / 1e6:.0f}',
                'max |diff|': f'{err:.1e}',
                'fwd BLAS ms': f"{fwd['blas'].median * 1e3:.3f}",
                'fwd oneDNN ms': f"{fwd['onednn'].median * 1e3:.3f}",
                'fwd speed-up': _ratio(fwd),
                'fwd+bwd speed-up': _ratio(bwd),
                'autotuner': choice[0] if choice else '-',
            }
        )
    print(machine_line(args.threads) + '; fp32; speed-up = BLAS / oneDNN (median / best)')
    print_table(rows, 'Token linears: F.linear (BLAS) vs the oneDNN 1x1-conv GEMM')


if __name__ == '__main__':
    main()
