"""Sparsification: exact, random, threshold, chunked/tiled and sampled top-k,
and the aggregation of many workers' sparse payloads.

Every function takes any float32/float64 array, or float16/bfloat16 (widened
exactly to float32 for the selection; the kept values keep their dtype), of
any shape (read as its flattened C-order vector; non-contiguous input is
copied), leaves it unchanged, and returns a ``Sparse`` whose indices are ascending uint32
(uint64 for 2**32 elements or more).  Results are byte-identical for every
thread count.  Non-finite input raises ValueError naming the first bad flat
index unless ``check_finite=False`` (then NaN ranks above +-Inf, which rank
above every finite value).
"""
from __future__ import annotations

import numpy as np

from . import _core
from ._payload import Sparse
from ._validate import (ANY_FLOAT_DTYPES, FLOAT_DTYPES, as_selectable, check_choice, check_count,
                        check_finite_array, check_finite_number, check_int, check_out, check_ratio,
                        check_seed, check_step, check_threads, group_arrays, group_ks, k_from_ratio,
                        resolve_k)

__all__ = ["topk", "randomk", "threshold", "topk_chunked", "topk_sampled", "aggregate",
           "topk_group", "randomk_group"]


def _sparse(x, half, pair, seed=None, step=None):
    """The Sparse for kernel output on `x` (the float32 widening of `half`
    when that is not None: values are then taken from `half`)."""
    indices, values = pair
    if half is not None:
        values = half.reshape(-1)[indices]
        x = half
    return Sparse._make(indices, values, x.shape, x.dtype, seed, step)


def topk(x, k=None, *, ratio=None, check_finite=True, threads=None):
    """The k elements of largest magnitude (exact).

    Give either ``k`` (0 <= k <= x.size) or ``ratio`` (k = round(ratio * n),
    at least 1 when ratio > 0).  Ties go to the lower index.  Radix selection
    over the magnitude bits (no sort): a sampled bound lets one streaming
    pass collect the candidates, with a two-pass histogram select as the
    fallback.
    """
    if type(x) is np.ndarray and x.dtype in FLOAT_DTYPES:   # used as it is (C copies a strided x)
        k = resolve_k(x.size, k, ratio)
        idx, vals = _core.topk(x, k, check_finite is True or bool(check_finite),
                               None if threads is None else check_threads(threads))
        return Sparse._make(idx, vals, x.shape, x.dtype)
    x, half = as_selectable(x)
    k = resolve_k(x.size, k, ratio)
    return _sparse(x, half, _core.topk(x, k, bool(check_finite), check_threads(threads)))


def _group_selectable(tensors, offsets):
    """[(work, original)] of a group's segments, as as_selectable does."""
    return [(a, None) if a.dtype in FLOAT_DTYPES else (a.astype(np.float32), a)
            for a in group_arrays(tensors, offsets, dtypes=ANY_FLOAT_DTYPES)]


def topk_group(tensors, k=None, *, ratio=None, offsets=None, check_finite=True, threads=None):
    """``topk`` on every tensor of a group, in one C call -> a list of Sparse.

    ``tensors``: a list of arrays or CPU tensors (one float dtype; each keeps
    its shape in its payload), or one array with ``offsets``, the segment
    boundaries ``[0, o1, ..., size]`` (segment i is ``flat[offsets[i]:
    offsets[i+1]]``, its payload 1-D).  ``k``: an int for every tensor or a
    list (one per tensor, each at most its size); or ``ratio``: a fraction
    (or a list), k_i = round(ratio * n_i), at least 1.  Payload i is exactly
    ``topk(tensors[i], k_i)`` for any thread count: large tensors use the
    whole team, small ones are spread across it, so a model's hundred
    tensors cost one call instead of a hundred.  A failure (non-finite
    input, k too large) raises naming the tensor, e.g. ``tensors[3]``.
    """
    segs = _group_selectable(tensors, offsets)
    ks = group_ks([w.size for w, _ in segs], k, ratio)
    pairs = _core.topk_group([w for w, _ in segs], ks, bool(check_finite), check_threads(threads))
    return [_sparse(w, half, pair) for (w, half), pair in zip(segs, pairs)]


