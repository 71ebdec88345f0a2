"""Payload types: what a compressor produces and what crosses the network.

``Sparse``    ascending indices + values (an array, or a ``Quantized``).
``Quantized`` integer codes + scales/tables, decoded by its *scheme*.
``Dense``     a plain array travelling uncompressed (fp32/fp64 baseline).

Every payload knows its exact wire size (``nbytes == len(lowband.encode(p))``)
and is treated as immutable once built.  Quantization schemes register a
``Scheme`` object that says which parameters and arrays they carry, how to
check them (``decode()`` trusts nothing) and how to dequantize.
"""
from __future__ import annotations

import operator

import numpy as np

from . import _core
from ._validate import (BFLOAT16, FLOAT_DTYPES, check_out, check_seed, check_step, check_threads,
                        from_torch)

FormatError = _core.FormatError
_new = object.__new__   # the trusted constructors' allocation (no __init__)

MAX_NDIM = 32
MAX_SIZE = 1 << 60     # every shape's shape_bound() is below this (2**63 bytes of float64:
                       # what NumPy can describe, even for an empty array)

# dtype codes shared with the wire format (docs/formats.md); bfloat16 (code
# 4) needs ml_dtypes for its NumPy dtype.
DTYPE_CODES = {np.dtype(np.float32): 1, np.dtype(np.float64): 2, np.dtype(np.float16): 3}
if BFLOAT16 is not None:
    DTYPE_CODES[BFLOAT16] = 4
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
_DTYPE_TYPES = frozenset(type(d) for d in DTYPE_CODES)   # np.dtype(d) is d for these


