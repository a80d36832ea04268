"""bf16 inference against fp32, for every msconv model: ``msconv.inference_model`` with fp32 weights, with bf16
weights, and with fp32 weights under ``torch.autocast('cpu', torch.bfloat16)``, timed interleaved in one process.

The speed issue asks bf16 to be at least 1.5x faster than fp32 on a CPU with AMX and never slower elsewhere; this
prints, per model, the two bf16 speed-ups (fp32 time / bf16 time, median and best of the alternating calls) and the
largest logit difference from fp32 relative to the largest fp32 logit, with the machine line (CPU model, ISA
extensions, torch, threads), so the claim can be checked on the machine at hand.

    python benchmarks/bench_bf16.py                       # every model, batch 8 at 224, 2 threads
    python benchmarks/bench_bf16.py smt_tiny shiftwise_tiny --batch 4 --repeats 5
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CPU_TIME_HELP, clock_for, machine_line, print_table, time_interleaved  # noqa: E402

import msconv  # noqa: E402

FORMS = {
    'fp32': dict(dtype='fp32'),
    'bf16 weights': dict(dtype='bf16', precision='weights'),
    'bf16 autocast': dict(dtype='bf16', precision='autocast'),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('models', nargs='*', help='msconv model names (default: every registered full-size model)')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--repeats', type=int, default=5, help='timed calls per form (alternating)')
    p.add_argument('--cpu-time', action='store_true', help=CPU_TIME_HELP)
    p.add_argument('--warmup', type=int, default=1, help='untimed calls per form after the first one')
    args = p.parse_args(argv)
    names = args.models or [n for n in msconv.list_models() if not n.startswith('test_')]
    unknown = sorted(set(names) - set(msconv.list_models()))
    if unknown:
        p.error(f"models must be msconv model names (msconv.list_models()), got {unknown}")

    torch.set_num_threads(args.threads)
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = msconv.create_model(name).eval()
        size = model.pretrained_cfg.get('input_size', (3, 224, 224))
        x = torch.randn(args.batch, *size)
        forms = {label: msconv.inference_model(model, **kw) for label, kw in FORMS.items()}
        with torch.inference_mode():
            outs = {label: m(x).float() for label, m in forms.items()}  # layouts and the autotuner decided here
            t = time_interleaved(
                {label: (lambda m=m: m(x)) for label, m in forms.items()},
                args.warmup,
                args.repeats,
                clock_for(args.cpu_time),
            )
        scale = outs['fp32'].abs().max().item()
        row = dict(model=name, input=f"{args.batch}x{size[1]}", fp32_ms=f"{1000 * t['fp32'].median:.0f}")
        for label in ('bf16 weights', 'bf16 autocast'):
            key = label.split()[1]
            row[f'{key}_ms'] = f"{1000 * t[label].median:.0f}"
            row[f'{key}_speedup'] = f"{t['fp32'].median / t[label].median:.2f}x / {t['fp32'].best / t[label].best:.2f}x"
            row[f'{key}_err'] = f"{(outs[label] - outs['fp32']).abs().max().item() / scale:.2%}"
        rows.append(row)
        print('  '.join(rows[-1].values()), flush=True)  # progress
        del model, forms, outs
        gc.collect()
    print_table(
        rows,
        f"bf16 vs fp32, msconv.inference_model, speed-up = fp32 time / bf16 time (median / best of {args.repeats} "
        "alternating calls; > 1: bf16 faster); err = max |logit - fp32 logit| / max |fp32 logit|",
    )
    print(machine_line(args.threads))


if __name__ == '__main__':
    main()
