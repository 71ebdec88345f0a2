"""Argument checks shared by every public function.

Each helper raises TypeError for a wrong type and ValueError for a wrong
value, with a message that names the argument and gives the expected and
the actual value.  Kernels call these before handing anything to the C core.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np

__all__ = [
    "as_float_array", "as_selectable", "HALF_DTYPES", "ANY_FLOAT_DTYPES", "BFLOAT16", "check_int", "check_count", "check_ratio", "check_seed",
    "check_step", "check_threads", "check_choice", "check_finite_number",
    "k_from_ratio", "resolve_k", "check_out", "FLOAT_DTYPES", "check_finite_array",
    "check_state_arrays", "check_state_step", "is_tensor", "from_torch", "check_offsets",
    "group_arrays", "group_ks",
]

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

try:  # bfloat16 arrays come from ml_dtypes (what JAX uses); optional
    import ml_dtypes as _ml_dtypes
    BFLOAT16 = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - depends on the environment
    BFLOAT16 = None
HALF_DTYPES = tuple(d for d in (np.dtype(np.float16), BFLOAT16) if d is not None)
ANY_FLOAT_DTYPES = FLOAT_DTYPES + HALF_DTYPES
MAX_STEP = 1 << 56
_U64 = 1 << 64


# -- torch tensors ---------------------------------------------------------
# Every entry point passes array arguments through from_torch() (as_float_array
# and check_out do it), so CPU tensors are used in place.  torch is never
# imported here: a tensor is recognised by its type's module.

def is_tensor(x: object) -> bool:
    """Whether x is a torch tensor (without importing torch)."""
    return type(x).__module__.startswith("torch") and hasattr(x, "data_ptr") and hasattr(x, "numpy")


def from_torch(x: Any, name: str = "x") -> Any:
    """x itself unless it is a torch tensor; a CPU tensor becomes a
    zero-copy ndarray view of its memory (bfloat16 through a uint16 view, as
    an ml_dtypes bfloat16 array).  A tensor that requires grad, lives on
    another device or has a dtype NumPy cannot view raises TypeError."""
    if type(x) is np.ndarray or not is_tensor(x):
        return x
    if x.requires_grad:
        raise TypeError(f"{name}: expected a tensor that does not require grad, got one with "
                        f"requires_grad=True (pass {name}.detach())")
    if x.device.type != "cpu":
        raise TypeError(f"{name}: expected a CPU tensor, got one on {x.device} (lowband.torch "
                        "handles other devices)")
    import torch
    if x.dtype == torch.bfloat16:
        if BFLOAT16 is None:
            raise TypeError(f"{name}: a bfloat16 tensor needs the ml_dtypes package (pip install ml_dtypes)")
        return x.view(torch.uint16).numpy().view(BFLOAT16)
    try:
        return x.numpy()
    except (RuntimeError, TypeError) as exc:
        raise TypeError(f"{name}: expected a tensor NumPy can view, got dtype {x.dtype} ({exc})") from None


def _dtype_names(dtypes):
    names = [str(np.dtype(d)) for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def as_float_array(x, name="x", dtypes=FLOAT_DTYPES):
    """x as a C-contiguous, aligned, native-endian ndarray of an allowed dtype.

    Arrays of an allowed dtype are used as they are when already contiguous
    (no copy); anything else is copied.  Python lists of floats become
    float64.  Other dtypes (ints, bools, complex, objects) raise TypeError.
    A torch CPU tensor is viewed without a copy (``from_torch``).
    """
    if type(x) is np.ndarray and x.dtype in dtypes and x.flags.aligned and x.flags.c_contiguous:
        return x   # the common case, in as few steps as possible (native: dtypes are)
    x = from_torch(x, name)
    if isinstance(x, np.ndarray):
        arr = x
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # pragma: no cover - numpy's own message
            raise TypeError(f"{name}: expected an array, got {type(x).__name__}") from exc
    dt = arr.dtype
    if dt.newbyteorder("=") not in dtypes:
        raise TypeError(f"{name}: expected a {_dtype_names(dtypes)} array, got dtype {dt}")
    if not dt.isnative:
        arr = arr.astype(dt.newbyteorder("="))
    if not (arr.flags.c_contiguous and arr.flags.aligned):
        arr = np.ascontiguousarray(arr)
    return arr


def as_selectable(x, name="x"):
    """(work, original) for the selection kernels: float32/float64 input is
    used as is (original is None); float16/bfloat16 input is widened exactly
    to float32 (magnitude order is preserved) and returned as `original` so
    the kept values can be taken from it in their own dtype."""
    arr = as_float_array(x, name, ANY_FLOAT_DTYPES)
    if arr.dtype in FLOAT_DTYPES:
        return arr, None
    return arr.astype(np.float32), arr


def check_int(value, name, lo=None, hi=None):
    """An int (numpy integers accepted, bool refused) within [lo, hi]."""
    if type(value) is int:
        v = value
    elif isinstance(value, (bool, np.bool_)) or not hasattr(value, "__index__"):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    else:
        v = operator.index(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        if lo is not None and hi is not None:
            raise ValueError(f"{name}: expected an int in [{lo}, {hi}], got {v}")
        if lo is not None:
            raise ValueError(f"{name}: expected an int >= {lo}, got {v}")
        raise ValueError(f"{name}: expected an int <= {hi}, got {v}")
    return v


def check_count(k, n, name="k"):
    """k as an int with 0 <= k <= n."""
    if type(k) is int:
        v = k
    elif isinstance(k, (bool, np.bool_)) or not hasattr(k, "__index__"):
        raise TypeError(f"{name}: expected an int, got {type(k).__name__}")
    else:
        v = operator.index(k)
    if v < 0 or v > n:
        raise ValueError(f"{name}: expected 0 <= {name} <= n (n = {n}), got {v}")
    return v


def check_finite_number(value, name, lo=None, hi=None, lo_open=False, hi_open=False):
    """A real number (not bool) that is finite and inside the given bounds."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    v = float(value)
    lo_bad = lo is not None and (v <= lo if lo_open else v < lo)
    hi_bad = hi is not None and (v >= hi if hi_open else v > hi)
    if not math.isfinite(v) or lo_bad or hi_bad:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else repr(lo)
        hi_s = "inf" if hi is None else repr(hi)
        raise ValueError(f"{name}: expected a finite number in {lb}{lo_s}, {hi_s}{rb}, got {value!r}")
    return v


