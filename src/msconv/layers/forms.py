"""Which form of an operator runs here: the one place that decides.

Every msconv operator and block keeps exactly one plain form, ``forward_reference``: batched, out of place,
made of standard PyTorch ops, the same maths as the official code. Beside it they may have fast forms, each of
one of these kinds:

============  ===================================================================================================
``folded``    an exact reformulation of the weights made at call time (e.g. MHMC's heads as one zero-padded
              depthwise conv, ShiftWise's BNs folded into a cross kernel in eval). Capture-safe: it runs
              everywhere except inside ``reference_forms()``.
``inplace``   the same ops writing into tensors the module just created (GELU, residual adds, products).
              Needs autograd off (``torch.no_grad``/``inference_mode``) and no autocast (mixed dtypes).
``per_image`` image-by-image execution of a block on CPU so that its temporaries stay cache-sized. Needs
              what ``inplace`` needs; see ``msconv.layers.fast_ops.map_images``.
``onednn``    fp32 GEMMs through oneDNN's convolution op on CPU (``msconv.layers.Linear``). Works with
              autograd; not under CPU autocast (autocast only casts the ops on its list).
``cpu_gemm``  convolutions computed as explicit GEMMs on CPU (SCSC's 1x1 convs, the im2col stem), fp32.
              Needs what ``inplace`` needs.
``triton``    msconv's Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``).
``lean``      a custom ``autograd.Function`` that saves less for backward (ShiftWise training). Eager only.
``fused``     a oneDNN convolution with the activation after it applied as a post-op
              (``torch.ops.mkldnn._convolution_pointwise``): no separate pass over the output. CPU fp32/bf16,
              oneDNN enabled; needs what ``inplace`` needs (the op has no autograd formula).
============  ===================================================================================================

:func:`use_fast_form` answers "may this kind of fast form run on ``x`` now?". Under any graph capture
(``torch.jit.trace``/``torch.jit.script``, FX symbolic tracing, ``torch.compile``/dynamo, ``torch.export`` and
both ONNX exporters) only ``folded`` forms run: the captured graph never holds a Python loop over the batch, an
in-place write that the capture cannot see, a buffer sized by a traced value or an op an exporter does not know,
so every capture gives the eager numbers at every batch size. Inside ``reference_forms()`` no fast form runs
at all (the tests compare against this, and ``msconv.profile`` counts the architecture's MACs in it).

Where several exact forms are allowed and the fastest depends on the machine (BLAS or oneDNN GEMM, image by
image or batched, a convolution or an explicit GEMM), :func:`tuned` measures them on the running machine the
first time it meets an operation and shape in eager inference, keeps the fastest (in memory, and on disk under
``MSCONV_CACHE_DIR`` when set) and runs it from then on. It never measures under a graph capture or with autograd
on (the plain form runs there). A timing taken while an inner operation was itself being measured is discarded and
taken again, and long runs are timed fewer times (see ``_measure``). ``MSCONV_AUTOTUNE=0`` gives the plain forms
everywhere; :func:`forced_choices` pins a choice (tests, benchmarks); :func:`autotune_choices` lists what was
chosen.

Conditions that belong to a module's own state (eval mode, a reparameterized branch, a bias present) stay with
the module; conditions of the environment (autograd, capture, device, dtype, autocast, oneDNN switched off) are
decided here only.

TorchScript: ``use_fast_form`` returns False when scripting (the early return keeps the rest of its body out of
the script compiler), and the fast methods it guards are ``@torch.jit.unused``, so ``torch.jit.script`` compiles
only the plain forms.
"""

import json
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from ._fold import channels_last_only

__all__ = [
    'FORMS',
    'reference_forms',
    'reference_forms_enabled',
    'is_capturing',
    'use_fast_form',
    'tuned',
    'forced_choices',
    'autotune_choices',
    'autotune_enabled',
]

FORMS = ('folded', 'inplace', 'per_image', 'onednn', 'cpu_gemm', 'triton', 'lean', 'fused')

_REFERENCE = False


def reference_forms_enabled() -> bool:
    return _REFERENCE


@contextmanager
def reference_forms(enabled: bool = True) -> Iterator[None]:
    """Run every msconv operator in its plain ``forward_reference`` form inside the block (no fast form of any
    kind, including the folded ones)."""
    global _REFERENCE
    previous, _REFERENCE = _REFERENCE, enabled
    try:
        yield
    finally:
        _REFERENCE = previous


