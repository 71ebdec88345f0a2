"""Majority vote on sign payloads (signSGD with majority vote, Bernstein et
al., "signSGD: Compressed Optimisation for Non-Convex Problems", ICML 2018,
and "signSGD with Majority Vote is Communication Efficient and Fault
Tolerant", ICLR 2019).

The vote runs in C on the packed sign bits (a bit-sliced counter on 64-bit
words, no unpacking), so a server or an all-gather of W workers' 1-bit
payloads produces the 1-bit answer at memory speed.
"""
from __future__ import annotations


import numpy as np

from . import _core
from ._payload import Quantized
from ._validate import check_int, check_threads

__all__ = ["majority_vote"]


def majority_vote(payloads, *, threshold=None, threads=None):
    """The elementwise majority of sign payloads as a sign payload (scale
    "none", decoding to +-1 in the payloads' dtype).

    ``payloads``: a sequence of ``lowband.sign`` payloads (any scale mode:
    only the signs vote) of one shape.  Element i is +1 when at least
    ``threshold`` payloads have sign +1 there (code 1, x >= 0), else -1;
    the default threshold ceil(W/2) breaks a tie (even W) towards +1, the
    same convention as sign(0) = +1.
    """
    if isinstance(payloads, (Quantized, np.ndarray, str, bytes)) or not hasattr(payloads, "__len__"):
        raise TypeError(f"payloads: expected a list of sign payloads, got {type(payloads).__name__}")
    payloads = list(payloads)
    if not payloads:
        raise ValueError("payloads: expected at least one sign payload, got 0")
    first = payloads[0]
    for j, p in enumerate(payloads):
        if not isinstance(p, Quantized) or p.scheme != "sign":
            got = p.scheme if isinstance(p, Quantized) else type(p).__name__
            raise TypeError(f"payloads[{j}]: expected a sign payload (lowband.sign), got {got}")
        if p.shape != first.shape:
            raise ValueError(f"payloads[{j}]: expected shape {first.shape} (payloads[0]'s), got {p.shape}")
    W = len(payloads)
    thresh = 0 if threshold is None else check_int(threshold, "threshold", 1, W)
    threads = check_threads(threads)
    codes = _core.majority_vote([p.arrays["codes"] for p in payloads], first.size, thresh, threads)
    return Quantized._make("sign", first.shape, first.dtype, {"scale": 0, "block": 0},
                           {"codes": codes, "scales": np.zeros(0, np.float32)})
