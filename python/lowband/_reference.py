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

# Shared rules (docs/quantization.md): sums use 16 lanes (lane l adds the
# terms j % 16 == l in order from +0.0, then lane[l] += lane[l + w] for
# w = 8, 4, 2, 1) over pieces of CHUNK elements counted from the block start,
# added in order; element i draws the top 24 bits of Philox word i.

CHUNK = 65536


def lanesum(terms):
    """The 16-lane sum of float64 terms (one piece)."""
    t = np.asarray(terms, dtype=np.float64)
    rows = np.concatenate([t, np.zeros((-t.size) % 16)]).reshape(-1, 16)
    lanes = np.cumsum(np.vstack([np.zeros((1, 16)), rows]), axis=0)[-1].copy()
    for w in (8, 4, 2, 1):
        lanes[:w] += lanes[w:2 * w]
    return float(lanes[0])


def _terms(v, mode, mu=0.0):
    v = np.asarray(v).astype(np.float64)
    return {"abs": np.abs(v), "sq": v * v, "raw": v, "dev2": (v - mu) * (v - mu)}[mode]


def block_sum(v, mode, mu=0.0):
    """Sum over one block: CHUNK-element pieces added in order."""
    total = 0.0
    for s in range(0, len(v), CHUNK):
        total += lanesum(_terms(v[s:s + CHUNK], mode, mu))
    return total


def _blocks(n, block):
    """Start offsets of the blocks (block 0: one block for the tensor)."""
    b = block or max(n, 1)
    return b, [(s, min(s + b, n)) for s in range(0, n, b)]


def _empty_stat(block):
    """Statistics of an empty tensor: one zero for a per-tensor block."""
    return [] if block else [0.0]


def f32_up(v):
    """The smallest float32 >= v, elementwise (v float64 >= 0)."""
    v = np.asarray(v, dtype=np.float64)
    f = v.astype(np.float32)
    return np.where(f.astype(np.float64) < v, np.nextafter(f, np.float32(np.inf)), f).astype(np.float32)


def _decodes_finite(v, out):
    """Whether v (the decoder's work-precision value) rounds to a finite
    value of the decoded dtype `out` (float16 from 65520, bfloat16 from
    0x1.FFp127: halfway past their largest values)."""
    v = abs(float(v))
    name = np.dtype(out).name
    if name == "float16":
        return v < 65520.0
    if name == "bfloat16":
        return v < float.fromhex("0x1.FFp127")
    return math.isfinite(v)


def _decoded_top(s, top, div, out):
    """The largest code's value top * (s / div) as the decoder computes it."""
    if np.dtype(out) == np.float64:
        return float(top) * (float(s) / div)
    with np.errstate(over="ignore"):
        return float(np.float32(top) * (np.float32(s) / np.float32(div)))


def scale_cap(top, div, out):
    """(smax, reach) of lb_scale_cap_of: the largest float32 scale whose top
    code decodes finite in `out`, and its decoded top plus one step."""
    lo, hi = 0, 0x7F800000
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _decodes_finite(_decoded_top(np.uint32(mid).view(np.float32), top, div, out), out):
            lo = mid
        else:
            hi = mid
    smax = np.uint32(lo).view(np.float32)
    return smax, _decoded_top(smax, top, div, out) + float(smax) / div