def _fx_symbolic_tracing() -> bool:
    from torch.fx._symbolic_trace import _get_is_fx_tracing  # the flag itself; the public getter warns

    return _get_is_fx_tracing()


def is_capturing() -> bool:
    """True while a graph capture is recording: TorchScript tracing or scripting, FX symbolic tracing,
    ``torch.compile``/dynamo, ``torch.export`` (strict or not) and ONNX export (either exporter)."""
    if torch.jit.is_scripting():
        return True
    return (
        torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or _fx_symbolic_tracing()
        or torch.onnx.is_in_onnx_export()
    )


def use_fast_form(form: str, x: torch.Tensor) -> bool:
    """May a fast form of kind ``form`` (one of ``FORMS``) run on input ``x`` here? (Whether it is also faster is
    for :func:`tuned` to measure.)"""
    if torch.jit.is_scripting():
        return False
    return _use_fast_form(form, x)


def _use_fast_form(form: str, x: torch.Tensor) -> bool:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if _REFERENCE:
        return False
    if form == 'folded':
        return True
    if is_capturing():  # before any look at x: under FX it is a Proxy, under export its sizes are symbols
        return False
    if form == 'lean':
        return True
    if form == 'triton':
        from ..kernels.depthwise import triton_available

        return x.dtype in (torch.float32, torch.float16, torch.bfloat16) and triton_available(x.device)
    cpu_fp32 = x.device.type == 'cpu' and x.dtype == torch.float32
    onednn_on = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    if form == 'onednn':
        return cpu_fp32 and onednn_on and not torch.is_autocast_enabled('cpu')
    if torch.is_grad_enabled():  # the remaining kinds write in place or loop without autograd
        return False
    if torch.is_autocast_enabled(x.device.type):  # mixed dtypes: an in-place write could not hold the result
        return False
    if form == 'inplace':
        return True
    if form == 'cpu_gemm':
        return cpu_fp32
    if form == 'fused':
        return (
            x.device.type == 'cpu'
            and x.dtype in (torch.float32, torch.bfloat16)
            and onednn_on
            and hasattr(torch.ops.mkldnn, '_convolution_pointwise')
        )
    # per_image
    return x.device.type == 'cpu' and x.shape[0] > 1


# ---- the autotuner ---------------------------------------------------------------------------------------------

_CHOICES: Dict[str, str] = {}
_FORCED: Dict[str, str] = {}
_DISK: Optional[Dict[str, str]] = None


def autotune_enabled() -> bool:
    """False when ``MSCONV_AUTOTUNE`` is ``0`` (or ``false``/``off``): every tuned operation runs its plain form."""
    return os.environ.get('MSCONV_AUTOTUNE', '1').strip().lower() not in ('0', 'false', 'off', 'no')


@contextmanager
def forced_choices(**choices: str) -> Iterator[None]:
    """Pin the form of tuned operations inside the block, e.g. ``forced_choices(linear='onednn')``; an operation
    name maps to one of its candidates' names (an unknown candidate raises when the operation runs)."""
    previous = dict(_FORCED)
    _FORCED.update(choices)
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(previous)


def autotune_choices() -> Dict[str, str]:
    """What the autotuner chose in this process: ``'op|shape|dtype|device|threads|extra' -> candidate``."""
    return dict(_CHOICES)


def _machine() -> str:
    model = ''
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                model = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model or 'unknown cpu'} | torch {torch.__version__}"


def _cache_file() -> Optional[Path]:
    folder = os.environ.get('MSCONV_CACHE_DIR')
    return Path(folder) / 'autotune.json' if folder else None


def _disk() -> Dict[str, str]:
    global _DISK
    if _DISK is None:
        _DISK = {}
        path = _cache_file()
        if path is not None and path.is_file():
            try:
                _DISK = dict(json.loads(path.read_text()).get(_machine(), {}))
            except (OSError, ValueError, AttributeError):
                _DISK = {}  # an unreadable cache is measured again and rewritten
    return _DISK


