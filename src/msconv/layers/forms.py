"""Which form of an operator runs here: the one place that decides.

Every msconv operator and block keeps exactly one plain form, ``forward_reference``: batched, out of place,
made of standard PyTorch ops, the same maths as the official code. Beside it they may have fast forms. Two tables
below declare them once: :data:`FORM_KINDS`, the kinds of fast form and what each needs of the environment, and
:data:`TUNED`, the operations whose fastest form is measured, with their candidate forms (the plain one first) and
what each candidate needs.

:func:`use_fast_form` answers "may this kind of fast form run on ``x`` now?" from :data:`FORM_KINDS`. Under any
graph capture (``torch.jit.trace``/``torch.jit.script``, FX symbolic tracing, ``torch.compile``/dynamo,
``torch.export`` and both ONNX exporters) only ``folded`` forms run: the captured graph never holds a Python loop
over the batch, an in-place write that the capture cannot see, a buffer sized by a traced value or an op an exporter
does not know, so every capture gives the eager numbers at every batch size. Inside ``reference_forms()`` no fast
form runs at all (the tests compare against this, and ``msconv.profile`` counts the architecture's MACs in it).

Where several exact forms are allowed and the fastest depends on the machine (BLAS or oneDNN GEMM, image by
image or batched, a convolution or an explicit GEMM), :func:`tuned` runs the candidates of a :data:`TUNED` operation
that the gate allows here, measures them on the running machine the first time it meets the operation and its key
(the input's shape, layout, dtype, device and the thread count; the operands' sizes; for a whole block or stage its
:func:`structure_signature`) in eager inference, keeps the fastest (in memory, and on disk under ``MSCONV_CACHE_DIR``
when set) and runs it from then on. It never measures under a graph capture or with autograd on (the plain form
runs there). A timing taken while an inner operation was itself being measured is discarded and taken again, and
long runs are timed fewer times (see ``_measure``). A training operation (:func:`tuned_training`) also counts the
bytes each form keeps for backward: a form within :func:`memory_slack` (3%) of the fastest one's time that keeps
fewer bytes is kept instead. :func:`forced_choices` pins a choice (tests, benchmarks);
:func:`autotune_choices` lists what was chosen.

Results that do not depend on timing: the forms a tuned operation chooses between compute the same maths with
other roundings, so two processes whose measurements came out differently can differ in the last bits.
``MSCONV_AUTOTUNE=0`` runs the plain form of every tuned operation (no measuring): the same machine, torch build
and thread count then give bit-identical results in every process. ``forced_choices`` pins forms inside one
process; ``MSCONV_CACHE_DIR`` holding an ``autotune.json`` written by an earlier run makes later processes reuse
its choices (an operation or shape missing from the file is still measured).

Conditions that belong to a module's own state (eval mode, a reparameterized branch, a bias present, its weights'
dtype) stay with the module; conditions of the environment (capture, ``reference_forms()``, autograd, autocast,
device, the input's dtype and memory layout, oneDNN and Triton switched off) are asked here only: through
:func:`use_fast_form` for a kind, or :func:`tunable` for a tuned operation.

TorchScript: ``use_fast_form`` returns False when scripting (the early return keeps the rest of its body out of
the script compiler), and the fast methods it guards are ``@torch.jit.unused``, so ``torch.jit.script`` compiles
only the plain forms.
"""

import copy
import hashlib
import json
import os
import statistics
import sys
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from torch.fx._symbolic_trace import _get_is_fx_tracing  # the flag itself; the public getter warns

from ._fold import channels_last_only

__all__ = [
    'FORMS',
    'FORM_KINDS',
    'TUNED',
    'FormKind',
    'TunedOp',
    'reference_forms',
    'reference_forms_enabled',
    'is_capturing',
    'use_fast_form',
    'tunable',
    'tuned',
    'tuned_training',
    'structure_signature',
    'forced_choices',
    'autotune_choices',
    'restore_autotune_choices',
    'autotune_enabled',
    'can_measure',
    'memory_slack',
    'autocast_dtype',
]


# ---- the kinds of fast form ---------------------------------------------------------------------------------------


def _triton_ok(x: torch.Tensor) -> bool:
    """Triton available for the device"""
    from ..kernels.depthwise import triton_available  # kernels sit below layers; imported where first needed

    return triton_available(x.device)


def _onednn_pointwise_op_ok(x: torch.Tensor) -> bool:
    """torch's oneDNN pointwise-conv op"""
    return hasattr(torch.ops.mkldnn, '_convolution_pointwise')


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast runs GEMMs and convolutions in on ``x``'s device, or None where autocast is off there
    (what a training or inference form that computes in the autocast dtype itself needs to know)."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def _bf16_autocast(x: torch.Tensor) -> bool:
    """bf16 autocast on the input's device"""
    return autocast_dtype(x) == torch.bfloat16


@dataclass(frozen=True)
class FormKind:
    """A kind of fast form and what it needs of the environment (besides: not inside ``reference_forms()``)."""

    name: str
    what: str
    under_capture: bool = False  #: may run while a graph capture records (only exact weight reformulations)
    autograd: bool = True  #: may run while autograd records
    autocast: bool = True  #: may run under autocast on the input's device
    device: Optional[str] = None  #: the input's device type, if one only
    dtypes: Optional[Tuple[torch.dtype, ...]] = None  #: the input's dtypes, if some only
    onednn: bool = False  #: needs oneDNN available and enabled (``torch.backends.mkldnn``)
    min_batch: int = 1  #: at least this many images
    available: Optional[Callable[[torch.Tensor], bool]] = None  #: e.g. Triton importable for the input's device

    def needs(self) -> str:
        """What this kind needs, in words (the docs' table)."""
        parts = [] if self.under_capture else ['no capture']
        parts += [] if self.autograd else ['no autograd']
        parts += [] if self.autocast else ['no autocast']
        parts += [f'{self.device.upper()}'] if self.device else []
        parts += ['/'.join(str(d).replace('torch.', '') for d in self.dtypes)] if self.dtypes else []
        parts += ['oneDNN'] if self.onednn else []
        parts += [f'batch >= {self.min_batch}'] if self.min_batch > 1 else []
        parts += [self.available.__doc__ or self.available.__name__] if self.available else []  # what it checks
        return ', '.join(parts) or 'nothing'


