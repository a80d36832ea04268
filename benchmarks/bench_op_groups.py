"""Where a model's inference time goes, per group of operations, against what each group could cost.

    python benchmarks/bench_op_groups.py [--models scsc_resnet50 resnet50] [--threads 1] [--batch 8] [--size 224]

Each model runs in the inference form ``msconv.inference_model`` gives (reparameterized, eval, no autograd, the
layout of ``--layout``). After warm-up calls, ``--repeats`` calls run under a ``TorchDispatchMode`` that times every
ATen operation (the calling thread's CPU time with ``--threads 1``, so that time spent waiting for a core on a shared
machine is left out; wall time otherwise) and sorts it into a group: 1x1 convs and GEMMs, other dense convs,
depthwise convs, BatchNorm, activations, elementwise products (routing, SE scaling), reductions (pooling), residual
adds, copies (cat, copy, contiguous), views and allocations, other. Compute groups report GFLOP/s (2 x MACs of their
outputs); memory groups report the bytes they read and write and the time a copy of those bytes takes at the cold-cache
copy bandwidth measured in the same run (a 32 MiB copy after sweeping a 256 MiB buffer): their floor. The instrumented
total runs above a plain call (the dispatch mode costs a few microseconds per operation); the shares are what to read.
``msconv.layers.forms.tuned`` runs the plain form of every tuned operation under a dispatch mode (so that a
FlopCounterMode counts the plain forms); here, by default (``--forms chosen``), it is told that no mode is active during
the instrumented calls, so they run the forms the warm-up calls chose, as an uninstrumented call does.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, Tuple

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, print_table  # noqa: E402

import msconv  # noqa: E402
from msconv.layers import forms  # noqa: E402

GEMMS = {'mm', 'addmm', 'bmm', 'baddbmm', 'linear', 'matmul'}
BATCH_NORMS = {'native_batch_norm', '_native_batch_norm_legit_no_training', 'batch_norm'}
ACTIVATIONS = {'gelu', 'gelu_', 'relu', 'relu_', 'clamp_min', 'clamp_min_', 'sigmoid', 'sigmoid_', 'hardsigmoid'}
PRODUCTS = {'mul', 'mul_', 'addcmul', 'addcmul_'}
REDUCTIONS = {'mean', 'sum', 'adaptive_avg_pool2d', '_adaptive_avg_pool2d', 'max_pool2d', 'max_pool2d_with_indices'}
ADDS = {'add', 'add_'}
COPIES = {'cat', 'copy_', 'clone', 'contiguous', '_to_copy'}
VIEWS = {'view', 'permute', 'as_strided', 'transpose', 'slice', 'unsqueeze', 'expand', 'select', '_reshape_alias', 't'}
VIEWS |= {'reshape', 'flatten', 'unflatten', 'detach', 'alias', 'empty', 'empty_like', 'new_empty', 'to', 'dropout'}
COMPUTE = ('1x1 conv / GEMM', 'dense kxk conv', 'depthwise conv')


def _tensors(args) -> Iterator[torch.Tensor]:
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _tensors(a)
        elif isinstance(a, torch.Tensor):
            yield a


def _classify(name: str, args, out) -> Tuple[str, float]:
    """(group, FLOPs) of one ATen operation."""
    ts = list(_tensors(args))
    o = out if isinstance(out, torch.Tensor) else next(_tensors([out]), None)
    if 'conv' in name and len(ts) >= 2 and ts[1].dim() == 4 and o is not None:
        w = ts[1]
        flops = 2.0 * o.numel() * w.shape[1] * w.shape[2] * w.shape[3]
        if w.shape[1] == 1 and w.shape[0] > 1:
            return 'depthwise conv', flops
        return ('1x1 conv / GEMM' if w.shape[2] * w.shape[3] == 1 else 'dense kxk conv'), flops
    if name in GEMMS and o is not None:
        a = ts[1] if name in ('addmm', 'baddbmm') else ts[0]
        return '1x1 conv / GEMM', 2.0 * o.numel() * a.shape[-1]
    for group, names in (
        ('BatchNorm', BATCH_NORMS),
        ('activations', ACTIVATIONS),
        ('products (routing, SE)', PRODUCTS),
        ('reductions (pooling)', REDUCTIONS),
        ('residual adds', ADDS),
        ('copies (cat, copy)', COPIES),
        ('views, allocations', VIEWS),
    ):
        if name in names:
            return group, 0.0
    return f'other: {name}', 0.0


class _Accounting(TorchDispatchMode):
    def __init__(self, clock) -> None:
        super().__init__()
        self.clock = clock
        self.ns: Dict[str, float] = collections.defaultdict(float)
        self.flops: Dict[str, float] = collections.defaultdict(float)
        self.bytes: Dict[str, float] = collections.defaultdict(float)
        self.ops: Dict[str, float] = collections.defaultdict(float)
        self.calls: Dict[str, int] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t0 = self.clock()
        out = func(*args, **kwargs)
        dt = self.clock() - t0
        name = func.overloadpacket.__name__
        group, flops = _classify(name, args, out)
        self.ns[group] += dt
        self.flops[group] += flops
        outs = list(_tensors([out]))
        if group not in ('views, allocations',):
            moved = sum(t.numel() * t.element_size() for t in _tensors(args)) + sum(
                t.numel() * t.element_size() for t in outs
            )
            self.bytes[group] += moved
        key = f"{group} | {name} {tuple(outs[0].shape) if outs else ''}"
        self.ops[key] += dt
        self.calls[key] += 1
        return out


@contextlib.contextmanager
def _chosen_forms(enabled: bool) -> Iterator[None]:
    """With ``enabled``: ``forms.tuned`` runs its cached choices although a dispatch mode is active."""
    if not enabled:
        yield
        return
    saved = forms._dispatch_mode_active
    forms._dispatch_mode_active = lambda: False
    try:
        yield
    finally:
        forms._dispatch_mode_active = saved


def cold_copy_bandwidth() -> float:
    """Bytes per second of a 32 MiB copy (read + write counted) after sweeping a 256 MiB buffer, median of 7."""
    sweep = torch.empty(64 * 1024 * 1024)
    src, dst = torch.randn(8 * 1024 * 1024), torch.empty(8 * 1024 * 1024)
    times = []
    for _ in range(7):
        sweep.add_(1.0)
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / sorted(times)[3]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', nargs='+', default=['scsc_resnet50', 'resnet50'])
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--repeats', type=int, default=2, help='instrumented calls per model')
    p.add_argument('--layout', choices=['auto', 'channels_last', 'contiguous'], default='channels_last')
    p.add_argument(
        '--forms',
        choices=['chosen', 'plain'],
        default='chosen',
        help="account the autotuner's choices (as an uninstrumented call runs) or every tuned operation's plain form",
    )
    p.add_argument('--top', type=int, default=0, help='also list the N most expensive operations per model')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.thread_time_ns if args.threads == 1 else time.perf_counter_ns
    layout = {'auto': 'auto', 'channels_last': True, 'contiguous': False}[args.layout]
    bandwidth = cold_copy_bandwidth()
    x = torch.randn(args.batch, 3, args.size, args.size)
    for name in args.models:
        model = msconv.inference_model(timm.create_model(name), channels_last=layout)
        with torch.inference_mode():
            for _ in range(3):
                model(x)
            t0 = clock()
            model(x)
            plain_ms = (clock() - t0) / 1e6
            acct = _Accounting(clock)
            with acct, _chosen_forms(args.forms == 'chosen'):
                for _ in range(args.repeats):
                    model(x)
        total = sum(acct.ns.values())
        rows = []
        for group in sorted(acct.ns, key=lambda g: -acct.ns[g]):
            ms = acct.ns[group] / args.repeats / 1e6
            row = {'group': group, 'ms': f'{ms:.1f}', 'share': f'{100 * acct.ns[group] / total:.1f}%'}
            if group in COMPUTE:
                row['GFLOP'] = f'{acct.flops[group] / args.repeats / 1e9:.2f}'
                row['rate'] = f'{acct.flops[group] / acct.ns[group]:.1f} GFLOP/s'
                row['floor ms'] = ''
            else:
                mb = acct.bytes[group] / args.repeats / 1e6
                row['GFLOP'] = f'{mb:.0f} MB' if mb else ''
                row['rate'] = f'{acct.bytes[group] / acct.ns[group]:.1f} GB/s' if mb else ''
                row['floor ms'] = f'{mb * 1e6 / bandwidth * 1e3:.1f}' if mb else ''
            rows.append(row)
        print_table(
            rows,
            f"{name}: one plain call {plain_ms:.0f} ms, instrumented {total / args.repeats / 1e6:.0f} ms per call, "
            f"{sum(acct.calls.values()) // args.repeats} operations per call, channels_last={model.channels_last}",
        )
        if args.top:
            for key in sorted(acct.ops, key=lambda k: -acct.ops[k])[: args.top]:
                print(f"  {acct.ops[key] / args.repeats / 1e6:8.2f} ms {acct.calls[key] // args.repeats:4d}x  {key}")
    print(
        f"\ncold-cache copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write); "
        f"times: {'thread CPU time' if args.threads == 1 else 'wall time'}"
    )
    print(machine_line(args.threads))


if __name__ == '__main__':
    main()