def randomk(x, k=None, *, ratio=None, seed, step=0, rescale=False, check_finite=True,
            threads=None):
    """k distinct coordinates drawn uniformly without replacement.

    The indices depend only on (seed, step, x.size, k), so workers that share
    the seed and step pick the same coordinates and their payloads can be
    summed index-aligned (the payload carries seed/step, so on the wire only
    the values travel).  ``rescale=True`` multiplies the values by n/k, which
    makes the compressor unbiased.  ``check_finite`` checks the sent values.
    """
    x, half = as_selectable(x)
    k = resolve_k(x.size, k, ratio)
    seed, step = check_seed(seed), check_step(step)
    threads = check_threads(threads)
    # the draws run on one thread: a team for the index set's clearing and
    # scan saves a fraction of a millisecond at 16 Mi, and a busy second
    # core stalls it for longer (measured), so only the gather uses `threads`
    indices = _core.randomk_indices(x.size, k, seed, step)
    scale = x.size / k if (rescale and k) else 1.0
    values = _core.gather(x, indices, scale, bool(check_finite), threads)
    if scale != 1.0 and check_finite:   # finite input never becomes Inf silently
        check_finite_array(values, f"randomk: a value rescaled by n/k = {scale!r}",
                           "overflows (use rescale=False)")
    if half is not None:
        values = values.astype(half.dtype)   # exact unless rescaled
        x = half
    return Sparse._make(indices, values, x.shape, x.dtype, seed, step)


def randomk_group(tensors, k=None, *, ratio=None, seed, step=0, rescale=False, offsets=None,
                  check_finite=True, threads=None):
    """``randomk`` on every tensor of a group, in one C call -> a list of
    Sparse, each exactly ``randomk(tensors[i], k_i, seed=seed, step=step)``
    (one seed and step for the group, as separate calls with them).
    ``tensors``, ``offsets``, ``k`` and ``ratio`` as in ``topk_group``."""
    segs = _group_selectable(tensors, offsets)
    ks = group_ks([w.size for w, _ in segs], k, ratio)
    seed, step = check_seed(seed), check_step(step)
    pairs = _core.randomk_group([w for w, _ in segs], ks, seed, step, bool(rescale),
                                bool(check_finite), check_threads(threads))
    out = []
    for i, ((w, half), (indices, values), k_i) in enumerate(zip(segs, pairs, ks)):
        if rescale and k_i and w.size != k_i and check_finite:
            check_finite_array(values, f"randomk_group: a value of tensors[{i}] rescaled by n/k = "
                               f"{w.size / k_i!r}", "overflows (use rescale=False)")
        if half is not None:
            values = values.astype(half.dtype)
            w = half
        out.append(Sparse._make(indices, values, w.shape, w.dtype, seed, step))
    return out


def threshold(x, tau, *, check_finite=True, threads=None):
    """Every element with |x| >= tau (tau a finite number >= 0)."""
    x, half = as_selectable(x)
    tau = check_finite_number(tau, "tau", lo=0.0)
    return _sparse(x, half, _core.threshold(x, tau, bool(check_finite), check_threads(threads)))


