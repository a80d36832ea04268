"""Training step: msconv against the official code (same weights) and shiftwise_tiny against timm's convnext_tiny.

    python benchmarks/bench_train.py --smt-repo /path/to/AFeng-x/SMT --scsc-repo /path/to/megvii-research/SCSC
        [--pairs smt scsc_swin scsc_resnet shiftwise] [--threads 2] [--batch 8] [--size 224] [--repeats 7] [--bf16]

One step = forward + cross-entropy + backward + SGD (momentum 0.9) step, train mode, drop path 0, fp32. The official
model files are imported from local checkouts at run time (never part of msconv); a pair whose checkout is not given
is skipped. For each official pair the official model is built with its own init, its BatchNorm statistics and
affines are randomised, its weights are loaded into ours through ``msconv.convert_official`` and the eval outputs
and the train-mode loss are checked to agree before anything is timed. shiftwise_tiny's peer is timm's
convnext_tiny (random weights), compared per multiply-accumulate: the MACs of the architectures (reparameterized,
plain forms, ``torch.utils.flop_counter``).

Timing: after the warm-up steps the two models alternate step by step (one round = one step of each), so load from
other processes hits both alike; per round the ratio theirs / ours is taken from the two adjacent steps, and the
table gives the median of those ratios and their range, with the median step times. Saved bytes: the unique
storages autograd saves for backward during one forward and loss (``torch.autograd.graph.saved_tensors_hooks``,
parameters included, each storage counted once), ours over theirs.

``--bf16`` adds a table of our own step under ``torch.autocast('cpu', torch.bfloat16)`` against the same step in
fp32 (interleaved likewise): the speed-up of mixed precision on this CPU.

``--micro`` runs the same pairs on tiny configurations (the smoke test): SMT and Swin+SCSC at the sizes of the
official fixtures, CBTNet with depths 1-1-1-1, test_shiftwise against timm's test_convnext.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, print_table, randomize_norms, saved_bytes  # noqa: E402

import msconv  # noqa: E402
from msconv.layers import reference_forms  # noqa: E402

PAIRS = ('smt', 'scsc_swin', 'scsc_resnet', 'shiftwise')


class Pair(NamedTuple):
    label: str
    ours: nn.Module
    theirs: nn.Module
    num_classes: int
    per_mac: bool  # compared per multiply-accumulate (a peer of another architecture)


# ---- the models -----------------------------------------------------------------------------------------------------


def _smt_pair(repo: Path, micro: bool) -> Pair:
    from bench_smt_official import load_official

    official = load_official(repo)
    torch.manual_seed(0)
    if micro:
        kwargs = dict(embed_dims=[16, 32, 64, 128], depths=[1, 1, 2, 1], mlp_ratios=[2, 2, 2, 2], num_classes=10)
        theirs = official.SMT(
            ca_num_heads=[4, 4, 4, -1], sa_num_heads=[-1, -1, 8, 16], qkv_bias=True, ca_attentions=[1, 1, 1, 0],
            head_conv=3, expand_ratio=2, **kwargs,
        )  # fmt: skip
        ours = msconv.create_model('test_smt', num_classes=10)
    else:
        theirs = official.smt_t(drop_path_rate=0.0)
        ours = msconv.create_model('smt_tiny', drop_path_rate=0.0)
    randomize_norms(theirs)
    ours.load_state_dict(msconv.convert_official(theirs.state_dict(), 'smt'))
    return Pair('smt_tiny vs official SMT-T' if not micro else 'test_smt vs official SMT', ours, theirs,
                10 if micro else 1000, False)  # fmt: skip


def _scsc_module(repo: Path, file: str):
    from bench_scsc_official import _import

    return _import(repo / file, f'_official_{file[:-3]}')


def _scsc_swin_pair(repo: Path, micro: bool, size: int) -> Pair:
    official = _scsc_module(repo, 'scsc_swin.py')
    torch.manual_seed(0)
    if micro:
        theirs = official.SCSC_Swin(img_size=size, embed_dim=24, depths=[1, 1, 2, 1], num_classes=10,
                                    drop_path_rate=0.0)  # fmt: skip
        ours = msconv.create_model('test_scsc_swin', drop_path_rate=0.0)
    else:
        theirs = official.SCSC_Swin(img_size=size, drop_path_rate=0.0)
        ours = msconv.create_model('scsc_swin_tiny', drop_path_rate=0.0)
    randomize_norms(theirs)
    ours.load_state_dict(msconv.convert_official(theirs.state_dict(), 'scsc'))
    label = 'scsc_swin_tiny vs official Swin-T+SCSC' if not micro else 'test_scsc_swin vs official SCSC_Swin'
    return Pair(label, ours, theirs, 10 if micro else 1000, False)


def _scsc_resnet_pair(repo: Path, micro: bool) -> Pair:
    official = _scsc_module(repo, 'cbtnet.py')
    torch.manual_seed(0)
    depths = (1, 1, 1, 1) if micro else (3, 5, 12, 3)
    classes = 10 if micro else 1000
    theirs = official.CBTNet(official.CNN_Trans_block, list(depths), num_classes=classes)
    for block in theirs.modules():
        if hasattr(block, 'routing_fc') and not hasattr(block, 'patch_sizes'):
            block.patch_sizes = [None] * len(block.layers)  # the attribute the released forward reads (never set)
    ours = msconv.create_model('scsc_resnet50', depths=depths, num_classes=classes, drop_path_rate=0.0)
    randomize_norms(theirs)
    ours.load_state_dict(msconv.convert_official(theirs.state_dict(), 'scsc'))
    label = 'scsc_resnet50 vs official CBTNet-50' if not micro else 'scsc_resnet (1-1-1-1) vs official CBTNet'
    return Pair(label, ours, theirs, classes, False)


def _shiftwise_pair(micro: bool) -> Pair:
    import timm

    torch.manual_seed(0)
    if micro:
        ours = msconv.create_model('test_shiftwise', num_classes=10)
        theirs = timm.create_model('test_convnext', num_classes=10)
    else:
        ours, theirs = msconv.create_model('shiftwise_tiny'), timm.create_model('convnext_tiny')
    randomize_norms(ours)
    label = 'shiftwise_tiny vs timm convnext_tiny' if not micro else 'test_shiftwise vs timm test_convnext'
    return Pair(label, ours, theirs, 10 if micro else 1000, True)


def _gmacs(model: nn.Module, size: int) -> float:
    """Multiply-accumulates of one image through the architecture (reparameterized, plain forms)."""
    model = copy.deepcopy(model).eval()
    if hasattr(model, 'reparameterize'):
        model = msconv.reparameterize(model)
    with FlopCounterMode(display=False) as counter, torch.inference_mode(), reference_forms():
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 2e9


# ---- the measurements -----------------------------------------------------------------------------------------------


def _check_agreement(pair: Pair, x: torch.Tensor, y: torch.Tensor) -> str:
    """Same weights: eval logits and the train-mode loss agree (else the comparison would be meaningless)."""
    if pair.per_mac:
        return '-'
    ours, theirs = pair.ours, pair.theirs
    with torch.no_grad():
        ours.eval(), theirs.eval()
        err = (ours(x[:2]) - theirs(x[:2])).abs().max().item()
        a, b = copy.deepcopy(ours).train(), copy.deepcopy(theirs).train()
        loss_err = abs(F.cross_entropy(a(x), y).item() - F.cross_entropy(b(x), y).item())
    if err > 1e-3 or loss_err > 1e-3:
        raise RuntimeError(f"{pair.label}: ours and theirs disagree (eval logits {err:.2e}, train loss {loss_err:.2e})")
    return f'{max(err, loss_err):.0e}'


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool = False) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast('cpu', torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def _alternate(fns: Dict[str, Callable[[], None]], warmup: int, repeats: int) -> Dict[str, List[float]]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(repeats):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]  # neither side always runs first
        for k in order:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def _ratio_stats(num: List[float], den: List[float]) -> Tuple[float, float, float]:
    ratios = [a / b for a, b in zip(num, den)]
    return statistics.median(ratios), min(ratios), max(ratios)


def bench_pair(pair: Pair, args, size: int) -> Tuple[Dict[str, str], Optional[Dict[str, str]]]:
    torch.manual_seed(1)
    x = torch.randn(args.batch, 3, size, size)
    y = torch.randint(0, pair.num_classes, (args.batch,))
    agree = _check_agreement(pair, x, y)
    ours, theirs = pair.ours.train(), pair.theirs.train()

    def loss_of(m: nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: F.cross_entropy(m(x), y)

    saved_ours, saved_theirs = saved_bytes(loss_of(ours)), saved_bytes(loss_of(theirs))
    t = _alternate({'theirs': _step_fn(theirs, x, y), 'ours': _step_fn(ours, x, y)}, args.warmup, args.repeats)
    med, lo, hi = _ratio_stats(t['theirs'], t['ours'])
    row = {
        'pair': pair.label,
        'theirs ms': f"{1e3 * statistics.median(t['theirs']):.0f}",
        'ours ms': f"{1e3 * statistics.median(t['ours']):.0f}",
        'step ratio theirs/ours (median, range)': f'{med:.2f}x ({lo:.2f}-{hi:.2f})',
        'saved MiB ours/theirs': f'{saved_ours / 2**20:.0f}/{saved_theirs / 2**20:.0f}',
        'saved ratio ours/theirs': f'{saved_ours / saved_theirs:.2f}',
        'agree': agree,
    }
    if pair.per_mac:
        mac_ours, mac_theirs = _gmacs(ours, size), _gmacs(theirs, size)
        row['per MAC (ours/theirs efficiency)'] = (
            f'{med * mac_ours / mac_theirs:.2f} (GMACs {mac_ours:.3g}/{mac_theirs:.3g})'
        )
    else:
        row['per MAC (ours/theirs efficiency)'] = '-'
    amp_row = None
    if args.bf16:
        fp32_model, amp_model = ours, copy.deepcopy(ours)
        t = _alternate(
            {'fp32': _step_fn(fp32_model, x, y), 'bf16': _step_fn(amp_model, x, y, amp=True)}, args.warmup, args.repeats
        )
        med, lo, hi = _ratio_stats(t['fp32'], t['bf16'])
        amp_row = {
            'model': pair.label.split(' vs ')[0],
            'fp32 ms': f"{1e3 * statistics.median(t['fp32']):.0f}",
            'bf16 autocast ms': f"{1e3 * statistics.median(t['bf16']):.0f}",
            'bf16 speed-up (median, range)': f'{med:.2f}x ({lo:.2f}-{hi:.2f})',
            'saved MiB fp32/bf16': f"{saved_ours / 2**20:.0f}/{_amp_saved(amp_model, x, y) / 2**20:.0f}",
        }
    return row, amp_row


def _amp_saved(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    def run() -> torch.Tensor:
        with torch.autocast('cpu', torch.bfloat16):
            return F.cross_entropy(model(x), y)

    return saved_bytes(run)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--smt-repo', type=Path, help='local checkout of github.com/AFeng-x/SMT (for the smt pair)')
    p.add_argument('--scsc-repo', type=Path, help='local checkout of github.com/megvii-research/SCSC (scsc pairs)')
    p.add_argument('--pairs', nargs='+', default=list(PAIRS), choices=PAIRS)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--repeats', type=int, default=7, help='timed rounds (one step of each model per round)')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps of each model first')
    p.add_argument('--bf16', action='store_true', help='also time our step under bf16 autocast against fp32')
    p.add_argument('--micro', action='store_true', help='tiny configurations (smoke test)')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = 64 if args.micro else args.size
    print(f"{machine_line(args.threads)}; fp32, batch {args.batch} at {size}, SGD momentum, train mode, drop path 0")
    rows, amp_rows = [], []
    for name in args.pairs:
        repo = args.smt_repo if name == 'smt' else args.scsc_repo
        if name != 'shiftwise' and repo is None:
            print(f"{name}: skipped (pass --{'smt' if name == 'smt' else 'scsc'}-repo, a local checkout)")
            continue
        if name == 'smt':
            pair = _smt_pair(repo, args.micro)
        elif name == 'scsc_swin':
            pair = _scsc_swin_pair(repo, args.micro, size)
        elif name == 'scsc_resnet':
            pair = _scsc_resnet_pair(repo, args.micro)
        else:
            pair = _shiftwise_pair(args.micro)
        row, amp_row = bench_pair(pair, args, size)
        print('  '.join(row.values()), flush=True)  # progress
        rows.append(row)
        if amp_row is not None:
            print('  '.join(amp_row.values()), flush=True)
            amp_rows.append(amp_row)
        del pair
        gc.collect()
    print_table(
        rows,
        f"Training step (fwd + bwd + SGD), {args.repeats} alternating rounds after {args.warmup} warm-up steps; "
        "ratio > 1: ours faster; saved ratio < 1: ours saves less",
    )
    if amp_rows:
        print_table(amp_rows, 'Our training step, bf16 autocast against fp32 (> 1: bf16 faster)')
    print(machine_line(args.threads))
    return 0


if __name__ == '__main__':
    sys.exit(main())
