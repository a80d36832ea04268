"""Offline look at the Triton depthwise kernels' GPU code, no GPU needed: compile for sm_90 (Triton's bundled
ptxas) at the default launch configurations and print registers, spills and how the global loads vectorised.

    python benchmarks/kernels_sm90_resources.py [--dtype fp16] [--channels 80]

A companion to bench_kernels_gpu.py (which times them on a GPU): a config with spills, or channels_last loads
that did not become ``ld.global.v4``, is worth fixing before timing.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'src'))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--dtype', default='fp16', choices=['fp32', 'fp16', 'bf16'])
    p.add_argument('--channels', type=int, default=80)
    args = p.parse_args(argv)

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from msconv.kernels import depthwise as dw

    cuobjdump = Path(triton.__file__).parent / 'backends' / 'nvidia' / 'bin' / 'cuobjdump'
    fwd, wgrad = dw._kernels(False)
    C, dt = args.channels, args.dtype
    divisible = ('C', 'sxb', 'sxh', 'sxw', 'syb', 'syh', 'syw', 'sgb', 'sgh', 'sgw')
    print(f"sm_90, {dt}, C={C}; channels_last strides specialised as Triton does at launch (stride 1, others % 16)")
    print(
        f"{'kernel':6s} {'layout':6s} {'taps':>9s} {'MIXED':>5s} {'config':46s} {'regs':>4s} {'spill B':>7s} "
        f"{'ld.v4':>5s} {'ld.scalar':>9s}"
    )
    for kind in ('fwd', 'wgrad'):
        for cl in (False, True):
            for kh, kw, mixed in ((3, 3, 0), (9, 9, 0), (9, 9, 2 if not cl else 1), (3, 51, 0), (51, 3, 0)):
                fn = fwd if kind == 'fwd' else wgrad
                if kind == 'fwd':
                    cfg = dw._fwd_config(cl, C, 64 * 56, 56)
                    consts = dict(HAS_BIAS=True, MIXED=mixed, INT64=False, BR=cfg['BR'], BW=cfg['BW'], BC=cfg['BC'])
                    ptrs = dict(x_ptr=dt, w_ptr=dt, b_ptr=dt, y_ptr=dt, taps_ptr='i32')
                else:
                    tp = dw._next_pow2(kh * kw)
                    cfg = dw._wgrad_config(cl, C, tp)
                    consts = dict(MIXED=mixed, INT64=False, BP=cfg['BP'], BC=cfg['BC'], TP=tp)
                    ptrs = dict(x_ptr=dt, g_ptr=dt, pw_ptr='fp32', pb_ptr='fp32', taps_ptr='i32')
                sig = {n: 'i32' for n in fn.arg_names}
                sig.update({n: '*' + t for n, t in ptrs.items()})
                if cl:  # unit channel stride is a specialised constant at launch
                    for n in ('sxc', 'syc', 'sgc'):
                        if n in sig:
                            consts[n] = 1
                sig.update({n: 'constexpr' for n in consts})
                attrs = {
                    (fn.arg_names.index(n),): [['tt.divisibility', 16]]
                    for n in list(ptrs) + [d for d in divisible if d in fn.arg_names and sig[d] == 'i32']
                }
                k = triton.compile(
                    ASTSource(fn, sig, consts, attrs),
                    target=GPUTarget('cuda', 90, 32),
                    options=dict(num_warps=cfg['num_warps'], enable_fp_fusion=True),
                )
                with tempfile.NamedTemporaryFile('wb', suffix='.cubin') as f:
                    f.write(k.asm['cubin'])
                    f.flush()
                    res = subprocess.run([str(cuobjdump), '-res-usage', f.name], capture_output=True, text=True).stdout
                regs = re.search(r'REG:(\d+)', res)
                stack = re.search(r'STACK:(\d+)', res)
                ptx = k.asm['ptx']
                v4 = len(re.findall(r'ld\.global(?:\.\w+)*\.v4', ptx))
                scalar = len(re.findall(r'ld\.global(?:\.\w+)*\.b(?:16|32)\b', ptx))
                cfg_s = ' '.join(f'{a}={b}' for a, b in cfg.items())
                print(
                    f"{kind:6s} {'nhwc' if cl else 'nchw':6s} {f'{kh}x{kw}':>9s} {mixed:5d} {cfg_s:46s} "
                    f"{regs.group(1) if regs else '?':>4s} {stack.group(1) if stack else '?':>7s} {v4:5d} {scalar:9d}"
                )
    return 0


if __name__ == '__main__':
    sys.exit(main())
