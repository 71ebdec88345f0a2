"""Quantization and bit packing.

Every quantizer takes a float32, float64, float16 or bfloat16 array (any
shape, read as its flattened C-order vector; float16/bfloat16 are widened
to float32 exactly), leaves it unchanged and returns a ``lowband.Quantized``
whose ``dequantize()`` gives the decoded tensor back in the input dtype
(a float16 or bfloat16 input decodes to its own dtype).
Codes are packed LSB first into one bit stream; scales are float32,
computed in float64 and, where the largest code would decode to +-Inf in
the decoded dtype, lowered to the largest float32 that decodes finite
(codes saturate), so finite input never decodes to Inf; input that no
float32 scale can represent (float64 beyond it) raises ValueError.
Results are byte-identical for every thread count and instruction set;
randomised quantizers draw from Philox4x32-10 keyed by ``seed`` with a
fresh stream per ``step``.  Non-finite input raises ValueError naming the
first bad flat index unless ``check_finite=False``.  Exact definitions, code
mappings and bits per element: docs/quantization.md.
"""
from __future__ import annotations

import numpy as np

from . import _core
from ._payload import DTYPE_CODES, Quantized, shape_size
from ._schemes import (SCHEMES, BlockwiseScheme, DitherScheme, FedZipScheme, MinifloatScheme, QSGDScheme, emax_of,
                       packed_bytes)
from ._validate import (ANY_FLOAT_DTYPES, BFLOAT16, FLOAT_DTYPES, as_float_array, from_torch, check_choice,
                        check_finite_number, check_int, check_seed, check_step, check_threads,
                        group_arrays, MAX_STEP)

__all__ = ["sign", "quantize", "qsgd", "terngrad", "natural", "minifloat", "lut2bit",
           "cast", "pack_bits", "unpack_bits", "dither", "fedzip", "sign_group", "quantize_group"]

F16 = np.dtype(np.float16)
INPUT_DTYPES = ANY_FLOAT_DTYPES
_NARROW_CODES = {"float16": 3, "bfloat16": 4}
MAX_BLOCK = _core.MAX_BLOCK   # inclusive; the one bound (csrc/lowband.h)


def _input(x, threads):
    """(float32/float64 working array, decoded dtype, shape)."""
    if type(x) is np.ndarray and x.dtype in FLOAT_DTYPES:   # the C glue copies a strided x
        return x, x.dtype, x.shape
    return _widened(as_float_array(x, "x", INPUT_DTYPES), threads)


def _widened(arr, threads):
    """_input for an array already checked."""
    if arr.dtype in FLOAT_DTYPES:
        return arr, arr.dtype, arr.shape
    is_bf16 = arr.dtype == BFLOAT16
    work = np.empty(arr.shape, np.float32)
    _core.widen(arr.reshape(-1).view(np.uint16), 4 if is_bf16 else 3, work.reshape(-1), threads)
    out_dtype = arr.dtype if arr.dtype in DTYPE_CODES else np.dtype(np.float32)
    return work, out_dtype, arr.shape


def _block(block, name="block"):
    if type(block) is int and 1 <= block <= MAX_BLOCK:
        return block
    return 0 if block is None else check_int(block, name, 1, MAX_BLOCK)


def _payload(scheme, shape, dtype, params, arrays):
    """The kernel's output as a Quantized.  The kernels lower scales so that
    every code decodes finite; check_range re-checks it (ValueError), so a
    payload that decode would refuse is never returned."""
    q = Quantized._make(scheme, shape, dtype, params, arrays)
    check_range = getattr(SCHEMES[scheme], "check_range", None)
    if check_range is not None:
        try:
            check_range(q)
        except ValueError as exc:
            raise ValueError(f"x: its {scheme} encoding cannot be decoded in {q.dtype} "
                             f"({exc})") from None
    return q


_SIGN_MODES = {m: i for i, m in enumerate(SCHEMES["sign"].MODES)}
_TWO_MEANS = SCHEMES["sign"].TWO_MEANS


def _linear_payload(scheme, shape, dtype, params, codes, scales, levels):
    """_payload for sign and blockwise output (``levels``: the largest
    |table entry|): check_range runs only when its fast bound (levels times
    the largest scale far from overflow, checked in C) does not hold."""
    q = Quantized._make(scheme, shape, dtype, params, {"codes": codes, "scales": scales})
    if _core.range_ok(scales, levels, DTYPE_CODES[q.dtype]) or not shape_size(shape):
        return q
    return _payload(scheme, shape, dtype, params, q.arrays)


