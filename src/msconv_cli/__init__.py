"""The `msconv` command line: argument parsing and printing only.

Each sub-command lives in ``msconv_cli/commands/<name>.py`` and defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; the work itself is a library function users can call
from Python. A command with ``TAKES_TASK_OPTIONS = True`` (``msconv train``) gets the arguments its parser does not
know in ``args.task_args``: the options each training task declares, parsed once the engine is loaded. This package
sits beside ``msconv`` (not inside it) because ``import msconv`` registers the models
in timm and so imports torch; ``msconv --help`` and argument errors import neither.

User errors (bad paths, bad values, malformed YAML, unreadable or foreign checkpoints, bad data, an optional
dependency that is not installed: the line names the extra) and failures of the file system (full, read-only, gone)
or of another process of a torchrun job are printed as one line on stderr with exit status 2; ``--debug`` shows the
traceback instead. Ctrl-C exits with 130, SIGTERM with 143 (under torchrun: every process, whichever received the
signal).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import List, Optional

from . import commands

__all__ = ['build_parser', 'main', 'user_error_message']


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='msconv', description='Multi-scale convolution backbones: SMT, SCSC, ShiftwiseConv.'
    )
    parser.add_argument('--debug', action='store_true', help='show the full traceback of an error')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith('_'):
            continue
        module = importlib.import_module(f'{commands.__name__}.{info.name}')
        name = getattr(module, 'NAME', info.name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.add_argument(
            '--debug', action='store_true', default=argparse.SUPPRESS, help='show the full traceback of an error'
        )
        p.set_defaults(_run=module.run, _takes_task_options=getattr(module, 'TAKES_TASK_OPTIONS', False))
    return parser


def user_error_message(e: BaseException) -> Optional[str]:
    """The one-line message for an error caused by the user's input, or None for anything else (a bug)."""
    import pickle  # deferred: only an error needs it (`msconv --help` loads nothing it does not need)

    if isinstance(e, pickle.UnpicklingError):
        return (
            f"a file could not be unpickled ({e}); it is corrupt or not a torch checkpoint / pickle "
            f"(use --debug to see which call read it)"
        )
    if isinstance(e, (ValueError, OSError, FloatingPointError)):
        return str(e) or type(e).__name__
    if isinstance(e, ImportError):  # an optional dependency that is not installed: name its extra
        from msconv._extras import MissingExtraError, extra_for_missing_module  # deferred: msconv loads torch

        return str(e) if isinstance(e, MissingExtraError) else extra_for_missing_module(e)
    if type(e).__name__ == 'JobFailure':  # msconv.engine.distributed: another process of a torchrun job failed
        return str(e)
    if any(c.__name__ == 'DistError' and c.__module__.startswith('torch') for c in type(e).__mro__):
        # torchrun: a collective timed out or another process vanished (torch's message runs over many lines)
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        return f"another process of the job stopped answering or failed ({type(e).__name__}: {first[:300]})"
    if type(e).__module__.split('.')[0] == 'yaml':  # a YAML error that reached here without its file name
        return f"malformed YAML: {e}"
    return None


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    # a command that takes the tasks' own options (`msconv train`) parses the arguments left over once it runs
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, '_takes_task_options', False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.task_args = extra
    if not hasattr(args, '_run'):
        parser.print_help()
        return 2
    args.argv = argv
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"msconv {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = user_error_message(e)
        if message is None or args.debug:
            raise
        print(f"msconv {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
