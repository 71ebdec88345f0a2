"""The quantization schemes: how each ``Quantized`` kind is laid out on the
wire, checked when it arrives (``decode`` trusts nothing) and dequantized.

Every scheme stores its codes as one packed bit stream (``codes``, uint8,
LSB first, see docs/quantization.md) plus small per-block or per-tensor
arrays.  Dequantization is one C pass: ``out[i] = table[code_i] *
mult[i // block]``, with the table and the multipliers in the output
precision (float32 for float16 output, rounded to float16 at the end).
"""
from __future__ import annotations

import math

import numpy as np

from . import _core
from ._payload import Scheme, register_scheme
from ._validate import BFLOAT16

__all__ = ["SCHEMES", "packed_bytes", "nblocks", "emax_of", "work_dtype"]

MAX_BLOCK = _core.MAX_BLOCK   # inclusive; the one bound (csrc/lowband.h)
_NONE = 0xFFFFFFFF
_F16 = np.dtype(np.float16)
_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
# Half the largest finite value of each decoded dtype: a largest code times
# largest scale below this cannot round to Inf in any precision on the way.
_SAFE = {_F16: 32752.0, _F32: float(np.finfo(np.float32).max) / 2,
         _F64: float(np.finfo(np.float64).max) / 2}
if BFLOAT16 is not None:
    _SAFE[BFLOAT16] = (2 - 2 ** -7) * 2.0 ** 127 / 2   # its largest finite value / 2
_SMALL = 64   # arrays up to this many elements are reduced in Python (no ufunc call)


def packed_bytes(n, bits):
    return (n * bits + 7) // 8


