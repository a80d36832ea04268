"""`msconv train MODEL --data PATH|digits ...`: thin wrapper over ``msconv.train``.

The flags below are the options every task shares, parsed without importing torch (``--help`` stays fast). A
task's own options come from its config (``msconv.engine``; ``msconv tasks`` lists them): the arguments left over
are parsed against them once the engine is loaded.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal

HELP = 'train a model: timm recipe, per-family presets, crash-safe checkpoints, --resume, torchrun'
EPILOG = (
    "Each task adds its own options (e.g. a detector's --arch): `msconv tasks` lists the tasks, their presets and "
    "options; any option can also be set with --set NAME=VALUE."
)
# `msconv train` takes the arguments its parser does not know: the options of the tasks (see the module docstring)
TAKES_TASK_OPTIONS = True

# flag -> config field; value None means "not given" so that YAML values stay.
_FLAGS = [
    ('--data', 'data', str, "'digits' (bundled MNIST) or an ImageFolder root with train/ and val/"),
    (
        '--preset',
        'preset',
        str,
        "the recipe to start from (default: the task's own; classification: 'imagenet', the family's official "
        "recipe; 'demo': small and fast; see docs/guides/recipes.md and `msconv tasks`)",
    ),
    ('--task', 'task', str, "the training task (default 'classification', or the preset's task; `msconv tasks`)"),
    ('--epochs', 'epochs', int, 'training epochs'),
    ('--max-steps', 'max_steps', int, 'stop after this many optimizer steps'),
    ('--batch-size', 'batch_size', int, 'global batch per micro-step (split over torchrun processes)'),
    ('--accum-steps', 'accum_steps', int, 'gradient accumulation micro-steps per optimizer step'),
    ('--lr', 'lr', float, 'peak learning rate per lr_base_size images'),
    ('--weight-decay', 'weight_decay', float, 'AdamW weight decay'),
    ('--warmup-epochs', 'warmup_epochs', float, 'linear warm-up length in epochs'),
    ('--drop-path', 'drop_path', float, 'stochastic depth rate'),
    ('--image-size', 'image_size', int, 'training/eval image side (default: the model\'s)'),
    ('--workers', 'num_workers', int, 'data loader worker processes'),
    ('--device', 'device', str, "'auto', 'cpu', 'cuda', 'cuda:N'"),
    ('--output', 'output', str, 'folder holding run folders (default runs/)'),
    ('--name', 'name', str, 'run folder name (default MODEL-DATA)'),
    ('--resume', 'resume', str, "'auto' (the run's newest good checkpoint) or a checkpoint/run folder"),
    ('--init-checkpoint', 'init_checkpoint', str, 'start from these weights (official or msconv)'),
    ('--ckpt-every', 'ckpt_every', int, 'optimizer steps between checkpoints (0: epoch ends only)'),
    ('--keep-last', 'keep_last', int, 'checkpoints kept'),
    ('--nan-policy', 'nan_policy', str, "on a NaN/inf loss: 'abort' (default) or 'skip' the step"),
    ('--seed', 'seed', int, 'random seed'),
    (
        '--dist-timeout',
        'dist_timeout',
        float,
        'torchrun: seconds any process waits for the others before the job fails (default: $MSCONV_DIST_TIMEOUT, '
        'else 1800)',
    ),
    ('--log-every', 'log_every', int, 'optimizer steps between metric records (and progress lines off a terminal)'),
    ('--amp-dtype', 'amp_dtype', str, "'float16' (fp16 + GradScaler; needs CUDA, fp32 on CPU), 'bfloat16' or 'auto'"),
    (
        '--per-gpu-batch',
        'per_gpu_batch',
        int,
        'images per process per micro-step (the official per-GPU batch: BatchNorm statistics); gradient '
        'accumulation makes up the global batch (batch-size x accum-steps), the LR follows the global batch',
    ),
]
_BOOLS = [
    ('amp', 'mixed precision (--amp-dtype; the presets: fp16 + GradScaler for SMT/SCSC, off for ShiftWise)'),
    ('keep_best', "keep the best evaluation's weights in checkpoints/best-<step> (default on)"),
    ('ema', 'model EMA (timm ModelEmaV3)'),
    ('channels_last', 'channels_last memory format'),
    ('sync_bn', 'SyncBatchNorm under torchrun'),
    ('progress', 'progress bar (a live bar on a terminal, complete lines every --log-every steps otherwise)'),
    (
        'tensorboard',
        'TensorBoard scalars (losses, lr, img/s, evaluation metrics) in RUN/tensorboard, written by rank 0; '
        'needs msconv[tensorboard]',
    ),
    (
        'compile',
        "torch.compile the training forward (timm's --torchcompile); evaluation and checkpoints use the plain model",
    ),
    (
        'grad_checkpointing',
        "recompute the backbone's stage activations in the backward pass (classifiers, face and dense backbones): "
        'less memory, the same gradients, about a third more compute',
    ),
    (
        'overwrite',
        "start afresh in a run folder that holds a run (with --resume auto: only when it has no valid "
        "checkpoint); without it a new run never writes into another run's folder",
    ),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument('model', help="model name, e.g. smt_tiny (see `msconv list`), or any timm model")
    parser.add_argument('--config', '-c', default=None, help='YAML file of config options (flags override it)')
    for flag, dest, typ, hlp in _FLAGS:
        parser.add_argument(flag, dest=dest, type=typ, default=None, help=hlp)
    for dest, hlp in _BOOLS:
        parser.add_argument(
            f"--{dest.replace('_', '-')}", dest=dest, action=argparse.BooleanOptionalAction, default=None, help=hlp
        )
    parser.add_argument(
        '--print-config',
        action='store_true',
        help='print the resolved config (preset < --config < flags) as YAML, with what its preset is based on; exit',
    )
    parser.add_argument(
        '--set',
        dest='set_values',
        action='append',
        default=[],
        metavar='KEY=VALUE',
        help='any other config option, VALUE parsed as YAML (e.g. --set mixup=0.2)',
    )


def collect_overrides(args: argparse.Namespace) -> dict:
    """The config options given on the command line: the shared flags, ``--set`` and, once the engine is loaded,
    the tasks' own flags (``args.task_args``: the arguments the parser left over)."""
    import yaml  # deferred: only a run parses values (`msconv train --help` loads no YAML parser)

    overrides = {'model': args.model}
    for _, dest, _, _ in _FLAGS:
        overrides[dest] = getattr(args, dest)
    for dest, _ in _BOOLS:
        overrides[dest] = getattr(args, dest)
    overrides.update(task_options(getattr(args, 'task_args', None) or []))
    overrides = {k: v for k, v in overrides.items() if v is not None}  # flags not given
    for item in args.set_values:  # a value, null included (--set clip_grad=null: no clipping)
        if '=' not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split('=', 1)
        try:
            overrides[key.strip().replace('-', '_')] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from e
    return overrides