def _store(key: str, choice: str) -> None:
    path = _cache_file()
    if path is None:
        return
    _disk()[key] = choice
    try:
        everything = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(everything, dict):
            everything = {}
    except (OSError, ValueError):
        everything = {}
    everything[_machine()] = dict(_disk())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    tmp.write_text(json.dumps(everything, indent=1, sort_keys=True))
    os.replace(tmp, path)


#: Seconds of repeated timing rounds one measurement may spend after its first clean round (see ``_measure``).
_ROUNDS_BUDGET_S = 2.0
#: How many measurements this process has started (nested ones included): a candidate's run during which this
#: changed also measured an inner operation, so its time is not the form's own.
_MEASUREMENTS = 0


def _measure(candidates: Dict[str, Callable[[], torch.Tensor]], rounds: int = 3) -> Tuple[str, torch.Tensor]:
    """Time every candidate up to ``rounds`` times, interleaved; the one with the lowest median wins. Returns its name
    and its last output (so that the calling op's result is the winner's, as on every later call).

    Two rules keep this honest and bounded when candidates are large (a whole model, a big batch):

    * a run during which another operation was measured (an inner tuned operation met for the first time, as when
      ``inference_model`` times whole models) is not a timing of the form and is run again;
    * the rounds after the first clean one are kept within ``_ROUNDS_BUDGET_S`` seconds: candidates whose runs take
      long are timed fewer times (at least once), where one run is long enough for the OS's noise to matter little.
    """
    times: Dict[str, list] = {name: [] for name in candidates}
    outputs: Dict[str, torch.Tensor] = {}
    wanted = rounds
    for _ in range(rounds + 2):  # each nested measurement costs a candidate one extra run, at most twice
        for name, fn in candidates.items():
            if len(times[name]) >= wanted:
                continue
            measurements = _MEASUREMENTS
            start = time.perf_counter()
            out = fn()
            if out.device.type == 'cuda':
                torch.cuda.synchronize(out.device)
            elapsed = time.perf_counter() - start
            outputs[name] = out
            if _MEASUREMENTS == measurements:
                times[name].append(elapsed)
        if all(times.values()):
            one_round = sum(min(t) for t in times.values())
            wanted = max(1, min(rounds, 1 + int(_ROUNDS_BUDGET_S / max(one_round, 1e-9))))
            if all(len(t) >= wanted for t in times.values()):
                break
    timed = [name for name in candidates if times[name]] or list(candidates)
    best = min(timed, key=lambda n: statistics.median(times[n]) if times[n] else float('inf'))
    return best, outputs[best]


def _dispatch_mode_active() -> bool:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None


def tuned(op: str, x: torch.Tensor, candidates: Dict[str, Callable[[], torch.Tensor]], extra: str = '') -> torch.Tensor:
    """The result of the fastest of ``candidates`` (forms computing the same thing, the first one the plain form) for
    operation ``op`` on input ``x``: measured on the first call for this (op, shape, dtype, device, threads,
    ``extra``) in eager inference, then reused. The plain form runs with autograd on, under a capture and inside a
    dispatch mode (so a ``FlopCounterMode`` counts the same operations whether or not a choice is cached); a
    ``forced_choices`` pin wins everywhere. Candidates must not write into ``x``."""
    forced = _FORCED.get(op)
    if forced is not None:
        if forced not in candidates:
            raise ValueError(f"forced_choices: {op!r} has the forms {list(candidates)}, got {forced!r}")
        return candidates[forced]()
    plain = next(iter(candidates))
    if not autotune_enabled() or torch.is_grad_enabled() or is_capturing():
        return candidates[plain]()
    if _dispatch_mode_active():  # e.g. a FlopCounterMode: it counts the plain form, whatever a cache holds
        return candidates[plain]()
    layout = 'cl' if channels_last_only(x) else ('c' if x.is_contiguous() else 's')
    key = (
        f"{op}|{tuple(x.shape)}|{layout}|{str(x.dtype).replace('torch.', '')}|{x.device.type}|"
        f"{torch.get_num_threads()}|{extra}"
    )
    choice = _CHOICES.get(key) or _disk().get(key)
    if choice in candidates:
        _CHOICES[key] = choice
        return candidates[choice]()
    global _MEASUREMENTS
    _MEASUREMENTS += 1
    choice, out = _measure(candidates)
    _CHOICES[key] = choice
    _store(key, choice)
    return out
