"""Benchmark suite: the fixed cost of one call on a small tensor.

A model has many small tensors (biases, norms), so what a call costs before
it touches any data matters as much as bandwidth.  Each case times a loop
of calls on a float32 vector of 1 and of 1 Ki elements and reports the
cost of one call (``lowband`` column in ms as everywhere; the note gives
microseconds).  Targets:

- topk, sign and quantize (4-bit blockwise): at most 3 us per call;
- an ErrorFeedback step (top-k and sign) and encode or decode of a
  payload: at most 5 us per call;
- topk on 1 Ki floats (k = 10) no slower than ``numpy.argpartition`` on
  the magnitudes (the NumPy way: abs, argpartition, gather).

The element count is fixed (``--size`` does not apply); tensors this small
always run on the calling thread, whatever ``--threads`` says.  A cost is
the fastest of ``reps`` loops of many calls (timeit's convention: other
processes on the machine only ever add time); the us per call is also the
number in brackets after each target.
"""
import time

import numpy as np

import lowband
from lowband.feedback import ErrorFeedback

SIZES = (1, 1024)


def per_call(fn, reps, calls):
    """The fastest of `reps` loops of `calls` calls of fn, in seconds per call."""
    for _ in range(max(10, calls // 10)):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        ts.append((time.perf_counter() - t0) / calls)
    return min(ts)


def _cases(n):
    """(name, lowband fn, numpy fn or None, target us or None) for n elements."""
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    k = max(1, n // 100)
    p = lowband.topk(x, k)
    q = lowband.quantize(x, 4)
    bp, bq = lowband.encode(p), lowband.encode(q)
    ef_topk = ErrorFeedback(lowband.compressors.TopK(k=k), x)
    ef_sign = ErrorFeedback(lowband.compressors.Sign(), x)
    out = [
        (f"topk k={k}", lambda: lowband.topk(x, k), None, 3.0),
        ("sign", lambda: lowband.sign(x), None, 3.0),
        ("quantize 4-bit", lambda: lowband.quantize(x, 4), None, 3.0),
        (f"EF step topk k={k}", lambda: ef_topk.step(x), None, 5.0),
        ("EF step sign", lambda: ef_sign.step(x), None, 5.0),
        (f"encode topk k={k}", lambda: lowband.encode(p), None, 5.0),
        (f"decode topk k={k}", lambda: lowband.decode(bp), None, 5.0),
        ("encode 4-bit", lambda: lowband.encode(q), None, 5.0),
        ("decode 4-bit", lambda: lowband.decode(bq), None, 5.0),
    ]
    if n >= 1024:
        def numpy_topk():
            a = np.abs(x)
            i = np.argpartition(a, n - 10)[n - 10:]
            return i, x[i]
        out.append(("topk k=10 vs argpartition", lambda: lowband.topk(x, 10), numpy_topk, None))
    return out


def rows(ctx, reps):
    """The suite's rows (per-call costs; targets in microseconds)."""
    calls, reps = (50, max(reps, 3)) if ctx.quick else (2000, max(reps, 5))
    out = []
    for n in SIZES:
        for name, fn, numpy_fn, limit in _cases(n):
            sec = per_call(fn, reps, calls)
            row = {"suite": "small", "case": f"{name} n={n}", "nbytes": 4 * n,
                   "lowband_ms": sec * 1e3, "gbps": None, "note": f"{sec * 1e6:.2f} us/call",
                   "targets": []}
            if limit is not None:
                us = sec * 1e6
                row["targets"].append({"target": f"<={limit:g} us", "met": us <= limit, "ratio": us})
            if numpy_fn is not None:
                np_sec = per_call(numpy_fn, reps, calls)
                row["numpy_ms"] = np_sec * 1e3
                row["targets"].append({"target": ">=1x numpy", "met": np_sec >= sec,
                                       "ratio": np_sec / sec})
            out.append(row)
    return out
