"""The lowband wire format: ``encode(payload) -> bytes`` and back.

The byte layout is specified in docs/formats.md (version 1).  In short:

    magic "LBND" | version u8 | kind u8 | dtype u8 | ndim u8 | shape u64*ndim
    | body (kind-specific, made of length-prefixed sections) | CRC-32C u32

All integers are little-endian.  Encoding is canonical (one byte string per
payload; the smallest index encoding is always chosen), and ``decode``
accepts only canonical bytes, so ``encode(decode(b)) == b`` for every ``b``
it accepts.  ``decode`` treats its input as hostile: every length, index,
code and scale is validated and anything wrong raises ``FormatError``.
"""
from __future__ import annotations

import struct
import sys

import numpy as np

from . import _core
from . import _payload as _payload_mod
from ._payload import (CODE_DTYPES, DTYPE_CODES, IDX_SEEDED, MAX_NDIM, MAX_SIZE, Dense, FormatError, Quantized, Sparse, get_scheme,
                       index_choice, normalize_shape, scheme_by_id, shape_bound, shape_size,
                       smallest_index_encoding)
from ._validate import check_int, from_torch

__all__ = ["encode", "encode_into", "decode", "encoded_size", "FormatError", "MAGIC", "VERSION"]

MAGIC = b"LBND"
VERSION = 1
KIND_SPARSE, KIND_QUANTIZED, KIND_DENSE = 1, 2, 3
VALUES_RAW, VALUES_QUANTIZED = 0, 1
PARAM_U64, PARAM_F64 = 0, 1

_u8 = struct.Struct("<B")
_u32 = struct.Struct("<I")
_u64 = struct.Struct("<Q")
_f64 = struct.Struct("<d")
_u64_from = _u64.unpack_from
_param_u = struct.Struct("<BQ")
_param_f = struct.Struct("<Bd")
_LITTLE = sys.byteorder == "little"
_LE = {}   # dtype -> its little-endian form (cached: decode runs per message)


# --------------------------------------------------------------------------
# Encoding: a payload becomes a list of pieces (bytes, or arrays written as
# their little-endian bytes); encoded_size() sums them without copying.
# --------------------------------------------------------------------------

class _Lazy:
    """A piece whose bytes are produced only when encoding."""

    __slots__ = ("size", "make")

    def __init__(self, size, make):
        self.size = size
        self.make = make


def _piece_len(p):
    if isinstance(p, (bytes, bytearray)):
        return len(p)
    if isinstance(p, np.ndarray):
        return p.nbytes
    return p.size


def _piece_bytes(p):
    """The piece's bytes as a bytes-like object; an array is viewed, not
    copied, when it is already contiguous and little-endian."""
    if isinstance(p, (bytes, bytearray)):
        return p
    if isinstance(p, np.ndarray):
        a = np.ascontiguousarray(p, dtype=p.dtype.newbyteorder("<")).reshape(-1)
        return memoryview(a.view(np.uint8))
    return p.make()


def _section(pieces, body):
    """Appends a u64 length then `body` (one piece)."""
    pieces.append(_u64.pack(_piece_len(body)))
    pieces.append(body)


def _header(kind, dtype, shape):
    if len(shape) > MAX_NDIM:
        raise ValueError(f"payload: at most {MAX_NDIM} dimensions can be encoded, got {len(shape)}")
    return (MAGIC + bytes([VERSION, kind, DTYPE_CODES[np.dtype(dtype)], len(shape)])
            + struct.pack(f"<{len(shape)}Q", *shape))


def _quant_body(q, pieces):
    sch = get_scheme(q.scheme)
    pieces.append(bytes([sch.wire_id, DTYPE_CODES[q.dtype], len(sch.params)]))
    for name, kind in sch.params:
        v = q.params[name]
        pieces.append(_param_u.pack(PARAM_U64, v) if kind == "u" else _param_f.pack(PARAM_F64, v))
    pieces.append(bytes([len(sch.arrays)]))
    for name in sch.arrays:
        _section(pieces, q.arrays[name])


