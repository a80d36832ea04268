"""CPU GEMMs of the token linears: ``F.linear`` (BLAS sgemm) against ``msconv.layers.linear`` (oneDNN 1x1 conv).

    python benchmarks/bench_cpu_linear.py [--threads 2] [--repeats 20]

Shapes are the per-image (B=1) and batch-8 token linears of smt_tiny and shiftwise_tiny at 224 (M tokens x K
-> N). For each: forward under inference_mode, and forward + backward (input, weight and bias gradients), both
implementations timed alternately in this process; the speed-up is BLAS time / oneDNN time (median / best).
This measurement is what decided the CPU GEMM path of ``msconv.layers.Linear``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, time_interleaved  # noqa: E402

from msconv.layers import linear as linear_module  # noqa: E402

# (batch, H, W, K, N): smt_tiny stage 1 fc1/fc2 (ratio 8), stage 2 fc1 (ratio 6), stage 3 fc1 and qkv, stage 4;
# shiftwise_tiny stage 1 and stage 3 fc1/fc2
SHAPES = [
    (1, 56, 56, 64, 512), (1, 56, 56, 512, 64), (1, 28, 28, 128, 768), (8, 14, 14, 256, 1024),
    (8, 14, 14, 256, 768), (8, 7, 7, 512, 1024), (1, 56, 56, 80, 320), (8, 14, 14, 320, 1280),
    (8, 14, 14, 1280, 320), (8, 7, 7, 64, 64),
]


def _ratio(t) -> str:
    return f"{t['blas'].median / t['ours'].median:.2f}x / {t['blas'].best / t['ours'].best:.2f}x"


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
        weight, bias = torch.randn(n, k) / k ** 0.5, torch.randn(n)
        macs = b * h * w * k * n
        onednn = linear_module._use_onednn(x, weight, bias)
        with torch.inference_mode():
            err = (linear_module.linear(x, weight, bias) - F.linear(x, weight, bias)).abs().max().item()
            fwd = time_interleaved({'blas': lambda: F.linear(x, weight, bias),
                                    'ours': lambda: linear_module.linear(x, weight, bias)},
                                   warmup=3, repeats=args.repeats)
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, weight, bias))
        gy = torch.randn(b, h, w, n)

        def train(fn):
            return lambda: torch.autograd.grad(fn(xg, wg, bg), (xg, wg, bg), gy)

        bwd = time_interleaved({'blas': train(F.linear), 'ours': train(linear_module.linear)},
                               warmup=2, repeats=max(3, args.repeats // 2))
        rows.append({
            'B,H,W: K->N': f'{b},{h},{w}: {k}->{n}', 'MMACs': f'{macs / 1e6:.0f}',
            'path': 'oneDNN' if onednn else 'BLAS (small)', 'max |diff|': f'{err:.1e}',
            'fwd BLAS ms': f"{fwd['blas'].median * 1e3:.3f}", 'fwd ours ms': f"{fwd['ours'].median * 1e3:.3f}",
            'fwd speed-up': _ratio(fwd), 'fwd+bwd speed-up': _ratio(bwd),
        })
    print(f"torch {torch.__version__}, {args.threads} threads, fp32; speed-up = BLAS / ours (median / best)")
    print_table(rows, 'Token linears: F.linear vs msconv.layers.linear')


if __name__ == '__main__':
    main()