def task_options(argv: list) -> dict:
    """The options of the tasks given as flags in ``argv`` (each task's config declares its flags)."""
    from msconv.engine.config import task_flags  # deferred: the tasks' flags are known once the engine is loaded

    if not argv:
        return {}
    parser = argparse.ArgumentParser(prog='msconv train', add_help=False, exit_on_error=False)
    for flag, dest, kwargs in task_flags():
        parser.add_argument(flag, dest=dest, default=None, **kwargs)
    try:
        ns, rest = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise ValueError(str(e)) from e
    if rest:
        raise ValueError(f"unrecognized arguments: {' '.join(rest)} (`msconv tasks` lists the options of each task)")
    return {k: v for k, v in vars(ns).items() if v is not None}


def resume_command(argv: list, run_dir: str) -> str:
    """The command that continues this run: the same arguments with ``--resume auto`` and the run folder spelt
    out (``--output``/``--name``), without ``--overwrite``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ('--resume', '--output', '--name'):
            skip = True
            continue
        if a.startswith(('--resume=', '--output=', '--name=')) or a in ('--overwrite', '--no-overwrite'):
            continue
        out.append(a)
    run_dir = os.path.normpath(run_dir)
    out += ['--output', os.path.dirname(run_dir) or '.', '--name', os.path.basename(run_dir), '--resume', 'auto']
    return shlex.join(['msconv'] + out)


def run(args: argparse.Namespace) -> int:
    from msconv.engine import train  # deferred: the engine loads torch (`msconv train --help` does not)

    if getattr(args, 'print_config', False):
        # deferred: as train above
        from msconv.engine.config import config_yaml, resolve_config
        from msconv.engine.recipes import preset_info

        cfg = resolve_config(args.config, collect_overrides(args))
        info = preset_info(cfg.model, cfg.preset, getattr(cfg, 'arch', None))
        kind = 'official recipe' if info['official'] else 'NOT an official recipe'
        print(f"# preset {cfg.preset!r} for {cfg.model}: {kind}; based on {info['based_on']}")
        print(config_yaml(cfg), end='')
        return 0
    result = train(args.config, **collect_overrides(args))
    interrupted = result['status'] == 'interrupted'
    code = (143 if result.get('signal') == signal.SIGTERM else 130) if interrupted else 0
    if int(os.environ.get('RANK', '0')) != 0:
        return code  # rank 0 prints; every rank's exit status says what happened
    if interrupted:
        argv = getattr(args, 'argv', None) or ['train', args.model]
        print(
            f"interrupted; checkpoint {result['checkpoint']}. Continue with:\n  "
            f"{resume_command(argv, result['run_dir'])}"
        )
        return code
    line = f"done: {result['steps']} steps, run folder {result['run_dir']}"
    last, best = result.get('last'), result.get('best')
    if last is not None:
        line += f", val top-1 last {last['top1']:.2f}% (epoch {last['epoch']:.2f})"
        if best is not None:
            line += f", best {best['top1']:.2f}% (epoch {best['epoch']:.2f})"
    elif result.get('top1') is not None:
        line += f", val top-1 {result['top1']:.2f}%"
    for key, value in result.get('headline', {}).items():  # the task's headline metrics
        line += f", {key} {value:.3f}"
    print(line)
    if result.get('curves'):
        print(f"curves: {result['curves']}")
    return 0