_FP32 = (torch.float32,)

#: Every kind of fast form, declared once: what it is and what it needs. ``use_fast_form`` reads nothing else.
FORM_KINDS: Dict[str, FormKind] = {
    k.name: k
    for k in (
        FormKind(
            'folded',
            "an exact reformulation of the weights made at call time (MHMC's heads as one zero-padded depthwise conv, "
            "ShiftWise's BNs, paths and identity as two strip convs in eval)",
            under_capture=True,
        ),
        FormKind(
            'inplace',
            'the same ops writing into tensors the module just created (GELU, residual adds, products)',
            autograd=False,
            autocast=False,
        ),
        FormKind(
            'per_image',
            'a block run image by image on CPU so that its temporaries stay cache-sized',
            autograd=False,
            autocast=False,
            device='cpu',
            min_batch=2,
        ),
        FormKind(
            'onednn',
            "fp32 GEMMs through oneDNN's convolution op (``msconv.layers.Linear``); works with autograd",
            autocast=False,
            device='cpu',
            dtypes=_FP32,
            onednn=True,
        ),
        FormKind(
            'cpu_gemm',
            "convolutions computed as explicit GEMMs (SCSC's 1x1 convs, the im2col stem)",
            autograd=False,
            autocast=False,
            device='cpu',
            dtypes=_FP32,
        ),
        FormKind(
            'triton',
            "msconv's Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``); ``MSCONV_DISABLE_TRITON=1`` "
            'switches them off',
            dtypes=(torch.float32, torch.float16, torch.bfloat16),
            available=_triton_ok,
        ),
        FormKind('lean', "a custom autograd function that saves less for backward (ShiftWise training)"),
        FormKind(
            'train_gemm',
            '1x1 convolutions of a training step as batched GEMMs on the (B, C, H*W) view (autograd through '
            '``bmm``/``baddbmm``)',
            device='cpu',
            dtypes=(torch.float32, torch.bfloat16),
        ),
        FormKind(
            'fp32_tail',
            'a bf16/fp16 elementwise tail computed in fp32 (reduced-precision operands widened as they are read) and '
            "rounded to the input's dtype once at its end, where the plain form rounds after every op: within the "
            "plain form's own rounding, and ATen's reduced-precision elementwise loops over strided views are slow",
            autograd=False,
            autocast=False,
            dtypes=(torch.bfloat16, torch.float16),
        ),
        FormKind(
            'fused',
            'a oneDNN convolution with the GELU after it as a post-op (``torch.ops.mkldnn._convolution_pointwise``): '
            'no second pass over the output; the op has no autograd formula',
            autograd=False,
            autocast=False,
            device='cpu',
            dtypes=(torch.float32, torch.bfloat16),
            onednn=True,
            available=_onednn_pointwise_op_ok,
        ),
        FormKind(
            'lean_recompute',
            'a custom autograd function for a whole training block that saves the inputs of its GEMMs and '
            'convolutions and recomputes the BatchNorm/GELU/routing passes between them in backward (SCSC and the '
            'Swin+SCSC MLP); its 1x1 convs run as per-image GEMMs (measured on CPU only)',
            autocast=False,
            device='cpu',
            dtypes=_FP32,
        ),
        FormKind(
            'lean_fp32',
            'a custom autograd function over several ops of a block that saves its inputs and recomputes cheap '
            "intermediates in backward (ShiftWise's SE product, MLP and GRN), fp32 without autocast",
            autocast=False,
            dtypes=_FP32,
        ),
        FormKind(
            'attention_math',
            'attention as two batched GEMMs and a softmax (autograd through them) instead of '
            "``scaled_dot_product_attention``'s fused CPU kernel, whose backward is slow in bf16 (SMT's MSA in a bf16 "
            'autocast training step)',
            device='cpu',
        ),
        FormKind(
            'roi_gemm',
            "RoIAlign as one sparse (CSR) matrix of bilinear sampling weights per sampling-grid size times the feature "
            "map read channels-last (``msconv.dense.poolers.roi_align_gemm``); torchvision's CPU kernel walks each "
            'channel plane and copies a channels-last map to NCHW first',
            autograd=False,
            autocast=False,
            device='cpu',
            dtypes=_FP32,
        ),
        FormKind(
            'token_norm',
            'a LayerNorm over the channels of an NCHW map on a (B, H, W, C) token map made by one copy (the Swin+SCSC '
            "stem's conv run channels-last, its patch mergings' 2x2 gather read from the NCHW map directly) where the "
            'plain form permutes, pads and copies several times (not under autocast: a bf16 conv run channels-last '
            'rounds its weight gradient otherwise)',
            autocast=False,
        ),
        FormKind(
            'lean_bf16',
            "the ``lean_fp32`` forms in a bf16 autocast training step (ShiftWise's SE product, MLP and GRN): GEMMs, "
            'GELU and the saved hidden map in bf16 as autocast runs the Linears, norms, statistics and reductions '
            'accumulated in fp32 (measured on CPU only)',
            device='cpu',
            dtypes=(torch.float32, torch.bfloat16),
            available=_bf16_autocast,
        ),
        FormKind(
            'inplace_bf16',
            "the ``inplace`` inference forms under bf16 autocast (a reparameterized ShiftWise block): the block's maps "
            "in bf16 written in place, its fp32 weights cast to bf16 as autocast casts them (measured on CPU only)",
            autograd=False,
            device='cpu',
            dtypes=(torch.float32, torch.bfloat16),
            available=_bf16_autocast,
        ),
        FormKind(
            'lean_recompute_amp',
            "``lean_recompute`` under bf16 autocast on CPU (SCSC): the lean function's GEMMs and convolutions in bf16 "
            'with the fp32 weights cast as autocast casts them, BatchNorm statistics, affines and weight gradients in '
            'fp32, everything it saves in bf16',
            device='cpu',
            dtypes=(torch.float32, torch.bfloat16),
        ),
    )
}
FORMS = tuple(FORM_KINDS)

