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
``per_image`` image-by-image execution of a block on CPU so that its temporaries stay cache-sized (see
              ``PER_IMAGE_MIN_PIXELS``). Needs what ``inplace`` needs; see :func:`map_images` /
              :func:`image_chunks`.
``onednn``    fp32 GEMMs through oneDNN's convolution op on CPU (``msconv.layers.Linear``). Works with
              autograd; not under CPU autocast (autocast only casts the ops on its list).
``cpu_gemm``  convolutions computed as explicit GEMMs on CPU (SCSC's 1x1 convs, the im2col stem), fp32.
              Needs what ``inplace`` needs.
``triton``    msconv's Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``).
``lean``      a custom ``autograd.Function`` that saves less for backward (ShiftWise training). Eager only.
============  ===================================================================================================

:func:`use_fast_form` answers "may this kind of fast form run on ``x`` now?". Under any graph capture
(``torch.jit.trace``/``torch.jit.script``, FX symbolic tracing, ``torch.compile``/dynamo, ``torch.export`` and
both ONNX exporters) only ``folded`` forms run: the captured graph never holds a Python loop over the batch, an
in-place write that the capture cannot see, a buffer sized by a traced value or an op an exporter does not know,
so every capture gives the eager numbers at every batch size. Inside ``reference_forms()`` no fast form runs
at all (the tests compare against this, and ``msconv.profile`` counts the architecture's MACs in it).

Conditions that belong to a module's own state (eval mode, a reparameterized branch, a bias present) stay with
the module; conditions of the environment (autograd, capture, device, dtype, autocast, oneDNN switched off) are
decided here only.

TorchScript: ``use_fast_form`` returns False when scripting (the early return keeps the rest of its body out of
the script compiler), and the fast methods it guards are ``@torch.jit.unused``, so ``torch.jit.script`` compiles
only the plain forms.
"""

from contextlib import contextmanager
from typing import Callable, Iterator, Tuple

import torch

__all__ = [
    'FORMS', 'PER_IMAGE_MIN_PIXELS', 'reference_forms', 'reference_forms_enabled', 'is_capturing', 'use_fast_form',
    'map_images', 'image_chunks',
]

FORMS = ('folded', 'inplace', 'per_image', 'onednn', 'cpu_gemm', 'triton', 'lean')

#: Per-image execution (CPU, autograd off) for maps of at least this many pixels: 28x28, i.e. stages 1-2 of a
#: 224 input. Below it the batched ops' temporaries fit in cache anyway and one batched call is cheaper.
PER_IMAGE_MIN_PIXELS = 28 * 28

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
    return (torch.jit.is_tracing() or torch.compiler.is_compiling() or _fx_symbolic_tracing()
            or torch.onnx.is_in_onnx_export())


def use_fast_form(form: str, x: torch.Tensor, hw_dims: Tuple[int, int] = (2, 3)) -> bool:
    """May a fast form of kind ``form`` (one of ``FORMS``) run on input ``x`` here?

    ``hw_dims``: the dims of ``x`` holding the map's height and width ((2, 3) for NCHW, (1, 2) for channels-last
    tokens); only ``per_image`` reads them.
    """
    if torch.jit.is_scripting():
        return False
    return _use_fast_form(form, x, hw_dims)


def _use_fast_form(form: str, x: torch.Tensor, hw_dims: Tuple[int, int]) -> bool:
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
    if form == 'onednn':
        return (cpu_fp32 and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                and not torch.is_autocast_enabled('cpu'))
    if torch.is_grad_enabled():  # the remaining kinds write in place or loop without autograd
        return False
    if torch.is_autocast_enabled(x.device.type):  # mixed dtypes: an in-place write could not hold the result
        return False
    if form == 'inplace':
        return True
    if form == 'cpu_gemm':
        return cpu_fp32
    # per_image
    pixels = x.shape[hw_dims[0]] * x.shape[hw_dims[1]]
    return x.device.type == 'cpu' and x.shape[0] > 1 and pixels >= PER_IMAGE_MIN_PIXELS


def map_images(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               hw_dims: Tuple[int, int] = (2, 3)) -> torch.Tensor:
    """``fn(x)``, computed one image at a time (and concatenated) when ``use_fast_form('per_image', x, hw_dims)``;
    ``fn`` must treat images independently (eval mode)."""
    if use_fast_form('per_image', x, hw_dims):
        return torch.cat([fn(xi) for xi in x.split(1)])
    return fn(x)


def image_chunks(*tensors: torch.Tensor, hw_dims: Tuple[int, int] = (2, 3)) -> Iterator[Tuple[torch.Tensor, ...]]:
    """Views of ``tensors`` (all with the same batch size) one image at a time when
    ``use_fast_form('per_image', tensors[0], hw_dims)``, else the whole tensors once. For loops that write each
    chunk's result into a preallocated output."""
    if use_fast_form('per_image', tensors[0], hw_dims):
        return zip(*(t.split(1) for t in tensors))
    return iter((tensors,))
