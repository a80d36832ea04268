"""Start-up cost of ``import msconv`` over ``import timm`` (which it needs) and ``import torch, timm``, and of
``msconv --help``.

Each command runs in a fresh interpreter; the runs are interleaved (torch+timm, msconv, help, torch+timm, ...)
so that a busy machine slows all of them alike, and the median of ``--repeats`` runs is printed. Targets
(issue #15): ``import msconv`` at most 0.3 s above ``import torch, timm``; ``msconv --help`` under 1.5 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / 'src'
COMMANDS = {
    'import timm': [sys.executable, '-c', 'import timm'],
    'import torch, timm': [sys.executable, '-c', 'import torch, timm'],
    'import msconv': [sys.executable, '-c', 'import msconv'],
    'msconv after torch, timm': [
        sys.executable,
        '-c',
        'import time, torch, timm; t = time.perf_counter(); import msconv; print(time.perf_counter() - t)',
    ],
    'msconv --help': [sys.executable, '-m', 'msconv_cli', '--help'],
    'msconv train --help': [sys.executable, '-m', 'msconv_cli', 'train', '--help'],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=5)
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    times = {name: [] for name in COMMANDS}
    for name, cmd in COMMANDS.items():  # warm the file cache once
        subprocess.run(cmd, env=env, capture_output=True, check=True)
    for _ in range(args.repeats):
        for name, cmd in COMMANDS.items():
            t0 = time.perf_counter()
            out = subprocess.run(cmd, env=env, capture_output=True, check=True, text=True).stdout
            # the in-process figure: what `import msconv` adds once torch and timm are loaded
            times[name].append(float(out) if name == 'msconv after torch, timm' else time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in med.items():
        print(f"{name:22s} median {t:6.3f} s   (runs: {', '.join(f'{x:.2f}' for x in times[name])})")
    print(
        f"import msconv / import timm: {med['import msconv'] / med['import timm']:.2f}x "
        f"({med['import msconv'] - med['import timm']:+.3f} s)"
    )
    extra = med['import msconv'] - med['import torch, timm']
    print(
        f"import msconv - import torch, timm: {extra:+.3f} s between processes, "
        f"{med['msconv after torch, timm']:.3f} s in process (target <= 0.3 s)"
    )
    print(f"msconv --help: {med['msconv --help']:.3f} s (target < 1.5 s)")


if __name__ == '__main__':
    main()