def _pieces(payload):
    if isinstance(payload, Sparse):
        pieces = [_header(KIND_SPARSE, payload.dtype, payload.shape), _u64.pack(payload.nnz)]
        enc, size = index_choice(payload)
        pieces.append(bytes([enc]))
        if enc == IDX_SEEDED:
            _section(pieces, _u64.pack(payload.seed) + _u64.pack(payload.step))
        else:
            idx, n = payload.indices, payload.size
            _section(pieces, _Lazy(size, lambda: _core.index_encode(idx, n, enc, size)))
        if isinstance(payload.values, Quantized):
            pieces.append(bytes([VALUES_QUANTIZED]))
            _quant_body(payload.values, pieces)
        else:
            pieces.append(bytes([VALUES_RAW]))
            _section(pieces, payload.values)
        return pieces
    if isinstance(payload, Quantized):
        pieces = [_header(KIND_QUANTIZED, payload.dtype, payload.shape)]
        _quant_body(payload, pieces)
        return pieces
    if isinstance(payload, Dense):
        pieces = [_header(KIND_DENSE, payload.dtype, payload.shape)]
        _section(pieces, payload.array.reshape(-1))
        return pieces
    raise TypeError(f"payload: expected a Sparse, Quantized or Dense, got {type(payload).__name__}")


# The C fast path (csrc/python/wire_glue.c): one call writes the whole
# payload; it returns None for what it does not handle (then the pieces
# above are assembled in Python: same bytes).

_QINFO = {}   # Scheme -> (wire id, parameter kinds as bytes, parameter names, array names)


def _quant_parts(q):
    """A Quantized as wire_encode's tuple (wire id, dtype code, kinds, params, arrays)."""
    sch = get_scheme(q.scheme)
    info = _QINFO.get(sch)
    if info is None:
        info = _QINFO[sch] = (sch.wire_id, "".join(k for _, k in sch.params).encode(),
                              tuple(p for p, _ in sch.params), tuple(sch.arrays))
    wid, kinds, pnames, anames = info
    params, arrays = q.params, q.arrays
    return (wid, DTYPE_CODES[q.dtype], kinds, tuple([params[p] for p in pnames]),
            tuple([arrays[a] for a in anames]))


def _encode_c(payload):
    """encode(payload) in one C call, or None (not handled there)."""
    t = type(payload)
    try:
        if t is Sparse:
            v = payload.values
            if type(v) is Quantized:
                v = _quant_parts(v)
            return _core.wire_encode(1, payload.shape, DTYPE_CODES[payload.dtype], payload.indices,
                                     payload.seed, payload.step, v)
        if t is Quantized:
            return _core.wire_encode(2, payload.shape, DTYPE_CODES[payload.dtype],
                                     _quant_parts(payload))
        if t is Dense:
            a = payload.array
            return _core.wire_encode(3, a.shape, DTYPE_CODES[a.dtype], a)
    except (KeyError, ValueError, TypeError):   # the Python path raises the error
        return None
    return None


def encoded_size(payload):
    """len(encode(payload)), computed without building the bytes."""
    if not isinstance(payload, (Sparse, Quantized, Dense)):
        raise TypeError(f"payload: expected a Sparse, Quantized or Dense, got {type(payload).__name__}")
    return payload.nbytes


def encode(payload):
    """The canonical wire bytes of a payload (docs/formats.md)."""
    out = _encode_c(payload)
    return _encode_py(payload) if out is None else out


def _encode_py(payload):
    """encode() in Python (what the C fast path hands over)."""
    parts = [_piece_bytes(p) for p in _pieces(payload)]
    crc = 0
    for part in parts:
        crc = _core.crc32c(part, crc)
    parts.append(_u32.pack(crc))
    return b"".join(parts)      # the one copy of the payload's arrays