def sign(x, *, scale="l1", block=None, check_finite=True, threads=None):
    """1-bit signs with an optional scale (EF-signSGD, 1-bit Adam, Seide et
    al.'s 1-bit SGD).

    Code 1 means x >= 0 (so sign(+-0) = +1).  ``scale``: "l1" (mean |x|),
    "rms" (||x||_2 / sqrt(n)) or "none" (decodes to +-1): code 1 decodes as
    +scale, code 0 as -scale, one float32 scale per ``block`` elements (or
    for the whole tensor when ``block`` is None), 1 bit per element plus 32
    bits per block.  "two_means" (Seide et al., Interspeech 2014): per block
    code 1 decodes to the mean of the non-negative elements and code 0 to
    the mean of the negative ones (the reconstruction that minimises the
    squared error for the sign partition; an empty side gets 0); 1 bit per
    element plus 64 bits per block.
    """
    mode = _SIGN_MODES.get(scale) if type(scale) is str else None
    if mode is None:
        mode = SCHEMES["sign"].MODES.index(
            check_choice(scale, "scale", ("l1", "rms", "none", "two_means")))
    block = 0 if block is None else _block(block)
    if threads is not None:
        threads = check_threads(threads)
    work, dtype, shape = _input(x, threads)
    check_finite = check_finite is True or bool(check_finite)
    if mode == _TWO_MEANS:
        codes, scales = _core.sign_two_means(work, block, check_finite, threads)
    else:
        codes, scales = _core.sign(work, mode, block, check_finite, threads)
    return _linear_payload("sign", shape, dtype, {"scale": mode, "block": block},
                           codes, scales, 1.0)


def quantize(x, bits, *, block=64, rounding="nearest", seed=None, step=0, check_finite=True,
             threads=None):
    """Symmetric blockwise absmax quantization to ``bits`` in {1, 2, 3, 4, 8}.

    Per block of ``block`` elements (None: the whole tensor) the float32 step
    is d = absmax / Q rounded up, Q = 2^(bits-1) - 1; q = round(x / d) in
    [-Q, Q] is stored as the code q + Q (the all-ones code is unused).  With
    bits=1 the levels are -absmax and +absmax.  ``rounding``: "nearest"
    (ties to even) or "stochastic" (up with probability equal to the
    fraction, from 16 random bits per element keyed by (seed, step, index):
    unbiased to within 2^-16 of a level; needs ``seed``).
    """
    if type(bits) is not int:
        bits = check_int(bits, "bits")
    if bits not in (1, 2, 3, 4, 8):
        raise ValueError(f"bits: expected one of 1, 2, 3, 4, 8, got {bits}")
    block = _block(block)
    if type(rounding) is str and rounding == "nearest":
        stochastic = False
    else:
        stochastic = check_choice(rounding, "rounding", ("nearest", "stochastic")) == "stochastic"
    seed = check_seed(seed) if stochastic else 0
    if type(step) is not int or not 0 <= step < MAX_STEP:
        step = check_step(step)
    if threads is not None:
        threads = check_threads(threads)
    work, dtype, shape = _input(x, threads)
    codes, scales = _core.quantize(work, DTYPE_CODES[dtype], bits, block, stochastic, seed, step,
                                   check_finite is True or bool(check_finite), threads)
    return _linear_payload("blockwise_sr" if stochastic else "blockwise", shape, dtype,
                           {"bits": bits, "block": block}, codes, scales,
                           float(BlockwiseScheme.levels(bits)))


def _group_inputs(tensors, offsets, threads):
    """[(working array, decoded dtype, shape)] of a group (see topk_group)."""
    return [_widened(a, threads) for a in group_arrays(tensors, offsets, dtypes=INPUT_DTYPES)]


def _group_payloads(scheme, segs, params, pairs, aux):
    return [_payload(scheme, shape, dtype, params, {"codes": codes, aux: sc})
            for (_, dtype, shape), (codes, sc) in zip(segs, pairs)]


def sign_group(tensors, *, scale="l1", block=None, offsets=None, check_finite=True, threads=None):
    """``sign`` on every tensor of a group, in one C call -> a list of
    Quantized, each exactly ``sign(tensors[i], ...)`` for any thread count.
    ``tensors``: a list of arrays or CPU tensors, or one array with
    ``offsets`` (segment boundaries ``[0, ..., size]``; payloads 1-D), as in
    ``lowband.topk_group``.  ``scale="two_means"`` runs tensor by tensor."""
    mode = SCHEMES["sign"].MODES.index(
        check_choice(scale, "scale", ("l1", "rms", "none", "two_means")))
    block = _block(block)
    threads = check_threads(threads)
    segs = _group_inputs(tensors, offsets, threads)
    if mode == SCHEMES["sign"].TWO_MEANS:    # no grouped kernel: as sign(), tensor by tensor
        pairs = [_core.sign_two_means(w, block, bool(check_finite), threads) for w, _, _ in segs]
        return _group_payloads("sign", segs, {"scale": mode, "block": block}, pairs, "scales")
    pairs = _core.sign_group([w for w, _, _ in segs], mode, block, bool(check_finite), threads)
    return _group_payloads("sign", segs, {"scale": mode, "block": block}, pairs, "scales")


