"""msconv operators: usable on their own, NCHW in and out."""
