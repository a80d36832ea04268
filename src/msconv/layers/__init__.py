"""msconv operators: usable on their own, NCHW in and out."""
from .mixed_conv import MultiHeadMixedConv, ScaleAwareAggregation, ScaleAwareModulation