def topk_chunked(x, chunk, k_per_chunk, *, check_finite=True, threads=None):
    """Top-``k_per_chunk`` by magnitude inside each chunk (SparseLoCo).

    ``chunk`` an int: contiguous chunks of the flattened vector; the last,
    shorter chunk keeps min(k_per_chunk, its length).  ``chunk`` a pair
    (tile_rows, tile_cols): 2-D tile mode over a 2-D x; edge tiles keep
    min(k_per_chunk, their size).  Indices are flat and ascending either way.
    """
    x, half = as_selectable(x)
    threads = check_threads(threads)
    if isinstance(chunk, tuple):
        if len(chunk) != 2:
            raise ValueError(f"chunk: expected an int or a (tile_rows, tile_cols) pair, got {chunk!r}")
        if x.ndim != 2:
            raise ValueError(f"x: tile mode needs a 2-D array, got shape {x.shape}")
        th = check_int(chunk[0], "chunk[0]", 1, _core.MAX_TILE)
        tw = check_int(chunk[1], "chunk[1]", 1, _core.MAX_TILE)
        kpc = check_count(k_per_chunk, th * tw, "k_per_chunk")
        rows, cols = x.shape
        return _sparse(x, half, _core.topk_tiled(x, rows, cols, th, tw, kpc, bool(check_finite), threads))
    chunk = check_int(chunk, "chunk", 1, _core.MAX_CHUNK)
    kpc = check_count(k_per_chunk, chunk, "k_per_chunk")
    return _sparse(x, half, _core.topk_chunked(x, chunk, kpc, bool(check_finite), threads))


def topk_sampled(x, ratio, *, sample_ratio=0.01, seed, step=0, check_finite=True,
                 threads=None, return_info=False):
    """Deep Gradient Compression's approximate top-k.

    k = round(ratio * n).  The threshold is the top-ratio magnitude of a
    strided sample (at least sample_ratio*n and 2/ratio elements, random start
    from (seed, step)); while fewer than 0.8k elements pass, it is multiplied
    by 0.8 (at most 10 times); when more than 1.3k pass, the exact top-k among
    them is taken.  The count always lands in [ceil(0.8k), floor(1.3k)]: if
    the corrections do not get there, exact top-k is the fallback.  With
    ``return_info=True`` also returns a dict (num_samples, iterations,
    exact_fallback, threshold).
    """
    x, half = as_selectable(x)
    ratio = check_ratio(ratio)
    sample_ratio = check_finite_number(sample_ratio, "sample_ratio", 0.0, 1.0, lo_open=True)
    seed, step = check_seed(seed), check_step(step)
    k = k_from_ratio(x.size, ratio)
    idx, vals, info = _core.topk_sampled(x, k, sample_ratio, seed, step, bool(check_finite),
                                         check_threads(threads))
    out = _sparse(x, half, (idx, vals))
    if return_info:
        info["k"] = k
        return out, info
    return out


_AGG_OPS = ("sum", "mean", "contributor_mean")


def aggregate(payloads, op="mean", out=None, *, threads=None):
    """Combine W workers' sparse payloads into one dense tensor.

    ``op``: "sum"; "mean" (the sum divided by W, the number of payloads);
    "contributor_mean" (SparseLoCo: each coordinate divided by the number of
    payloads that hold it; zero where none does).  All payloads must share
    shape and dtype.  For each coordinate the contributions are added in
    payload order, so the result does not depend on the thread count.  No
    per-worker dense vector is built.  Quantized values are decoded first.
    float16/bfloat16 payloads are accumulated (and returned) in float32.
    """
    check_choice(op, "op", _AGG_OPS)
    threads = check_threads(threads)
    if isinstance(payloads, Sparse):
        payloads = [payloads]
    payloads = list(payloads)
    if not payloads:
        raise ValueError("payloads: expected at least one Sparse payload, got none")
    first = payloads[0]
    for i, p in enumerate(payloads):
        if not isinstance(p, Sparse):
            raise TypeError(f"payloads[{i}]: expected a Sparse, got {type(p).__name__}")
        if p.shape != first.shape or p.dtype != first.dtype:
            raise ValueError(f"payloads[{i}]: shape {p.shape} / dtype {p.dtype} differs from "
                             f"payloads[0]: shape {first.shape} / dtype {first.dtype}")
    shape, dtype = first.shape, first.dtype
    if dtype not in FLOAT_DTYPES:
        dtype = np.dtype(np.float32)   # half-precision payloads sum in float32
    if out is None:
        result = np.empty(shape, dtype=dtype)
    else:
        result = check_out(out, shape, dtype)    # a tensor: a view of it
    _core.aggregate([p.scatter_pair(dtype) for p in payloads], op, result.reshape(-1), threads)
    return result if out is None else out
