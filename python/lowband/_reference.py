"""Pure-NumPy twins of every C kernel: the test oracle.

Each function here computes, slowly and plainly, exactly what its C
counterpart returns (same bytes, including every random draw), so the tests
can compare the two on generated inputs.  Nothing here is used by the fast
paths.  Sections: Philox; sparsification; aggregation; (later issues append
quantization, error feedback and MoE sections).
"""
from __future__ import annotations

import math

import numpy as np

M32 = np.uint64(0xFFFFFFFF)

# ==========================================================================
# Philox4x32-10
# ==========================================================================

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85

DOMAIN_TEST, DOMAIN_RANDOMK, DOMAIN_SAMPLED_TOPK = 0, 1, 2
DOMAIN_STOCHASTIC_ROUND, DOMAIN_QSGD, DOMAIN_TERNGRAD, DOMAIN_NATURAL = 3, 4, 5, 6


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on arrays of 32-bit counter words (as uint64 arrays)
    with key (k0, k1); returns the four output word arrays."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & M32 for c in (c0, c1, c2, c3))
    k0, k1 = int(k0) & 0xFFFFFFFF, int(k1) & 0xFFFFFFFF
    for _ in range(10):
        p0 = c0 * np.uint64(PHILOX_M0)
        p1 = c2 * np.uint64(PHILOX_M1)
        hi0, lo0 = p0 >> np.uint64(32), p0 & M32
        hi1, lo1 = p1 >> np.uint64(32), p1 & M32
        c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint64(k0), lo1, hi0 ^ c3 ^ np.uint64(k1), lo0
        k0 = (k0 + PHILOX_W0) & 0xFFFFFFFF
        k1 = (k1 + PHILOX_W1) & 0xFFFFFFFF
    return c0, c1, c2, c3


def philox_stream(seed, step, domain):
    """(k0, k1, s0, s1): key words from the seed, stream words from
    stream = domain << 56 | step."""
    stream = (int(domain) << 56) | int(step)
    return (seed & 0xFFFFFFFF, seed >> 32, stream & 0xFFFFFFFF, stream >> 32)


def philox_blocks(seed, step, domain, blocks):
    """Philox blocks for counter indices `blocks` (uint64 array): 4 arrays."""
    k0, k1, s0, s1 = philox_stream(seed, step, domain)
    b = np.asarray(blocks, dtype=np.uint64)
    return philox4x32_10(b & M32, b >> np.uint64(32), np.full_like(b, s0), np.full_like(b, s1), k0, k1)


def philox_words(seed, step, domain, first_block, n):
    """Twin of lb_philox_fill: word i is lane i % 4 of block first_block + i // 4."""
    nb = (n + 3) // 4
    lanes = philox_blocks(seed, step, domain, np.arange(first_block, first_block + nb, dtype=np.uint64))
    return np.stack(lanes, axis=1).reshape(-1)[:n].astype(np.uint32)


def philox_u64(seed, step, domain, blocks):
    """64 random bits per block: lane1 << 32 | lane0."""
    l0, l1, _, _ = philox_blocks(seed, step, domain, blocks)
    return (l1 << np.uint64(32)) | l0


def philox_below(seed, step, domain, block, stride, bound):
    """Twin of lb_philox_below: unbiased int in [0, bound) by Lemire's method,
    retrying on counters block + stride, block + 2*stride, ..."""
    threshold = (-bound) % (1 << 64) % bound
    while True:
        r = int(philox_u64(seed, step, domain, [block])[0])
        m = r * bound
        if (m & ((1 << 64) - 1)) >= threshold:
            return m >> 64
        block += stride


# ==========================================================================
# Magnitude keys
# ==========================================================================

def magnitude_keys(x):
    """Raw bits with the sign cleared (uint32 for float32, uint64 for
    float64): they order like |x|, with Inf above finite values and NaNs
    above Inf."""
    x = np.ascontiguousarray(x).reshape(-1)
    if x.dtype == np.float32:
        return x.view(np.uint32) & np.uint32(0x7FFFFFFF)
    if x.dtype == np.float64:
        return x.view(np.uint64) & np.uint64(0x7FFFFFFFFFFFFFFF)
    raise TypeError(f"magnitude_keys: float32 or float64 expected, got {x.dtype}")


def first_nonfinite(x):
    """Flat index of the first NaN/Inf, or None."""
    bad = np.flatnonzero(~np.isfinite(np.asarray(x).reshape(-1)))
    return int(bad[0]) if bad.size else None


def index_dtype(n):
    return np.uint32 if n <= 0xFFFFFFFF else np.uint64


