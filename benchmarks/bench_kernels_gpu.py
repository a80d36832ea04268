"""Triton depthwise-conv kernels vs PyTorch's own depthwise conv (``F.conv2d(groups=C)``, cuDNN) on CUDA.

For every case (SMT-T MHMC shapes, ShiftWise SW-T strip shapes) x dtype (fp32/fp16/bf16) x layout (NCHW,
channels_last) it prints, measured in one run with both sides interleaved:

* forward time of Triton and of PyTorch, their ratio, and each one's achieved bandwidth
  ``(input + output + weight bytes) / time`` as a fraction of the device's copy bandwidth (a large
  ``clone`` timed in the same run; target >= 60%);
* forward+backward time (grad_input, grad_weight, grad_bias) of both and its ratio, with the backward's
  bandwidth fraction counted on its minimal traffic (read grad_out and x, write grad_input, + weights).

Before timing, every case checks the Triton output and gradients against PyTorch on the same inputs.

    python benchmarks/bench_kernels_gpu.py [--batch 64] [--dtypes fp32 fp16 bf16] [--layouts nchw nhwc]
        [--only smt|sw] [--sweep] [--json out.json]

``--sweep`` also tries a few launch configurations per kernel and layout (``depthwise.LAUNCH_OVERRIDES``) and
reports the fastest, to tune the defaults in ``msconv/kernels/depthwise.py``.
Exits with a message (status 2) on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'src'))

DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}


def cases(batch: int, only: str | None):
    """(name, B, C, H, W, KH, KW, padding (top, bottom, left, right), group_kernel_sizes, interleaved)."""
    out = []
    if only in (None, 'smt'):
        # SMT-T: MHMC in stages 1-3 (dims 64/128/256 at 56/28/14), heads of k = 3, 5, 7, 9; the merged form is one
        # 9x9 depthwise conv in SAA's interleaved channel order.
        for C, R in ((64, 56), (128, 28), (256, 14)):
            for k in (3, 5, 7, 9):
                out.append((f'smt C{C} {R}x{R} k{k}', C, R, R, k, k, (k // 2,) * 4, None, False))
            out.append((f'smt C{C} {R}x{R} mixed3579', C, R, R, 9, 9, (4,) * 4, (3, 5, 7, 9), True))
    if only in (None, 'sw'):
        # SW-T (UniRepLKNet-T dims 80/160/320/640): strips of the closed form, small kernel 3.
        # K=51: offsets [-25, 25]; K=49: nk=17 strip of 51 at [-24, 26] (asymmetric); K=47: 48 at [-23, 24].
        for C, R, L, lo in ((80, 56, 51, 25), (80, 56, 51, 24), (160, 28, 51, 24), (320, 14, 48, 23)):
            hi = L - 1 - lo
            out.append((f'sw C{C} {R}x{R} 3x{L} [-{lo},{hi}]', C, R, R, 3, L, (1, 1, lo, hi), None, False))
            out.append((f'sw C{C} {R}x{R} {L}x3 [-{lo},{hi}]', C, R, R, L, 3, (lo, hi, 1, 1), None, False))
    return [(n, batch, *rest) for n, *rest in out]


DEVICE = 'cuda'  # --dry-run: 'cpu' (Triton interpreter), to check this script's plumbing without a GPU
ROUNDS = (15, 10, 9, 5)  # forward rounds, calls per round; fwd+bwd rounds, calls per round


def _sync():
    if DEVICE == 'cuda':
        torch.cuda.synchronize()


def _time_calls(f, iters: int) -> float:
    """Seconds per call of ``f`` over ``iters`` back-to-back calls (CUDA events on the GPU)."""
    if DEVICE != 'cuda':
        t = time.perf_counter()
        for _ in range(iters):
            f()
        return (time.perf_counter() - t) / iters
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        f()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / 1e3 / iters


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s of a large device clone (read + write counted)."""
    x = torch.empty(nbytes // 4, device=DEVICE, dtype=torch.float32).normal_()
    for _ in range(3):
        x.clone()
    _sync()
    times = [_time_calls(x.clone, 1) for _ in range(10)]
    return 2 * x.numel() * 4 / statistics.median(times)


def interleaved_times(fns, rounds: int, iters: int):
    """Median seconds per call of each function, measured round-robin so drifts hit all of them alike."""
    for f in fns:
        f()
    _sync()
    samples = [[] for _ in fns]
    for _ in range(rounds):
        for i, f in enumerate(fns):
            samples[i].append(_time_calls(f, iters))
    return [statistics.median(s) for s in samples]


def run_case(case, dtype, channels_last, copy_bw, check=True):
    from msconv.kernels.depthwise import depthwise_conv2d, depthwise_conv2d_reference

    name, B, C, H, W, KH, KW, pads, gks, inter = case
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(B, C, H, W, device=DEVICE, generator=g).to(dtype)
    w = (torch.randn(C, 1, KH, KW, device=DEVICE, generator=g) / (KH * KW) ** 0.5).to(dtype)
    b = torch.randn(C, device=DEVICE, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xg, wg, bg = (t.detach().requires_grad_(True) for t in (x, w, b))

    def tri_fwd():
        return depthwise_conv2d(x, w, b, pads, gks, inter, backend='triton')

    def ref_fwd():
        return depthwise_conv2d_reference(x, w, b, pads, gks, inter)

    y = tri_fwd()
    gy = (
        torch.randn(y.shape, device=DEVICE, generator=g)
        .to(dtype)
        .contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    )

    def tri_step():
        out = depthwise_conv2d(xg, wg, bg, pads, gks, inter, backend='triton')
        return torch.autograd.grad(out, (xg, wg, bg), gy)

    def ref_step():
        out = depthwise_conv2d_reference(xg, wg, bg, pads, gks, inter)
        return torch.autograd.grad(out, (xg, wg, bg), gy)

    err = {}
    if check:
        tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 8e-2}[dtype]
        with torch.no_grad():
            err['y'] = (tri_fwd().float() - ref_fwd().float()).abs().max().item()
        for k, a, r in zip(('gx', 'gw', 'gb'), tri_step(), ref_step()):
            err[k] = ((a.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-6)).item()
        bad = {k: v for k, v in err.items() if v > tol}
        if bad:
            print(f"  !! {name} {dtype} cl={channels_last}: Triton differs from PyTorch {bad}", flush=True)
    with torch.no_grad():
        t_tri, t_ref = interleaved_times([tri_fwd, ref_fwd], ROUNDS[0], ROUNDS[1])
    s_tri, s_ref = interleaved_times([tri_step, ref_step], ROUNDS[2], ROUNDS[3])
    es = x.element_size()
    w_taps = w.numel()
    fwd_bytes = (x.numel() + y.numel() + w_taps) * es
    bwd_bytes = (gy.numel() + 2 * x.numel() + w_taps) * es  # read grad_out, x; write grad_x; weights
    return dict(
        case=name,
        dtype=str(dtype).replace('torch.', ''),
        layout='nhwc' if channels_last else 'nchw',
        fwd_triton_ms=t_tri * 1e3,
        fwd_torch_ms=t_ref * 1e3,
        fwd_speedup=t_ref / t_tri,
        fwd_bw_triton=fwd_bytes / t_tri / copy_bw,
        fwd_bw_torch=fwd_bytes / t_ref / copy_bw,
        step_triton_ms=s_tri * 1e3,
        step_torch_ms=s_ref * 1e3,
        step_speedup=s_ref / s_tri,
        bwd_bw_triton=bwd_bytes / max(s_tri - t_tri, 1e-9) / copy_bw,
        bwd_bw_torch=bwd_bytes / max(s_ref - t_ref, 1e-9) / copy_bw,
        errors=err,
    )


def sweep_configs(kind: str, layout: str, C: int, taps_p2: int):
    """Launch configurations to try (channels_last channel blocks that divide C, or the whole of a small C;
    weight-gradient steps of at most 8192 position x tap x channel products)."""
    blocks = [bc for bc in (8, 16, 32, 64) if C % bc == 0] or [min(64, 1 << (C - 1).bit_length())]
    if kind == 'fwd' and layout == 'nchw':
        return [
            dict(BR=r, BW=w, BC=1, num_warps=nw)
            for (r, w) in ((16, 64), (8, 64), (32, 32), (4, 64), (32, 64))
            for nw in (4, 8)
        ]
    if kind == 'fwd':
        return [
            dict(BR=max(1, p // 8), BW=min(p, 8), BC=bc, num_warps=nw)
            for bc in blocks
            for p in (8, 16, 32, 64)
            if 256 <= p * bc <= 4096
            for nw in (4, 8)
        ]
    if layout == 'nchw':
        return [dict(BP=p, BC=1, num_warps=nw) for p in (8, 16, 32, 64, 128) if p * taps_p2 <= 8192 for nw in (4, 8)]
    return [
        dict(BP=p, BC=bc, num_warps=nw)
        for bc in blocks
        if bc <= 32
        for p in (1, 2, 4, 8)
        if p * bc * taps_p2 <= 8192
        for nw in (4, 8)
    ]


def sweep(case, dtype, channels_last):
    """Fastest launch configuration of each kernel for this case (forward and full step timed per config)."""
    from msconv.kernels import depthwise as dw

    layout = 'nhwc' if channels_last else 'nchw'
    best = {}
    for kind in ('fwd', 'wgrad'):
        results = []
        taps_p2 = 1 << (case[5] * case[6] - 1).bit_length() if case[10] is None else 256
        for cfg in sweep_configs(kind, layout, case[2], taps_p2):
            dw.LAUNCH_OVERRIDES.clear()
            dw.LAUNCH_OVERRIDES[kind] = {layout: cfg}
            try:
                r = run_case(case, dtype, channels_last, 1.0, check=False)
            except Exception as e:  # a config the compiler rejects (e.g. too many registers)
                print(f"    {kind} {cfg}: failed ({type(e).__name__})")
                continue
            results.append((r['fwd_triton_ms'] if kind == 'fwd' else r['step_triton_ms'], cfg))
        dw.LAUNCH_OVERRIDES.clear()
        if results:
            best[kind] = min(results, key=lambda t: t[0])
            print(f"    best {kind} {layout}: {best[kind][1]} {best[kind][0]:.3f} ms")
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--dtypes', nargs='+', default=['fp32', 'fp16', 'bf16'], choices=list(DTYPES))
    p.add_argument('--layouts', nargs='+', default=['nchw', 'nhwc'], choices=['nchw', 'nhwc'])
    p.add_argument('--only', choices=['smt', 'sw'], default=None)
    p.add_argument('--sweep', action='store_true', help='also search launch configurations')
    p.add_argument('--json', type=Path, default=None, help='write the results here')
    p.add_argument(
        '--dry-run',
        action='store_true',
        help='no GPU: two tiny cases on CPU in the Triton interpreter (needs TRITON_INTERPRET=1), '
        'to check this script itself; the figures mean nothing',
    )
    args = p.parse_args(argv)

    global DEVICE, ROUNDS
    if args.dry_run:
        from msconv.kernels.depthwise import interpreter_active

        if not interpreter_active():
            print("bench_kernels_gpu --dry-run: set TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        DEVICE, ROUNDS = 'cpu', (1, 1, 1, 1)
        shrink = lambda c: (c[0], 1, 8, 8, 8, *c[5:])  # noqa: E731 - batch 1, 8 channels, 8x8
        todo = [shrink(c) for c in cases(1, None) if c[0].startswith(('smt C64 56x56 mixed', 'sw C80 56x56 3x51 [-25'))]
        copy_bw = copy_bandwidth(1 << 24)
        rows = [run_case(c, torch.float32, cl, copy_bw) for c in todo for cl in (False, True)]
        if args.sweep:
            sweep(todo[0], torch.float32, True)
        print(f"dry run: {len(rows)} cases ran; errors {[r['errors'] for r in rows]}")
        return 0
    if not torch.cuda.is_available():
        print(
            "bench_kernels_gpu: no CUDA device here; this benchmark times Triton kernels on a GPU. "
            "(Correctness on CPU: pytest tests/test_kernels.py, which runs the kernels in Triton's interpreter.)",
            file=sys.stderr,
        )
        return 2
    from msconv.kernels.depthwise import HAS_TRITON

    if not HAS_TRITON:
        print("bench_kernels_gpu: triton is not importable", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    copy_bw = copy_bandwidth()
    dev = torch.cuda.get_device_name()
    print(
        f"device: {dev}; torch {torch.__version__}; copy bandwidth {copy_bw / 1e9:.0f} GB/s "
        f"(clone of 1 GiB, read+write); batch {args.batch}"
    )
    hdr = (
        f"{'case':34s} {'dtype':8s} {'lay':4s} | {'fwd tri':>8s} {'fwd pt':>8s} {'x':>5s} {'bw tri':>6s} "
        f"{'bw pt':>6s} | {'step tri':>8s} {'step pt':>8s} {'x':>5s} {'bwdbw tri':>9s} {'bwdbw pt':>8s}"
    )
    print(hdr)
    print('-' * len(hdr))
    rows = []
    for case in cases(args.batch, args.only):
        for dname in args.dtypes:
            for layout in args.layouts:
                r = run_case(case, DTYPES[dname], layout == 'nhwc', copy_bw)
                rows.append(r)
                print(
                    f"{r['case']:34s} {dname:8s} {layout:4s} | {r['fwd_triton_ms']:8.3f} {r['fwd_torch_ms']:8.3f} "
                    f"{r['fwd_speedup']:5.2f} {r['fwd_bw_triton']:6.0%} {r['fwd_bw_torch']:6.0%} | "
                    f"{r['step_triton_ms']:8.3f} {r['step_torch_ms']:8.3f} {r['step_speedup']:5.2f} "
                    f"{r['bwd_bw_triton']:9.0%} {r['bwd_bw_torch']:8.0%}",
                    flush=True,
                )
                if args.sweep:
                    r['sweep'] = {
                        k: dict(ms=v[0], config=v[1]) for k, v in sweep(case, DTYPES[dname], layout == 'nhwc').items()
                    }
    fb = [r['fwd_bw_triton'] for r in rows]
    print(
        f"\nforward bandwidth fraction of copy (Triton): median {statistics.median(fb):.0%}, min {min(fb):.0%}; "
        f"cases >= 60%: {sum(f >= 0.6 for f in fb)}/{len(fb)}"
    )
    print(
        f"forward speedup vs PyTorch: median {statistics.median(r['fwd_speedup'] for r in rows):.2f}x; "
        f"fwd+bwd: median {statistics.median(r['step_speedup'] for r in rows):.2f}x"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                dict(device=dev, torch=torch.__version__, copy_bw=copy_bw, batch=args.batch, rows=rows), indent=1
            )
        )
    return 0


if __name__ == '__main__':
    sys.exit(main())
