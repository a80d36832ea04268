"""One call for the fastest inference model: :func:`inference_model`.

``msconv.inference_model(model, dtype='bf16')`` returns an :class:`InferenceModel`: a copy of ``model`` in eval mode
and in its inference form (the model's own ``reparameterize()`` if it has one, then timm's ``reparameterize_model``
on its sub-modules, as ``msconv.reparameterize`` does: BatchNorms folded, parallel branches merged; a no-op for
plain timm models), with

* its weights in ``dtype`` (``precision='weights'``, the default) or fp32 weights run under ``torch.autocast``
  (``precision='autocast'``). Measured on a 2-core AMD EPYC VM (AVX-512-BF16, no AMX), reparameterized models, batch
  8 at 224, 2 threads: bf16 weights 170 ms vs autocast 175 ms for smt_tiny, 292 ms vs 301 ms for scsc_swin_tiny
  (fp32: 342 and 573 ms; see ``docs/speed.md``); they are as fast or faster and halve the weights' memory, so they
  are the default;
* channels-last memory where it measures faster: with ``channels_last='auto'`` the first call where the autotuner
  can measure (``msconv.layers.forms.can_measure()``: eager, ``MSCONV_AUTOTUNE`` not ``0``, not in
  ``reference_forms()`` or a ``FlopCounterMode``) times both layouts on the real input through the autotuner
  (``msconv.layers.forms.tuned``, keyed by the architecture's name, its parameter count and the precision, and by
  the input's shape, dtype and device and the thread count, so models of one architecture and size share the
  measurement; cached in memory and under ``MSCONV_CACHE_DIR``; a ``forced_choices`` pin decides instead) and keeps
  the faster layout from then on; calls before that run the default layout and decide nothing; ``True``/``False``
  force a layout;
* optionally ``torch.compile`` (after the layout is chosen, on the first call).

The wrapper's ``forward`` runs without autograd, casts the input to the weights' device, dtype and layout, and
returns the model's output as computed (bf16 logits for bf16 weights: call ``.float()`` where fp32 is needed).
Other attributes (``pretrained_cfg``, ``num_classes``, ``forward_features`` ...) are those of the wrapped model.
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from .layers import forms

__all__ = ['inference_model', 'InferenceModel', 'resolve_dtype', 'DTYPES', 'PRECISIONS']

DTYPES = {
    'fp32': torch.float32,
    'float32': torch.float32,
    'bf16': torch.bfloat16,
    'bfloat16': torch.bfloat16,
    'fp16': torch.float16,
    'float16': torch.float16,
}
PRECISIONS = ('weights', 'autocast')
_LAYOUTS = (True, False, 'auto')


def resolve_dtype(dtype: Union[None, str, torch.dtype], name: str = 'dtype') -> torch.dtype:
    """``None`` -> float32; 'fp32'/'bf16'/'fp16' (or 'float32'/'bfloat16'/'float16') or one of those torch dtypes."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"{name} must be None, one of {sorted(DTYPES)} or torch.float32/bfloat16/float16, got {dtype!r}")