def normalize_shape(shape, name="shape"):
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, (bool, np.bool_)):
        shape = (int(shape),)
    try:
        if isinstance(shape, (str, bytes)):
            raise TypeError
        shape = tuple(int(operator.index(s)) for s in shape)
    except TypeError:
        raise TypeError(f"{name}: expected an int or a tuple of ints, got {type(shape).__name__}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"{name}: expected non-negative dimensions, got {shape}")
    if len(shape) > MAX_NDIM:
        raise ValueError(f"{name}: expected at most {MAX_NDIM} dimensions, got {len(shape)}")
    if shape_bound(shape) >= MAX_SIZE:
        raise ValueError(f"{name}: the product of the dimensions (zeros counted as 1) must be "
                         f"below 2**60, got shape {shape}")
    return shape


def shape_bound(shape):
    """The product of the dimensions with zeros counted as 1: what NumPy
    must be able to index, even for an empty tensor (the size check of
    every payload and of ``decode``)."""
    size = 1
    for s in shape:
        size *= max(s, 1)
    return size


def shape_size(shape):
    size = 1
    for s in shape:
        size *= s
    return size


def index_dtype(size):
    """uint32 when the vector has fewer than 2**32 elements, else uint64."""
    return np.dtype(np.uint32) if size <= 0xFFFFFFFF else np.dtype(np.uint64)


def _float_dtype(dtype, name="dtype"):
    dt = np.dtype(dtype)
    if dt not in DTYPE_CODES:
        raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {dt}")
    return dt


# --------------------------------------------------------------------------
# Quantization schemes
# --------------------------------------------------------------------------

class Scheme:
    """How a quantization scheme stores, checks and decodes a ``Quantized``.

    Subclasses set ``name``, a unique ``wire_id`` (1..255), ``params`` (a
    tuple of (name, "u" for an unsigned 64-bit int | "f" for a float64)),
    ``arrays`` (names, in wire order), the flags ``summable`` / ``unbiased``,
    and implement ``layout``, ``check`` and ``dequantize``.
    """

    name = ""
    wire_id = 0
    params = ()
    arrays = ()
    summable = False
    unbiased = False

    def layout(self, params, size, dtype):
        """{array name: (numpy dtype, element count)} for a tensor of `size`."""
        raise NotImplementedError

    def check(self, q):
        """Raise ValueError when q's parameters or array contents are invalid
        (non-finite scales, codes out of range ...).  Shapes and lengths were
        already checked against ``layout``."""

    def dequantize(self, q, out, threads):
        """Decode q into the flat array `out` (q.size elements, q.dtype)."""
        raise NotImplementedError


_SCHEMES_BY_NAME: dict[str, Scheme] = {}
_SCHEMES_BY_ID: dict[int, Scheme] = {}
# Schemes whose layout and checks the C decoder (wire.decode's fast path)
# implements: a Scheme class that sets ``c_wire`` to its wire id in its own
# body (not inherited).  {wire id: (name, parameter names, array names)}
# and the bit mask of those ids; any other scheme decodes in Python.
C_WIRE: dict[int, tuple] = {}
C_WIRE_MASK = 0


def register_scheme(scheme):
    """Make a Scheme instance known to Quantized and to the wire format."""
    if not isinstance(scheme, Scheme):
        raise TypeError("register_scheme: expected a Scheme instance")
    if not 1 <= scheme.wire_id <= 255:
        raise ValueError(f"register_scheme: wire_id must be in [1, 255], got {scheme.wire_id}")
    old = _SCHEMES_BY_ID.get(scheme.wire_id)
    if old is not None and old.name != scheme.name:
        raise ValueError(f"register_scheme: wire_id {scheme.wire_id} is taken by {old.name!r}")
    _SCHEMES_BY_NAME[scheme.name] = scheme
    _SCHEMES_BY_ID[scheme.wire_id] = scheme
    global C_WIRE_MASK
    if type(scheme).__dict__.get("c_wire") == scheme.wire_id:
        C_WIRE[scheme.wire_id] = (scheme.name, tuple(p for p, _ in scheme.params), tuple(scheme.arrays))
        C_WIRE_MASK |= 1 << scheme.wire_id
    else:
        C_WIRE.pop(scheme.wire_id, None)
        C_WIRE_MASK &= ~(1 << scheme.wire_id)
    return scheme


def get_scheme(name):
    try:
        return _SCHEMES_BY_NAME[name]
    except KeyError:
        raise ValueError(f"scheme: unknown quantization scheme {name!r} "
                         f"(known: {', '.join(sorted(_SCHEMES_BY_NAME))})") from None


def scheme_by_id(wire_id):
    return _SCHEMES_BY_ID.get(wire_id)


def _check_param(kind, name, value):
    if kind == "u":
        if isinstance(value, (bool, np.bool_)) or not hasattr(value, "__index__"):
            raise TypeError(f"params[{name!r}]: expected an int, got {type(value).__name__}")
        v = int(value)
        if not 0 <= v < 1 << 64:
            raise ValueError(f"params[{name!r}]: expected an int in [0, 2**64), got {v}")
        return v
    v = float(value)
    return v


class Quantized:
    """A quantized tensor: integer codes plus what is needed to decode them.

    Attributes: ``scheme`` (its name), ``shape``, ``dtype`` (of the decoded
    tensor), ``params`` (dict of ints/floats), ``arrays`` (dict of ndarrays;
    ``codes`` and, for most schemes, ``scales``), ``size``, ``nbytes``.
    """

    __slots__ = ("scheme", "shape", "dtype", "params", "arrays", "_nbytes")

    def __init__(self, scheme, shape, dtype, params, arrays, *, validate=True):
        sch = get_scheme(scheme)
        self.scheme = sch.name
        self.shape = normalize_shape(shape)
        self.dtype = _float_dtype(dtype)
        self._nbytes = None
        if not validate:
            self.params = dict(params)
            self.arrays = dict(arrays)
            return
        if set(params) != {p for p, _ in sch.params}:
            raise ValueError(f"params: scheme {sch.name!r} expects {[p for p, _ in sch.params]}, "
                             f"got {sorted(params)}")
        self.params = {p: _check_param(kind, p, params[p]) for p, kind in sch.params}
        lay = sch.layout(self.params, self.size, self.dtype)
        if set(arrays) != set(lay):
            raise ValueError(f"arrays: scheme {sch.name!r} expects {sorted(lay)}, got {sorted(arrays)}")
        self.arrays = {}
        for name, (adt, count) in lay.items():
            a = from_torch(arrays[name], f"arrays[{name!r}]")
            if not isinstance(a, np.ndarray) or a.dtype != adt or a.ndim != 1 or a.size != count:
                got = (f"{a.dtype} of shape {a.shape}" if isinstance(a, np.ndarray)
                       else type(a).__name__)
                raise ValueError(f"arrays[{name!r}]: expected {count} elements of {np.dtype(adt)}, got {got}")
            self.arrays[name] = np.ascontiguousarray(a)
        sch.check(self)

    @classmethod
    def _make(cls, scheme, shape, dtype, params, arrays):
        """Trusted constructor for kernels (no checks)."""
        q = _new(cls)
        q.scheme = scheme
        q.shape = shape if type(shape) is tuple else tuple(shape)
        q.dtype = dtype if type(dtype) in _DTYPE_TYPES else np.dtype(dtype)
        q.params = params
        q.arrays = arrays
        q._nbytes = None
        return q

    @property
    def size(self):
        return shape_size(self.shape)

    @property
    def codes(self):
        return self.arrays.get("codes")

    @property
    def scales(self):
        return self.arrays.get("scales")

    @property
    def summable(self):
        return get_scheme(self.scheme).summable

    @property
    def unbiased(self):
        return get_scheme(self.scheme).unbiased

    @property
    def nbytes(self):
        if self._nbytes is None:
            self._nbytes = _header_size(self.shape) + _quant_body_size(self) + 4
        return self._nbytes

    def dequantize(self, out=None, *, threads=None):
        """The decoded tensor (shape ``self.shape``), written into `out` if given."""
        check_threads(threads)
        if out is None:
            flat = np.empty(self.size, dtype=self.dtype)
        else:
            flat = check_out(out, self.shape, self.dtype).reshape(-1)
        get_scheme(self.scheme).dequantize(self, flat, threads)
        return flat.reshape(self.shape) if out is None else out

    def __repr__(self):
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return (f"Quantized({self.scheme}, shape={self.shape}, dtype={self.dtype}, "
                f"{params}{', ' if params else ''}nbytes={self.nbytes})")

    def __eq__(self, other):
        if not isinstance(other, Quantized):
            return NotImplemented
        return (self.scheme == other.scheme and self.shape == other.shape
                and self.dtype == other.dtype and self.params == other.params
                and self.arrays.keys() == other.arrays.keys()
                and all(_same_bytes(self.arrays[k], other.arrays[k]) for k in self.arrays))

    __hash__ = None


def _same_bytes(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# --------------------------------------------------------------------------
# Sparse
# --------------------------------------------------------------------------

class Sparse:
    """A sparse payload: strictly ascending ``indices`` into the flattened
    tensor and their ``values`` (an array, or a ``Quantized`` of nnz elements).

    ``seed`` / ``step`` are set on random-k payloads: their indices follow
    from (seed, step, size, nnz), so the wire format sends only the values.
    """

    __slots__ = ("indices", "values", "shape", "dtype", "seed", "step", "_nbytes")

    def __init__(self, indices, values, shape, *, dtype=None, seed=None, step=None):
        self.shape = normalize_shape(shape)
        size = self.size
        idx = np.asarray(from_torch(indices, "indices"))
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "ui"):
            raise TypeError(f"indices: expected a 1-D integer array, got {idx.dtype} of shape {idx.shape}")
        if idx.size and idx.dtype.kind == "i" and idx.min() < 0:
            raise ValueError(f"indices: expected non-negative indices, got {int(idx.min())}")
        idx = np.ascontiguousarray(idx, dtype=index_dtype(size))
        _core.index_check(idx, size)
        if isinstance(values, Quantized):
            if values.size != idx.size:
                raise ValueError(f"values: expected a Quantized of {idx.size} elements, got {values.size}")
            vdt = values.dtype
        else:
            values = np.asarray(from_torch(values, "values"))
            if values.ndim != 1 or values.size != idx.size:
                raise ValueError(f"values: expected a 1-D array of {idx.size} elements, got shape {values.shape}")
            if values.dtype.newbyteorder("=") not in DTYPE_CODES:
                raise TypeError(f"values: expected float16, bfloat16, float32 or float64, got {values.dtype}")
            values = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("="))
            vdt = values.dtype
        self.dtype = _float_dtype(dtype if dtype is not None else vdt)
        if not isinstance(values, Quantized) and values.dtype != self.dtype:
            raise TypeError(f"values: expected dtype {self.dtype} (the payload dtype), got {values.dtype}")
        if (seed is None) != (step is None):
            raise TypeError("seed and step go together (both or neither)")
        if seed is not None:
            seed, step = check_seed(seed), check_step(step)
            expect = _core.randomk_indices(size, idx.size, seed, step)
            if not np.array_equal(expect, idx):
                raise ValueError("indices: they are not the random-k indices of (seed, step)")
        self.indices = idx
        self.values = values
        self.seed = seed
        self.step = step
        self._nbytes = None

    @classmethod
    def _make(cls, indices, values, shape, dtype, seed=None, step=None):
        """Trusted constructor for kernels (no checks)."""
        s = _new(cls)
        s.indices = indices
        s.values = values
        s.shape = shape if type(shape) is tuple else tuple(shape)
        s.dtype = dtype if type(dtype) in _DTYPE_TYPES else np.dtype(dtype)
        s.seed = seed
        s.step = step
        s._nbytes = None
        return s

    @property
    def size(self):
        return shape_size(self.shape)

    @property
    def nnz(self):
        return int(self.indices.size)

    @property
    def density(self):
        return self.nnz / self.size if self.size else 0.0

    @property
    def nbytes(self):
        if self._nbytes is None:
            values = (_quant_body_size(self.values) if isinstance(self.values, Quantized)
                      else 8 + self.values.nbytes)
            self._nbytes = (_header_size(self.shape) + 8 + 1 + 8 + index_choice(self)[1]
                            + 1 + values + 4)
        return self._nbytes

    @property
    def summable(self):
        """Index-aligned with same-seed peers (random-k), so values can be summed."""
        return self.seed is not None

    def values_array(self):
        """The values as a plain array (dequantized when they are Quantized)."""
        if isinstance(self.values, Quantized):
            return self.values.dequantize().reshape(-1)
        return self.values

    def to_dense(self, out=None, *, threads=None):
        """Scatter into a zero tensor of ``shape`` (or into `out`);
        float16/bfloat16 payloads come back in float32."""
        threads = check_threads(threads)
        dtype = self.dtype if self.dtype in FLOAT_DTYPES else np.dtype(np.float32)
        result = np.empty(self.shape, dtype=dtype) if out is None else check_out(out, self.shape, dtype)
        _core.aggregate([self.scatter_pair(dtype)], "sum", result.reshape(-1), threads)
        return result if out is None else out   # a tensor `out` comes back as itself

    def scatter_pair(self, dtype):
        """(indices, values) as the C scatter takes them: contiguous indices
        of ``index_dtype(size)``, values decoded and cast to `dtype`."""
        vals = self.values_array() if isinstance(self.values, Quantized) else self.values
        return (np.ascontiguousarray(self.indices, dtype=index_dtype(self.size)),
                np.ascontiguousarray(vals, dtype=dtype))

    def __repr__(self):
        vals = "Quantized" if isinstance(self.values, Quantized) else str(self.values.dtype)
        extra = f", seed={self.seed}, step={self.step}" if self.seed is not None else ""
        return (f"Sparse(nnz={self.nnz}, shape={self.shape}, dtype={self.dtype}, "
                f"values={vals}{extra}, nbytes={self.nbytes})")

    def __eq__(self, other):
        if not isinstance(other, Sparse):
            return NotImplemented
        if (self.shape != other.shape or self.dtype != other.dtype
                or not _same_bytes(self.indices, other.indices)):
            return False
        if isinstance(self.values, Quantized) or isinstance(other.values, Quantized):
            return self.values == other.values
        return _same_bytes(self.values, other.values)

    __hash__ = None


