"""Shared helpers of the benchmark scripts: interleaved timing and loading an official repository's model file.

Ratios are what we report: both sides are timed in the same process, alternating, so machine noise hits both.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple


class Timing(NamedTuple):
    median: float  # seconds per call
    best: float  # the least disturbed call: the fairer statistic on a machine shared with other work


def machine_line(threads: int) -> str:
    """The machine a figure comes from: CPU model, the ISA extensions that decide CPU kernels, torch, threads
    (``msconv.tools._common.machine_line``, which ``msconv bench`` prints too)."""
    from msconv.tools._common import machine_line as _machine_line

    return _machine_line(threads)


def time_interleaved(
    fns: Dict[str, Callable[[], object]],
    warmup: int = 2,
    repeats: int = 7,
    clock: Callable[[], float] = time.perf_counter,
) -> Dict[str, Timing]:
    """Median and best seconds per call of each function, measured round-robin after warm-up calls (warm up at
    the timed shapes: oneDNN builds its primitives per shape). ``clock=time.process_time`` counts the process's CPU
    time instead of wall time (see :func:`clock_for`)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            samples[name].append(clock() - t0)
    return {k: Timing(statistics.median(v), min(v)) for k, v in samples.items()}


CPU_TIME_HELP = (
    "time with the process's CPU time (time.process_time) instead of wall time: with --threads 1 on a machine "
    'shared with other jobs it leaves out the time the process waited for a core (with more threads it would add '
    "the threads' times and their spin-waits)"
)


def clock_for(cpu_time: bool) -> Callable[[], float]:
    """The clock of ``--cpu-time`` (:data:`CPU_TIME_HELP`): ``time.process_time`` or wall time."""
    return time.process_time if cpu_time else time.perf_counter


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the unique storages autograd saves for backward while ``fn()`` runs its forward pass."""
    import torch

    storages: Dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def randomize_norms(model, seed: int = 0, layer_norm: bool = True) -> None:
    """Non-trivial BatchNorm2d statistics and affines (and LayerNorm affines with ``layer_norm``): speed does not
    depend on them, but the agreement checks between two implementations of a model become meaningful."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            elif layer_norm and isinstance(m, torch.nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


def import_official_file(path: Path, module_name: str, stub_modules: tuple = ()) -> types.ModuleType:
    """Import one file of an official repository (never committed here) by path.

    ``stub_modules`` are module names the file imports at top level but never uses for the model (e.g. FLOP
    counters); they are replaced by empty modules so the import succeeds.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official model file {path} not found: pass the path of a local checkout")
    for name in stub_modules:
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__getattr__ = lambda attr, _n=name: lambda *a, **k: None  # any attribute is a no-op callable
            sys.modules[name] = stub
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def print_table(rows: List[Dict[str, object]], title: str = '') -> None:
    if title:
        print(f"\n{title}")
    if not rows:
        return
    cols = list(rows[0])
    widths = [max(len(str(c)), *(len(str(r[c])) for r in rows)) for c in cols]
    print('  '.join(str(c).ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print('  '.join(str(r[c]).ljust(w) for c, w in zip(cols, widths)))
