"""`msconv export MODEL --checkpoint ... --format onnx`: the inference form as ONNX with a dynamic batch size."""

from __future__ import annotations

import argparse

HELP = 'export the inference (re-parameterized) form of a model to ONNX, dynamic batch, checked in onnxruntime'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('model', metavar='MODEL', help='msconv model name, or a timm model (optionally prefixed timm:)')
    parser.add_argument('--checkpoint', default=None, help='official or msconv checkpoint (.pth/.safetensors)')
    parser.add_argument('--trust-pickle', action='store_true', help='allow a checkpoint that needs full unpickling')
    parser.add_argument('--format', default='onnx', choices=['onnx'], help='export format (onnx)')
    parser.add_argument('--out', default=None, help='output file (default MODEL.onnx)')
    parser.add_argument('--img-size', type=int, default=None, help="input height and width (default: the model's cfg)")
    parser.add_argument('--num-classes', type=int, default=None, help='classifier size (default: the model default)')
    parser.add_argument(
        '--exporter',
        default='dynamo',
        choices=['dynamo', 'torchscript'],
        help='torch.export-based exporter (default) or the legacy TorchScript tracer',
    )
    parser.add_argument('--opset', type=int, default=None, help='ONNX opset (default: the exporter default)')
    parser.add_argument('--no-reparam', action='store_true', help='export the training form as is')
    parser.add_argument('--no-check', action='store_true', help='skip the onnxruntime comparison with PyTorch')


def run(args: argparse.Namespace) -> int:
    # deferred: msconv loads torch (`msconv --help` and argument errors do not)
    from msconv.tools._common import build_model
    from msconv.tools.export import _onnx_summary, export_onnx, export_onnx_checked

    kwargs = {} if args.num_classes is None else {'num_classes': args.num_classes}
    model = build_model(args.model, args.checkpoint, trust_pickle=args.trust_pickle, **kwargs)
    c, h, w = (getattr(model, 'pretrained_cfg', None) or {}).get('input_size', (3, 224, 224))
    if args.img_size is not None:
        if args.img_size < 1:
            raise ValueError(f"--img-size must be positive, got {args.img_size}")
        h = w = args.img_size
    out = args.out or f"{args.model.replace('timm:', '').replace('/', '_')}.onnx"
    export_kwargs = dict(exporter=args.exporter, opset=args.opset, reparam=not args.no_reparam)
    if args.no_check:
        export_onnx(model, out, (c, h, w), **export_kwargs)
    else:  # written to a temporary file, renamed into place only once onnxruntime reproduces the model
        diffs = export_onnx_checked(model, out, (c, h, w), batch_sizes=(1, 3), **export_kwargs)
    info = _onnx_summary(out)
    print(
        f"wrote {out}: opset {info['opset']}, input {info['input_shape']}, {info['nodes']} nodes"
        f"{'' if args.no_reparam else ', inference (re-parameterized) form'}"
    )
    if not args.no_check:
        print(
            'onnxruntime vs PyTorch, max relative difference: '
            + ', '.join(f"batch {b}: {d:.1e}" for b, d in diffs.items())
        )
    return 0