def quantize_group(tensors, bits, *, block=64, rounding="nearest", seed=None, step=0, offsets=None,
                   check_finite=True, threads=None):
    """``quantize`` on every tensor of a group, in one C call -> a list of
    Quantized, each exactly ``quantize(tensors[i], ...)`` (with the same
    seed and step: stochastic rounding draws per tensor what a lone call
    draws).  ``tensors`` and ``offsets`` as in ``lowband.topk_group``."""
    bits = check_int(bits, "bits")
    if bits not in (1, 2, 3, 4, 8):
        raise ValueError(f"bits: expected one of 1, 2, 3, 4, 8, got {bits}")
    block = _block(block)
    stochastic = check_choice(rounding, "rounding", ("nearest", "stochastic")) == "stochastic"
    seed = check_seed(seed) if stochastic else 0
    step = check_step(step)
    threads = check_threads(threads)
    segs = _group_inputs(tensors, offsets, threads)
    out_dtypes = bytes(DTYPE_CODES[dtype] for _, dtype, _ in segs)
    pairs = _core.quantize_group([w for w, _, _ in segs], out_dtypes, bits, block, stochastic,
                                 seed, step, bool(check_finite), threads)
    return _group_payloads("blockwise_sr" if stochastic else "blockwise", segs,
                           {"bits": bits, "block": block}, pairs, "scales")


def qsgd(x, levels, *, seed, step=0, block=None, check_finite=True, threads=None):
    """QSGD (Alistarh et al.) with s = ``levels`` in [1, 127]: unbiased.

    Per block (None: the whole tensor) the float32 norm ||x||_2 (rounded
    up); l = floor(s |x| / norm) + Bernoulli(fraction), sent as the code
    sign(x) * l + s in ceil(log2(2s + 1)) bits.
    """
    levels = check_int(levels, "levels", 1, QSGDScheme.MAX_LEVELS)
    seed, step = check_seed(seed), check_step(step)
    block = _block(block)
    threads = check_threads(threads)
    work, dtype, shape = _input(x, threads)
    codes, norms = _core.qsgd(work, DTYPE_CODES[dtype], levels, block, seed, step, bool(check_finite),
                              threads)
    return _payload("qsgd", shape, dtype, {"levels": levels, "block": block},
                    {"codes": codes, "scales": norms})


def terngrad(x, *, seed, step=0, clip=2.5, check_finite=True, threads=None):
    """TernGrad (Wen et al.): ternary {-s, 0, s} codes, 2 bits per element.

    x is first clipped to +-clip * sigma (sigma its population standard
    deviation; ``clip=None`` disables clipping), s = max |clipped| (float32,
    rounded up), and each element becomes sign * s with probability
    |clipped| / s, else 0: an unbiased estimate of the clipped x (of x itself
    when clip=None).
    """
    seed, step = check_seed(seed), check_step(step)
    clip = 0.0 if clip is None else check_finite_number(clip, "clip", 0.0, lo_open=True)
    threads = check_threads(threads)
    work, dtype, shape = _input(x, threads)
    codes, scale = _core.terngrad(work, clip, seed, step, bool(check_finite), threads)
    return _payload("terngrad", shape, dtype, {}, {"codes": codes, "scales": scale})


def natural(x, *, seed, step=0, check_finite=True, threads=None):
    """Natural compression (Horvath et al.): |x| randomly rounded to one of
    its two neighbouring powers of two, unbiased; 8 bits per element (sign
    and a 7-bit exponent relative to the tensor's top exponent, stored as
    int16).  Magnitudes more than 126 binades below the largest round to 0
    or the smallest representable power, still unbiased.
    """
    seed, step = check_seed(seed), check_step(step)
    threads = check_threads(threads)
    work, dtype, shape = _input(x, threads)
    codes, top = _core.natural(work, emax_of(dtype), seed, step, bool(check_finite), threads)
    return _payload("natural", shape, dtype, {}, {"codes": codes, "top": top})


