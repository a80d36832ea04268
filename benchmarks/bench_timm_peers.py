"""msconv models against the timm models a user would pick instead, at equal dtype, measured in one run.

    python benchmarks/bench_timm_peers.py [--threads 2] [--batch 8] [--size 224] [--dtypes fp32 bf16]

Both sides run in the inference form ``msconv.inference_model`` gives (reparameterized, weights in the dtype, the
layout the autotuner measures faster, eval, no autograd); timm models are built with random weights (speed does not
depend on them). For each pair and dtype: one call each decides the layout and the autotuner's forms, then warm-up
calls, then the two models alternate call by call; the ratio is the peer's seconds per batch over ours (> 1: ours
is faster), from the medians and from the best calls (the least disturbed, the fairer figure on a shared machine).
The MAC ratio (``torch.utils.flop_counter``: matmuls and convolutions) bounds what equal per-MAC efficiency gives:
peer MACs / ours.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CPU_TIME_HELP, clock_for, machine_line, print_table, time_interleaved  # noqa: E402

import msconv  # noqa: E402
from msconv.layers import reference_forms  # noqa: E402

PAIRS = (
    ('smt_tiny', 'convnext_tiny'),
    ('scsc_swin_tiny', 'swin_tiny_patch4_window7_224'),
    ('scsc_resnet50', 'resnet50'),
    ('shiftwise_tiny', 'convnext_tiny'),
)


def _pair(text: str):
    ours, sep, peer = text.partition(':')
    if not sep or not ours or not peer:
        raise argparse.ArgumentTypeError(f"a pair is OURS:PEER (e.g. smt_tiny:convnext_tiny), got {text!r}")
    return ours, peer


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--dtypes', nargs='+', default=['fp32', 'bf16'], choices=['fp32', 'bf16', 'fp16'])
    p.add_argument('--repeats', type=int, default=7, help='timed calls per model (alternating)')
    p.add_argument('--cpu-time', action='store_true', help=CPU_TIME_HELP)
    p.add_argument('--warmup', type=int, default=2, help='untimed calls per model after the first one')
    p.add_argument('--pairs', nargs='+', type=_pair, default=list(PAIRS), metavar='OURS:PEER')
    args = p.parse_args(argv)
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    rows = []
    mac_ratio = {}
    for ours_name, peer_name in args.pairs:
        mac_ratio[ours_name, peer_name] = _gmacs(_build(timm.create_model, peer_name, args.size), args.size) / _gmacs(
            _build(msconv.create_model, ours_name, args.size), args.size
        )
    for dtype in args.dtypes:
        for ours_name, peer_name in args.pairs:
            ours = msconv.inference_model(_build(msconv.create_model, ours_name, args.size), dtype=dtype)
            peer = msconv.inference_model(_build(timm.create_model, peer_name, args.size), dtype=dtype)
            xd = x.to(ours.weight_dtype)
            with torch.inference_mode():
                ours(xd), peer(xd)  # the layout choice and the autotuner's measurements happen here
                fns = {'ours': lambda m=ours: m(xd), 'peer': lambda m=peer: m(xd)}
                t = time_interleaved(fns, args.warmup, args.repeats, clock_for(args.cpu_time))
            rows.append(
                dict(
                    dtype=dtype,
                    ours=ours_name,
                    peer=peer_name,
                    ours_ms=f"{1000 * t['ours'].median:.1f}",
                    peer_ms=f"{1000 * t['peer'].median:.1f}",
                    ratio_median=f"{t['peer'].median / t['ours'].median:.2f}x",
                    ratio_best=f"{t['peer'].best / t['ours'].best:.2f}x",
                    layouts=f"{_layout(ours)}/{_layout(peer)}",
                    peer_over_ours_macs=f"{mac_ratio[ours_name, peer_name]:.2f}",
                )
            )
            print('  '.join(str(v) for v in rows[-1].values()), flush=True)  # progress
            del ours, peer, fns
            gc.collect()
    print_table(
        rows,
        f"ours vs timm peer, inference form, batch {args.batch} at {args.size}, ratio = peer time / ours "
        f"(> 1: ours faster), median and best of {args.repeats} alternating calls",
    )
    print(machine_line(args.threads))


def _build(factory, name: str, size: int):
    """The model for ``size`` x ``size`` inputs (window/patch models are built for their input size)."""
    if size == 224:
        return factory(name)
    try:
        return factory(name, img_size=size)
    except TypeError:  # a convnet: any input size
        return factory(name)


def _gmacs(model: torch.nn.Module, size: int) -> float:
    """Multiply-accumulates of one ``size`` x ``size`` image through the reparameterized fp32 model, in its plain
    forms (the architecture's MACs, as ``msconv profile`` counts them)."""
    model = msconv.reparameterize(model.eval()) if hasattr(model, 'reparameterize') else model.eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode(), reference_forms():
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 2e9


def _layout(model) -> str:
    return {True: 'NHWC', False: 'NCHW'}.get(model.channels_last, str(model.channels_last))


if __name__ == '__main__':
    main()