def encode_into(payload, out, offset=0):
    """Write ``encode(payload)`` into the writable buffer ``out`` (bytes-like:
    bytearray, NumPy array, CPU uint8 tensor) at byte ``offset``, without
    building it as bytes first, and return its length.  ValueError when it
    does not fit."""
    try:
        view = memoryview(from_torch(out, "out")).cast("B")
    except TypeError:
        raise TypeError(f"out: expected a writable bytes-like object, got {type(out).__name__}") from None
    if view.readonly:
        raise TypeError("out: expected a writable buffer, got a read-only one")
    offset = check_int(offset, "offset", 0)
    pieces = _pieces(payload)
    n = sum(_piece_len(p) for p in pieces) + 4
    if offset + n > len(view):
        raise ValueError(f"out: needs {offset + n} bytes (offset {offset} + payload {n}), got {len(view)}")
    pos = offset
    for p in pieces:
        b = _piece_bytes(p)
        k = len(b) if not isinstance(b, memoryview) else b.nbytes
        view[pos:pos + k] = b
        pos += k
    view[pos:pos + 4] = _u32.pack(_core.crc32c(view[offset:pos]))
    return n


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------

def _w(what):
    """A _Reader message part: a str, or (template, *parts) formatted now."""
    if isinstance(what, str):
        return what
    return what[0].format(*(_w(p) for p in what[1:]))


class _Reader:
    """Bounds-checked cursor over untrusted bytes; errors name the offset."""

    __slots__ = ("buf", "pos", "end", "copy")

    def __init__(self, buf, end, copy=True):
        self.buf = buf
        self.pos = 0
        self.end = end
        self.copy = copy

    # `what` (the part being read, for error messages) is a str or a tuple
    # (template, *parts) that is formatted only when an error is raised

    def fail(self, what, at=None):
        raise FormatError(f"decode: {what} (at byte {self.pos if at is None else at})")

    def take(self, n, what):
        if n < 0 or n > self.end - self.pos:
            self.fail(f"truncated {_w(what)}: needs {n} bytes, {self.end - self.pos} left")
        start = self.pos
        self.pos += n
        return self.buf[start:self.pos]

    def u8(self, what):
        pos = self.pos
        if pos >= self.end:
            return self.take(1, what)[0]   # raises
        self.pos = pos + 1
        return self.buf[pos]

    def u64(self, what):
        pos = self.pos
        if self.end - pos < 8:
            return _u64.unpack(self.take(8, what))[0]   # raises
        self.pos = pos + 8
        return _u64_from(self.buf, pos)[0]

    def section(self, what, expected=None):
        at = self.pos
        n = self.u64(("{} length", what))
        if expected is not None and n != expected:
            self.fail(f"{_w(what)} is {n} bytes, expected {expected}", at)
        return self.take(n, what)


def _array_from(raw, dtype, count, copy=True):
    """Little-endian bytes -> a fresh native array, or (not ``copy``) a view
    of the input when it is aligned and native already."""
    le = _LE.get(dtype)
    if le is None:
        le = _LE[dtype] = np.dtype(dtype).newbyteorder("<")
    a = np.frombuffer(raw, dtype=le, count=count)
    if not copy and a.flags.aligned and a.dtype.isnative:
        return a
    return a.astype(np.dtype(dtype), copy=True)


def _read_dtype(r, what):
    at = r.pos
    code = r.u8(what)
    if code not in CODE_DTYPES:
        r.fail(f"unknown {what} code {code}", at)
    return CODE_DTYPES[code]


def _read_quant(r, shape, dtype_expected=None):
    at = r.pos
    sch = scheme_by_id(r.u8("scheme id"))
    if sch is None:
        r.fail(f"unknown quantization scheme id {r.buf[at]}", at)
    dtype = _read_dtype(r, "value dtype")
    if dtype_expected is not None and dtype != dtype_expected:
        r.fail(f"quantized dtype {dtype} differs from the payload dtype {dtype_expected}", at + 1)
    at = r.pos
    if r.u8("parameter count") != len(sch.params):
        r.fail(f"scheme {sch.name!r} has {len(sch.params)} parameters", at)
    params = {}
    for name, kind in sch.params:
        at = r.pos
        tag = r.u8(("parameter {} type", name))
        if tag != (PARAM_U64 if kind == "u" else PARAM_F64):
            r.fail(f"parameter {name!r} has type tag {tag}", at)
        raw = r.take(8, ("parameter {}", name))
        params[name] = _u64.unpack(raw)[0] if kind == "u" else _f64.unpack(raw)[0]
    at = r.pos
    if r.u8("array count") != len(sch.arrays):
        r.fail(f"scheme {sch.name!r} has {len(sch.arrays)} arrays", at)
    size = shape_size(shape)
    try:
        lay = sch.layout(params, size, dtype)
    except (ValueError, TypeError, OverflowError, ZeroDivisionError) as exc:
        r.fail(f"invalid {sch.name} parameters: {exc}", at)
    arrays = {}
    for name in sch.arrays:
        adt, count = lay[name]
        raw = r.section(("{} {}", sch.name, name), expected=count * np.dtype(adt).itemsize)
        arrays[name] = _array_from(raw, adt, count, r.copy)
    # what Quantized(...) would check, less what holds by construction here
    # (parameters read as u64/f64, arrays of the layout's sizes)
    q = Quantized._make(sch.name, shape, dtype, params, arrays)
    try:
        sch.check(q)
        return q
    except (ValueError, TypeError) as exc:
        r.fail(f"invalid {sch.name} payload: {exc}", at)


