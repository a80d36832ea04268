"""Inference and training throughput, peak memory, params and MACs of msconv (and any timm) models.

Measuring conventions follow timm's ``benchmark.py``: random ``torch.randn`` input, ``torch.inference_mode()``
for inference, an SGD step (lr 1e-4, timm's ``create_optimizer_v2``) on cross-entropy with random targets for
training, 10 warm-up steps, ``time.perf_counter`` with ``torch.cuda.synchronize()`` on GPU, cuDNN benchmark and
TF32 matmuls on CUDA, AMP through ``torch.autocast``. Two additions:

* the timed steps are split into ``repeats`` runs and the **median** run's images/s is reported;
* models are measured **interleaved** (run 1 of every model, then run 2 of every model, ...), so a baseline
  given with ``baseline=`` / ``--vs`` sees the same machine state and the printed ratio is meaningful.

Peak memory (``*_mem_mb``) is the peak of tensor memory allocated during one step *on top of* what was live
before it (weights, input and optimizer state are not included; gradients and activations are): on CUDA from
the caching allocator's ``max_memory_allocated``, on CPU from the allocation events of ``torch.profiler``
(``profile_memory=True``).
The process RSS is not used: it includes the Python heap and never goes down.

``dtype`` (or ``reparam``) benchmarks every model, the baseline included, in its inference form, the one
``msconv.inference_model`` returns: reparameterized, weights in ``dtype``, channels-last where the autotuner measures
it faster (``channels_last=True`` forces it), optionally compiled. A timm peer gets the same treatment (eval,
timm's ``reparameterize_model``, the dtype, the layout choice, the compile), so ``--vs timm:PEER --dtype bf16`` is a
comparison at equal dtype. Training is not measured in that mode.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..inference import InferenceModel, inference_model, resolve_dtype
from ._common import build_model

__all__ = ['benchmark', 'write_csv']

AMP_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


@contextmanager
def _native_output_discarded() -> Iterator[None]:
    """Discard what C++ code prints straight to file descriptors 1 and 2 for the duration of the block.

    torch.profiler's kineto backend prints profiler start/stop lines and, on a machine without a GPU, a
    ``gpuGetDeviceCount failed`` error at every session; they say nothing about the benchmark. (The step measured
    inside has already run during the timing, so nothing of its own is lost.)"""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, 'w') as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _peak_step_memory(step: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by one call of ``step`` above what was live before it."""
    if device.type == 'cuda':
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return max(torch.cuda.max_memory_allocated(device) - before, 0)
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with _native_output_discarded(), torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == '[memory]')
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