def check_ratio(ratio, name="ratio"):
    """A fraction in [0, 1]."""
    return check_finite_number(ratio, name, 0.0, 1.0)


def k_from_ratio(n, ratio):
    """k = round(ratio * n) (half up), at least 1 when ratio > 0 and n > 0."""
    k = int(math.floor(ratio * n + 0.5))
    if ratio > 0 and n > 0:
        k = max(k, 1)
    return min(k, n)


def resolve_k(n, k, ratio, name="k"):
    """Exactly one of k (a count) or ratio (a fraction) -> a count in [0, n]."""
    if ratio is None and type(k) is int and 0 <= k <= n:
        return k
    if (k is None) == (ratio is None):
        raise TypeError(f"give exactly one of {name}= or ratio= (got {name}={k!r}, ratio={ratio!r})")
    if k is not None:
        return check_count(k, n, name)
    return k_from_ratio(n, check_ratio(ratio))


def check_seed(seed, name="seed"):
    """A seed: an int in [0, 2**64)."""
    if seed is None:
        raise TypeError(f"{name}: expected an int in [0, 2**64), got None (the seed is required)")
    if isinstance(seed, (bool, np.bool_)) or not hasattr(seed, "__index__"):
        raise TypeError(f"{name}: expected an int in [0, 2**64), got {type(seed).__name__}")
    v = operator.index(seed)
    if not 0 <= v < _U64:
        raise ValueError(f"{name}: expected an int in [0, 2**64), got {v}")
    return v


def check_step(step, name="step"):
    """A step counter: an int in [0, 2**56)."""
    if type(step) is int:
        v = step
    elif isinstance(step, (bool, np.bool_)) or not hasattr(step, "__index__"):
        raise TypeError(f"{name}: expected an int in [0, 2**56), got {type(step).__name__}")
    else:
        v = operator.index(step)
    if not 0 <= v < MAX_STEP:
        raise ValueError(f"{name}: expected an int in [0, 2**56), got {v}")
    return v


def check_threads(threads):
    """None or an int >= 1 (the C glue applies the same rule)."""
    if threads is None:
        return None
    return check_int(threads, "threads", 1, 4096)


def check_choice(value, name, choices):
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_finite_array(a, name, what="has a non-finite value"):
    """ValueError naming the first non-finite element of the array a (one
    read pass; nothing is allocated when a is finite)."""
    # min and max propagate NaN and show +-Inf: no temporary array
    if a.size and a.dtype.kind == "f" and not (np.isfinite(a.min()) and np.isfinite(a.max())):
        flat = a.reshape(-1)
        bad = int(np.flatnonzero(~np.isfinite(flat))[0])
        raise ValueError(f"{name} {what} ({flat[bad]!r}) at flat index {bad}")
    return a


def check_state_step(t, name="state['t']"):
    """A restored step counter: an int in [0, 2**56) (randomised
    compressors use it as their Philox step)."""
    return check_int(t, name, 0, MAX_STEP - 1)