def _model_tag(model: nn.Module) -> str:
    """What the autotuner's layout choice is keyed by besides the input: the architecture and its size."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    arch = cfg.get('architecture') or type(model).__name__
    return f"{arch}|{sum(p.numel() for p in model.parameters())}"


class InferenceModel(nn.Module):
    """A model prepared for inference by :func:`inference_model` (the wrapped model is ``.model``)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        dtype: torch.dtype,
        precision: str,
        channels_last: Union[bool, str],
        compile: Union[bool, str],
    ) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.precision = precision if dtype != torch.float32 else 'weights'
        self.channels_last = channels_last  # True/False once decided, 'auto' until the first eager call decides
        self.compile_backend = ('inductor' if compile is True else compile) or None
        self._compiled: Optional[nn.Module] = None
        self.eval()

    def train(self, mode: bool = True) -> 'InferenceModel':
        if mode:
            raise ValueError('an InferenceModel runs in eval mode only: train the original model')
        return super().train(False)

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.dtype if self.precision == 'weights' else torch.float32

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__('model'), name)

    def extra_repr(self) -> str:
        return (
            f"dtype={str(self.dtype).replace('torch.', '')}, precision={self.precision!r}, "
            f"channels_last={self.channels_last!r}, compile={self.compile_backend!r}"
        )

    def _input(self, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else x.device
        dtype = self.weight_dtype if x.is_floating_point() else None
        x = x.to(device=device, dtype=dtype)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return x

    def _run(self, model: nn.Module, x: torch.Tensor) -> Any:
        if self.precision == 'autocast':
            with torch.autocast(x.device.type, dtype=self.dtype):
                return model(x)
        return model(x)

    def _choose_layout(self, x: torch.Tensor) -> Any:
        """Run ``x`` through the faster layout (measured once, by the autotuner) and keep that layout."""
        other: Optional[nn.Module] = None
        outputs = {}

        def contiguous() -> Any:
            outputs['contiguous'] = self._run(self.model, self._input(x, False))
            return outputs['contiguous']

        def channels_last() -> Any:
            nonlocal other
            if other is None:
                other = copy.deepcopy(self.model).to(memory_format=torch.channels_last)
            outputs['channels_last'] = self._run(other, self._input(x, True))
            return outputs['channels_last']

        candidates = {'contiguous': contiguous, 'channels_last': channels_last}
        tag = f"{_model_tag(self.model)}|{self.precision}"
        out = forms.tuned('inference_model.memory_format', self._input(x, False), candidates, extra=tag)
        if out is outputs.get('channels_last'):
            self.model = other
            self.channels_last = True
        else:
            self.channels_last = False
        return out

    def forward(self, x: torch.Tensor) -> Any:
        with torch.no_grad():
            if self.channels_last == 'auto':
                if x.dim() != 4 or not forms.can_measure():
                    return self._run(self.model, self._input(x, False))  # nothing measured, nothing decided
                return self._choose_layout(x)
            x = self._input(x, bool(self.channels_last))
            if self.compile_backend is None:
                return self._run(self.model, x)
            if self._compiled is None:  # kept out of the submodules: state_dict() holds the weights once
                object.__setattr__(self, '_compiled', torch.compile(self.model, backend=self.compile_backend))
            return self._run(self._compiled, x)


def inference_model(
    model: nn.Module,
    dtype: Union[None, str, torch.dtype] = None,
    compile: Union[bool, str] = False,
    channels_last: Union[bool, str] = 'auto',
    device: Union[None, str, torch.device] = None,
    precision: str = 'weights',
) -> InferenceModel:
    """The fastest inference form of ``model`` (msconv or any timm / torch model): see the module docstring.

    Args:
        model: an ``nn.Module``; it is not modified (a copy is converted).
        dtype: None or 'fp32' (float32), 'bf16', 'fp16', or the torch dtype.
        compile: False, True (``torch.compile`` with inductor) or a ``torch.compile`` backend name.
        channels_last: 'auto' (the faster layout, measured on the first eager call), True or False.
        device: where the model runs (default: where its parameters are).
        precision: 'weights' (weights cast to ``dtype``) or 'autocast' (fp32 weights under ``torch.autocast``);
            ignored for fp32.
    """
    from .models import reparameterize

    if isinstance(model, InferenceModel):
        raise ValueError('model is already an InferenceModel: pass the original model to inference_model')
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    dt = resolve_dtype(dtype)
    if not (isinstance(compile, bool) or (isinstance(compile, str) and compile)):
        raise ValueError(f"compile must be True, False or a torch.compile backend name, got {compile!r}")
    if isinstance(compile, str) and compile not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(
            f"compile must be True, False or a torch.compile backend name "
            f"({', '.join(torch._dynamo.list_backends(exclude_tags=()))}), got {compile!r}"
        )
    if not any(channels_last is v for v in _LAYOUTS) and channels_last != 'auto':
        raise ValueError(f"channels_last must be True, False or 'auto', got {channels_last!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from e
        if device.type == 'cuda' and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available")

    net = copy.deepcopy(model)
    if callable(getattr(net, 'reparameterize', None)):  # the model's own (MsconvModel's calls timm's, as below)
        net.reparameterize()
    net = reparameterize(net, inplace=True).eval()  # every sub-module's reparameterize()/fuse(), timm's way
    weight_dtype = dt if precision == 'weights' else torch.float32
    net = net.to(device=device, dtype=weight_dtype) if device is not None else net.to(dtype=weight_dtype)
    if channels_last is True:
        net = net.to(memory_format=torch.channels_last)
    return InferenceModel(net, dtype=dt, precision=precision, channels_last=channels_last, compile=compile)