class _Subject:
    """One model under test with its input, inference step and training step."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        *,
        batch_size: int,
        img_size: int,
        in_chans: int,
        device: torch.device,
        amp_dtype: Optional[torch.dtype],
        channels_last: bool,
        compile_backend: Optional[str],
        reparam: bool,
        train: bool,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        import copy

        from msconv.tools.profile import profile

        self.name = name
        self.channels_last = channels_last
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.device = device
        self.autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
        self.x = torch.randn(batch_size, in_chans, img_size, img_size, device=device).to(memory_format=fmt)
        self.batch_size = batch_size

        if dtype is not None:  # the inference form, as msconv.inference_model gives it (training is not measured)
            self.autocast = nullcontext  # the InferenceModel runs its own autocast (precision='autocast')
            fast = inference_model(
                model,
                dtype=amp_dtype or dtype,
                precision='autocast' if amp_dtype else 'weights',
                compile=compile_backend or False,
                channels_last=True if channels_last else 'auto',
                device=device,
            )
            self.x = self.x.to(fast.weight_dtype)  # the wrapper would cast it at every step
            # params and MACs of the inference form (counted on an fp32 meta copy)
            meta_copy = copy.deepcopy(fast.model).to('meta', torch.float32)
            stats = profile(meta_copy, input_size=(in_chans, img_size, img_size))
            self.params, self.macs = stats['params'], stats['macs']
            self.infer_model: nn.Module = fast
            self.train_model = None
            self.train_forward = None
            return
        self.infer_model = model.to(device=device, memory_format=fmt).eval()
        self.train_model = None
        if train:
            from timm.optim import create_optimizer_v2

            self.train_model = copy.deepcopy(self.infer_model).train()
            self.optimizer = create_optimizer_v2(self.train_model, opt='sgd', lr=1e-4)
            num_classes = getattr(self.train_model, 'num_classes', 1000) or 1000
            self.target = torch.randint(0, num_classes, (batch_size,), device=device)
            self.loss_fn = nn.CrossEntropyLoss()
        # params and MACs of the form that is benchmarked for inference (counted on a meta copy)
        stats = profile(self.infer_model, input_size=(in_chans, img_size, img_size), device='meta')
        self.params, self.macs = stats['params'], stats['macs']
        if compile_backend:
            torch._dynamo.reset()
            self.infer_model = torch.compile(self.infer_model, backend=compile_backend)
            if self.train_model is not None:
                self.train_compiled = torch.compile(self.train_model, backend=compile_backend)
        self.train_forward = getattr(self, 'train_compiled', self.train_model)

    @property
    def layout(self) -> str:
        """The memory format the inference model ran in ('auto' only if nothing was measured)."""
        cl = self.infer_model.channels_last if isinstance(self.infer_model, InferenceModel) else self.channels_last
        return {True: 'channels_last', False: 'contiguous'}.get(cl, str(cl))

    def infer_step(self) -> None:
        with torch.inference_mode(), self.autocast():
            self.infer_model(self.x)

    def train_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.loss_fn(self.train_forward(self.x), self.target)
        loss.backward()
        self.optimizer.step()

    def timed(self, step: Callable[[], None], iters: int) -> float:
        """Images per second over ``iters`` consecutive steps."""
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(iters):
            step()
        _sync(self.device)
        return iters * self.batch_size / (time.perf_counter() - start)


def benchmark(
    models: Sequence[Union[str, nn.Module]],
    *,
    baseline: Optional[Union[str, nn.Module]] = None,
    batch_size: Optional[int] = None,
    img_size: int = 224,
    device: Union[str, torch.device] = 'cpu',
    amp: bool = False,
    amp_dtype: Optional[str] = None,
    channels_last: bool = False,
    compile: Optional[str] = None,
    reparam: bool = False,
    dtype: Optional[Union[str, torch.dtype]] = None,
    train: bool = True,
    num_warm_iter: int = 10,
    num_bench_iter: int = 40,
    repeats: int = 5,
    model_kwargs: Optional[Dict[str, Any]] = None,
) -> List[Dict[str, Any]]:
    """Measure every model (and the ``baseline``) interleaved in one run; one result dict per model.

    Args:
        models: msconv model names, timm model names (``timm:`` prefix optional) or ``nn.Module`` instances.
        baseline: a model measured in the same run; every other row gets ``infer_ratio`` / ``train_ratio``
            (its images/s divided by the baseline's). ``None``: no ratios.
        batch_size: images per step (default: 256 on CUDA, as timm, and 16 on CPU).
        img_size: input height and width.
        device: 'cpu', 'cuda', 'cuda:1', ...
        amp: run under ``torch.autocast`` with ``amp_dtype`` (default float16 on CUDA, bfloat16 on CPU).
        channels_last: model and input in NHWC memory format.
        compile: a ``torch.compile`` backend ('inductor', 'aot_eager', ...), or None for eager.
        reparam: benchmark the inference form (``msconv.inference_model`` in fp32; training is then not measured).
        dtype: 'fp32', 'bf16' or 'fp16': benchmark every model's inference form (``msconv.inference_model``) with
            its weights in that dtype; None: fp32, and the inference form only with ``reparam``.
        train: also measure the training step.
        num_warm_iter, num_bench_iter, repeats: warm-up steps; timed steps per mode, split into ``repeats``
            runs whose median images/s is reported.
        model_kwargs: keyword arguments for building models given by name.

    Returns:
        dicts with model, device, batch_size, img_size, amp, dtype, layout (the memory format inference ran in),
        params, gmacs (per image), infer_img_s, infer_step_ms,
        infer_mem_mb, train_img_s, train_step_ms, train_mem_mb (NaN where not measured), and the ratios.
    """
    device = torch.device(device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
    if batch_size is None:
        batch_size = 256 if device.type == 'cuda' else 16
    for arg, value, low in (
        ('batch_size', batch_size, 1),
        ('img_size', img_size, 1),
        ('num_bench_iter', num_bench_iter, 1),
        ('repeats', repeats, 1),
        ('num_warm_iter', num_warm_iter, 0),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{arg} must be an int >= {low}, got {value!r}")
    if num_bench_iter < repeats:
        raise ValueError(f"num_bench_iter ({num_bench_iter}) must be at least repeats ({repeats})")
    if amp_dtype is not None and amp_dtype not in AMP_DTYPES:
        raise ValueError(f"amp_dtype must be one of {sorted(AMP_DTYPES)}, got {amp_dtype!r}")
    if not models:
        raise ValueError('models must name at least one model')
    weights_dtype = resolve_dtype(dtype) if (dtype is not None or reparam) else None
    if amp and weights_dtype not in (None, torch.float32):
        raise ValueError(
            f"amp (autocast with fp32 weights) and dtype={dtype!r} (weights in that dtype) are exclusive: pick one"
        )
    autocast_dtype = AMP_DTYPES[amp_dtype or ('float16' if device.type == 'cuda' else 'bfloat16')] if amp else None
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True

    in_chans = int((model_kwargs or {}).get('in_chans', 3))
    entries = ([baseline] if baseline is not None else []) + list(models)
    subjects = []
    for entry in entries:
        if isinstance(entry, nn.Module):
            name, model = type(entry).__name__, entry
        elif isinstance(entry, str):
            name, model = entry, build_model(entry, **(model_kwargs or {}))
        else:
            raise ValueError(f"models must be names or nn.Module instances, got {type(entry).__name__}")
        subjects.append(
            _Subject(
                name,
                model,
                batch_size=batch_size,
                img_size=img_size,
                in_chans=in_chans,
                device=device,
                amp_dtype=autocast_dtype,
                channels_last=channels_last,
                compile_backend=compile,
                reparam=reparam,
                train=train,
                dtype=weights_dtype,
            )
        )

    modes = ['infer'] + (['train'] if train and weights_dtype is None else [])
    per_run = num_bench_iter // repeats
    rates: Dict[tuple, List[float]] = {}
    for mode in modes:
        for s in subjects:
            step = getattr(s, f'{mode}_step')
            for _ in range(num_warm_iter):
                step()
            _sync(device)
        for _ in range(repeats):  # interleaved: every model's run r before any model's run r + 1
            for i, s in enumerate(subjects):
                rates.setdefault((i, mode), []).append(s.timed(getattr(s, f'{mode}_step'), per_run))

    results = []
    for i, s in enumerate(subjects):
        row: Dict[str, Any] = dict(
            model=s.name,
            device=str(device),
            batch_size=batch_size,
            img_size=img_size,
            amp=str(autocast_dtype).replace('torch.', '') if autocast_dtype else 'float32',
            dtype=str(weights_dtype or torch.float32).replace('torch.', ''),
            channels_last=channels_last,
            layout=s.layout,
            compile=compile or '',
            reparam=weights_dtype is not None,
            params_m=s.params / 1e6,
            gmacs=s.macs / 1e9,
        )
        for mode in ('infer', 'train'):
            if mode in modes:
                rate = statistics.median(rates[(i, mode)])
                row[f'{mode}_img_s'] = rate
                row[f'{mode}_step_ms'] = 1000.0 * batch_size / rate
                if mode == 'train':  # gradients count as step memory (on CPU and CUDA alike)
                    s.optimizer.zero_grad(set_to_none=True)
                row[f'{mode}_mem_mb'] = _peak_step_memory(getattr(s, f'{mode}_step'), device) / 2**20
            else:
                row[f'{mode}_img_s'] = row[f'{mode}_step_ms'] = row[f'{mode}_mem_mb'] = math.nan
        results.append(row)
    if baseline is not None:
        base = results[0]
        base['baseline'] = True
        for row in results:
            for mode in ('infer', 'train'):
                row[f'{mode}_ratio'] = row[f'{mode}_img_s'] / base[f'{mode}_img_s'] if mode in modes else math.nan
    return results


def write_csv(results: Sequence[Dict[str, Any]], path: str) -> None:
    import csv

    if not results:
        raise ValueError('results is empty: nothing to write')
    fields: List[str] = []
    for row in results:
        fields += [k for k in row if k not in fields]
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(results)