def minifloat(x, exp_bits, man_bits, *, block=128, check_finite=True, threads=None):
    """Small floats (E3M0 = ``exp_bits=3, man_bits=0``: Streaming DiLoCo's
    4-bit outer gradients) with a power-of-two scale 2^k per block.

    Element format: sign, E exponent bits, M mantissa bits, IEEE-like with
    bias 2^E - 1 and subnormals, no Inf/NaN (largest value 2 - 2^-M).  k is
    the smallest exponent with absmax <= (2 - 2^-M) * 2^k, stored as int8
    (clamped to [-127, 127], [-127, 15] for float16); rounding to nearest,
    ties to even, saturating.  1 + E + M bits per element plus 8 per block.
    """
    E = check_int(exp_bits, "exp_bits", 1, 5)
    M = check_int(man_bits, "man_bits", 0, 3)
    if not MinifloatScheme.valid(E, M):
        raise ValueError(f"exp_bits + man_bits: expected at most 7, got {E + M}")
    block = _block(block)
    threads = check_threads(threads)
    work, dtype, shape = _input(x, threads)
    kmax = 15 if dtype == F16 else 127
    codes, exps = _core.minifloat(work, E, M, block, kmax, bool(check_finite), threads)
    return _payload("minifloat", shape, dtype, {"exp_bits": E, "man_bits": M, "block": block},
                    {"codes": codes, "exponents": exps})


def lut2bit(x, *, check_finite=True, threads=None):
    """SparseLoCo's 2-bit values: centred on the mean mu, 4 bins of width
    w = 6 sigma / 4 (sigma the sample standard deviation), code
    clamp(round((x - mu) / w + 2), 0, 3), decoded through a 4-entry float32
    table of the bin means.  2 bits per element plus 128 bits.
    """
    threads = check_threads(threads)
    work, dtype, shape = _input(x, threads)
    codes, table = _core.lut2bit(work, DTYPE_CODES[dtype], bool(check_finite), threads)
    return _payload("lut2bit", shape, dtype, {}, {"codes": codes, "table": table})


def cast(x, dtype, *, check_finite=True, threads=None):
    """x cast to float16 or bfloat16 (round to nearest even) as a payload
    that decodes back to x's dtype; 16 bits per element, summable.  A value
    that overflows the narrow type raises ValueError (unless
    ``check_finite=False``, which gives Inf)."""
    name = dtype if isinstance(dtype, str) else None
    if name is None:
        try:
            d = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype: expected 'float16' or 'bfloat16', got {dtype!r}") from None
        name = {F16: "float16", BFLOAT16: "bfloat16"}.get(d, str(d))
    check_choice(name, "dtype", ("float16", "bfloat16"))
    threads = check_threads(threads)
    arr = as_float_array(x, "x", INPUT_DTYPES)
    out_dtype = arr.dtype if arr.dtype in DTYPE_CODES else np.dtype(np.float32)
    if arr.dtype == F16 and name == "float16":
        codes = arr.reshape(-1).view(np.uint16).copy()
    else:
        work, _, _ = _input(arr, threads)
        codes = _core.narrow(work, _NARROW_CODES[name], bool(check_finite), threads)
    return _payload(name, arr.shape, out_dtype, {}, {"codes": codes})


def pack_bits(codes, bits, *, threads=None):
    """Packs non-negative integer codes (< 2^bits, bits in 1..16) into a uint8
    bit stream of ceil(n * bits / 8) bytes: code i occupies stream bits
    [i*bits, (i+1)*bits), stream bit k is bit k % 8 of byte k // 8 (LSB
    first, like ``np.packbits(..., bitorder="little")`` for bits=1); spare
    bits of the last byte are zero."""
    bits = check_int(bits, "bits", 1, 16)
    threads = check_threads(threads)
    arr = np.asarray(from_torch(codes, "codes"))
    if arr.dtype.kind not in "ui" or arr.dtype.itemsize > 8:
        raise TypeError(f"codes: expected an integer array, got dtype {arr.dtype}")
    return _core.pack_bits(arr.reshape(-1), bits, threads)