def _top_positions(keys, k):
    """Positions of the k largest keys, ties to the lower position, ascending."""
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    # lexsort's last key is the primary one: ~keys ascending = keys descending
    order = np.lexsort((np.arange(keys.size), ~keys))
    return np.sort(order[:k])


# ==========================================================================
# Sparsification
# ==========================================================================

def topk(x, k):
    """(indices, values) of the k largest |x|, ties to the lower index."""
    flat = np.ascontiguousarray(x).reshape(-1)
    pos = _top_positions(magnitude_keys(flat), k)
    return pos.astype(index_dtype(flat.size)), flat[pos]


def threshold(x, tau):
    """(indices, values) of all |x| >= tau (NaN counts as +inf)."""
    flat = np.ascontiguousarray(x).reshape(-1)
    mag = np.abs(flat).astype(np.float64)
    mag[np.isnan(mag)] = np.inf
    pos = np.flatnonzero(mag >= float(tau))
    return pos.astype(index_dtype(flat.size)), flat[pos]


def topk_chunked(x, chunk, k_per_chunk):
    flat = np.ascontiguousarray(x).reshape(-1)
    keys = magnitude_keys(flat)
    parts = []
    for b in range(0, flat.size, chunk):
        m = min(chunk, flat.size - b)
        parts.append(b + _top_positions(keys[b:b + m], min(k_per_chunk, m)))
    pos = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return pos.astype(index_dtype(flat.size)), flat[pos]


