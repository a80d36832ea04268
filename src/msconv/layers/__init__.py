"""msconv operators: usable on their own, NCHW in and out."""
from .shiftwise import ShiftWiseConv2d
