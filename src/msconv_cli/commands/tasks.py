"""`msconv tasks [TASK]`: the training tasks, the presets each takes and its own options (with their
``msconv train`` flags); printing only, the facts come from each task's class and config."""

from __future__ import annotations

import argparse
import dataclasses

HELP = 'list the training tasks: their presets and own options (the flags msconv train takes for them)'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('task', nargs='?', default=None, help='one task (default: every registered task)')


def run(args: argparse.Namespace) -> int:
    # deferred: the engine loads torch (`msconv --help` and argument errors do not)
    from msconv.engine.config import PRESETS, own_options, preset_task
    from msconv.engine.registry import TASKS, task_class

    for name in [args.task] if args.task else list(TASKS):
        cls = task_class(name)
        title = ' '.join((cls.__doc__ or '').split()).split('. ')[0].split(': ')[0].rstrip('.')
        own = [p for p in PRESETS if preset_task(p) == name]
        shared = [] if cls.own_presets_only else [p for p in PRESETS if preset_task(p) is None]
        print(f"{name}: {title}")
        print(f"  presets: {', '.join(own + shared) or 'none'} (default: {cls.default_preset or 'none'})")
        print('  options (msconv train --set NAME=VALUE, or the flag):')
        for f in own_options(cls.config_class):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            flag = (
                f"  [{f.metadata['flag']}{' ...' if f.metadata.get('repeat') else ''}]"
                if f.metadata.get('flag')
                else ''
            )
            choices = f" ({' | '.join(map(str, f.metadata['choices']))})" if f.metadata.get('choices') else ''
            print(f"    {f.name} = {default!r}{flag}  {f.metadata.get('help', '')}{choices}")
        print()
    return 0
