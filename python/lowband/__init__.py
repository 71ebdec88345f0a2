"""lowband: compression, error feedback and Mixture-of-Experts routing
primitives for communication-efficient training, with a C11/OpenMP core.

Quick start::

    import numpy as np, lowband
    g = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
    p = lowband.topk(g, ratio=0.01)        # Sparse payload, 1% of entries
    wire = lowband.encode(p)               # bytes; len(wire) == p.nbytes
    back = lowband.decode(wire)
    dense = lowband.aggregate([back, back], op="mean")

Threads: every kernel takes ``threads=``; the default is
``set_num_threads(n)``, else ``omp_get_max_threads()`` at call time.  Results
are byte-identical for any thread count.  After ``os.fork()`` the child runs
kernels serially (libgomp cannot survive a fork); use the "spawn" start
method for parallel worker processes.
"""
import os as _os


def _load_core():
    """Import the extension with a short OpenMP spin (GOMP_SPINCOUNT=1000)
    unless the user chose a wait policy: libgomp reads it once, when it is
    loaded with the extension.  Spinning idle workers for libgomp's default
    (about 300,000 spins) make a team of two on two cores shared with
    another busy process up to 10x slower than one thread; a short spin
    costs nothing measurable on a quiet machine.  The environment is left as
    it was for child processes."""
    if "OMP_WAIT_POLICY" in _os.environ or "GOMP_SPINCOUNT" in _os.environ:
        from . import _core
        return _core
    _os.environ["GOMP_SPINCOUNT"] = "1000"
    try:
        from . import _core
    finally:
        _os.environ.pop("GOMP_SPINCOUNT", None)
    return _core


_core = _load_core()
from ._payload import Dense, FormatError, Quantized, Scheme, Sparse, register_scheme
from ._validate import check_int as _check_int
from ._version import __version__
from .sparsify import (aggregate, randomk, randomk_group, threshold, topk, topk_chunked, topk_group,
                       topk_sampled)
from .wire import decode, encode
from .vote import majority_vote
from . import lossless
from . import compressors as _compressors, feedback as _feedback, moe, optim, sim
from . import powersgd
from .powersgd import PowerSGD
from . import federated, decentral
from . import quantize as _quantize
from .quantize import *  # noqa: F401,F403  (sign, quantize, qsgd, ... pack_bits)
from .compressors import *  # noqa: F401,F403  (TopK, RandomK, ..., Chain, from_spec)
from .feedback import *  # noqa: F401,F403  (ErrorFeedback, EF21, ..., DGC)

# `lowband.quantize` is the function quantize(); the module stays reachable
# as `lowband._quantize` and through sys.modules["lowband.quantize"].

__all__ = [
    "__version__", "Sparse", "Quantized", "Dense", "Scheme", "register_scheme",
    "FormatError", "topk", "randomk", "threshold", "topk_chunked", "topk_sampled", "topk_group",
    "randomk_group",
    "aggregate", "majority_vote", "encode", "decode", "set_num_threads", "get_num_threads", "isa",
    "release_memory", "moe", "optim", "sim", "lossless", "powersgd", "PowerSGD", "federated",
    "decentral", *_quantize.__all__, *_compressors.__all__, *_feedback.__all__,
]


def set_num_threads(n):
    """Default team size of the kernels (None: back to omp_get_max_threads()
    read at each call).  A ``threads=`` argument overrides it per call."""
    _core.set_num_threads(None if n is None else _check_int(n, "n", 1, 4096))


def get_num_threads():
    """The team size a large kernel would use now (1 in a forked child)."""
    return _core.get_num_threads()


def release_memory():
    """Give back the buffers lowband keeps for reuse: large kernel outputs and
    scratch space return to a pool when freed (at most LOWBAND_POOL_LIMIT_MB,
    default an eighth of the physical memory and at least 1024 MB), so that
    repeated calls do not pay page faults."""
    _core.release_memory()


def isa():
    """The instruction set the dispatched kernels use: 'scalar', 'avx2' or
    'avx512' (LOWBAND_FORCE_ISA can force a lower one)."""
    return _core.isa()


# Fork guard: a child must never enter an OpenMP region its parent used.
if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_core._after_fork_child)