def _read_sparse(r, shape, dtype):
    size = shape_size(shape)
    at = r.pos
    nnz = r.u64("nnz")
    if nnz > size:
        r.fail(f"nnz {nnz} exceeds the size {size}", at)
    at = r.pos
    enc = r.u8("index encoding")
    if enc > IDX_SEEDED:
        r.fail(f"unknown index encoding {enc}", at)
    seed = step = None
    if enc == IDX_SEEDED:
        raw = r.section("seeded indices", expected=16)
        seed, step = _u64.unpack(raw[:8])[0], _u64.unpack(raw[8:])[0]
        if step >= 1 << 56:
            r.fail(f"random-k step {step} is >= 2**56", at)
        index_bytes = None
    else:
        index_bytes = r.section("indices")
    at_values = r.pos
    vkind = r.u8("values kind")
    if vkind == VALUES_RAW:
        raw = r.section("values", expected=nnz * dtype.itemsize)
        values = _array_from(raw, dtype, nnz, r.copy)
    elif vkind == VALUES_QUANTIZED:
        values = _read_quant(r, (nnz,), dtype)
    else:
        r.fail(f"unknown values kind {vkind}", at_values)
    # nnz is now bounded by real bytes (values) before any index work
    if enc == IDX_SEEDED:
        indices = _core.randomk_indices(size, nnz, seed, step)
    else:
        indices = _core.index_decode(index_bytes, enc, nnz, size)
        best = smallest_index_encoding(_core.index_sizes(indices, size))[0]
        if enc != best:
            r.fail(f"non-canonical index encoding {enc} (the smallest is {best})", at)
    return Sparse._make(indices, values, shape, dtype, seed, step)


def decode(data, *, expect_shape=None, expect_dtype=None, max_size=None, copy=True):
    """The payload encoded in `data` (bytes-like).  Raises FormatError for
    anything that is not a canonical version-1 lowband payload.

    A receiver that knows what it expects should say so: ``expect_shape`` /
    ``expect_dtype`` reject a payload of another shape or dtype, and
    ``max_size`` one that claims more elements (a valid payload may describe
    a huge, empty tensor that nobody could densify), all before any work.

    ``copy=False`` returns the value, code and scale arrays that lie aligned
    in ``data`` as views of it (read-only when ``data`` is) instead of
    copies: validation is the same, but the payload keeps ``data`` alive
    and changes with it, so use it only on a buffer nobody rewrites while
    the payload is in use.
    """
    ecode, limit = -1, -1
    if expect_shape is not None:
        expect_shape = normalize_shape(expect_shape, "expect_shape")
    if expect_dtype is not None:
        expect_dtype = np.dtype(expect_dtype)
        ecode = DTYPE_CODES.get(expect_dtype, 0)   # 0: no payload has it
    if max_size is not None:
        max_size = check_int(max_size, "max_size", 0)
        limit = min(max_size, MAX_SIZE)
    if type(data) is bytes:
        buf = data
    else:
        try:
            buf = memoryview(from_torch(data, "data")).cast("B")
        except TypeError:
            raise TypeError(f"data: expected a bytes-like object, got {type(data).__name__}") from None
    parts = _core.wire_decode(buf, bool(copy), expect_shape, ecode, limit, _payload_mod.C_WIRE_MASK)
    if parts is not None:
        return _from_parts(parts, len(buf))
    return _decode_py(memoryview(buf).cast("B") if type(buf) is bytes else buf, expect_shape,
                      expect_dtype, max_size, copy)


