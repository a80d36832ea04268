"""msconv operators: usable on their own, NCHW in and out."""
from .cross_scale import CrossScaleBottleneck, SpatialCrossScaleConv; from .margin import ArcFace, CosFace  # noqa: E702,F401
