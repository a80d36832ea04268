"""msconv operators: usable on their own, NCHW in and out."""
from ._forms import reference_forms, reference_forms_enabled
from .cross_scale import CrossScaleBottleneck, SpatialCrossScaleConv
from .linear import Linear
from .margin import ArcFace, CosFace
from .mixed_conv import MultiHeadMixedConv, ScaleAwareAggregation, ScaleAwareModulation
from .shiftwise import ShiftWiseConv2d
