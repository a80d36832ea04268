"""msconv operators: usable on their own, NCHW in and out."""
from .forms import PER_IMAGE_MIN_PIXELS, is_capturing, reference_forms, reference_forms_enabled, use_fast_form
from .cross_scale import CrossScaleBottleneck, SpatialCrossScaleConv
from .linear import Linear
from .margin import ArcFace, CosFace
from .mixed_conv import MultiHeadMixedConv, ScaleAwareAggregation, ScaleAwareModulation
from .shiftwise import ShiftWiseConv2d
