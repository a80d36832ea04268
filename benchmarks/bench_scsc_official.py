"""SCSC: our models against the official megvii-research/SCSC code, CPU, measured in one interleaved run.

The official code is NOT part of msconv: pass the path of a local checkout (``scsc_swin.py`` and ``cbtnet.py``
are imported from it). The official ``cbtnet`` crashes as shipped (its block reads an attribute that is never set);
the script sets that attribute on each official block instance, the same one-line fix the reference fixtures used,
without touching the checkout.

For each model the official network is built with its own init, BatchNorm statistics are randomised, the same
weights are loaded into ours through ``msconv.convert_official`` and the outputs are checked to agree (1e-4)
before any timing. Inference compares official eval (as shipped, NCHW, and with model and input in channels-last,
which the official code runs too) against ours eager, reparameterized (BatchNorms folded) and through
``msconv.inference_model`` (reparameterized, the layout measured on this machine); training
compares one step (forward + backward + AdamW step) of each in train mode. Variants are timed round-robin
(one call of each per round) so that load from other processes hits all of them alike; the median over rounds
and the minimum are reported, with ratios official / ours.

    python benchmarks/bench_scsc_official.py /path/to/SCSC --threads 2 --batch 8 --size 224 --iters 5
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

import msconv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, randomize_norms  # noqa: E402


def _import(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        spec.loader.exec_module(mod)
    return mod


def build_official(repo: Path, model: str) -> nn.Module:
    if model == 'scsc_swin_tiny':
        return _import(repo / 'scsc_swin.py', '_official_scsc_swin').SCSC_Swin(img_size=224)
    if model == 'scsc_resnet50':
        net = _import(repo / 'cbtnet.py', '_official_cbtnet').cbtnet50()
        for block in net.modules():
            if hasattr(block, 'routing_fc') and not hasattr(block, 'patch_sizes'):
                block.patch_sizes = [None] * len(block.layers)  # the attribute the released forward reads
        return net
    raise ValueError(f"model must be scsc_swin_tiny or scsc_resnet50, got {model!r}")


def interleaved(fns: dict, iters: int, warmup: int) -> dict:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def bench_model(repo: Path, name: str, args) -> list:
    torch.manual_seed(0)
    official = build_official(repo, name)
    randomize_norms(official, layer_norm=False)
    ours = msconv.create_model(name)
    ours.load_state_dict(msconv.convert_official(official.state_dict(), 'scsc'))
    x = torch.randn(args.batch, 3, args.size, args.size)
    official.eval(), ours.eval()
    with torch.inference_mode():
        err = (official(x) - ours(x)).abs().max().item()
        deploy = copy.deepcopy(ours).reparameterize()
        err_deploy = (official(x) - deploy(x)).abs().max().item()
    if max(err, err_deploy) > 1e-4:
        raise RuntimeError(f"{name}: outputs disagree with the official model ({err:.2e}, {err_deploy:.2e})")
    rows = []
    official_cl = copy.deepcopy(official).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    fastest = msconv.inference_model(ours)  # its layout is chosen (measured) on the first call, below

    def run_eval(m, inp=x):
        def fn():
            with torch.inference_mode():
                m(inp)

        return fn

    variants = {
        'official': run_eval(official),
        'official channels-last': run_eval(official_cl, x_cl),
        'ours (eager)': run_eval(ours),
        'ours reparameterized': run_eval(deploy),
        'ours inference_model': run_eval(fastest),
    }
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        compiled = torch.compile(deploy)
        variants['ours reparam. + compile'] = run_eval(compiled)
    t = interleaved(variants, args.iters, args.warmup)
    for k, (lo, med) in t.items():
        rows.append((name, 'eval', k, lo, med, args.batch / lo, t['official'][0] / lo, t['official'][1] / med))

    if args.train:
        y = torch.randint(0, 1000, (args.train_batch,))
        xt = torch.randn(args.train_batch, 3, args.size, args.size)
        steps = {}
        for label, model in (('official', official), ('ours', ours)):
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step(model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(xt), y).backward()
                opt.step()

            steps[label] = step
        t = interleaved(steps, args.train_iters, 1)
        for k, (lo, med) in t.items():
            rows.append(
                (name, 'train step', k, lo, med, args.train_batch / lo, t['official'][0] / lo, t['official'][1] / med)
            )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('official_repo', type=Path, help='local checkout of github.com/megvii-research/SCSC')
    p.add_argument('--models', nargs='+', default=['scsc_swin_tiny', 'scsc_resnet50'])
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--iters', type=int, default=5, help='timed rounds (each runs every variant once)')
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--train', action='store_true', help='also time training steps (fwd + bwd + AdamW)')
    p.add_argument('--train-batch', type=int, default=8)
    p.add_argument('--train-iters', type=int, default=2)
    p.add_argument('--compile', action='store_true', help='add ours reparameterized + torch.compile (inductor)')
    args = p.parse_args()
    for f in ('scsc_swin.py', 'cbtnet.py'):
        if not (args.official_repo / f).is_file():
            raise SystemExit(f"official_repo: {args.official_repo} has no {f}; pass a checkout of megvii-research/SCSC")
    torch.set_num_threads(args.threads)
    print(
        f"{machine_line(args.threads)}; fp32, batch {args.batch} at {args.size}x{args.size}, {args.iters} "
        f"interleaved rounds"
    )
    rows = []
    for name in args.models:
        rows += bench_model(args.official_repo, name, args)
    print(
        "Best (min) and median seconds per call; speed-up = official / ours for each statistic. The min is the\n"
        "least-disturbed call, the better estimate on a shared machine."
    )
    print(f"{'model':15} {'mode':10} {'variant':24} {'min s':>7} {'med s':>7} {'img/s':>6} {'x(min)':>7} {'x(med)':>7}")
    for name, mode, variant, lo, med, ips, r_lo, r_med in rows:
        print(f"{name:15} {mode:10} {variant:24} {lo:7.3f} {med:7.3f} {ips:6.2f} {r_lo:6.2f}x {r_med:6.2f}x")
    return 0


if __name__ == '__main__':
    sys.exit(main())
