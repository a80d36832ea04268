"""msconv's layers: the three operators (mixed convolution + aggregation, cross-scale convolution, shift-wise
convolution; NCHW in and out; ``replace_large_kernels`` puts the shift-wise one into any large-kernel CNN), the parts
they share (``Linear`` over channels-last tokens, the ``ArcFace``/``CosFace`` margin heads over embeddings), the
generic fast operators (``fast_ops``) and the gate that decides which form of them runs (``forms``)."""

from .cross_scale import CrossScaleBottleneck, SpatialCrossScaleConv
from .forms import (
    autotune_choices,
    can_measure,
    forced_choices,
    is_capturing,
    reference_forms,
    reference_forms_enabled,
    restore_autotune_choices,
    tunable,
    tuned,
    use_fast_form,
)
from .linear import Linear
from .margin import ArcFace, CosFace
from .mixed_conv import MultiHeadMixedConv, ScaleAwareAggregation, ScaleAwareModulation
from .replace import replace_large_kernels
from .shiftwise import ShiftWiseConv2d

__all__ = [
    'autotune_choices',
    'can_measure',
    'forced_choices',
    'is_capturing',
    'reference_forms',
    'reference_forms_enabled',
    'restore_autotune_choices',
    'tunable',
    'tuned',
    'use_fast_form',
    'CrossScaleBottleneck',
    'SpatialCrossScaleConv',
    'Linear',
    'ArcFace',
    'CosFace',
    'MultiHeadMixedConv',
    'ScaleAwareAggregation',
    'ScaleAwareModulation',
    'ShiftWiseConv2d',
    'replace_large_kernels',
]