def topk_tiled(x, tile_rows, tile_cols, k_per_tile):
    x = np.ascontiguousarray(x)
    rows, cols = x.shape
    keys = magnitude_keys(x).reshape(rows, cols)
    picks = []
    for r0 in range(0, rows, tile_rows):
        for c0 in range(0, cols, tile_cols):
            tile = keys[r0:r0 + tile_rows, c0:c0 + tile_cols]
            h, w = tile.shape
            local = _top_positions(tile.reshape(-1), min(k_per_tile, h * w))
            picks.append((r0 + local // w) * cols + c0 + local % w)
    pos = np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)
    flat = x.reshape(-1)
    return pos.astype(index_dtype(flat.size)), flat[pos]


def kth_largest_key(keys, r):
    return np.sort(keys)[::-1][r - 1]


def topk_sampled(x, k, sample_ratio, seed, step):
    """Twin of lb_topk_sampled: (indices, values, info)."""
    flat = np.ascontiguousarray(x).reshape(-1)
    n = flat.size
    keys = magnitude_keys(flat)
    info = {"num_samples": 0, "iterations": 0, "exact_fallback": False, "threshold": 0.0}
    if k == 0 or k == n:
        i, v = topk(flat, k)
        return i, v, info
    ratio = k / n
    want = max(math.ceil(sample_ratio * n), math.ceil(2.0 / ratio))
    if want >= n:
        info.update(num_samples=n, exact_fallback=True)
        i, v = topk(flat, k)
        return i, v, info
    S = int(want)
    stride = math.ceil(n / S / 32.0) * 32 + 1
    while stride > 1 and n // stride < S:
        stride = stride - 8 if stride > 8 else 1
    start = philox_below(seed, step, DOMAIN_SAMPLED_TOPK, 0, 1, stride)
    samples = keys[start::stride]
    m = samples.size
    ks = max(1, math.ceil(ratio * m))
    thr = kth_largest_key(samples, ks)
    info["num_samples"] = m
    lo, hi = math.ceil(0.8 * k), max(math.floor(1.3 * k), k)
    it = 0
    while True:
        sel = np.flatnonzero(keys >= thr)
        info["iterations"] = it
        info["threshold"] = float(_key_value(thr, flat.dtype))
        if lo <= sel.size <= hi:
            return sel.astype(index_dtype(n)), flat[sel], info
        if sel.size > hi or it == 10 or int(thr) == 0:
            info["exact_fallback"] = True
            i, v = topk(flat, k)
            return i, v, info
        if flat.dtype == np.float32:
            f = np.float32(_key_value(thr, flat.dtype)) * np.float32(0.8)
            thr = np.array([f], dtype=np.float32).view(np.uint32)[0] & np.uint32(0x7FFFFFFF)
        else:
            d = float(_key_value(thr, flat.dtype)) * 0.8
            thr = np.array([d]).view(np.uint64)[0] & np.uint64(0x7FFFFFFFFFFFFFFF)
        it += 1


def _key_value(key, dtype):
    if dtype == np.float32:
        return np.array([key], dtype=np.uint32).view(np.float32)[0]
    return np.array([key], dtype=np.uint64).view(np.float64)[0]


def randomk_indices(n, k, seed, step):
    """Twin of lb_randomk_indices: Floyd's algorithm (drawing the complement
    when k > n/2), sorted.  Draw i, uniform in [0, bound) with bound =
    n - draws + i + 1, uses the 32-bit stream word i (lane i % 4 of block
    i // 4) by Lemire's multiply-shift when bound <= 2**32; a rejected word or
    a larger bound takes 64-bit words from blocks ceil(draws/4) + r*draws + i."""
    if k == 0:
        return np.zeros(0, dtype=index_dtype(n))
    complement = k > n // 2
    draws = n - k if complement else k
    words = philox_words(seed, step, DOMAIN_RANDOMK, 0, draws).astype(np.uint64)
    chosen = set()
    for i in range(draws):
        j = n - draws + i
        bound = j + 1
        t = None
        if bound <= 1 << 32:
            m = int(words[i]) * bound
            if bound == 1 << 32 or (m & 0xFFFFFFFF) >= ((1 << 32) - bound) % bound:
                t = m >> 32
        if t is None:
            t = philox_below(seed, step, DOMAIN_RANDOMK, (draws + 3) // 4 + i, draws, bound)
        chosen.add(j if t in chosen else t)
    if complement:
        mask = np.ones(n, dtype=bool)
        mask[list(chosen)] = False
        return np.flatnonzero(mask).astype(index_dtype(n))
    return np.array(sorted(chosen), dtype=index_dtype(n))


def randomk(x, k, seed, step, rescale=False):
    flat = np.ascontiguousarray(x).reshape(-1)
    idx = randomk_indices(flat.size, k, seed, step)
    vals = flat[idx.astype(np.int64)]
    if rescale and k:
        vals = vals * flat.dtype.type(flat.size / k)
    return idx, vals


# ==========================================================================
# Aggregation
# ==========================================================================

def aggregate(pairs, n, dtype, op):
    """Twin of lb_aggregate over (indices, values) pairs."""
    out = np.zeros(n, dtype=dtype)
    count = np.zeros(n, dtype=np.int64)
    for idx, vals in pairs:
        idx = np.asarray(idx, dtype=np.int64)
        out[idx] += np.asarray(vals, dtype=dtype)  # indices are distinct
        count[idx] += 1
    if op == "mean":
        out = (out / np.dtype(dtype).type(len(pairs))).astype(dtype)
    elif op == "contributor_mean":
        many = count > 1
        out[many] = out[many] / count[many].astype(dtype)
    return out


# ==========================================================================
# Quantization and bit packing
# ==========================================================================

# (quantization twins go here)


# ==========================================================================
# Error feedback
# ==========================================================================

# The twins take `compress(p, step) -> payload` and `decode(payload) ->
# dense flat array` callables so that any compressor's reference can be used.

def ef14_step(e, g, compress, decode, step, decay=1.0, scale=1.0):
    """p = decay*e + scale*g; payload = C(p); returns (payload, p - D(C(p)))."""
    dt = e.dtype.type
    p = e * dt(decay) if decay != 1.0 else e.copy()
    p = p + dt(scale) * g if scale != 1.0 else p + g
    payload = compress(p, step)
    return payload, p - decode(payload)


def ef21_step(h, g, compress, decode, step, weight=1.0):
    target = g / h.dtype.type(weight) if weight != 1.0 else g
    c = compress(target - h, step)
    return c, h + decode(c)


def econtrol_step(h, e, g, eta, compress, decode, step):
    diff = g - h
    target = diff + h.dtype.type(eta) * e if eta else diff
    c = compress(target, step)
    d = decode(c)
    return c, h + d, e + (diff - d)


def dgc_step(u, v, g, mu, nesterov, masking, select):
    """Momentum correction and masking; select(v) -> ascending indices."""
    dt = u.dtype.type
    u, v = u.copy(), v.copy()
    if nesterov:
        u = (u + g) * dt(mu)
        v = v + u + g
    else:
        u = u * dt(mu) + g
        v = v + u
    idx = select(v)
    sent = v[idx].copy()
    v[idx] = 0
    if masking:
        u[idx] = 0
    return idx, sent, u, v


# ==========================================================================
# Wire format helpers
# ==========================================================================

def crc32c(data):
    """Bitwise CRC-32C (Castagnoli, reflected)."""
    crc = 0xFFFFFFFF
    for byte in bytes(data):
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def varint_indices(indices):
    """LEB128 of idx[0], then of each gap - 1."""
    out = bytearray()
    prev = None
    for x in (int(v) for v in indices):
        d = x if prev is None else x - prev - 1
        prev = x
        while d >= 0x80:
            out.append((d & 0x7F) | 0x80)
            d >>= 7
        out.append(d)
    return bytes(out)


# ==========================================================================
# Mixture-of-Experts
# ==========================================================================

# (MoE twins go here)
