"""Dispatch of the fused error-feedback passes (C) for the common
compressors.  ``residual_step`` returns the payload when a fused kernel
handled the step (the state updated in place), or None for the generic
path.  Every fused kernel produces exactly the bytes of the generic path
(tests/test_feedback_fused.py checks this)."""

from . import _core
from ._payload import Sparse, get_scheme
from ._schemes import SCHEMES
from ._validate import k_from_ratio
from .compressors import (QSGD, Blockwise, ChunkedTopK, Lut2Bit, MiniFloat, Natural, RandomK, Sign,
                          TernGrad, TopK)
from .quantize import _linear_payload

# the scale modes the two-pass sign kernel handles, as the scheme numbers them
_SIGN_MODES = {m: SCHEMES["sign"].MODES.index(m) for m in ("l1", "rms")}

# Quantizers decoded as table[code] * mult[block]: compensation in C, the
# quantizer's own kernel on p, then e -= D(C(p)) in place (no temporary).
_TABLE_QUANTIZERS = (Sign, Blockwise, QSGD, TernGrad, Natural, MiniFloat, Lut2Bit)
# Compressors whose fused residual p - D(C(p)) is finite whenever p is (the
# kernels check p), so the step needs no check of the new state: 0 or p
# (top-k), or D(C(p)) of p's sign (or 0) and finite, so |p - D| <= max(|p|,
# |D|): sign, blockwise, QSGD, TernGrad, natural and minifloat, whose scales
# are lowered until their largest code decodes finite in the state's dtype.
# Not 1-bit stochastic blockwise: it may send -absmax for p > 0.
_FINITE_RESIDUAL = (TopK, ChunkedTopK, Sign, Blockwise, QSGD, TernGrad, Natural, MiniFloat)


def finite_residual(comp):
    """Whether the fused residual of `comp` is finite whenever p is."""
    if type(comp) is TopK:
        return True
    if isinstance(comp, Blockwise) and comp.bits == 1 and comp.rounding == "stochastic":
        return False
    return isinstance(comp, _FINITE_RESIDUAL)


def sign_step(fb, e, g, scale):
    """The step of an l1/rms-scaled Sign compressor as the two-pass kernel
    ef_sign (p = decay*e + scale*g and its block sums read-only, then the
    codes and e = p - D(sign(p)) written), or None with e untouched (then
    the caller takes the transactional path, which reports any error).
    Once the kernel writes it cannot fail, so no state snapshot is needed."""
    comp = fb.compressor
    if type(comp) is not Sign or e.size == 0:
        return None
    mode = _SIGN_MODES.get(comp.scale)
    if mode is None:
        return None
    block = 0 if comp.block is None else comp.block
    threads = fb.threads if fb.threads is not None else comp.threads
    out = _core.ef_sign(e, g, fb.decay, scale, mode, block, None, None, threads)
    if out is None:
        return None
    return _linear_payload("sign", fb.shape, fb.dtype, {"scale": mode, "block": block},
                           out[0], out[1], 1.0)


def _topk(fb, comp, e, g, scale, threads):
    """The fused top-k step (ef_topk: all or nothing, e unchanged when it fails)."""
    n, k = e.size, comp.k
    k = k_from_ratio(n, comp.ratio) if k is None else k if k <= n else n
    idx, vals = _core.ef_topk(e, g, k, fb.decay, scale, True, threads)
    return Sparse._make(idx, vals, fb.shape, fb.dtype)


def topk_step(fb, e, g, scale):
    """The step of a TopK compressor as the all-or-nothing kernel ef_topk
    (the selection of p = decay*e + scale*g made reading e and g only, then
    e = p with zeros where sent), or None for other compressors.  A failure
    (a non-finite g, an overflow) raises with e unchanged, so no state
    snapshot is needed."""
    if type(fb.compressor) is not TopK:
        return None
    return residual_step(fb, e, g, scale)


def direct_step(fb, e, g, scale):
    """The step of `fb` by a kernel that needs no state snapshot (sign_step,
    topk_step), or None (then the caller takes the transactional path)."""
    payload = sign_step(fb, e, g, scale)
    return payload if payload is not None else topk_step(fb, e, g, scale)


def residual_step(fb, e, g, scale):
    """One ErrorFeedback/DecayedFeedback step of `fb` fused in C, or None."""
    comp = fb.compressor
    kind = type(comp)
    threads = fb.threads if fb.threads is not None else comp.threads
    if kind is TopK:
        return _topk(fb, comp, e, g, scale, threads)
    if kind is ChunkedTopK and not isinstance(comp.chunk, tuple):
        idx, vals = _core.ef_topk_chunked(e, g, comp.chunk, comp.k_per_chunk, fb.decay, scale,
                                          True, threads)
        return Sparse._make(idx, vals, fb.shape, fb.dtype)
    if kind is RandomK:
        _core.ef_axpby(e, g, fb.decay, scale, True, threads)
        payload = comp.compress(e.reshape(fb.shape), step=fb.t)
        vals = payload.values
        if comp.rescale:
            e[payload.indices] -= vals     # p - (n/k) p, as the generic path
        else:
            e[payload.indices] = 0         # p - p
        return payload
    if kind in _TABLE_QUANTIZERS:
        _core.ef_axpby(e, g, fb.decay, scale, True, threads)
        payload = comp.compress(e.reshape(fb.shape), step=fb.t)
        get_scheme(payload.scheme).residual(payload, e, threads)
        return payload
    return None




def _k_of(comp, n):
    """The k a TopK compressor keeps of n elements (as TopK.compress)."""
    return min(comp.k, n) if comp.k is not None else k_from_ratio(n, comp.ratio)


def residual_group(comps, es, gs, shapes, dtype, decay, threads):
    """The residual steps of a group (segment i: compressor comps[i], flat
    state es[i] updated in place, gradient gs[i]) as one fused C call, when
    every compressor is a TopK (each segment with its own k); None for the
    generic path.  Returns one Sparse per segment, each the bytes
    residual_step gives on it.  All or nothing: every selection is made
    before any state is written, so a failure raises with every es[i]
    unchanged (no snapshot needed)."""
    if any(type(c) is not TopK for c in comps):
        return None
    ks = [_k_of(c, e.size) for c, e in zip(comps, es)]
    pairs = _core.ef_topk_group(es, gs, ks, decay, 1.0, True, threads)
    return [Sparse._make(idx, vals, shape, dtype) for (idx, vals), shape in zip(pairs, shapes)]