def _quant_from(t, shape):
    """The Quantized of a wire_decode quant tuple."""
    sid, code, params, arrays = t
    name, pnames, anames = _payload_mod.C_WIRE[sid]
    return Quantized._make(name, shape, CODE_DTYPES[code], dict(zip(pnames, params)),
                           dict(zip(anames, arrays)))


def _from_parts(parts, n):
    """The payload of what wire_decode parsed and checked (n: its bytes)."""
    kind = parts[0]
    if kind == KIND_SPARSE:
        _, shape, code, idx, values, seed, step = parts
        if type(values) is tuple:
            values = _quant_from(values, (len(idx),))
        p = Sparse._make(idx, values, shape, CODE_DTYPES[code], seed, step)
    elif kind == KIND_QUANTIZED:
        p = _quant_from(parts[3], parts[1])
    else:
        p = Dense.__new__(Dense)   # the array is native, C-contiguous and of a payload dtype
        p.array = parts[3]
        return p
    p._nbytes = n
    return p


def _decode_py(buf, expect_shape, expect_dtype, max_size, copy):
    """decode() in Python: every check with its FormatError message (the C
    fast path hands over everything it does not accept)."""
    n = len(buf)
    if n < 12:
        raise FormatError(f"decode: {n} bytes is shorter than the smallest payload (12)")
    if bytes(buf[:4]) != MAGIC:
        raise FormatError(f"decode: bad magic {bytes(buf[:4])!r}, expected {MAGIC!r} (at byte 0)")
    crc = _u32.unpack(buf[n - 4:])[0]
    if _core.crc32c(buf[:n - 4]) != crc:
        raise FormatError(f"decode: CRC-32C mismatch (at byte {n - 4})")
    r = _Reader(buf, n - 4, bool(copy))
    r.take(4, "magic")
    version = r.u8("version")
    if version != VERSION:
        r.fail(f"unsupported version {version}, expected {VERSION}", 4)
    kind = r.u8("kind")
    dtype = _read_dtype(r, "dtype")
    ndim = r.u8("ndim")
    if ndim > MAX_NDIM:
        r.fail(f"ndim {ndim} exceeds {MAX_NDIM}", 7)
    if r.end - r.pos >= 8 * ndim:   # all of it at once (else read one by one: that fails)
        shape = struct.unpack_from(f"<{ndim}Q", buf, r.pos)
        r.pos += 8 * ndim
    else:
        shape = tuple(r.u64("shape") for _ in range(ndim))
    if shape_bound(shape) >= MAX_SIZE:
        r.fail(f"tensor size overflows 2**60 (shape {shape}; zero dimensions count as 1)", 8)
    size = shape_size(shape)
    if expect_shape is not None and shape != expect_shape:
        r.fail(f"shape {shape} differs from the expected {expect_shape}", 8)
    if expect_dtype is not None and dtype != expect_dtype:
        r.fail(f"dtype {dtype} differs from the expected {expect_dtype}", 6)
    if max_size is not None and size > max_size:
        r.fail(f"tensor of {size} elements exceeds max_size={max_size}", 8)
    if kind == KIND_SPARSE:
        payload = _read_sparse(r, shape, dtype)
    elif kind == KIND_QUANTIZED:
        payload = _read_quant(r, shape, dtype)
    elif kind == KIND_DENSE:
        raw = r.section("dense values", expected=size * dtype.itemsize)
        payload = Dense(_array_from(raw, dtype, size, r.copy).reshape(shape))
    else:
        r.fail(f"unknown payload kind {kind}", 5)
    if r.pos != r.end:
        r.fail(f"{r.end - r.pos} trailing bytes before the checksum")
    if not isinstance(payload, Dense):
        payload._nbytes = n
    return payload



_core.wire_setup(tuple(CODE_DTYPES.get(c) for c in range(max(CODE_DTYPES) + 1)))
