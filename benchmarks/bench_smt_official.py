"""msconv SMT against the official implementation, measured in one run on this machine.

    python benchmarks/bench_smt_official.py --official-repo /path/to/AFeng-x/SMT [--models smt_tiny smt_small]

The official ``models/smt.py`` is imported from a local checkout (never committed here); its unused FLOP-counter
imports (ptflops, thop) are stubbed. For each model: the official model is built, its weights are loaded into
ours (checking the outputs agree), and the two are timed alternately:

* eval: official (as shipped, NCHW; and with model and input in channels-last) vs ours (training form), ours
  reparameterized and ours through ``msconv.inference_model`` (layout measured here), batch 8 at 224, fp32,
  inference_mode;
* train step: forward + cross-entropy backward + AdamW step, official vs ours (training form).

Also compares the two ways of running MHMC's four depthwise convolutions (one zero-padded 9x9 conv with SAA's
interleave folded into its rows vs four separate convs, concatenated and interleaved), which decided the form
msconv uses.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Timing, import_official_file, machine_line, print_table, time_interleaved  # noqa: E402

import msconv  # noqa: E402

OFFICIAL_FACTORY = {'smt_tiny': 'smt_t', 'smt_small': 'smt_s', 'smt_base': 'smt_b', 'smt_large': 'smt_l'}


def load_official(repo: Path):
    import timm.data.transforms as tdt

    if not hasattr(tdt, '_pil_interp'):  # removed from newer timm; only used by the official notebook helpers
        tdt._pil_interp = lambda *a, **k: None
    return import_official_file(repo / 'models' / 'smt.py', 'official_smt', stub_modules=('ptflops', 'thop'))


def _ratios(base: Timing, ours: Timing) -> str:
    return f"{base.median / ours.median:.2f}x / {base.best / ours.best:.2f}x"


def bench_mhmc(batch: int, repeats: int) -> list:
    """MHMC's 3/5/7/9 depthwise convs (4 heads) as the inference form runs them (one 9x9 conv with zero-padded
    kernels, rows already in SAA's interleaved order) against the per-head form: four convs, concatenated, then
    SAA's channel interleave as an activation copy (which the merged form folds into its weights)."""
    rows = []
    for dim, size in ((64, 56), (128, 28), (256, 14)):
        x = torch.randn(batch, size, size, dim).permute(0, 3, 1, 2)  # channels-last, as inside the model
        merged = torch.randn(dim, 1, 9, 9)
        per_head = [torch.randn(dim // 4, 1, k, k) for k in (3, 5, 7, 9)]

        def one_conv():
            return F.conv2d(x, merged, padding=4, groups=dim)

        def four_convs():
            return torch.cat(
                [F.conv2d(p, w, padding=w.shape[-1] // 2, groups=dim // 4) for p, w in zip(x.chunk(4, 1), per_head)], 1
            )

        def four_convs_interleaved():
            y = four_convs()
            return (
                y.unflatten(1, (4, dim // 4))
                .transpose(1, 2)
                .flatten(1, 2)
                .contiguous(memory_format=torch.channels_last)
            )

        with torch.inference_mode():
            t = time_interleaved(
                {'one': one_conv, 'four': four_convs, 'four_il': four_convs_interleaved}, warmup=2, repeats=repeats
            )
        rows.append(
            {
                'C': dim,
                'HxW': f'{size}x{size}',
                'one 9x9 conv ms': f"{t['one'].median * 1e3:.2f}",
                'four convs ms': f"{t['four'].median * 1e3:.2f}",
                'four convs + interleave ms': f"{t['four_il'].median * 1e3:.2f}",
                'one conv vs four + interleave (median/best)': _ratios(t['four_il'], t['one']),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--official-repo', type=Path, required=True, help='local checkout of AFeng-x/SMT')
    parser.add_argument('--models', nargs='+', default=['smt_tiny'], choices=sorted(OFFICIAL_FACTORY))
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--no-train', action='store_true', help='skip the training-step table')
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    official = load_official(args.official_repo)
    print(f"{machine_line(args.threads)}; batch {args.batch_size} at {args.img_size}, fp32")
    eval_rows, train_rows = [], []
    for name in args.models:
        torch.manual_seed(0)
        kwargs = {'use_layerscale': True} if name == 'smt_large' else {}
        theirs = getattr(official, OFFICIAL_FACTORY[name])(**kwargs).eval()
        ours = msconv.create_model(name).eval()
        ours.load_state_dict(theirs.state_dict())
        deployed = msconv.reparameterize(ours)
        fastest = msconv.inference_model(ours)  # reparameterized, its layout measured on its first call
        theirs_cl = copy.deepcopy(theirs).to(memory_format=torch.channels_last)
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            ref = theirs(x)
            err = max((m(x) - ref).abs().max().item() for m in (ours, deployed, fastest))
            t = time_interleaved(
                {
                    'official': lambda: theirs(x),
                    'official_cl': lambda: theirs_cl(x_cl),
                    'ours': lambda: ours(x),
                    'deployed': lambda: deployed(x),
                    'fastest': lambda: fastest(x),
                },
                warmup=1,
                repeats=args.repeats,
            )
        eval_rows.append(
            {
                'model': name,
                'max |diff|': f'{err:.1e}',
                'official img/s (NCHW / channels-last)': f"{args.batch_size / t['official'].median:.1f} / "
                f"{args.batch_size / t['official_cl'].median:.1f}",
                'ours img/s': f"{args.batch_size / t['ours'].median:.1f}",
                'ours reparam img/s': f"{args.batch_size / t['deployed'].median:.1f}",
                'speed-up ours (median/best)': _ratios(t['official'], t['ours']),
                'speed-up reparam (median/best)': _ratios(t['official'], t['deployed']),
                'speed-up inference_model (median/best)': _ratios(t['official'], t['fastest']),
                'inference_model vs official channels-last': _ratios(t['official_cl'], t['fastest']),
            }
        )
        if args.no_train:
            continue
        theirs.train()
        ours_t = copy.deepcopy(ours).train()
        target = torch.randint(0, 1000, (args.batch_size,))
        steps = {}
        for label, model in (('official', theirs), ('ours', ours_t)):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step(model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), target).backward()
                opt.step()

            steps[label] = step
        t = time_interleaved(steps, warmup=1, repeats=max(2, args.repeats // 2))
        train_rows.append(
            {
                'model': name,
                'official img/s': f"{args.batch_size / t['official'].median:.1f}",
                'ours img/s': f"{args.batch_size / t['ours'].median:.1f}",
                'speed-up (median/best)': _ratios(t['official'], t['ours']),
            }
        )
    print_table(eval_rows, 'Inference (eval)')
    if train_rows:
        print_table(train_rows, 'Training step (forward + backward + AdamW)')
    print_table(
        bench_mhmc(args.batch_size, args.repeats),
        'MHMC: one zero-padded 9x9 depthwise conv (interleave folded) vs four convs (+ the interleave copy)',
    )


if __name__ == '__main__':
    main()
