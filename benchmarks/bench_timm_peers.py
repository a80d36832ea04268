"""msconv's models in inference form against the timm models a user would pick instead, CPU, eval, equal dtype.

Issue 12 item 4: ``smt_tiny`` vs ``convnext_tiny``, ``scsc_swin_tiny`` vs ``swin_tiny_patch4_window7_224``,
``scsc_resnet50`` vs ``resnet50``, ``shiftwise_tiny`` vs ``convnext_tiny``; target >= 1.0x each, in fp32 and bf16.
Ours is ``msconv.reparameterize(model)`` (BatchNorms folded, branches merged), the peer is timm's eval model
(``timm.utils.reparameterize_model``, a no-op for these four). Both run in their default memory layout, without
autograd, timed interleaved in one process (A, B, A, B, ...; ``_common.time_interleaved``), so machine noise hits both;
the table gives the peer's time over ours (> 1: ours is faster) from the medians and from the best calls (the fairer
statistic on a machine shared with other work).

Dtypes: ``fp32``; ``bf16`` (weights and input cast to bfloat16); ``autocast`` (fp32 weights under
``torch.autocast('cpu', torch.bfloat16)``). The MAC ratio (``torch.utils.flop_counter``, which counts matmuls and
convolutions) bounds what equal per-MAC efficiency gives: peer MACs / our MACs.

    PYTHONPATH=src python benchmarks/bench_timm_peers.py [--dtypes fp32,bf16,autocast] [--repeats 5] [--pairs ...]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import timm
import torch
from timm.utils import reparameterize_model
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, print_table, time_interleaved  # noqa: E402

import msconv

PAIRS = (
    ('smt_tiny', 'convnext_tiny'),
    ('scsc_swin_tiny', 'swin_tiny_patch4_window7_224'),
    ('scsc_resnet50', 'resnet50'),
    ('shiftwise_tiny', 'convnext_tiny'),
)
DTYPES = ('fp32', 'bf16', 'autocast')


def gmacs(model: torch.nn.Module, size: int) -> float:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 2e9


def runner(model: torch.nn.Module, x: torch.Tensor, dtype: str):
    """A no-argument call of ``model`` on ``x`` in ``dtype`` (the model is cast for 'bf16')."""
    if dtype == 'bf16':
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
        return lambda: model(x)
    if dtype == 'autocast':

        def call():
            with torch.autocast('cpu', torch.bfloat16):
                return model(x)

        return call
    return lambda: model(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--pairs', default=','.join(f'{a}:{b}' for a, b in PAIRS), help='OURS:PEER,... (timm names)')
    ap.add_argument('--dtypes', default=','.join(DTYPES), help=f"comma-separated, of {', '.join(DTYPES)}")
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--size', type=int, default=224)
    ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--warmup', type=int, default=2)
    args = ap.parse_args()
    dtypes = [d for d in args.dtypes.split(',') if d]
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"--dtypes: each must be one of {DTYPES}, got {d!r}")
    pairs = []
    for item in args.pairs.split(','):
        if item.count(':') != 1:
            ap.error(f"--pairs: each must be OURS:PEER, got {item!r}")
        pairs.append(tuple(item.split(':')))
    torch.set_num_threads(args.threads)
    print(machine_line(args.threads))
    print(f"batch {args.batch} at {args.size}, eval, no autograd, default layouts, {args.repeats} interleaved rounds")
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    rows = []
    for ours_name, peer_name in pairs:
        ours = msconv.reparameterize(msconv.create_model(ours_name).eval())
        peer = reparameterize_model(timm.create_model(peer_name).eval())
        mac_ratio = gmacs(peer, args.size) / gmacs(ours, args.size)
        for dtype in dtypes:
            fns = {'ours': runner(copy.deepcopy(ours), x, dtype), 'peer': runner(copy.deepcopy(peer), x, dtype)}
            with torch.inference_mode():
                t = time_interleaved(fns, warmup=args.warmup, repeats=args.repeats)
            rows.append(
                {
                    'ours': ours_name,
                    'peer': peer_name,
                    'dtype': dtype,
                    'ours ms (median/best)': f"{t['ours'].median * 1e3:.0f}/{t['ours'].best * 1e3:.0f}",
                    'peer ms (median/best)': f"{t['peer'].median * 1e3:.0f}/{t['peer'].best * 1e3:.0f}",
                    'ours vs peer (median/best)': f"{t['peer'].median / t['ours'].median:.2f}x/"
                    f"{t['peer'].best / t['ours'].best:.2f}x",
                    'peer/ours MACs': f'{mac_ratio:.2f}',
                }
            )
            print(rows[-1], flush=True)
    print_table(rows, 'ours (inference form) vs timm peer; > 1.00x: ours is faster (target >= 1.00x)')


if __name__ == '__main__':
    main()