def scale_fit(ideal, smax):
    """lb_scale_fit: float64 ideal scales rounded up to float32, lowered to
    smax; non-finite ones as they are."""
    ideal = np.asarray(ideal, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        up = f32_up(np.where(np.isfinite(ideal), ideal, 0.0))
        out = np.where(np.isfinite(ideal), np.minimum(up, smax), ideal.astype(np.float32))
    return out.astype(np.float32)


def uniforms24(seed, step, domain, n):
    """The 24-bit uniform integer of each element."""
    return philox_words(seed, step, domain, 0, n) >> np.uint32(8)


def uniforms16(seed, step, domain, n):
    """The 16-bit uniform of each element in stochastic blockwise rounding
    (quant.h's LB_SR16): element 128 g + 64 h + 16 l + j takes bits
    [16 h, 16 h + 16) of word l of counter block 16 g + j."""
    groups = -(-n // 128)
    lanes = philox_blocks(seed, step, domain, np.arange(16 * groups, dtype=np.uint64))
    w = np.stack([np.asarray(v, dtype=np.uint32).reshape(groups, 16) for v in lanes], axis=1)
    halves = np.stack([w & np.uint32(0xFFFF), w >> np.uint32(16)], axis=1)   # (g, h, l, j)
    return halves.reshape(-1)[:n]


def _per_element(values, block, n):
    b = block or max(n, 1)
    return np.repeat(np.asarray(values), b)[:n]


def _smq(x, unit, clip, L, u24):
    """Sign-magnitude quantization (quant.h smq) in x's precision."""
    T = x.dtype.type
    a = np.abs(x)
    a = np.where(a < T(clip), a, T(clip))
    unit = unit.astype(x.dtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = a / unit
        if u24 is None:
            l = np.rint(t)
        else:
            f = np.floor(t)
            up = u24.astype(x.dtype) < (t - f) * T(1 << 24)
            l = f + up.astype(x.dtype)
    l = np.where(l <= T(L), l, T(L))
    l = np.where(unit == 0, 0, l).astype(np.int64)
    return np.where((x < 0) & (unit != 0), L - l, L + l).astype(np.uint8)


def pack_bits(codes, bits):
    """Codes (< 2^bits) as an LSB-first bit stream."""
    c = np.asarray(codes, dtype=np.uint64).reshape(-1)
    b = ((c[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(b.reshape(-1), bitorder="little")


def unpack_bits(buf, bits, n):
    b = np.unpackbits(np.asarray(buf, dtype=np.uint8), bitorder="little")[:n * bits]
    w = (b.reshape(n, bits).astype(np.uint32) << np.arange(bits, dtype=np.uint32)).sum(axis=1)
    return w.astype(np.uint8 if bits <= 8 else np.uint16)


def sign(x, mode, block):
    """Twin of lb_sign: (codes, scales); mode "none" | "l1" | "rms"."""
    x = np.ascontiguousarray(x).reshape(-1)
    codes = np.packbits(x >= 0, bitorder="little")
    if mode == "none":
        return codes, np.zeros(0, np.float32)
    _, spans = _blocks(x.size, block)
    sums = [block_sum(x[s:e], "abs" if mode == "l1" else "sq") for s, e in spans]
    scales = [v / (e - s) if mode == "l1" else math.sqrt(v / (e - s)) for v, (s, e) in zip(sums, spans)]
    return codes, np.array(scales or _empty_stat(block), dtype=np.float64).astype(np.float32)


def absmax_blocks(x, block):
    _, spans = _blocks(x.size, block)
    return np.array([np.abs(x[s:e]).max() for s, e in spans] or _empty_stat(block), dtype=np.float64)


def quantize(x, bits, block, stochastic=False, seed=0, step=0, out=None):
    """Twin of lb_quantize: (codes, scales); out: the decoded dtype (x's)."""
    x = np.ascontiguousarray(x).reshape(-1)
    Q = 1 if bits == 1 else (1 << (bits - 1)) - 1
    scales = scale_fit(absmax_blocks(x, block) / Q, scale_cap(Q, 1, x.dtype if out is None else out)[0])
    if x.size == 0:
        return np.zeros(0, np.uint8), scales
    unit = _per_element(scales, block, x.size).astype(x.dtype)
    # the 16-bit draw u as the 24-bit uniform u * 2^8: u * 2^8 < p * 2^24
    # exactly when u < p * 2^16
    u24 = uniforms16(seed, step, DOMAIN_STOCHASTIC_ROUND, x.size) << np.uint32(8) if stochastic else None
    if bits == 1:
        if u24 is None:
            codes = (x >= 0).astype(np.uint8)
        else:
            T = x.dtype.type
            with np.errstate(divide="ignore", invalid="ignore"):
                p = (x / unit + T(1)) * T(0.5)
            codes = (u24.astype(x.dtype) < p * T(1 << 24)).astype(np.uint8)
        codes[unit == 0] = 1
    else:
        codes = _smq(x, unit, np.inf, Q, u24)
    return pack_bits(codes, bits), scales


def qsgd_bits(levels):
    return int(2 * levels).bit_length()


def qsgd(x, levels, block, seed, step, out=None):
    """Twin of lb_qsgd: (codes, norms); out: the decoded dtype (x's)."""
    x = np.ascontiguousarray(x).reshape(-1)
    _, spans = _blocks(x.size, block)
    norms = scale_fit(np.sqrt(np.array([block_sum(x[s:e], "sq") for s, e in spans] or _empty_stat(block))),
                      scale_cap(levels, levels, x.dtype if out is None else out)[0])
    if x.size == 0:
        return np.zeros(0, np.uint8), norms
    T = x.dtype.type
    unit = (norms.astype(x.dtype) / T(levels)).astype(x.dtype)
    codes = _smq(x, _per_element(unit, block, x.size), np.inf, levels,
                 uniforms24(seed, step, DOMAIN_QSGD, x.size))
    return pack_bits(codes, qsgd_bits(levels)), norms


def terngrad(x, clip, seed, step):
    """Twin of lb_terngrad: (codes, scale[1]); clip None disables clipping."""
    x = np.ascontiguousarray(x).reshape(-1)
    n = x.size
    mu = block_sum(x, "raw") / n if n else 0.0
    c = np.inf
    if clip:
        c = clip * math.sqrt(block_sum(x, "dev2", mu) / n if n else 0.0)
        if x.dtype == np.float32:
            c = float(np.float32(c))
    amax = float(np.abs(x).max()) if n else 0.0
    scale = f32_up([min(amax, c)])
    if n == 0:
        return np.zeros(0, np.uint8), scale
    codes = _smq(x, np.full(n, scale[0]), c, 1, uniforms24(seed, step, DOMAIN_TERNGRAD, n))
    return pack_bits(codes, 2), scale


def natural(x, emax, seed, step):
    """Twin of lb_natural: (codes, top[1])."""
    x = np.ascontiguousarray(x).reshape(-1)
    y = np.abs(x.astype(np.float64))
    amax = y.max() if y.size else 0.0
    top = int(np.frexp(amax)[1]) if amax > 0 else 0   # floor(log2) + 1
    top = max(min(top, emax), -896)
    lo = top - 126
    u = uniforms24(seed, step, DOMAIN_NATURAL, x.size).astype(np.uint64)
    bits = y.view(np.uint64)
    e = (bits >> np.uint64(52)).astype(np.int64) - 1023
    mant = bits & np.uint64((1 << 52) - 1)
    up = ((u << np.uint64(28)) < mant).astype(np.int64)
    field = np.minimum(e + up, top) - lo + 1
    tiny = u.astype(np.float64) < np.ldexp(y, 24 - lo)
    field = np.where(e < lo, tiny.astype(np.int64), field)
    field[y == 0] = 0
    codes = (field | np.where((x < 0) & (field > 0), 0x80, 0)).astype(np.uint8)
    return codes, np.array([top], np.int16)


def minifloat_scale_exponents(x, E, M, block, kmax):
    amax = absmax_blocks(x, block)
    f, p = np.frexp(amax)
    k = np.where(f <= 1 - 2.0 ** -(M + 1), p - 1, p)
    k = np.where(amax > 0, k, 0)
    return np.clip(k, -127, kmax).astype(np.int8)


def minifloat(x, E, M, block, kmax=127):
    """Twin of lb_minifloat: (codes, exponents)."""
    x = np.ascontiguousarray(x).reshape(-1)
    k = minifloat_scale_exponents(x, E, M, block, kmax)
    if x.size == 0:
        return np.zeros(0, np.uint8), k
    bias, cmax = (1 << E) - 1, (1 << (E + M)) - 1
    pmin = 1 - bias
    y = np.abs(x.astype(np.float64)) * np.ldexp(1.0, -_per_element(k, block, x.size).astype(np.int64))
    sat = ~(y < 2.0 - 2.0 ** -M)
    p = np.where(y > 0, np.frexp(y)[1] - 1, pmin)
    p = np.maximum(p, pmin)
    r = np.rint(np.where(sat, 0.0, y) * np.ldexp(1.0, M - p))
    mag = np.minimum(((p - pmin) << M) + r.astype(np.int64), cmax)
    mag = np.where(sat, cmax, mag)
    codes = np.where((mag > 0) & (x < 0), mag | (1 << (E + M)), mag)
    return pack_bits(codes, 1 + E + M), k


def lut2bit(x, out=None):
    """Twin of lb_lut2bit: (codes, table[4]); out: the decoded dtype (x's)."""
    x = np.ascontiguousarray(x).reshape(-1)
    n = x.size
    mu = block_sum(x, "raw") / n if n else 0.0
    w = 1.5 * math.sqrt(block_sum(x, "dev2", mu) / (n - 1) if n > 1 else 0.0)
    v = x.astype(np.float64)
    q = np.clip(np.rint((v - mu) / w + 2.0), 0, 3).astype(np.int64) if w > 0 else np.full(n, 2)
    sums, counts = np.zeros(4), np.zeros(4)
    for s in range(0, n, CHUNK):
        qc, dc = q[s:s + CHUNK], v[s:s + CHUNK] - mu
        for j in range(4):
            sums[j] += np.cumsum(np.concatenate([[0.0], dc[qc == j]]))[-1]
            counts[j] += np.count_nonzero(qc == j)
    table = [mu + sums[j] / counts[j] if counts[j] else mu + (j - 2) * w for j in range(4)]
    lim = scale_cap(1, 1, x.dtype if out is None else out)[0]
    with np.errstate(over="ignore"):
        table = np.array(table).astype(np.float32)
    return pack_bits(q, 2), np.clip(table, -lim, lim).astype(np.float32)


def table_decode(codes, n, bits, table, mult, block, dtype):
    """Twin of lb_table_decode: table[code] * mult[block] in float32 (float64
    for float64 output), then rounded to the output dtype."""
    wd = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    c = unpack_bits(codes, bits, n).astype(np.int64)
    out = np.asarray(table, dtype=wd)[c]
    if mult is not None:
        out = out * _per_element(np.asarray(mult, dtype=wd), block, n)
    return out.astype(dtype)


def to_bfloat16_bits(x):
    """Round to nearest even bfloat16 (uint16 bits), directly from x's value."""
    v = np.asarray(x, dtype=np.float64).reshape(-1)
    out = np.empty(v.size, np.uint16)
    nan = np.isnan(v)
    fin = np.isfinite(v)
    e = np.frexp(np.where(fin, v, 1.0))[1]
    q = np.maximum(e - 8, -133)                 # 8 significant bits, subnormals at 2^-133
    r = np.ldexp(np.rint(np.ldexp(np.where(fin, v, 0.0), -q)), q)
    with np.errstate(over="ignore"):
        f = r.astype(np.float32)
    f = np.where(np.abs(r) > 3.3961775292304e38, np.copysign(np.float32(np.inf), r), f)
    bits = f.astype(np.float32).view(np.uint32) >> np.uint32(16)
    out[:] = bits.astype(np.uint16)
    out[~fin & ~nan] = np.where(v[~fin & ~nan] > 0, 0x7F80, 0xFF80)
    out[nan] = 0x7FC0
    return out


def from_bfloat16_bits(b):
    return (np.asarray(b, dtype=np.uint32) << np.uint32(16)).view(np.float32)


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

# The twins below perform the C kernels' IEEE operations in the same order
# (core/moe.c, core/moe_rows.h), so they return the same bytes: our own
# exponential, 8-lane row sums, column sums as per-chunk partials of
# moe_sum_rows(E) rows added in chunk order, libm's log (math.log).

MOE_SCORES = ("softmax", "sigmoid")


def moe_sum_rows(E):
    """Rows per column-sum partial (lb_moe_sum_rows)."""
    return max(1024, -(-65536 // E)) if E else 65536


def moe_exp(x):
    """Twin of exp_f32 / exp_f64: exact range reduction by the 1.5 * 2**p
    rounding trick, Cephes polynomial (float) or rational form (double),
    times 2**n from bits; flushes to 0 below -87 / -708, +inf above 88 / 709."""
    x = np.asarray(x)
    if x.dtype == np.float32:
        f = np.float32
        lo, hi, magic = f(-87.0), f(88.0), f(12582912.0)
        xc = np.minimum(np.maximum(x, lo), hi)
        n = (xc * f(1.44269504088896341) + magic) - magic
        r = xc - n * f(0.693359375)
        r = r - n * f(-2.12194440e-4)
        p = np.full_like(r, f(1.9875691500e-4))
        for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
                  5.0000001201e-1):
            p = p * r + f(c)
        y = p * (r * r) + r + f(1.0)
        scale = ((n.astype(np.int32) + np.int32(127)) << np.int32(23)).view(np.float32)
        y = y * scale
        return np.where(x < lo, f(0.0), np.where(x > hi, f(np.inf), y)).astype(np.float32)
    lo, hi, magic = -708.0, 709.0, 6755399441055744.0
    xc = np.minimum(np.maximum(x, lo), hi)
    n = (xc * 1.4426950408889634 + magic) - magic
    r = xc - n * 6.93145751953125e-1
    r = r - n * 1.42860682030941723212e-6
    rr = r * r
    px = np.full_like(r, 1.26177193074810590878e-4)
    px = px * rr + 3.02994407707441961300e-2
    px = px * rr + 9.99999999999999999910e-1
    px = px * r
    qx = np.full_like(r, 3.00198505138664455042e-6)
    for c in (2.52448340349684104192e-3, 2.27265548208155028766e-1, 2.00000000000000000009e0):
        qx = qx * rr + c
    y = px / (qx - px)
    y = 1.0 + 2.0 * y
    scale = ((n.astype(np.int32).astype(np.int64) + 1023) << 52).view(np.float64)
    y = y * scale
    return np.where(x < lo, 0.0, np.where(x > hi, np.inf, y))


def moe_lanesum(x):
    """Row sums over the last axis in the C order: 8 interleaved lanes onto
    0, then lane 0 + lane 1 + ... + lane 7."""
    x = np.asarray(x)
    n = x.shape[-1]
    pad = (-n) % 8
    xp = np.concatenate([x, np.zeros(x.shape[:-1] + (pad,), x.dtype)], axis=-1)
    xp = xp.reshape(x.shape[:-1] + ((n + pad) // 8, 8))
    acc = np.zeros(x.shape[:-1] + (8,), x.dtype)
    for b in range(xp.shape[-2]):
        acc = acc + xp[..., b, :]
    s = acc[..., 0]
    for lane in range(1, 8):
        s = s + acc[..., lane]
    return s


def moe_lanedot(a, b):
    """<a, b> over the last axis in double, in the lane order."""
    return moe_lanesum(np.asarray(a).astype(np.float64) * np.asarray(b).astype(np.float64))


def _moe_topk(keys, k, allowed=None):
    """Indices of the k largest keys per row, descending, ties to the lower index."""
    if allowed is not None:
        keys = np.where(allowed, keys, -np.inf)
    return np.argsort(-keys, axis=1, kind="stable")[:, :k]


def moe_scores(logits, score):
    """Softmax or sigmoid scores of each row, in the logits' dtype."""
    z = np.asarray(logits)
    one = z.dtype.type(1)
    if score == "sigmoid":
        return one / (one + moe_exp(-z))
    e = moe_exp(z - z.max(axis=1, keepdims=True))
    return e * (one / moe_lanesum(e))[:, None]   # one division per row


def moe_aux(scores, score):
    """(q, d): the load-balancing distribution in double and its divisor."""
    q = np.asarray(scores).astype(np.float64)
    if score == "softmax":
        return q, np.ones(q.shape[0])
    d = moe_lanesum(q) + 1e-20
    return q / d[:, None], d


def _moe_column_sums(q, R):
    """Column sums of q: partials of R rows (sequential) added in order."""
    total = np.zeros(q.shape[1])
    for r0 in range(0, q.shape[0], R):
        total = total + np.add.accumulate(q[r0:r0 + R], axis=0)[-1]
    return total


def moe_route(logits, k, score="softmax", renormalize=True, bias=None, groups=0, group_k=0):
    """Twin of lb_moe_route: (experts, weights, scores, counts, aux_sums)."""
    z = np.asarray(logits)
    T, E = z.shape
    dt = z.dtype.type
    s = moe_scores(z, score)
    allowed = None
    choice = None
    if bias is not None or groups > 1:
        b = np.zeros(E) if bias is None else np.asarray(bias, np.float64)
        choice = s.astype(np.float64) + b[None, :]
    if groups > 1:
        gs, per = E // groups, k // group_k
        gscore = np.zeros((T, groups))
        for g in range(groups):
            best = -np.sort(-choice[:, g * gs:(g + 1) * gs], axis=1)[:, :per]
            acc = np.zeros(T)
            for r in range(per):
                acc = acc + best[:, r]
            gscore[:, g] = acc
        keep = _moe_topk(gscore, group_k)
        allowed = np.zeros((T, E), bool)
        for r in range(group_k):
            for j in range(gs):
                allowed[np.arange(T), keep[:, r] * gs + j] = True
    keys = z.astype(np.float64) if bias is None else choice
    experts = _moe_topk(keys, k, allowed).astype(np.int32)
    rows = np.arange(T)[:, None]
    if score == "softmax" and renormalize:
        zs = z[rows, experts]
        e = moe_exp(zs - zs.max(axis=1, keepdims=True))
        total = np.zeros(T, z.dtype)
        for j in range(k):
            total = total + e[:, j]
        weights = e / total[:, None]
    elif renormalize:
        ss = s[rows, experts]
        total = np.zeros(T, z.dtype)
        for j in range(k):
            total = total + ss[:, j]
        total = total + dt(1e-20)
        weights = ss / total[:, None]
    else:
        weights = s[rows, experts]
    counts = np.bincount(experts.reshape(-1), minlength=E).astype(np.int64)
    q, _ = moe_aux(s, score)
    sums = _moe_column_sums(q, moe_sum_rows(E))
    return experts, weights.astype(z.dtype), s, counts, sums


def moe_balance_stats(scores, score, experts, E, mask, seg_len):
    """Twin of lb_moe_balance_stats: (counts [B,E], valid [B], sums [B,E])."""
    experts = np.asarray(experts)
    T, k = experts.shape
    valid_rows = np.ones(T, bool) if mask is None else np.asarray(mask, bool).reshape(-1)
    B = T // seg_len if T else 0
    counts = np.zeros((B, E), np.int64)
    valid = np.zeros(B, np.int64)
    sums = np.zeros((B, E))
    q = None
    if scores is not None:
        q, _ = moe_aux(scores, score)
        q = np.where(valid_rows[:, None], q, 0.0)
    R = moe_sum_rows(E)
    for b in range(B):
        sl = slice(b * seg_len, (b + 1) * seg_len)
        ex = experts[sl][valid_rows[sl]]
        counts[b] = np.bincount(ex.reshape(-1), minlength=E)
        valid[b] = valid_rows[sl].sum()
        if q is not None:
            sums[b] = _moe_column_sums(q[sl], R)
    return counts, valid, (sums if scores is not None else None)


def moe_balance_grad(scores, score, g, seg_len, mask):
    """Twin of lb_moe_balance_grad."""
    scores = np.asarray(scores)
    T = scores.shape[0]
    q, d = moe_aux(scores, score)
    gt = np.repeat(np.asarray(g, np.float64), seg_len, axis=0) if T else np.zeros_like(q)
    dot = moe_lanesum(q * gt)
    if score == "softmax":
        grad = q * (gt - dot[:, None])
    else:
        s = scores.astype(np.float64)
        grad = s * (1.0 - s) * (gt - dot[:, None]) / d[:, None]
    grad = grad.astype(scores.dtype)
    if mask is not None:
        grad[~np.asarray(mask, bool).reshape(-1)] = 0
    return grad


def moe_z_loss(logits, mask, scale):
    """Twin of lb_moe_z_loss: (sum over valid rows of lse^2, grad)."""
    z = np.asarray(logits)
    T, E = z.shape
    m = z.max(axis=1) if T else np.zeros(0, z.dtype)
    e = moe_exp(z - m[:, None])
    s = moe_lanesum(e)
    lse = m.astype(np.float64) + np.array([math.log(float(v)) for v in s])
    valid = np.ones(T, bool) if mask is None else np.asarray(mask, bool).reshape(-1)
    total = 0.0
    R = moe_sum_rows(E)
    for r0 in range(0, T, R):
        acc = 0.0
        for t in range(r0, min(T, r0 + R)):
            if valid[t]:
                acc = acc + lse[t] * lse[t]
        total = total + acc
    c = scale * 2.0 * lse
    grad = (c[:, None] * (e * (z.dtype.type(1) / s)[:, None]).astype(np.float64)).astype(z.dtype)
    grad[~valid] = 0
    return total, grad


def moe_plan(experts, E, mask, capacity, drop, weights):
    """Twin of lb_moe_plan: (offsets [E+1], rows [N], position [T,k])."""
    experts = np.asarray(experts)
    T, k = experts.shape
    flat = experts.reshape(-1).astype(np.int64)
    live = np.ones(T * k, bool) if mask is None else np.repeat(np.asarray(mask, bool).reshape(-1), k)
    position = np.full(T * k, -1, np.int64)
    w = None if weights is None else np.asarray(weights).reshape(-1).astype(np.float64)
    rows, offsets = [], [0]
    for e in range(E):
        mine = np.flatnonzero(live & (flat == e))          # token order
        if capacity is not None and mine.size > capacity:
            if drop == "position":
                mine = mine[:capacity]
            else:
                order = np.lexsort((mine, -w[mine]))       # largest weight, then lower token
                mine = np.sort(mine[order[:capacity]])
        position[mine] = offsets[-1] + np.arange(mine.size)
        rows.append(mine)
        offsets.append(offsets[-1] + mine.size)
    rows = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
    return np.array(offsets, np.int64), rows, position.reshape(T, k)


def moe_scatter(x, position, n, weights=None):
    """Twin of lb_moe_scatter: out[position[t, s]] = w * x[t] for the kept slots."""
    x = np.asarray(x)
    position = np.asarray(position)
    out = np.empty((n, x.shape[1]), x.dtype)
    for s in range(position.shape[1]):
        kept = position[:, s] >= 0
        rows = x[kept]
        if weights is not None:
            rows = np.asarray(weights)[kept, s][:, None] * rows
        out[position[kept, s]] = rows
    return out


def moe_combine(y, position, weights=None):
    """Twin of lb_moe_combine: slot-ordered weighted sums onto zero."""
    y = np.asarray(y)
    position = np.asarray(position)
    T, k = position.shape
    out = np.zeros((T, y.shape[1]), y.dtype)
    for s in range(k):
        kept = position[:, s] >= 0
        rows = y[position[kept, s]]
        if weights is not None:
            rows = np.asarray(weights)[kept, s][:, None] * rows
        out[kept] = out[kept] + rows
    return out


def moe_combine_dot(grad_out, y, position):
    """Twin of lb_moe_combine_dot."""
    y = np.asarray(y)
    position = np.asarray(position)
    T, k = position.shape
    gw = np.zeros((T, k), y.dtype)
    for s in range(k):
        kept = position[:, s] >= 0
        gw[kept, s] = moe_lanedot(np.asarray(grad_out)[kept], y[position[kept, s]]).astype(y.dtype)
    return gw


# --------------------------------------------------------------------------
# Two-means sign, majority vote, dithering
# --------------------------------------------------------------------------

DOMAIN_DITHER = 7


def sign_two_means(x, block):
    """Twin of lb_sign_two_means: (codes, scales[2 per block])."""
    x = np.ascontiguousarray(x).reshape(-1)
    codes = np.packbits(x >= 0, bitorder="little")
    _, spans = _blocks(x.size, block)
    out = []
    for s, e in spans:
        v = x[s:e].astype(np.float64)
        pos = neg = 0.0
        for p in range(0, v.size, CHUNK):
            w = v[p:p + CHUNK]
            pos += lanesum(np.where(w >= 0, w, 0.0))
            neg += lanesum(np.where(w >= 0, 0.0, w))
        npos = int((v >= 0).sum())
        nneg = v.size - npos
        out += [pos / npos if npos else 0.0, -neg / nneg if nneg else 0.0]
    if not spans and not block:
        out = [0.0, 0.0]
    return codes, np.array(out, dtype=np.float64).astype(np.float32)


def majority_vote(code_arrays, n, thresh=0):
    """Twin of lb_majority_vote: packed bits, 1 where >= thresh (0: ceil(W/2)) are set."""
    W = len(code_arrays)
    t = thresh or (W + 1) // 2
    bits = sum(np.unpackbits(c, count=n, bitorder="little").astype(np.int64) for c in code_arrays)
    return np.packbits(bits >= t, bitorder="little")


def dither_levels(levels, natural):
    """The level values l_0 .. l_s (float64)."""
    m = np.arange(levels + 1, dtype=np.float64)
    if natural:
        out = np.ldexp(1.0, (m - levels).astype(int))
        out[0] = 0.0
        return out
    return m / levels


def dither_indices(x, levels, natural, l2, seed, step, out=None):
    """(signed level index per element, float32 norm) of lb_dither; out:
    the decoded dtype (x's)."""
    x = np.ascontiguousarray(x).reshape(-1)
    if l2:
        tot = sum(lanesum(_terms(x[s:s + CHUNK], "sq")) for s in range(0, x.size, CHUNK))
        ideal = math.sqrt(tot)
    else:
        ideal = float(np.abs(x).max()) if x.size else 0.0
    norm = scale_fit(ideal, scale_cap(1, 1, x.dtype if out is None else out)[0])
    nv = float(norm)
    if x.size == 0:
        return np.zeros(0, np.int64), np.float32(norm)
    r = np.abs(x.astype(np.float64)) / nv if nv > 0 else np.zeros(x.size)
    u = uniforms24(seed, step, DOMAIN_DITHER, x.size).astype(np.float64)
    s = levels
    if natural:
        _, e = np.frexp(r)
        a = e - 1
        small = a < 1 - s
        lo = np.where(small, 0, a + s)
        t = np.where(small, np.ldexp(r, s - 1), np.ldexp(r, -a) - 1.0)
    else:
        v = r * s
        f = np.floor(v)
        lo, t = f.astype(np.int64), v - f
    m = lo + (u < t * 16777216.0)
    m = np.where(r <= 0, 0, np.where(r >= 1, s, np.minimum(m, s)))
    return np.where(x < 0, -m, m).astype(np.int64), np.float32(norm)


def gamma_stream(signed_levels):
    """(stream bytes, nbits): Elias gamma of m + 1, then a sign bit when m > 0."""
    v = np.asarray(signed_levels, dtype=np.int64)
    g = np.abs(v) + 1
    b = np.zeros(v.size, np.int64)
    while True:
        more = (g >> (b + 1)) > 0
        if not more.any():
            break
        b += more
    length = 2 * b + 1 + (g > 1)
    k = np.arange(int(length.max()) if v.size else 0)[None, :]
    B, G = b[:, None], g[:, None]
    shift = np.clip(2 * B - k, 0, 62)
    bit = np.where(k < B, 0, np.where(k <= 2 * B, (G >> shift) & 1, (v[:, None] < 0)))
    bits = bit[k < length[:, None]].astype(np.uint8)
    return np.packbits(bits, bitorder="little"), int(length.sum())


def dither(x, levels, natural, l2, seed, step, out=None):
    """Twin of lb_dither: (stream, norm, nbits)."""
    idx, norm = dither_indices(x, levels, natural, l2, seed, step, out)
    stream, nbits = gamma_stream(idx)
    return stream, np.array([norm], np.float32), nbits


def dither_decode(signed_levels, levels, natural, norm, dtype):
    """Decoded values: sign * l_m * norm (float64 product, then dtype)."""
    mag = dither_levels(levels, natural) * float(norm)
    wd = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    v = mag.astype(wd)[np.abs(signed_levels)]
    return np.where(signed_levels < 0, -v, v).astype(dtype)


# --------------------------------------------------------------------------
# FedZip
# --------------------------------------------------------------------------

def _seq_sum(v):
    """Sequential float64 sum (left to right), as the C loops add."""
    return float(np.cumsum(v)[-1]) if len(v) else 0.0


def _nearest3(v, c):
    d = np.abs(v[:, None] - np.asarray(c, np.float64)[None, :])
    j = np.where(d[:, 1] < d[:, 0], 1, 0)
    dj = np.where(j == 1, d[:, 1], d[:, 0])
    return np.where(d[:, 2] < dj, 2, j)


def kmeans3(x, iters):
    """Twin of lb_kmeans3: (float32 centroids[3], labels)."""
    v = np.ascontiguousarray(x, dtype=np.float64).reshape(-1)
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    cen = [lo, lo + 0.5 * (hi - lo), hi]
    for _ in range(iters):
        lab = _nearest3(v, cen)
        sums, cnts = [0.0] * 3, [0] * 3
        for s in range(0, v.size, CHUNK):
            w, lw = v[s:s + CHUNK], lab[s:s + CHUNK]
            for j in range(3):
                sums[j] += _seq_sum(w[lw == j])
                cnts[j] += int((lw == j).sum())
        cen = [sums[j] / cnts[j] if cnts[j] else cen[j] for j in range(3)]
    cf = np.array(cen, dtype=np.float64).astype(np.float32)
    return cf, _nearest3(v, cf.astype(np.float64)).astype(np.uint8)


def _elias_gamma_bits(values):
    out = []
    for g in values:
        b = int(g).bit_length() - 1
        out += [0] * b + [(int(g) >> (b - k)) & 1 for k in range(b + 1)]
    return out


def fedzip_stream(labels, gaps):
    """Twin of lb_fedzip_encode: (stream, major, nbits)."""
    labels = np.asarray(labels, dtype=np.int64)
    cnt = np.bincount(labels, minlength=3)
    major = int(np.argmax(cnt))
    minor0 = 1 if major == 0 else 0
    bits = []
    if not gaps:
        for lab in labels.tolist():
            bits += [0] if lab == major else [1, int(lab != minor0)]
    else:
        pos = np.flatnonzero(labels != major)
        gapv = np.diff(np.concatenate([[-1], pos]))
        g = _elias_gamma_bits(gapv.tolist())
        i = 0
        for gv, p in zip(gapv.tolist(), pos.tolist()):
            n = 2 * (int(gv).bit_length() - 1) + 1
            bits += g[i:i + n] + [int(labels[p] != minor0)]
            i += n
    arr = np.array(bits, dtype=np.uint8)
    return np.packbits(arr, bitorder="little"), major, len(bits)


def fedzip(x, ratio, gaps, iters=4):
    """Twin of lowband.fedzip: (stream, centroids, major, nbits, labels)."""
    v = np.ascontiguousarray(x).reshape(-1)
    if ratio < 1.0 and v.size:
        k = min(max(int(math.floor(ratio * v.size + 0.5)), 1), v.size)
        idx, vals = topk(v, k)
        dense = np.zeros_like(v)
        dense[idx] = vals
        v = dense
    cen, lab = kmeans3(v, iters)
    stream, major, nbits = fedzip_stream(lab, gaps)
    return stream, cen, major, nbits, lab

# ==========================================================================
# PowerSGD
# ==========================================================================

POWERSGD_BLOCK = 4096      # rows per block of the sums (LB_PSGD_BLOCK)


POWERSGD_LANES = 8         # interleaved partial sums per block


def _blocked_sum(terms):
    """The C core's sum of float64 terms: per block of POWERSGD_BLOCK rows,
    row k adds into lane k % 8 (from +0.0, in row order); a block's sum is
    0.0 + lane 0 + ... + lane 7; the total 0.0 + block 0 + block 1 + ..."""
    total = 0.0
    for lo in range(0, len(terms), POWERSGD_BLOCK):
        block = terms[lo:lo + POWERSGD_BLOCK]
        pad = -len(block) % POWERSGD_LANES
        rows = np.concatenate([block, np.zeros(pad)]).reshape(-1, POWERSGD_LANES)
        lanes = np.cumsum(np.vstack([np.zeros(POWERSGD_LANES), rows]), axis=0)[-1]
        bs = 0.0
        for v in lanes:
            bs += float(v)
        total += bs
    return total


def powersgd_orthogonalize(a, epsilon=0.0):
    """Modified Gram-Schmidt over the columns of each trailing n x r matrix
    of a (float32/float64); returns a new array with the bytes of the C
    kernel: column i *= 1 / (sqrt(sum c^2) + epsilon) (0 when that is 0), then
    c_j -= <c_i, c_j> c_i for j > i, sums in float64."""
    a = np.array(a, copy=True)
    dt = a.dtype
    mats = a.reshape(-1, a.shape[-2], a.shape[-1])
    for mat in mats:
        n, r = mat.shape
        total = [_blocked_sum(mat[:, j].astype(np.float64) ** 2) for j in range(r)]
        for i in range(r):
            d = math.sqrt(total[i]) + epsilon
            col = mat[:, i].astype(np.float64)
            inv = 0.0 if d == 0 else 1.0 / d
            mat[:, i] = (col * inv).astype(dt)
            c = mat[:, i].astype(np.float64)
            dots = {j: _blocked_sum(c * mat[:, j].astype(np.float64)) for j in range(i + 1, r)}
            for j in range(i + 1, r):
                mat[:, j] = (mat[:, j].astype(np.float64) - dots[j] * c).astype(dt)
            if i + 1 < r:
                total[i + 1] = _blocked_sum(mat[:, i + 1].astype(np.float64) ** 2)
    return a
