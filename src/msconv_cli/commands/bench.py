"""`msconv bench MODEL [MODEL...]`: inference/training throughput, peak memory, params and MACs.

``msconv bench smt_tiny --vs timm:convnext_tiny --dtype bf16``: both in inference form (``msconv.inference_model``)
with bf16 weights, interleaved in one run; the ratio and the machine line are printed."""

from __future__ import annotations

import argparse

HELP = 'measure inference and training throughput (img/s), peak memory, params and MACs; --vs adds a baseline'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        'models', nargs='+', metavar='MODEL', help='msconv model names, or timm models (optionally prefixed timm:)'
    )
    parser.add_argument(
        '--vs',
        metavar='MODEL',
        default=None,
        help='baseline measured in the same run, interleaved; ratios are printed (e.g. timm:convnext_tiny)',
    )
    parser.add_argument(
        '--dtype',
        choices=['fp32', 'bf16', 'fp16'],
        default=None,
        help='benchmark the inference form (msconv.inference_model) of every model, the --vs baseline included, '
        'with its weights in this dtype; training is not measured',
    )
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    parser.add_argument('--batch-size', type=int, default=None, help='images per step (default 256 on CUDA, 16 on CPU)')
    parser.add_argument('--img-size', type=int, default=224, help='input height and width (default 224)')
    parser.add_argument('--device', default=None, help='cpu, cuda, cuda:1, ... (default: cuda if available)')
    parser.add_argument('--amp', action='store_true', help='mixed precision with torch.autocast')
    parser.add_argument(
        '--amp-dtype',
        choices=['float16', 'bfloat16'],
        default=None,
        help='autocast dtype (default float16 on CUDA, bfloat16 on CPU)',
    )
    parser.add_argument(
        '--channels-last',
        action='store_true',
        help='NHWC memory format for model and input (with --dtype/--reparam: forced, instead of measured)',
    )
    parser.add_argument(
        '--compile',
        nargs='?',
        const='inductor',
        default=None,
        metavar='BACKEND',
        help='torch.compile the models (backend, default inductor)',
    )
    parser.add_argument(
        '--reparam',
        action='store_true',
        help='benchmark the inference form (msconv.inference_model, fp32 unless --amp); training is not measured',
    )
    parser.add_argument('--no-train', action='store_true', help='measure inference only')
    parser.add_argument('--num-warm-iter', type=int, default=10, help='warm-up steps per model and mode (default 10)')
    parser.add_argument('--num-bench-iter', type=int, default=40, help='timed steps per model and mode (default 40)')
    parser.add_argument(
        '--repeats',
        type=int,
        default=5,
        help='the timed steps are split into this many runs; the median run is reported (default 5)',
    )
    parser.add_argument('--csv', default=None, metavar='PATH', help='also write the results to this CSV file')
    parser.add_argument(
        '--dense',
        nargs='+',
        metavar='ARCH',
        default=None,
        help='dense systems on each MODEL backbone (mask_rcnn cascade_mask_rcnn retinanet upernet) at the papers\' '
        'input sizes, beside torchvision\'s Mask R-CNN / RetinaNet R50-FPN (batch 1; --num-bench-iter steps)',
    )


def _fmt(value: float, spec: str) -> str:
    return '-' if value != value else format(value, spec)  # NaN (not measured) -> '-'


def _ratio(value: float) -> str:
    return '-' if value != value else f"{value:.2f}x"  # NaN (nothing timed) -> '-'


def run(args: argparse.Namespace) -> int:
    import torch  # deferred: msconv loads torch (`msconv --help` and argument errors do not)

    if args.dense:  # the dense systems: msconv.tools.dense_bench
        from msconv.tools.dense_bench import bench_dense, format_dense_bench  # deferred: as torch above

        rows = bench_dense(
            [f"{m}:{a}" for m in args.models for a in args.dense],
            batch_size=args.batch_size or 1,
            device=args.device or ('cuda' if torch.cuda.is_available() else 'cpu'),
            train=not args.no_train,
            num_warm_iter=min(args.num_warm_iter, 1),
            num_bench_iter=args.num_bench_iter,
        )
        print(format_dense_bench(rows))
        return 0

    # deferred: as torch above
    from msconv.tools._common import machine_line
    from msconv.tools._table import print_table
    from msconv.tools.bench import benchmark, write_csv

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    results = benchmark(
        args.models,
        baseline=args.vs,
        batch_size=args.batch_size,
        img_size=args.img_size,
        device=device,
        amp=args.amp,
        amp_dtype=args.amp_dtype,
        channels_last=args.channels_last,
        compile=args.compile,
        reparam=args.reparam,
        dtype=args.dtype,
        train=not args.no_train,
        num_warm_iter=args.num_warm_iter,
        num_bench_iter=args.num_bench_iter,
        repeats=args.repeats,
    )
    r0 = results[0]
    inference_form = r0['reparam']
    precision = f"{r0['dtype']} weights" + (f", {r0['amp']} autocast" if args.amp else '')
    title = (
        f"{r0['device']}, batch {r0['batch_size']}, {r0['img_size']}px, {precision}"
        f"{', channels_last' if args.channels_last else ''}{', compile=' + args.compile if args.compile else ''}"
        f"{', inference form (msconv.inference_model)' if inference_form else ''}; "
        f"median of {args.repeats} interleaved runs"
    )
    train = not args.no_train
    columns = ['model', 'params (M)', 'GMACs', 'infer img/s', 'infer mem (MB)']
    columns += ['train img/s', 'train mem (MB)'] if train else []
    if inference_form:
        columns.insert(1, 'layout')
    if args.vs:
        columns += ['infer vs base'] + (['train vs base'] if train else [])
    rows = []
    for r in results:
        row = [
            r['model'] + (' (baseline)' if r.get('baseline') else ''),
            f"{r['params_m']:.2f}",
            f"{r['gmacs']:.3f}",
            _fmt(r['infer_img_s'], '.1f'),
            _fmt(r['infer_mem_mb'], '.1f'),
        ]
        row += [_fmt(r['train_img_s'], '.1f'), _fmt(r['train_mem_mb'], '.1f')] if train else []
        if inference_form:
            row.insert(1, r['layout'])
        if args.vs:
            row += [_ratio(r['infer_ratio'])] + ([_ratio(r['train_ratio'])] if train else [])
        rows.append(row)
    print_table(title, columns, rows, left=(0, 1) if inference_form else None)
    print(f"machine: {machine_line()}")
    if args.csv:
        write_csv(results, args.csv)
        print(f"results written to {args.csv}")
    return 0