#: Memory layouts a form may need of its input.
LAYOUTS: Dict[str, Callable[[torch.Tensor], bool]] = {
    'contiguous': lambda x: x.is_contiguous(),
    'channels_last': lambda x: x.is_contiguous(memory_format=torch.channels_last),
}


# ---- the tuned operations -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TunedOp:
    """An operation whose fastest exact form is measured: its candidate forms in order, the plain one first (which
    needs nothing), each mapped to what it needs (kinds of :data:`FORM_KINDS`, and a layout of :data:`LAYOUTS`),
    what its cache key holds besides the input, and whether the timing depends on a whole module (a block or a
    stage: ``tuned`` then takes ``module=`` and keys the choice by its :func:`structure_signature`)."""

    name: str
    candidates: Dict[str, Tuple[str, ...]]
    key: str
    where: str
    per_module: bool = False
    training: bool = False  #: a training form: measured as forward + backward with autograd on (``tuned_training``)

    @property
    def plain(self) -> str:
        return next(iter(self.candidates))

    #: ``(name, kinds, layout)`` of every candidate but the plain one (what the gate is asked, per call). Computed
    #: once at declaration, a plain attribute: ``functools.cached_property`` takes an ``RLock`` on Python < 3.12,
    #: which ``torch.compile(fullgraph=True)`` cannot trace when a compiled forward is the first to ask.
    fast: Tuple[Tuple[str, Tuple[str, ...], Optional[str]], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fast = tuple(
            (name, tuple(n for n in needs if n not in LAYOUTS), next((n for n in needs if n in LAYOUTS), None))
            for name, needs in list(self.candidates.items())[1:]
        )
        object.__setattr__(self, 'fast', fast)


#: Every tuned operation, declared once. ``tuned`` refuses an operation or a candidate that is not here.
TUNED: Dict[str, TunedOp] = {
    op.name: op
    for op in (
        TunedOp(
            'linear',
            {'blas': (), 'onednn': ('onednn', 'contiguous')},
            key='in and out features, bias',
            where='msconv.layers.Linear and the GEMMs of every inference form',
        ),
        TunedOp(
            'linear_gelu',
            {'plain': (), 'fused': ('fused', 'contiguous')},
            key='in and out features, bias',
            where="ShiftWise's first MLP Linear in the inference form",
        ),
        TunedOp(
            'conv_gelu',
            {'plain': (), 'fused': ('fused',)},
            key='channels, kernel, stride, groups',
            where="SCSC's reduce, branch and recover convs; the reparameterized SMT MLP's depthwise conv",
        ),
        TunedOp(
            'scsc_routing',
            {'plain': (), 'fp32_tail': ('fp32_tail',)},
            key='branches, reduced width, gate groups',
            where="SCSC's routing (the gated sum of its branches) in the inference form, bf16/fp16",
        ),
        TunedOp(
            'pointwise_conv',
            {'conv': (), 'gemm': ('cpu_gemm',)},
            key='channels, stride',
            where="SCSC's 1x1 convs and projection shortcut",
        ),
        TunedOp(
            'stem_conv',
            {'conv': (), 'im2col': ('cpu_gemm', 'contiguous')},
            key='out channels, stride',
            where="the SCSC CNNs' (and the face IResNet's) 3x3 stem",
        ),
        TunedOp(
            'smt_stage',
            {'batched': (), 'per_image': ('per_image',)},
            key="the stage's structure",
            where="an SMT stage's blocks (``map_images``)",
            per_module=True,
        ),
        TunedOp(
            'shiftwise_block',
            {'batched': (), 'per_image': ('per_image',)},
            key="the block's structure",
            where="the MLP of a reparameterized ShiftWise block",
            per_module=True,
        ),
        TunedOp(
            'scsc_swin_block',
            {'batched': (), 'per_image_gemm': ('per_image',), 'per_image_onednn': ('per_image', 'onednn')},
            key="the block's structure",
            where="the MLP of a Swin+SCSC block",
            per_module=True,
        ),
        TunedOp(
            'pointwise_conv_train',
            {'conv': (), 'gemm': ('train_gemm', 'contiguous')},
            key='channels, stride, bias, autocast',
            where="1x1 convs of the training step: Swin+SCSC's MLP, the SCSC modules' reduce, router and recover",
            training=True,
        ),
        TunedOp(
            'inference_model.memory_format',
            {'contiguous': (), 'channels_last': ()},
            key='architecture, parameter count, precision',
            where='``msconv.inference_model(channels_last="auto")``',
        ),
        TunedOp(
            'depthwise_grad_input',
            {'backward': (), 'flipped': ()},
            key='kernel, padding',
            where="the input gradient of a depthwise convolution in a lean training form's backward (ShiftWise's strip "
            "convolutions, SMT MHMC's heads, SCSC's stride-1 branches): the convolution's backward, or a forward "
            'correlation with the flipped kernel',
        ),
        TunedOp(
            'depthwise_grad_weight',
            {'backward': (), 'per_image': ('per_image',)},
            key='kernel, padding',
            where="the kernel gradient of a depthwise convolution in a lean training form's backward (ShiftWise's "
            "strip convolutions, SMT MHMC's heads): the convolution's backward, or per image a depthwise correlation "
            'of the padded input with the output gradient as its kernel, summed in fp32',
        ),
        TunedOp(
            'shiftwise_mlp_train',
            {'batched': (), 'per_image': ()},
            key='in and hidden features, autocast',
            where="the SE product, MLP and GRN of a ShiftWise block in its training form (kind lean_fp32): fc2 and the "
            "GRN's backward sums as batch GEMMs and passes over the hidden maps, or as per-image GEMMs",
            training=True,
        ),
        TunedOp(
            'roi_align',
            {'kernel': (), 'sparse_gemm': ('roi_gemm',)},
            key="channels, the map's layout and area, output size, sampling ratio, RoIs (areas and counts in powers "
            'of two)',
            where="the R-CNNs' RoI feature extraction (``msconv.dense.poolers.AlignedRoIAlign``), each FPN level",
        ),
        TunedOp(
            'scsc_train',
            {'plain': (), 'lean': ('lean_recompute', 'contiguous')},
            key="the module's structure, autocast",
            where="a training step's SCSC module (the CBTNet block's SCSC branch) and Swin+SCSC block MLP",
            per_module=True,
            training=True,
        ),
        TunedOp(
            'saa_fused',
            {'plain': (), 'fused': ('fused', 'channels_last'), 'fused_bands': ('fused', 'channels_last')},
            key='channels, heads, expanded channels',
            where="SMT's SAA in eval: grouped 1x1 conv, BatchNorm and GELU as one oneDNN call (the BatchNorm folded "
            'into its weight at call time), the dense 1x1 conv as a token GEMM; whole or one band of rows at a time',
        ),
        TunedOp(
            'smt_mlp_bands',
            {'plain': (), 'bands': ('fused', 'contiguous')},
            key='in, hidden and out features',
            where="SMT's MLP in eval: fc1, depthwise conv + GELU (one oneDNN call) and fc2 one band of rows at a time "
            'so that the hidden tensor stays cache-sized',
        ),
        TunedOp(
            'smt_stem',
            {'plain': (), 'fused': ('fused',)},
            key='(the input)',
            where="SMT's stem in eval: conv -> BatchNorm -> ReLU as one oneDNN convolution, the BatchNorm folded into "
            'its weight at call time',
        ),
        TunedOp(
            'scsc_swin_mlp_train',
            {'per_image': (), 'batched': ()},
            key="the block's structure, autocast",
            where="the lean training form of a Swin+SCSC block's MLP (kind lean_recompute): its GEMMs image by image "
            "on the (C, H*W) maps, or batched over all tokens on a channel-major (C, B*H*W) copy",
            per_module=True,
            training=True,
        ),
        TunedOp(
            'scsc_tokens',
            {'concat': (), 'runs': ('inplace',), 'expanded': ('inplace',)},
            key='branches, reduced width, gate groups, routing, stride, out width, out activation',
            where="a reparameterized SCSC module's token form (channels-last inference) up to its SE: the routing on "
            'the concatenated branches, or on each branch in place as runs of adjacent channels (reduced channels '
            "reordered in copies of the reduce, branch and router convs), each with one gate per token or with the "
            'gates copied out per channel',
        ),
        TunedOp(
            'scsc_train_amp',
            {'plain': (), 'lean': ('lean_recompute_amp', 'contiguous')},
            key="the module's structure, autocast",
            where="a bf16 autocast training step's SCSC module (the CBTNet block's SCSC branch): the plain form under "
            'autocast or the lean autograd function in bf16',
            per_module=True,
            training=True,
        ),
        TunedOp(
            'scsc_dw_grad_weight',
            {'backward': (), 'per_image': ('per_image',)},
            key='kernel, stride, padding',
            where="the kernel gradients of SCSC's depthwise branches in the lean training function's backward: the "
            "convolution's backward, or per image a depthwise correlation of the padded input with the output "
            'gradient as its kernel (dilated by the stride), summed in fp32',
        ),
        TunedOp(
            'scsc_stem_train',
            {'plain': (), 'lean': ('lean_recompute', 'contiguous')},
            key="the stem's structure",
            where="a training step's 3x3 conv + BatchNorm + ReLU stem of the SCSC CNNs: autograd through the three "
            'modules, or one autograd function (the conv through ``stem_conv``, the ReLU in place)',
            per_module=True,
            training=True,
        ),
        TunedOp(
            'stem_conv_grad_weight',
            {'backward': (), 'im2col': ('cpu_gemm', 'contiguous')},
            key='out channels, stride',
            where="the weight gradient of the SCSC CNNs' 3x3 stem in its lean training function: the convolution's "
            'backward, or per image a GEMM of the output gradient with the unfolded patches',
        ),
        TunedOp(
            'scsc_branch_conv',
            {'conv': (), 'transposed': ()},
            key='kernel, padding',
            where="the stride-1 depthwise branches of SCSC's lean training function (forward): the convolution, or the "
            "same correlation as the input gradient of a correlation with the flipped kernel (oneDNN's backward-data "
            'kernel)',
        ),
        TunedOp(
            'grouped_pointwise',
            {'conv': (), 'onednn': ('onednn', 'channels_last'), 'gemm': ('train_gemm', 'channels_last')},
            key='in channels, groups, out channels, bias',
            where="SMT SAA's grouped 1x1 conv in the lean training form (kind lean), forward and input gradient: "
            "``F.conv2d`` (on one thread torch's native kernel, which copies each group of a channels-last map), "
            "oneDNN's convolution called directly, or one GEMM per chunk of adjacent groups with its block-diagonal "
            'weight',
        ),
        TunedOp(
            'grouped_pointwise_grad_weight',
            {'backward': (), 'gemm': ('train_gemm', 'channels_last')},
            key='in channels, groups, out channels',
            where="the weight gradient of SMT SAA's grouped 1x1 conv in the lean training form: the convolution's "
            'backward, or per chunk of adjacent groups one GEMM over all tokens (its diagonal blocks)',
        ),
        TunedOp(
            'smt_mlp_train',
            {'batched': (), 'per_image': ()},
            key='in, hidden and out features, autocast',
            where="SMT's MLP in its lean training form (kind lean): fc1, depthwise conv, GELU and fc2 forward and "
            'backward on the whole batch, or image by image with the weight gradients accumulated in place (the '
            'hidden tensors cache-sized)',
            training=True,
        ),
        TunedOp(
            'smt_attention',
            {'views': (), 'contiguous': ()},
            key='heads x head size',
            where="SMT's global attention (MSA) in eval: ``scaled_dot_product_attention`` on strided views of the "
            'projection, or on contiguous copies of q, k and v (its fused CPU kernel reads them faster on large maps)',
        ),
        TunedOp(
            'scsc_lean_gemm',
            {'per_image': (), 'batched': (), 'conv': ()},
            key='in and out channels',
            where="the 1x1 convs (reduce, router, recover) of SCSC's lean training function (forward): one GEMM per "
            'image on its (C, H*W) view, one batched GEMM over the images, or the convolution (oneDNN)',
        ),
        TunedOp(
            'scsc_lean_gemm_backward',
            {'per_image': (), 'batched': (), 'tokens': (), 'conv': ()},
            key='in and out channels, input gradient',
            where="the gradients of those 1x1 convs in the lean function's backward: image by image (the weight "
            'gradient accumulated in place), batched GEMMs (the weight gradient summed over per-image products), '
            'batched input gradients and the weight gradient as one GEMM over every token (channel-major copies), or '
            "the convolution's backward",
        ),
    )
}

for _op in TUNED.values():  # the declarations themselves: plain first, every need a known kind or layout
    assert not _op.candidates[_op.plain], f"{_op.name}: the plain form needs nothing"
    assert all(n in FORM_KINDS or n in LAYOUTS for needs in _op.candidates.values() for n in needs), _op.name


# ---- the gate -----------------------------------------------------------------------------------------------------

_REFERENCE = False


def reference_forms_enabled() -> bool:
    return _REFERENCE


@contextmanager
def reference_forms(enabled: bool = True) -> Iterator[None]:
    """Run every msconv operator in its plain ``forward_reference`` form inside the block (no fast form of any
    kind, including the folded ones, and the plain form of every tuned operation)."""
    global _REFERENCE
    previous, _REFERENCE = _REFERENCE, enabled
    try:
        yield
    finally:
        _REFERENCE = previous


def is_capturing() -> bool:
    """True while a graph capture is recording: TorchScript tracing or scripting, FX symbolic tracing,
    ``torch.compile``/dynamo, ``torch.export`` (strict or not) and ONNX export (either exporter)."""
    if torch.jit.is_scripting():
        return True
    return (
        torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or _get_is_fx_tracing()
        or ('torch.onnx' in sys.modules and torch.onnx.is_in_onnx_export())  # no export without torch.onnx
    )


def use_fast_form(form: str, x: torch.Tensor, layout: Optional[str] = None) -> bool:
    """May a fast form of kind ``form`` (one of :data:`FORMS`) run on input ``x`` here? With ``layout`` (one of
    :data:`LAYOUTS`), only for an input in that memory layout, for a form that reads it so. (Whether the form is
    also faster is for :func:`tuned` to measure.)"""
    if torch.jit.is_scripting():
        return False
    return _use_fast_form(form, x, layout)


def _use_fast_form(form: str, x: torch.Tensor, layout: Optional[str]) -> bool:
    kind = FORM_KINDS.get(form)
    if kind is None:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {tuple(LAYOUTS)}, got {layout!r}")
    if _REFERENCE:
        return False
    if kind.under_capture:
        return True
    if is_capturing():  # before any look at x: under FX it is a Proxy, under export its sizes are symbols
        return False
    if x.device.type == 'meta':  # shapes only (no data to be fast on; autocast has no meta device to ask)
        return False
    if not kind.autograd and torch.is_grad_enabled():
        return False
    if kind.device is not None and x.device.type != kind.device:
        return False
    if kind.dtypes is not None and x.dtype not in kind.dtypes:
        return False
    if not kind.autocast and torch.is_autocast_enabled(x.device.type):  # mixed dtypes: in-place writes could not
        return False  # hold the result
    if kind.onednn and not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if kind.min_batch > 1 and x.shape[0] < kind.min_batch:
        return False
    if kind.available is not None and not kind.available(x):
        return False
    return layout is None or LAYOUTS[layout](x)


def _meets(kinds: Tuple[str, ...], layout: Optional[str], x: torch.Tensor) -> bool:
    if not kinds:  # an exact alternative needing no kind of fast form (a memory layout to try)
        return not _REFERENCE and not is_capturing() and (layout is None or LAYOUTS[layout](x))
    return all(_use_fast_form(k, x, layout) for k in kinds)


def _allowed(op: TunedOp, x: torch.Tensor) -> Tuple[str, ...]:
    """The candidates of ``op`` other than the plain one that may run on ``x`` here."""
    return tuple(name for name, kinds, layout in op.fast if _meets(kinds, layout, x))


def tunable(op: str, x: torch.Tensor) -> bool:
    """May any fast form of the tuned operation ``op`` (a name in :data:`TUNED`) run on ``x`` here? Callers ask
    this before looking at ``x`` or their operands, then call :func:`tuned`."""
    if torch.jit.is_scripting():
        return False
    return any(_meets(kinds, layout, x) for _, kinds, layout in _declared(op).fast)


def _declared(op: str) -> TunedOp:
    spec = TUNED.get(op)
    if spec is None:
        raise ValueError(f"unknown tuned operation {op!r}; the tuned operations are {sorted(TUNED)}")
    return spec


# ---- structure signatures -------------------------------------------------------------------------------------------

_SIGNATURES: 'weakref.WeakKeyDictionary[nn.Module, Tuple[int, str]]' = weakref.WeakKeyDictionary()
_STRUCTURE_EPOCH = 0


def _structure_changed(*_args) -> None:
    global _STRUCTURE_EPOCH
    _STRUCTURE_EPOCH += 1  # returns None: the registration goes ahead unchanged


# a module or parameter registered anywhere (a model built, a branch folded by reparameterize()) may change the
# structure of a module whose signature is cached: the cache is checked against this count
torch.nn.modules.module.register_module_module_registration_hook(_structure_changed)
torch.nn.modules.module.register_module_parameter_registration_hook(_structure_changed)

_PLAIN_VALUES = (bool, int, float, str, tuple, type(None))


def structure_signature(module: nn.Module) -> str:
    """A short hash of how ``module`` computes, not of its weights: every submodule's name and type, its plain
    attributes (sizes, strides, flags such as ``deployed``) and the shapes and dtypes of its parameters. Modules of
    two models that compute alike share it; a stage of another width or depth, or reparameterized, gets another.
    Kept per module until a module or a parameter is next registered anywhere in the process."""
    cached = _SIGNATURES.get(module)
    if cached is not None and cached[0] == _STRUCTURE_EPOCH:
        return cached[1]
    digest = hashlib.blake2b(digest_size=8)
    for name, m in module.named_modules():
        attrs = sorted((k, v) for k, v in vars(m).items() if not k.startswith('_') and isinstance(v, _PLAIN_VALUES))
        params = [(k, tuple(p.shape), str(p.dtype)) for k, p in m._parameters.items() if p is not None]
        digest.update(repr((name, type(m).__qualname__, attrs, params)).encode())
    signature = digest.hexdigest()
    _SIGNATURES[module] = (_STRUCTURE_EPOCH, signature)
    return signature


# ---- the autotuner ---------------------------------------------------------------------------------------------

_CHOICES: Dict[str, str] = {}
_FORCED: Dict[str, str] = {}
_DISK: Optional[Dict[str, str]] = None


def autotune_enabled() -> bool:
    """False when ``MSCONV_AUTOTUNE`` is ``0`` (or ``false``/``off``): every tuned operation runs its plain form."""
    return os.environ.get('MSCONV_AUTOTUNE', '1').strip().lower() not in ('0', 'false', 'off', 'no')


@contextmanager
def forced_choices(**choices: str) -> Iterator[None]:
    """Pin the form of tuned operations inside the block, e.g. ``forced_choices(linear='onednn')``: each name is an
    operation of :data:`TUNED` and maps to one of its candidates (anything else raises here, naming what is
    known). A pinned form runs wherever the gate allows it (with autograd on too, for a kind that allows it); where it
    does not, the plain form runs."""
    for op, choice in choices.items():
        if op not in TUNED:
            raise ValueError(f"forced_choices: unknown tuned operation {op!r}; the tuned ones are {sorted(TUNED)}")
        if choice not in TUNED[op].candidates:
            raise ValueError(f"forced_choices: {op!r} has the forms {list(TUNED[op].candidates)}, got {choice!r}")
    previous = dict(_FORCED)
    _FORCED.update(choices)
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(previous)


def autotune_choices() -> Dict[str, str]:
    """What the autotuner chose in this process: ``'op|shape|layout|dtype|device|threads|extra[|structure]
    [|of:candidates]' -> candidate``."""
    return dict(_CHOICES)


def restore_autotune_choices(choices: Mapping[str, str]) -> int:
    """Take ``choices`` (what :func:`autotune_choices` returned in another process, e.g. saved with a checkpoint) as
    this process's own: a key seen again reuses its recorded form instead of measuring, so a resumed training run
    runs the same forms as the run it continues and stays bit-identical to it (forms are exact, not bitwise equal).
    Entries naming an unknown operation or candidate are skipped (another msconv version); returns how many were
    taken."""
    taken = 0
    for key, choice in choices.items():
        spec = TUNED.get(str(key).split('|', 1)[0])
        if spec is not None and choice in spec.candidates:
            _CHOICES[str(key)] = str(choice)
            taken += 1
    return taken


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
#: A training form whose median time is within this fraction of the fastest one's and which keeps fewer bytes for
#: backward is chosen instead of it (see ``_measure``): differences this small are within the timer's noise under a
#: busy machine, the memory is not. ``MSCONV_AUTOTUNE_MEMORY_SLACK`` overrides it (``0``: speed only).
_MEMORY_SLACK = 0.03
#: How many measurements this process has started (nested ones included): a candidate's run during which this
#: changed also measured an inner operation, so its time is not the form's own.
_MEASUREMENTS = 0


def memory_slack() -> float:
    """The fraction of time a training form may lose to the fastest one and still be chosen because it keeps fewer
    bytes for backward: ``MSCONV_AUTOTUNE_MEMORY_SLACK`` (a number >= 0) or 0.03."""
    raw = os.environ.get('MSCONV_AUTOTUNE_MEMORY_SLACK')
    if raw is None or not raw.strip():
        return _MEMORY_SLACK
    try:
        slack = float(raw)
    except ValueError:
        slack = -1.0
    if not slack >= 0:  # also NaN
        raise ValueError(f"MSCONV_AUTOTUNE_MEMORY_SLACK: expected a number >= 0 (e.g. 0.03), got {raw!r}")
    return slack


def _measure(
    candidates: Dict[str, Callable[[], torch.Tensor]], rounds: int = 3, saved: Optional[Dict[str, int]] = None
) -> Tuple[str, torch.Tensor]:
    """Time every candidate up to ``rounds`` times, interleaved; the one with the lowest median wins. Returns its name
    and its last output (so that the calling op's result is the winner's, as on every later call). With ``saved``
    (training forms: the bytes each candidate's run kept for backward, filled in as they run), the candidate keeping
    the fewest bytes among those within :func:`memory_slack` of the lowest median wins.

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
            device = (out if isinstance(out, torch.Tensor) else out[0]).device  # a tensor, or a tuple led by one
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
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
    median = {n: statistics.median(times[n]) if times[n] else float('inf') for n in timed}
    best = min(timed, key=median.__getitem__)
    if saved:
        slack = memory_slack()
        close = [n for n in timed if median[n] <= median[best] * (1.0 + slack)]
        best = min(close, key=lambda n: (saved.get(n, float('inf')), median[n]))
    return best, outputs[best]


def _dispatch_mode_active() -> bool:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None


def can_measure() -> bool:
    """Would the autotuner measure here? Eager inference (autograd off, no graph capture), ``MSCONV_AUTOTUNE`` not
    ``0``, outside ``reference_forms()`` and outside a dispatch mode (a ``FlopCounterMode`` counts the plain forms)."""
    return (
        autotune_enabled()
        and not _REFERENCE
        and not torch.is_grad_enabled()
        and not is_capturing()
        and not _dispatch_mode_active()
    )


def tuned(
    op: str,
    x: torch.Tensor,
    candidates: Dict[str, Callable[[], torch.Tensor]],
    extra: str = '',
    module: Optional[nn.Module] = None,
) -> torch.Tensor:
    """The result of the fastest of ``candidates`` for the operation ``op`` of :data:`TUNED` on input ``x``: forms
    computing the same thing, named and ordered as declared there (the plain form first). Only the candidates the gate
    allows here compete (what each needs is declared with it); they are measured on the first call for this key
    (``op``, the input's shape, layout, dtype and device, the thread count, ``extra`` (the operands' sizes) and, for a
    per-module operation, the ``module``'s :func:`structure_signature`) in eager inference, then the winner is reused.
    The plain form runs inside ``reference_forms()``, with autograd on, under a capture and inside a dispatch mode
    (so a ``FlopCounterMode`` counts the same operations whether or not a choice is cached); a ``forced_choices``
    pin wins wherever its form is allowed. Candidates must not write into ``x``."""
    spec = _declared(op)
    if tuple(candidates) != tuple(spec.candidates):
        raise ValueError(f"tuned: {op!r} has the forms {list(spec.candidates)}, got {list(candidates)}")
    if spec.per_module and module is None:
        raise ValueError(f"tuned: {op!r} is timed per module: pass module=")
    plain = spec.plain
    if _REFERENCE:
        return candidates[plain]()
    allowed = _allowed(spec, x)
    forced = _FORCED.get(op)
    if forced is not None:
        return candidates[forced if forced in allowed else plain]()
    # can_measure() without asking is_capturing() again: under a capture nothing is allowed
    if not allowed or not autotune_enabled() or torch.is_grad_enabled() or _dispatch_mode_active():
        return candidates[plain]()  # e.g. in a FlopCounterMode: it counts the plain form, whatever is cached
    layout = 'cl' if channels_last_only(x) else ('c' if x.is_contiguous() else 's')
    key = (
        f"{op}|{tuple(x.shape)}|{layout}|{str(x.dtype).replace('torch.', '')}|{x.device.type}|"
        f"{torch.get_num_threads()}|{extra}"
    )
    if module is not None:
        key += f'|{structure_signature(module)}'
    competing = (plain, *allowed)
    if len(competing) < len(spec.candidates):  # some forms not allowed here (oneDNN off, ...): another contest
        key += f"|of:{','.join(competing)}"
    choice = _CHOICES.get(key) or _disk().get(key)
    if choice in competing:
        _CHOICES[key] = choice
        return candidates[choice]()
    global _MEASUREMENTS
    _MEASUREMENTS += 1
    choice, out = _measure({name: candidates[name] for name in competing})
    _CHOICES[key] = choice
    _store(key, choice)
    return out


def tuned_training(
    op: str,
    args: Tuple[torch.Tensor, ...],
    candidates: Dict[str, Callable[..., torch.Tensor]],
    extra: str = '',
    module: Optional[nn.Module] = None,
) -> torch.Tensor:
    """``candidates[choice](*args)`` for the training operation ``op`` of :data:`TUNED` (declared ``training=True``):
    forms computing the same function of ``args`` (the input first, then e.g. a weight and a bias), differentiable,
    named and ordered as declared there. For an operation timed per module (``per_module``: a block's training form)
    pass ``module=``; its candidates are then called as ``candidates[choice](module, *args)`` and may read the
    module's parameters and move its BatchNorm running statistics.

    Where the gate allows a fast form on ``args[0]`` and autograd is recording, the first call for a key (as
    :func:`tuned`'s, plus the autocast dtype) times each allowed candidate's forward and backward and keeps the
    fastest, or, among the candidates within :func:`memory_slack` of the fastest's time, the one whose forward kept
    the fewest bytes for backward; later calls run it. The timed runs touch no state of the caller: they run on
    detached copies of ``args`` (and on a ``copy.deepcopy`` of ``module``: its own parameters, its own BatchNorm
    running statistics and ``num_batches_tracked``, thrown away after), take gradients with ``torch.autograd.grad``
    into those copies (nothing is accumulated into a ``.grad``, no tensor hook of the caller runs), draw their random
    numbers from a forked generator state (the caller's is as it was: dropout masks and data order do not depend on
    whether a measurement ran), and any ``saved_tensors_hooks`` of the caller, such as gradient checkpointing's, are
    shielded from their graphs. So the step in which the measurement happens computes what any other step computes: the
    winner runs once on the real operands. The plain form runs inside ``reference_forms()``, under a capture, in a
    dispatch mode, with ``MSCONV_AUTOTUNE=0``, where nothing requires a gradient and where ``module``'s parameters
    are not leaves (a ``torch.func`` transform: no copy to time on); a ``forced_choices`` pin wins wherever its form is
    allowed (with autograd off too)."""
    spec = _declared(op)
    if not spec.training:
        raise ValueError(f"tuned_training: {op!r} is not a training operation (use tuned)")
    if tuple(candidates) != tuple(spec.candidates):
        raise ValueError(f"tuned_training: {op!r} has the forms {list(spec.candidates)}, got {list(candidates)}")
    if spec.per_module and module is None:
        raise ValueError(f"tuned_training: {op!r} is timed per module: pass module=")
    bound = (module,) if spec.per_module else ()
    plain, x = spec.plain, args[0]
    if _REFERENCE:
        return candidates[plain](*bound, *args)
    allowed = _allowed(spec, x)
    forced = _FORCED.get(op)
    if forced is not None:
        return candidates[forced if forced in allowed else plain](*bound, *args)
    params = list(module.parameters()) if spec.per_module else []
    if (
        not allowed
        or not autotune_enabled()
        or not torch.is_grad_enabled()
        or not any(a is not None and a.requires_grad for a in (*args, *params))
        or _dispatch_mode_active()
    ):
        return candidates[plain](*bound, *args)
    device = x.device.type
    amp = str(torch.get_autocast_dtype(device)).replace('torch.', '') if torch.is_autocast_enabled(device) else 'off'
    layout = 'cl' if channels_last_only(x) else ('c' if x.is_contiguous() else 's')
    key = (
        f"{op}|{tuple(x.shape)}|{layout}|{str(x.dtype).replace('torch.', '')}|{device}|"
        f"{torch.get_num_threads()}|{extra}|amp:{amp}"
    )
    if spec.per_module:
        key += f'|{structure_signature(module)}'
    competing = (plain, *allowed)
    if len(competing) < len(spec.candidates):
        key += f"|of:{','.join(competing)}"
    choice = _CHOICES.get(key) or _disk().get(key)
    if choice not in competing:
        if not all(p.is_leaf for p in params):
            return candidates[plain](*bound, *args)  # parameters computed by a transform: nothing to copy and time
        global _MEASUREMENTS
        _MEASUREMENTS += 1
        copies = (copy.deepcopy(module),) if spec.per_module else ()
        cuda = [torch.cuda.current_device() if x.device.index is None else x.device.index] if device == 'cuda' else []
        saved: Dict[str, int] = {}
        with torch.random.fork_rng(devices=cuda):  # the caller's generator state comes back as it was
            runs = {name: _forward_backward(candidates[name], args, copies, saved, name) for name in competing}
            choice, _ = _measure(runs, saved=saved)
        _store(key, choice)
    _CHOICES[key] = choice
    return candidates[choice](*bound, *args)


def _forward_backward(
    fn: Callable[..., torch.Tensor],
    args: Tuple[torch.Tensor, ...],
    module: Tuple[nn.Module, ...] = (),
    saved: Optional[Dict[str, int]] = None,
    name: str = '',
) -> Callable[[], torch.Tensor]:
    """One timed training run of a candidate: forward on detached leaf copies of ``args`` (after ``module``, a copy
    of the caller's module, when given) and the gradients of a fixed random cotangent into those copies and the
    module copy's parameters. The first run writes into ``saved[name]`` the bytes of the storages its forward kept
    for backward (the module's parameters and the inputs left out: every candidate keeps those)."""
    leaves = [a.detach().requires_grad_(a.requires_grad) if a is not None else None for a in args]
    wanted = [a for a in leaves if a is not None and a.requires_grad]
    wanted += [p for m in module for p in m.parameters() if p.requires_grad]
    shared = {t.untyped_storage().data_ptr() for t in (*wanted, *leaves) if t is not None and _has_storage(t)}
    cotangent: list = []

    def run() -> torch.Tensor:
        storages: Dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if saved is not None and name not in saved and _has_storage(t):
                storage = t.untyped_storage()
                if storage.data_ptr() not in shared:
                    storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, _keep):  # the caller's hooks (checkpointing) see none
            out = fn(*module, *leaves)
            if saved is not None and name not in saved:
                saved[name] = sum(storages.values())
            if not cotangent:
                cotangent.append(torch.randn_like(out))
            torch.autograd.grad(out, wanted, cotangent[0], allow_unused=True)
        return out.detach()

    return run


def _has_storage(t: torch.Tensor) -> bool:
    return t.layout == torch.strided and t.device.type != 'meta'


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t