def unpack_bits(buf, bits, n, *, threads=None):
    """The n codes of a stream made by ``pack_bits`` (uint8 for bits <= 8,
    else uint16).  ``buf``: bytes-like or a uint8 array holding at least
    ceil(n * bits / 8) bytes; nothing past those is read."""
    bits = check_int(bits, "bits", 1, 16)
    n = check_int(n, "n", 0, 1 << 60)
    threads = check_threads(threads)
    buf = from_torch(buf, "buf")
    if isinstance(buf, np.ndarray):
        if buf.dtype != np.uint8:
            raise TypeError(f"buf: expected a uint8 array or bytes, got dtype {buf.dtype}")
        arr = np.ascontiguousarray(buf.reshape(-1))
    else:
        try:
            arr = np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)
        except TypeError:
            raise TypeError(f"buf: expected bytes-like or a uint8 array, got {type(buf).__name__}") from None
    need = packed_bytes(n, bits)
    if arr.size < need:
        raise ValueError(f"buf: expected at least {need} bytes for n={n} codes of {bits} bits, "
                         f"got {arr.size}")
    return _core.unpack_bits(arr, bits, n, threads)



def dither(x, levels, *, partition="natural", norm="max", seed, step=0, threads=None):
    """Random dithering (Horvath et al. 2019, "Natural Compression for
    Distributed Deep Learning"; BytePS): unbiased, Elias-gamma coded.

    r = |x| / norm (``norm``: "max" = max |x| or "l2" = ||x||_2, float32
    rounded up) is rounded at random to one of its two neighbouring levels,
    up with probability proportional to the distance from the lower one, so
    E[decoded] = x.  ``partition``: "natural" (levels 0, 2^(1-s), ..., 1/2,
    1: power-of-two spacing) or "linear" (0, 1/s, ..., 1, as QSGD), with s
    = ``levels`` in [1, 127].  Randomness: Philox keyed by (seed, step).
    Wire: per element the Elias-gamma code of the level index m + 1 plus a
    sign bit when m > 0 (1 bit for a zero), then one float32 norm; the bit
    count is ``payload.params["nbits"]`` and ``payload.nbytes`` is exact.
    Non-finite input raises ValueError.
    """
    levels = check_int(levels, "levels", 1, DitherScheme.MAX_LEVELS)
    part = DitherScheme.PARTITIONS.index(check_choice(partition, "partition", DitherScheme.PARTITIONS))
    nrm = DitherScheme.NORMS.index(check_choice(norm, "norm", DitherScheme.NORMS))
    seed, step = check_seed(seed), check_step(step)
    threads = check_threads(threads)
    work, dtype, shape = _input(x, threads)
    codes, scale, nbits = _core.dither(work, DTYPE_CODES[dtype], levels, part == 0, nrm == 1, seed,
                                       step, threads)
    return _payload("dither", shape, dtype,
                    {"levels": levels, "partition": part, "norm": nrm, "nbits": nbits},
                    {"codes": codes, "scales": scale})


def fedzip(x, ratio=0.01, *, encoding="gaps", iters=4, threads=None):
    """FedZip's pipeline for one layer (Malekijoo et al. 2021, "FedZip: A
    Compression Framework for Communication-Efficient Federated Learning").

    1. Top-z: keep the round(ratio * n) largest magnitudes (at least one),
       zero the rest (``ratio=1``: keep all).
    2. 3-means on all n values, zeros included (one centroid lands near 0):
       centroids start at (min, (min + max) / 2, max), ``iters`` Lloyd
       iterations (the authors use 4), float32 centroids; every value
       becomes its nearest centroid.
    3. The labels are coded, with "major" the most frequent label:
       "huffman": "0" for the major label, "10" / "11" for the two others
       (a real prefix code: 1 to 2 bits per element); "gaps" (the paper's
       position encoding): for each element not in the major cluster its
       distance to the previous one, Elias-gamma coded, plus 1 bit for its
       cluster: about ratio * (2 log2(1 / ratio) + 2) bits per element.
    Plus 3 float32 centroids; ``payload.nbytes`` is exact.  Deterministic:
    the same bytes for every thread count.
    """
    ratio = check_finite_number(ratio, "ratio", 0.0, 1.0, lo_open=True)
    enc = FedZipScheme.ENCODINGS.index(check_choice(encoding, "encoding", FedZipScheme.ENCODINGS))
    iters = check_int(iters, "iters", 0, 1000)
    threads = check_threads(threads)
    work, dtype, shape = _input(x, threads)
    flat = work.reshape(-1)
    if ratio < 1.0 and flat.size:
        from .sparsify import topk
        from ._validate import k_from_ratio
        kept = topk(flat, k_from_ratio(flat.size, ratio), threads=threads)
        flat = np.zeros_like(flat)
        flat[kept.indices] = kept.values
    codes, centroids, major, nbits = _core.fedzip(flat, iters, enc == 1, threads)
    return _payload("fedzip", shape, dtype, {"encoding": enc, "major": major, "nbits": nbits},
                    {"codes": codes, "centroids": centroids})