class Dense:
    """An uncompressed tensor as a payload (the fp32/fp64 baseline)."""

    __slots__ = ("array",)

    def __init__(self, array):
        arr = np.asarray(from_torch(array, "array"))
        if arr.dtype.newbyteorder("=") not in DTYPE_CODES:
            raise TypeError(f"array: expected float16, bfloat16, float32 or float64, got {arr.dtype}")
        normalize_shape(arr.shape, "array.shape")
        # np.require keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d)
        self.array = np.require(arr.astype(arr.dtype.newbyteorder("="), copy=False),
                                requirements="C")

    shape = property(lambda self: self.array.shape)
    dtype = property(lambda self: self.array.dtype)
    size = property(lambda self: int(self.array.size))

    @property
    def nbytes(self):
        return _header_size(self.shape) + 8 + self.array.nbytes + 4

    def to_dense(self, out=None, *, threads=None):
        if out is None:
            return self.array.copy()
        check_out(out, self.shape, self.dtype).reshape(-1)[:] = self.array.reshape(-1)
        return out

    def __repr__(self):
        return f"Dense(shape={self.shape}, dtype={self.dtype}, nbytes={self.nbytes})"

    def __eq__(self, other):
        if not isinstance(other, Dense):
            return NotImplemented
        return _same_bytes(self.array, other.array)

    __hash__ = None


