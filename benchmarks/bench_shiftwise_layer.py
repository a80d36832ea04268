"""ShiftWiseConv2d (SW-T stage 1: C=80, 56x56, K=51, k=3) against a dense 51x51 depthwise nn.Conv2d, on CPU.

Reports, each beside the dense conv measured in the same run (interleaved, median of the timed repeats):
* training form, forward+backward time and the activations autograd saves (bytes of unique storages, as a
  multiple of the input size); the plain reference form (three convs + three BN modules) is shown too;
* deploy form (``reparameterize()``), forward time.
Targets (issue 3): training form < 3x the input in saved activations; deploy faster than the dense 51x51 conv.
For context, the official CUDA op writes repN*nk*(H+2e)^2 floats per image per path (computed, not measured).

    PYTHONPATH=src python benchmarks/bench_shiftwise_layer.py [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, saved_bytes, time_interleaved  # noqa: E402

from msconv.layers.shiftwise import ShiftWiseConv2d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--channels', type=int, default=80)
    ap.add_argument('--size', type=int, default=56)
    ap.add_argument('--kernel', type=int, default=51)
    ap.add_argument('--channels-last', action='store_true', help='channels_last input (the model default)')
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(args.threads))
    torch.manual_seed(0)
    c, k = args.channels, args.kernel
    x = torch.randn(args.batch, c, args.size, args.size)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    u = torch.randn_like(x)
    sw = ShiftWiseConv2d(c, k, 3).train()
    ref = copy.deepcopy(sw)
    ref.forward = ref.forward_reference  # the plain form of the operator
    dense = nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False)
    dense_name = f'dense {k}x{k}'
    in_bytes = x.numel() * x.element_size()

    def fwd_bwd(mod):
        def run():
            xi = x.detach().requires_grad_(True)
            mod(xi).backward(u)

        return run

    def saved(mod):
        return saved_bytes(lambda: mod(x.detach().requires_grad_(True))) / in_bytes

    mem = {'sw train (lean)': saved(sw), 'sw train (reference)': saved(ref), dense_name: saved(dense)}
    forms = {'sw train (lean)': fwd_bwd(sw), 'sw train (reference)': fwd_bwd(ref), dense_name: fwd_bwd(dense)}
    train_t = {n: v.median for n, v in time_interleaved(forms, warmup=1, repeats=args.repeats).items()}

    deploy = copy.deepcopy(sw).eval()
    deploy.reparameterize()
    folded = copy.deepcopy(sw).eval()
    ref_eval = copy.deepcopy(ref).eval()
    dense.eval()
    with torch.no_grad():
        inf = {
            'sw deploy': lambda: deploy(x),
            'sw eval (on-the-fly fold)': lambda: folded(x),
            'sw eval (reference)': lambda: ref_eval(x),
            dense_name: lambda: dense(x),
        }
        inf_t = {n: v.median for n, v in time_interleaved(inf, warmup=1, repeats=args.repeats).items()}

    e = 1
    official = sw.rep_channels * sw.nk * (args.size + 2 * e) ** 2 * args.batch * 4 / in_bytes
    print(
        f"ShiftWiseConv2d C={c} {args.size}x{args.size} K={k} k=3 batch {args.batch}, CPU {args.threads} threads, "
        f"fp32, {'channels_last' if args.channels_last else 'NCHW'}, median of {args.repeats}"
    )
    print(f"{'training form':28s} {'fwd+bwd ms':>11s} {'vs dense':>9s} {'saved act. (x input)':>21s}")
    for n in forms:
        print(f"{n:28s} {train_t[n] * 1e3:11.1f} {train_t[dense_name] / train_t[n]:8.2f}x {mem[n]:21.2f}")
    print(f"{'official op (computed)':28s} {'':11s} {'':9s} {official:21.2f}  (nk maps of one path, written)")
    print(f"{'inference':28s} {'fwd ms':>11s} {'vs dense':>9s}")
    for n in inf:
        print(f"{n:28s} {inf_t[n] * 1e3:11.1f} {inf_t[dense_name] / inf_t[n]:8.2f}x")
    print(
        f"targets: saved activations {mem['sw train (lean)']:.2f}x < 3x input: "
        f"{'PASS' if mem['sw train (lean)'] < 3 else 'FAIL'}; deploy faster than {dense_name} "
        f"({inf_t[dense_name] / inf_t['sw deploy']:.2f}x): "
        f"{'PASS' if inf_t['sw deploy'] < inf_t[dense_name] else 'FAIL'}"
    )


if __name__ == '__main__':
    main()
