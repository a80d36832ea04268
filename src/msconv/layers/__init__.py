"""msconv operators: usable on their own, NCHW in and out."""

from .cross_scale import CrossScaleBottleneck, SpatialCrossScaleConv
from .forms import (
    autotune_choices,
    forced_choices,
    is_capturing,
    reference_forms,
    reference_forms_enabled,
    tuned,
    use_fast_form,
)
from .linear import Linear
from .margin import ArcFace, CosFace
from .mixed_conv import MultiHeadMixedConv, ScaleAwareAggregation, ScaleAwareModulation
from .shiftwise import ShiftWiseConv2d

__all__ = [
    'autotune_choices',
    'forced_choices',
    'is_capturing',
    'reference_forms',
    'reference_forms_enabled',
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
]