def nblocks(n, block):
    """Per-block arrays: ceil(n / block) entries, one entry for block 0."""
    return -(-n // block) if block else 1


def emax_of(dtype):
    """Largest binary exponent the decoded dtype represents."""
    return {_F16: 15, _F64: 1023}.get(np.dtype(dtype), 127)


def work_dtype(dtype):
    """Precision of tables and multipliers when decoding to `dtype`."""
    return _F64 if np.dtype(dtype) == _F64 else _F32


def _u(params, name, lo, hi):
    v = params[name]
    if not lo <= v <= hi:
        raise ValueError(f"{name}: expected {lo}..{hi}, got {v}")
    return v


def _check_codes(q, bits, maxcode, forbidden=_NONE):
    bad = _core.check_codes(q.arrays["codes"], q.size, bits, maxcode, forbidden)
    if bad is not None:
        if bad == q.size:
            raise ValueError("codes: padding bits after the last code are not zero")
        raise ValueError(f"codes: invalid code at element {bad} (codes are at most {maxcode}"
                         + (f" and never {forbidden}" if forbidden != _NONE else "") + ")")


def _small_max(a):
    """max(a) as a float (1.0 for None or an empty array); with a NaN in a
    the result may be NaN or ignore it (callers treat both as "unknown")."""
    if a is None or a.size == 0:
        return 1.0
    return max(a.tolist()) if a.size <= _SMALL else float(a.max())


def _check_scales(a, name):
    if a.size <= _SMALL:   # a few scales: no ufunc calls (the per-call cost)
        ok = all(v >= 0 and v != math.inf for v in a.tolist())   # NaN fails v >= 0
    else:
        ok = bool(np.isfinite(a).all() and (a >= 0).all())
    if not ok:
        raise ValueError(f"{name}: expected finite, non-negative values")


def _check_top(q, top, name):
    """ValueError when the largest decoded magnitude `top` (float64, as the
    decoder computes it before rounding to the work precision) overflows
    the decoded dtype, as ``_Table.check_range`` does for table schemes."""
    with np.errstate(over="ignore", invalid="ignore"):
        worst = work_dtype(q.dtype).type(top).astype(q.dtype).astype(np.float64)
    if not np.isfinite(worst):
        raise ValueError(f"{name}: the largest decoded magnitude ({float(top)!r}) overflows "
                         f"{q.dtype}: the values cannot be represented")


def _to_bfloat16(out, fill, threads):
    """Runs fill(tmp) on a float32 temporary, then rounds it into the
    bfloat16 array `out` (round to nearest even, as ml_dtypes does)."""
    tmp = np.empty(out.shape, np.float32)
    fill(tmp)
    out[...] = tmp.astype(out.dtype)


def _decode(q, out, threads, bits, table, mult, block):
    wd = work_dtype(q.dtype)
    table = np.ascontiguousarray(table, dtype=wd)
    if mult is not None:
        mult = np.ascontiguousarray(mult, dtype=wd)
    if BFLOAT16 is not None and out.dtype == BFLOAT16:
        _to_bfloat16(out, lambda tmp: _core.table_decode(q.arrays["codes"], q.size, bits, table,
                                                         mult, block, tmp, threads), threads)
        return
    _core.table_decode(q.arrays["codes"], q.size, bits, table, mult, block, out, threads)


def _linear_table(bits, offset, step=1):
    """table[c] = step * c - offset for every code of `bits` bits."""
    return step * np.arange(1 << bits, dtype=np.float64) - offset


class _Table(Scheme):
    """A scheme decoded as table[code] * mult[block] (every scheme but the
    casts): ``decode_args(q)`` gives (bits, table, mult, block) once, for
    ``dequantize`` and for error feedback's in-place residual update."""

    def decode_args(self, q):
        raise NotImplementedError

    def max_code(self, q):
        """The largest valid code (codes 0..max_code are the valid ones)."""
        return (1 << self.decode_args(q)[0]) - 1

    def range_args(self, q):
        """(largest |table entry| of a valid code, multipliers) when known
        without building the table, else None: check_range's fast path."""
        return None

    def check_range(self, q):
        """ValueError when a valid code would decode to +-Inf: the largest
        |table entry| times the largest multiplier, rounded as the decoder
        rounds it (work precision, then the output dtype), must be finite.
        Runs on every decode and on every quantizer's output, so finite
        input never decodes to Inf silently."""
        if q.size == 0:
            return
        fast = self.range_args(q)
        if fast is not None and fast[0] * _small_max(fast[1]) <= _SAFE.get(q.dtype, 0.0):
            return   # far from overflow (NaN or Inf scales take the exact path)
        bits, table, mult, block = self.decode_args(q)
        wd = work_dtype(q.dtype)
        top = np.abs(np.asarray(table, dtype=np.float64)[:self.max_code(q) + 1]).max()
        m = 1.0 if mult is None or len(mult) == 0 else np.asarray(mult, dtype=np.float64).max()
        if not (np.isfinite(m) and np.isfinite(top)):
            return   # non-finite input under check_finite=False; decode refuses
                     # such scales and tables in check()
        with np.errstate(over="ignore", invalid="ignore"):
            worst = (wd.type(top) * wd.type(m)).astype(q.dtype).astype(np.float64)
        if not np.isfinite(worst):
            raise ValueError(f"scales: the largest code times the largest scale "
                             f"({top!r} * {float(m)!r}) overflows {q.dtype}: the values "
                             f"cannot be represented")

    def check(self, q):
        self.check_range(q)

    def dequantize(self, q, out, threads):
        _decode(q, out, threads, *self.decode_args(q))

    def residual(self, q, e, threads):
        """Error feedback's residual in place: e = e - D(q), where q is this
        scheme's compression of e (e float32/float64 of q.size elements)."""
        bits, table, mult, block = self.decode_args(q)
        wd = work_dtype(q.dtype)
        table = np.ascontiguousarray(table, dtype=wd)
        if mult is not None:
            mult = np.ascontiguousarray(mult, dtype=wd)
        _core.table_decode(q.arrays["codes"], q.size, bits, table, mult, block, e, threads, True)


class _Linear(_Table):
    """Codes c mean (step * c - offset) * scale[block]."""

    arrays = ("codes", "scales")

    def bits(self, params):
        raise NotImplementedError

    def block(self, params):
        return params["block"]

    def layout(self, params, size, dtype):
        return {"codes": (np.uint8, packed_bytes(size, self.bits(params))),
                "scales": (np.float32, nblocks(size, self.block(params)))}


class SignScheme(_Linear):
    """1-bit signs.  Scale modes none/l1/rms: code c means (2c - 1) * scale[block]
    (one float32 per block, none for "none").  Mode two_means (Seide et al.
    2014): two float32 per block, code 1 means +scales[2b] (the mean of the
    non-negative elements) and code 0 means -scales[2b + 1] (minus the mean
    of the negative ones)."""
    name, wire_id, c_wire = "sign", 1, 1   # c_wire: decoded in C (csrc/python/wire_glue.c)
    params = (("scale", "u"), ("block", "u"))
    MODES = ("none", "l1", "rms", "two_means")
    TWO_MEANS = 3

    def bits(self, params):
        return 1

    def layout(self, params, size, dtype):
        _u(params, "scale", 0, 3)
        _u(params, "block", 0, MAX_BLOCK)
        lay = super().layout(params, size, dtype)
        if params["scale"] == 0:
            lay["scales"] = (np.float32, 0)
        elif params["scale"] == self.TWO_MEANS:
            lay["scales"] = (np.float32, 2 * nblocks(size, params["block"]))
        return lay

    def max_code(self, q):
        return 1

    def range_args(self, q):
        return 1.0, (q.arrays["scales"] if q.params["scale"] else None)

    def check(self, q):
        _check_scales(q.arrays["scales"], "scales")
        _check_codes(q, 1, 1)
        self.check_range(q)

    def decode_args(self, q):
        mult = q.arrays["scales"] if q.params["scale"] else None
        return 1, [-1.0, 1.0], mult, q.params["block"]

    def _two_means(self, q, out, threads, subtract):
        """out = D(q) (or out -= D(q)): two table passes, one per scale, each
        adding exactly 0 where the other side's code is."""
        wd = work_dtype(q.dtype)
        sc = q.arrays["scales"].astype(wd)
        args = (q.arrays["codes"], q.size, 1)
        block = q.params["block"]
        pos, neg = np.ascontiguousarray(sc[0::2]), np.ascontiguousarray(sc[1::2])
        one, zero = wd.type(1), wd.type(0)
        if subtract:
            _core.table_decode(*args, np.array([zero, one], wd), pos, block, out, threads, True)
            _core.table_decode(*args, np.array([-one, zero], wd), neg, block, out, threads, True)
            return
        tmp = out if out.dtype == wd else np.empty(out.shape, wd)
        _core.table_decode(*args, np.array([zero, one], wd), pos, block, tmp, threads)
        _core.table_decode(*args, np.array([one, zero], wd), neg, block, tmp, threads, True)
        if tmp is not out:
            out[...] = tmp.astype(out.dtype)

    def dequantize(self, q, out, threads):
        if q.params["scale"] == self.TWO_MEANS:
            self._two_means(q, out, threads, False)
        else:
            super().dequantize(q, out, threads)

    def residual(self, q, e, threads):
        """e = e - D(q) for q = sign(e): the code of e[i] is e[i]'s own sign,
        so no codes are read (the same bytes as the table decode)."""
        if q.params["scale"] == self.TWO_MEANS:
            self._two_means(q, e, threads, True)
            return
        mult = q.arrays["scales"] if q.params["scale"] else None
        _core.ef_sign_residual(e, mult, q.params["block"], threads)


class BlockwiseScheme(_Linear):
    """Symmetric absmax: code c means (c - Q) * d (bits >= 2, Q = 2^(bits-1) - 1)
    or (2c - 1) * d (bits 1)."""
    name, wire_id, unbiased, c_wire = "blockwise", 2, False, 2
    params = (("bits", "u"), ("block", "u"))
    BITS = (1, 2, 3, 4, 8)

    def bits(self, params):
        if params["bits"] not in self.BITS:
            raise ValueError(f"bits: expected one of {self.BITS}, got {params['bits']}")
        return params["bits"]

    def layout(self, params, size, dtype):
        _u(params, "block", 0, MAX_BLOCK)
        return super().layout(params, size, dtype)

    @staticmethod
    def levels(bits):
        return 1 if bits == 1 else (1 << (bits - 1)) - 1

    def max_code(self, q):
        b = q.params["bits"]
        return 1 if b == 1 else 2 * self.levels(b)

    def range_args(self, q):
        return float(self.levels(q.params["bits"])), q.arrays["scales"]

    def check(self, q):
        _check_scales(q.arrays["scales"], "scales")
        _check_codes(q, q.params["bits"], self.max_code(q))
        self.check_range(q)

    def decode_args(self, q):
        b = q.params["bits"]
        table = _linear_table(1, 1, 2) if b == 1 else _linear_table(b, self.levels(b))
        return b, table, q.arrays["scales"], q.params["block"]


class BlockwiseSRScheme(BlockwiseScheme):
    name, wire_id, unbiased, c_wire = "blockwise_sr", 3, True, 3


class QSGDScheme(_Linear):
    """code c means (c - s) * norm / s."""
    name, wire_id, unbiased = "qsgd", 4, True
    params = (("levels", "u"), ("block", "u"))
    MAX_LEVELS = 127

    @staticmethod
    def code_bits(levels):
        return int(2 * levels).bit_length()

    def bits(self, params):
        return self.code_bits(_u(params, "levels", 1, self.MAX_LEVELS))

    def layout(self, params, size, dtype):
        _u(params, "block", 0, MAX_BLOCK)
        return super().layout(params, size, dtype)

    def max_code(self, q):
        return 2 * q.params["levels"]

    def check(self, q):
        _check_scales(q.arrays["scales"], "scales")
        _check_codes(q, self.code_bits(q.params["levels"]), self.max_code(q))
        self.check_range(q)

    def decode_args(self, q):
        s = q.params["levels"]
        wd = work_dtype(q.dtype)
        unit = q.arrays["scales"].astype(wd) / wd.type(s)
        return self.code_bits(s), _linear_table(self.code_bits(s), s), unit, q.params["block"]


class TernGradScheme(_Linear):
    """code c means (c - 1) * scale."""
    name, wire_id, unbiased = "terngrad", 5, True
    params = ()

    def bits(self, params):
        return 2

    def block(self, params):
        return 0

    def max_code(self, q):
        return 2

    def check(self, q):
        _check_scales(q.arrays["scales"], "scales")
        _check_codes(q, 2, 2)
        self.check_range(q)

    def decode_args(self, q):
        return 2, _linear_table(2, 1), q.arrays["scales"], 0


class NaturalScheme(_Table):
    """8-bit codes: bit 7 sign, field f = bits 0..6; value 2^(top - 127 + f), f = 0 zero."""
    name, wire_id, unbiased = "natural", 6, True
    arrays = ("codes", "top")

    def layout(self, params, size, dtype):
        return {"codes": (np.uint8, size), "top": (np.int16, 1)}

    def check(self, q):
        top = int(q.arrays["top"][0])
        if not -896 <= top <= emax_of(q.dtype):
            raise ValueError(f"top: expected -896..{emax_of(q.dtype)} for {q.dtype}, got {top}")
        _check_codes(q, 8, 255, 0x80)
        self.check_range(q)

    @staticmethod
    def table(top):
        f = np.arange(128)
        mag = np.ldexp(1.0, top - 127 + f)
        mag[0] = 0.0
        return np.concatenate([mag, -mag])

    def decode_args(self, q):
        return 8, self.table(int(q.arrays["top"][0])).astype(work_dtype(q.dtype)), None, 0


class MinifloatScheme(_Table):
    """Codes: sign bit, E exponent bits, M mantissa bits (IEEE-like, bias
    2^E - 1, subnormals, no Inf/NaN), times 2^k per block."""
    name, wire_id = "minifloat", 7
    params = (("exp_bits", "u"), ("man_bits", "u"), ("block", "u"))
    arrays = ("codes", "exponents")

    @staticmethod
    def valid(E, M):
        return 1 <= E <= 5 and 0 <= M <= 3 and E + M <= 7

    def layout(self, params, size, dtype):
        E, M = params["exp_bits"], params["man_bits"]
        if not self.valid(E, M):
            raise ValueError(f"exp_bits/man_bits: expected 1..5 and 0..3 with at most 7 "
                             f"together, got {E} and {M}")
        block = _u(params, "block", 0, MAX_BLOCK)
        return {"codes": (np.uint8, packed_bytes(size, 1 + E + M)),
                "exponents": (np.int8, nblocks(size, block))}

    @staticmethod
    def table(E, M):
        """Values of every (1 + E + M)-bit code (float64, exact)."""
        bias = (1 << E) - 1
        mag = np.arange(1 << (E + M))
        e, m = mag >> M, mag & ((1 << M) - 1)
        val = np.where(e > 0, np.ldexp((1 << M) + m, e - bias - M), np.ldexp(m, 1 - bias - M))
        return np.concatenate([val, -val])

    def range_args(self, q):
        # the largest code decodes to (2 - 2^-M) * 2^k: one max over the
        # int8 exponents instead of a float64 multiplier per block
        return (2.0 - 2.0 ** -q.params["man_bits"]) * 2.0 ** _small_max(q.arrays["exponents"]), None

    def check(self, q):
        E, M = q.params["exp_bits"], q.params["man_bits"]
        k = q.arrays["exponents"]
        kmax = 15 if q.dtype == _F16 else 127
        if k.size and (k.min() < -127 or k.max() > kmax):
            raise ValueError(f"exponents: expected -127..{kmax}, got {k.min()}..{k.max()}")
        _check_codes(q, 1 + E + M, (2 << (E + M)) - 1, 1 << (E + M))
        self.check_range(q)

    def decode_args(self, q):
        E, M = q.params["exp_bits"], q.params["man_bits"]
        mult = np.ldexp(1.0, q.arrays["exponents"].astype(np.int64))
        return 1 + E + M, self.table(E, M), mult, q.params["block"]


class Lut2bitScheme(_Table):
    """2-bit codes into a 4-entry float32 table of bin means (SparseLoCo)."""
    name, wire_id = "lut2bit", 8
    arrays = ("codes", "table")

    def layout(self, params, size, dtype):
        return {"codes": (np.uint8, packed_bytes(size, 2)), "table": (np.float32, 4)}

    def check(self, q):
        if not np.isfinite(q.arrays["table"]).all():
            raise ValueError("table: expected finite values")
        _check_codes(q, 2, 3)
        self.check_range(q)

    def decode_args(self, q):
        return 2, q.arrays["table"], None, 0


class CastScheme(Scheme):
    """Values cast to a 16-bit float (codes: their uint16 bit patterns)."""
    arrays = ("codes",)
    summable = True
    code = 0

    def layout(self, params, size, dtype):
        return {"codes": (np.uint16, size)}

    def dequantize(self, q, out, threads):
        if BFLOAT16 is not None and out.dtype == BFLOAT16:
            if self.code == 4:   # bfloat16 bits into a bfloat16 tensor: a copy
                out.view(np.uint16)[...] = q.arrays["codes"]
            else:
                _to_bfloat16(out, lambda tmp: _core.widen(q.arrays["codes"], self.code, tmp, threads),
                             threads)
            return
        _core.widen(q.arrays["codes"], self.code, out, threads)


class Float16Scheme(CastScheme):
    name, wire_id, code = "float16", 9, 3


class Bfloat16Scheme(CastScheme):
    name, wire_id, code = "bfloat16", 10, 4


class DitherScheme(Scheme):
    """Random dithering (linear or natural levels, Horvath et al. 2019) with
    an Elias-gamma coded stream of ``nbits`` bits: per element the gamma
    code of m + 1 (m the level index), then a sign bit when m > 0; one
    float32 norm.  Decoded value: sign * l_m * norm, l_m = m / s (linear)
    or 2^(m - s) for m > 0 (natural)."""
    name, wire_id, unbiased = "dither", 11, True
    params = (("levels", "u"), ("partition", "u"), ("norm", "u"), ("nbits", "u"))
    arrays = ("codes", "scales")
    PARTITIONS = ("natural", "linear")
    NORMS = ("max", "l2")
    MAX_LEVELS = 127

    @staticmethod
    def max_bits(levels):
        """Longest code of one element: gamma of s + 1 plus the sign bit."""
        return 2 * (int(levels + 1).bit_length() - 1) + 2

    def layout(self, params, size, dtype):
        s = _u(params, "levels", 1, self.MAX_LEVELS)
        _u(params, "partition", 0, 1)
        _u(params, "norm", 0, 1)
        nbits = _u(params, "nbits", size, size * self.max_bits(s))
        return {"codes": (np.uint8, packed_bytes(nbits, 1)), "scales": (np.float32, 1)}

    @classmethod
    def magnitudes(cls, q):
        """l_m * norm for m = 0 .. s (float64)."""
        s = q.params["levels"]
        m = np.arange(s + 1, dtype=np.float64)
        if q.params["partition"] == 0:
            lv = np.ldexp(1.0, (m - s).astype(np.int64))
            lv[0] = 0.0
        else:
            lv = m / s
        return np.ascontiguousarray(lv * float(q.arrays["scales"][0]))

    def check(self, q):
        _check_scales(q.arrays["scales"], "scales")
        _check_top(q, float(q.arrays["scales"][0]), "scales")
        _core.dither_decode(q.arrays["codes"], q.params["nbits"], q.size, q.params["levels"],
                            None, None)

    def _run(self, q, out, subtract):
        mag = self.magnitudes(q)
        _core.dither_decode(q.arrays["codes"], q.params["nbits"], q.size, q.params["levels"],
                            mag, out, subtract)

    def dequantize(self, q, out, threads):
        wd = work_dtype(q.dtype)
        tmp = out if out.dtype == wd else np.empty(out.shape, wd)
        self._run(q, tmp, False)
        if tmp is not out:
            out[...] = tmp.astype(out.dtype)

    def residual(self, q, e, threads):
        """e = e - D(q) in place (e float32/float64)."""
        self._run(q, e, True)


class FedZipScheme(Scheme):
    """FedZip (Malekijoo et al. 2021): 3 float32 centroids and a label per
    element, coded as Huffman ("0" for the major label, "10" / "11" for the
    two others in increasing order) or as gaps (per non-major element the
    Elias-gamma code of its distance to the previous one, then 1 bit for
    which minor label); ``nbits`` bits in all."""
    name, wire_id = "fedzip", 12
    params = (("encoding", "u"), ("major", "u"), ("nbits", "u"))
    arrays = ("codes", "centroids")
    ENCODINGS = ("huffman", "gaps")

    def layout(self, params, size, dtype):
        enc = _u(params, "encoding", 0, 1)
        _u(params, "major", 0, 2)
        lo, hi = (size, 2 * size) if enc == 0 else (0, size * 130)
        nbits = _u(params, "nbits", lo, hi)
        return {"codes": (np.uint8, packed_bytes(nbits, 1)), "centroids": (np.float32, 3)}

    def _run(self, q, out):
        p = q.params
        cen = None if out is None else np.ascontiguousarray(q.arrays["centroids"], np.float64)
        _core.fedzip_decode(q.arrays["codes"], p["nbits"], q.size, bool(p["encoding"]), p["major"],
                            cen, out)

    def check(self, q):
        if not np.isfinite(q.arrays["centroids"]).all():
            raise ValueError("centroids: expected finite values")
        _check_top(q, np.abs(q.arrays["centroids"].astype(np.float64)).max(), "centroids")
        self._run(q, None)

    def dequantize(self, q, out, threads):
        wd = work_dtype(q.dtype)
        tmp = out if out.dtype == wd else np.empty(out.shape, wd)
        self._run(q, tmp)
        if tmp is not out:
            out[...] = tmp.astype(out.dtype)


SCHEMES = {s.name: register_scheme(s) for s in (
    SignScheme(), BlockwiseScheme(), BlockwiseSRScheme(), QSGDScheme(), TernGradScheme(),
    NaturalScheme(), MinifloatScheme(), Lut2bitScheme(), Float16Scheme(), Bfloat16Scheme(),
    DitherScheme(), FedZipScheme())}
