"""Dispatch of the fused error-feedback passes (C) for the common
compressors.  ``residual_step`` returns the payload when a fused kernel
handled the step (the state updated in place), or None for the generic
path.  Every fused kernel produces exactly the bytes of the generic path."""


def residual_step(fb, e, g, scale):
    return None