def check_state_arrays(arrays, expected, name="state['arrays']"):
    """A state_dict's arrays: exactly the names of `expected` ({name:
    (shape, dtype)}), each an ndarray of that dtype (TypeError) and shape
    (ValueError), all values finite (ValueError)."""
    if not isinstance(arrays, dict) or set(arrays) != set(expected):
        got = sorted(arrays) if isinstance(arrays, dict) else type(arrays).__name__
        raise ValueError(f"{name}: expected arrays {sorted(expected)}, got {got}")
    for key, (shape, dtype) in expected.items():
        a = arrays[key]
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name}[{key!r}]: expected an ndarray, got {type(a).__name__}")
        if a.dtype != dtype:
            raise TypeError(f"{name}[{key!r}]: expected dtype {np.dtype(dtype)}, got {a.dtype}")
        if a.shape != tuple(shape):
            raise ValueError(f"{name}[{key!r}]: expected shape {tuple(shape)}, got {a.shape}")
        check_finite_array(a, f"{name}[{key!r}]")


def check_out(out, shape, dtype, name="out"):
    """A writeable C-contiguous ndarray of the given dtype and shape/size
    (a torch tensor: a zero-copy view of it, written in place)."""
    out = from_torch(out, name)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name}: expected an ndarray, got {type(out).__name__}")
    if out.dtype != np.dtype(dtype):
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype)}, got {out.dtype}")
    size = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    if out.shape != tuple(shape) and out.size != size:
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {out.shape}")
    if out.shape != tuple(shape) and out.ndim != 1:
        raise ValueError(f"{name}: expected shape {tuple(shape)} or ({size},), got {out.shape}")
    if not (out.flags.c_contiguous and out.flags.writeable and out.flags.aligned and out.dtype.isnative):
        raise ValueError(f"{name}: expected a writeable, C-contiguous, aligned native-endian array")
    return out


# -- groups of tensors -------------------------------------------------------
# The grouped calls take either a list of tensors, or one flat buffer with
# CSR-style offsets (segment i is flat[offsets[i]:offsets[i + 1]]).

def check_offsets(offsets, size, name="offsets"):
    """offsets as a list of ints: offsets[0] == 0, non-decreasing,
    offsets[-1] == size (the buffer's element count)."""
    if isinstance(offsets, (str, bytes)) or not hasattr(offsets, "__len__"):
        raise TypeError(f"{name}: expected a sequence of ints, got {type(offsets).__name__}")
    offs = [check_int(o, f"{name}[{i}]", 0) for i, o in enumerate(np.asarray(offsets).tolist()
                                                                     if is_tensor(offsets) else offsets)]
    if not offs or offs[0] != 0 or offs[-1] != size:
        raise ValueError(f"{name}: expected boundaries from 0 to {size} (the buffer's size), got "
                         f"{offs[:1]}...{offs[-1:]}")
    for i in range(1, len(offs)):
        if offs[i] < offs[i - 1]:
            raise ValueError(f"{name}: expected non-decreasing values, got {name}[{i}] = {offs[i]} "
                             f"< {name}[{i - 1}] = {offs[i - 1]}")
    return offs


def group_arrays(tensors, offsets=None, name="tensors", dtypes=FLOAT_DTYPES):
    """The segments of a group as a list of arrays: `tensors` a list/tuple
    of arrays or CPU tensors (each as_float_array(.., dtypes), named
    name[i]), or one array with `offsets` (flat views of it)."""
    if offsets is not None:
        flat = as_float_array(tensors, name, dtypes).reshape(-1)
        offs = check_offsets(offsets, flat.size)
        return [flat[offs[i]:offs[i + 1]] for i in range(len(offs) - 1)]
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name}: expected a list of arrays or tensors (or one flat array with "
                        f"offsets=), got {type(tensors).__name__}")
    return [as_float_array(t, f"{name}[{i}]", dtypes) for i, t in enumerate(tensors)]


def _per_tensor(value, m, name):
    """A scalar applied to all m tensors, or a sequence of m values."""
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != m:
            raise ValueError(f"{name}: expected {m} values (one per tensor), got {len(value)}")
        return [(v, f"{name}[{i}]") for i, v in enumerate(value)]
    return [(value, name)] * m


def group_ks(sizes, k, ratio, name="tensors"):
    """Per-tensor counts: exactly one of k (an int for all, or one per
    tensor, each <= its tensor's size) or ratio (a fraction, or one per
    tensor; k_i = round(ratio_i * n_i), at least 1)."""
    if (k is None) == (ratio is None):
        raise TypeError(f"give exactly one of k= or ratio= (got k={k!r}, ratio={ratio!r})")
    m = len(sizes)
    if k is not None:
        out = []
        for i, (kv, kname) in enumerate(_per_tensor(k, m, "k")):
            v = check_int(kv, kname, 0)
            if v > sizes[i]:
                raise ValueError(f"{kname}: expected at most {sizes[i]} (the size of {name}[{i}]), "
                                 f"got {v}")
            out.append(v)
        return out
    return [k_from_ratio(sizes[i], check_ratio(r, rname))
            for i, (r, rname) in enumerate(_per_tensor(ratio, m, "ratio"))]