# --------------------------------------------------------------------------
# Wire sizes (the layout is docs/formats.md; wire.py writes the bytes and
# its tests check nbytes == len(encode(p)) for every payload kind)
# --------------------------------------------------------------------------

IDX_RAW, IDX_VARINT, IDX_BITMAP, IDX_SEEDED = 0, 1, 2, 3


def _header_size(shape):
    """magic, version, kind, dtype, ndim, then one u64 per dimension."""
    return 8 + 8 * len(shape)


def _quant_body_size(q):
    """scheme id, dtype, parameter count, 9 bytes per parameter, array
    count, then each array as a u64 length and its bytes."""
    sch = get_scheme(q.scheme)
    return 3 + 9 * len(sch.params) + 1 + sum(8 + q.arrays[n].nbytes for n in sch.arrays)


def index_choice(s):
    """(encoding, bytes) of a Sparse's indices on the wire: seeded (the 16
    bytes of seed and step) for random-k payloads, else the smallest of raw,
    varint and bitmap (ties to the lower code)."""
    if s.seed is not None:
        return IDX_SEEDED, 16
    return smallest_index_encoding(_core.index_sizes(s.indices, s.size))


def smallest_index_encoding(sizes):
    """(encoding, bytes) of the smallest of the (raw, varint, bitmap) sizes,
    ties to the lower code."""
    raw, varint, bitmap = sizes
    if raw <= varint and raw <= bitmap:
        return IDX_RAW, raw
    return (IDX_VARINT, varint) if varint <= bitmap else (IDX_BITMAP, bitmap)
