"""PowerSGD: low-rank gradient compression with error feedback.

Vogels, Karimireddy and Jaggi, "PowerSGD: Practical Low-Rank Gradient
Compression for Distributed Optimization", NeurIPS 2019, run the way
PyTorch's ``powerSGD_hook``
(torch/distributed/algorithms/ddp_comm_hooks/powerSGD_hook.py) runs it, over
a lowband communicator (``lowband.sim.Cluster`` or a torch.distributed
one), so the same object works in the simulator and in real training.

One step on one rank, for a set of tensors (a flat vector g):

1. error feedback: g += e (e starts at 0); keep a copy g0;
2. each tensor is viewed as a matrix M (shape[0], -1) of rank
   r = min(n, m, rank); it is compressed when
   (n + m) * r * min_compression_rate < n * m, else (1-D tensors, small
   matrices) it is sent uncompressed;
3. Q (m x r) comes from a seeded generator, identical on every rank with no
   communication, on the first step (and on every step without
   ``warm_start``); with ``warm_start`` the previous step's Q is reused;
   either way it is orthogonalised;
4. P = M Q; **allreduce #1** carries the uncompressed tensors and all the
   P matrices in one buffer (torch uses two allreduces); the uncompressed
   tensors become the mean, the P matrices the sum;
5. P is orthogonalised; Q = M^T P; **allreduce #2**: Q becomes the mean;
6. M = P Q^T (the mean approximation); e = g0 - g (over the whole vector,
   as torch's hook: an uncompressed tensor's error is its local value minus
   the mean).

Orthogonalisation is lowband's C kernel (``orthogonalize``): modified
Gram-Schmidt as torch's ``_orthogonalize_gram_schmidt``, sums in double,
deterministic for any thread count.  torch switches to ``torch.linalg.qr``
for rank > 2; Gram-Schmidt is used for every rank here (QR gives the same
subspace, possibly with columns of opposite sign, which cancels in P Q^T).
A column of norm 0 becomes 0 (torch divides by zero there unless
``orthogonalization_epsilon`` > 0).  Matrix products use NumPy's matmul
(BLAS).

Random Q: torch seeds ``torch.randn`` with ``RandomState(seed).randint(1e9)``;
lowband draws ``numpy.random.default_rng([seed, draw]).standard_normal`` with
``draw`` counting the initialisations, so Q agrees across ranks without
communication but differs from torch's numbers (``q_matrices`` can be set
to compare with torch).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from . import _core
from ._validate import (FLOAT_DTYPES, as_float_array, check_finite_number, check_int, check_out,
                        check_seed, check_state_arrays, check_threads, from_torch)

__all__ = ["PowerSGD", "orthogonalize"]

_COMM_METHODS = ("allreduce",)


def orthogonalize(a: Any, epsilon: float = 0.0, *, threads: Optional[int] = None) -> np.ndarray:
    """Orthogonalise in place the columns of ``a`` (an n x r float32/float64
    matrix, or a stack of them: the last two axes) by modified Gram-Schmidt
    (column i /= ||column i|| + epsilon, then later columns lose their
    projection on it).  ``a`` must be writeable and C-contiguous (a torch
    tensor is used through a zero-copy view); returns it."""
    arr = from_torch(a, "a")
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"a: expected a float32 or float64 ndarray or tensor, got {type(a).__name__}")
    if arr.dtype not in FLOAT_DTYPES:
        raise TypeError(f"a: expected a float32 or float64 array, got dtype {arr.dtype}")
    if arr.ndim < 2:
        raise ValueError(f"a: expected at least 2 dimensions (n, r), got shape {arr.shape}")
    check_out(arr, arr.shape, arr.dtype, "a")
    eps = check_finite_number(epsilon, "epsilon", 0.0)
    _core.powersgd_orthogonalize(arr, eps, check_threads(threads))
    return a


def _shape_of(item, i):
    if isinstance(item, (int, np.integer)):
        raise TypeError(f"like[{i}]: expected an array, a tensor or a shape tuple, got {type(item).__name__} "
                        "(a single tensor's shape goes in a list: [(n, m)])")
    if isinstance(item, (tuple, list)):
        return tuple(check_int(s, f"like[{i}]", 0) for s in item)
    shape = getattr(item, "shape", None)
    if shape is None:
        raise TypeError(f"like[{i}]: expected an array, a tensor or a shape, got {type(item).__name__}")
    return tuple(int(s) for s in shape)


def _dtype_of(like, dtype):
    if dtype is not None:
        dt = np.dtype(dtype)
    else:
        dt = None
        for item in like:
            d = getattr(item, "dtype", None)
            if d is not None:
                dt = np.dtype(str(d).replace("torch.", ""))
                break
        dt = dt or np.dtype(np.float32)
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected float32 or float64, got {dt}")
    return dt


class PowerSGD:
    """PowerSGD over a lowband communicator (module doc).

    ``like``: the tensors of one flat buffer, in order: arrays, tensors or
    shapes.  ``comm``: a communicator with ``rank``, ``world_size`` and
    ``allreduce`` (``lowband.sim``; ``lowband.torch`` gives one over a
    process group).  ``rank``: the approximation rank; ``epsilon``: torch's
    ``orthogonalization_epsilon``.  ``dtype``: float32 or float64 (default:
    the first array's dtype, else float32).

    ``step(grad, out=None)``: ``grad`` is this rank's flat buffer (``size``
    elements) or a list of arrays with the shapes of ``like``; returns the
    mean approximation in the same form (``out``: where to write it; torch
    tensors accepted; ``out=grad`` works in grad's memory without a
    gradient-size copy, otherwise grad is left unchanged).  Every rank must call ``step``
    in lockstep.

    Accounting (this rank, cumulative): ``elements_sent`` / ``bytes_sent``
    are what this rank hands to the allreduces (uncompressed tensors, P and
    Q), ``elements_dense`` / ``bytes_dense`` what a plain allreduce of the
    buffer would hand over; a ring allreduce moves 2(W-1)/W of either per
    rank.  ``compressed[i]`` tells whether tensor i is compressed.
    """

    def __init__(self, like: Sequence[Any], comm: Any, rank: int = 1, *, error_feedback: bool = True,
                 warm_start: bool = True, seed: int = 0, min_compression_rate: float = 2.0,
                 epsilon: float = 0.0, dtype: Any = None, threads: Optional[int] = None) -> None:
        if not isinstance(like, (list, tuple)):
            raise TypeError(f"like: expected a list of arrays, tensors or shapes, got {type(like).__name__}")
        missing = [m for m in ("rank", "world_size", *_COMM_METHODS) if not hasattr(comm, m)]
        if missing:
            raise TypeError(f"comm: expected a lowband communicator (rank, world_size, allreduce), "
                            f"got {type(comm).__name__}")
        self.comm = comm
        self.shapes = [_shape_of(item, i) for i, item in enumerate(like)]
        self.dtype = _dtype_of(like, dtype)
        self.rank = check_int(rank, "rank", 1)
        self.error_feedback = bool(error_feedback)
        self.warm_start = bool(warm_start)
        self.seed = check_seed(seed)
        self.min_compression_rate = check_finite_number(min_compression_rate, "min_compression_rate", 0.0)
        self.epsilon = check_finite_number(epsilon, "epsilon", 0.0)
        self.threads = check_threads(threads)
        self.sizes = [math.prod(s) for s in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)]).astype(np.int64)
        self.size = int(self.offsets[-1])
        self.compressed, self.matrices = [], []     # matrices: (index, n, m, r)
        for i, shape in enumerate(self.shapes):
            if len(shape) >= 2:
                n, m = shape[0], self.sizes[i] // shape[0] if shape[0] else 0
                r = min(n, m, self.rank)
                ok = (n + m) * r * self.min_compression_rate < n * m
            else:
                ok = False
            self.compressed.append(ok)
            if ok:
                self.matrices.append((i, n, m, r))
        # P and Q memories hold the matrices grouped by shape, in order of
        # first appearance (the layout and draw order of torch's hook)
        groups: dict = {}
        for item in self.matrices:
            groups.setdefault(item[1:3], []).append(item)
        self.matrices = [item for group in groups.values() for item in group]
        self.p_size = sum(n * r for _, n, _, r in self.matrices)
        self.q_size = sum(m * r for _, _, m, r in self.matrices)
        self.uncompressed = [i for i, ok in enumerate(self.compressed) if not ok]
        self.u_size = sum(self.sizes[i] for i in self.uncompressed)
        self.error = np.zeros(self.size if self.error_feedback else 0, self.dtype)
        self.p_memory = np.zeros(self.p_size, self.dtype)
        self.q_memory = np.zeros(self.q_size, self.dtype)
        self.have_q = False
        self.draws = 0
        self.t = 0
        self.elements_sent = 0
        self.elements_dense = 0

    # -- views -----------------------------------------------------------------
    def _views(self, memory, dim):
        out, at = [], 0
        for _, n, m, r in self.matrices:
            rows = n if dim == "p" else m
            out.append(memory[at:at + rows * r].reshape(rows, r))
            at += rows * r
        return out

    @property
    def p_matrices(self) -> list:
        """The P matrices (n x r views of ``p_memory``), one per compressed
        tensor, grouped by shape in order of first appearance (as torch's
        hook lays them out); ``matrices[j]`` = (tensor index, n, m, r)."""
        return self._views(self.p_memory, "p")

    @property
    def q_matrices(self) -> list:
        """The Q matrices (m x r views of ``q_memory``); writing them (and
        setting ``have_q = True``) replaces the random initialisation."""
        return self._views(self.q_memory, "q")

    @property
    def bytes_sent(self) -> int:
        return self.elements_sent * self.dtype.itemsize

    @property
    def bytes_dense(self) -> int:
        return self.elements_dense * self.dtype.itemsize

    @property
    def compression_rate(self) -> float:
        """Dense elements over sent elements, for one step."""
        sent = self.u_size + self.p_size + self.q_size
        return self.size / sent if sent else math.inf

    # -- the algorithm -----------------------------------------------------------
    def _orth(self, a):
        _core.powersgd_orthogonalize(a, self.epsilon, self.threads)

    def _init_q(self):
        rng = np.random.default_rng([self.seed, self.draws])
        self.draws += 1
        for q in self.q_matrices:
            q[:] = rng.standard_normal(q.shape)
            self._orth(q)
        self.have_q = True

    def _flat_input(self, grad):
        if isinstance(grad, (list, tuple)):
            if len(grad) != len(self.shapes):
                raise ValueError(f"grad: expected {len(self.shapes)} arrays, got {len(grad)}")
            parts = []
            for i, (g, shape) in enumerate(zip(grad, self.shapes)):
                a = as_float_array(g, f"grad[{i}]", (self.dtype,))
                if a.size != self.sizes[i]:
                    raise ValueError(f"grad[{i}]: expected shape {shape}, got {a.shape}")
                parts.append(a.reshape(-1))
            return np.concatenate(parts) if parts else np.zeros(0, self.dtype)
        a = as_float_array(grad, "grad", (self.dtype,))
        if a.size != self.size:
            raise ValueError(f"grad: expected {self.size} elements (the flat buffer), got {a.size}")
        return a.reshape(-1)      # a view of grad when it is contiguous: copied in step

    def step(self, grad: Any, out: Any = None) -> Any:
        """This rank's gradient in, the mean approximation out (class doc)."""
        as_list = isinstance(grad, (list, tuple))
        g = self._flat_input(grad)
        in_place = False
        if out is not None and not as_list:
            target = check_out(out, (self.size,), self.dtype).reshape(-1)
            # out is grad itself: work in its memory (no gradient-size copy)
            in_place = target.ctypes.data == g.ctypes.data
        if out is not None and as_list:
            if not isinstance(out, (list, tuple)) or len(out) != len(self.shapes):
                raise TypeError(f"out: expected a list of {len(self.shapes)} arrays (as grad), "
                                f"got {type(out).__name__}")
            for i, (o, shape) in enumerate(zip(out, self.shapes)):
                check_out(o, shape, self.dtype, f"out[{i}]")
        if not np.isfinite(g).all():
            bad = int(np.flatnonzero(~np.isfinite(g))[0])
            raise ValueError(f"grad: expected finite values, got {g[bad]!r} at flat index {bad}")
        if in_place:
            g = target
        elif not as_list:
            g = g.copy()              # grad itself stays unchanged
        W = self.comm.world_size
        if self.error_feedback:
            g += self.error
            g0 = g.copy()
        mats = [g[self.offsets[i]:self.offsets[i + 1]].reshape(n, m) for i, n, m, _ in self.matrices]
        ps, qs = self.p_matrices, self.q_matrices
        if not self.have_q or not self.warm_start:
            self._init_q()
        else:
            for q in qs:
                self._orth(q)
        for M, p, q in zip(mats, ps, qs):
            np.matmul(M, q, out=p)
        unc = [g[self.offsets[i]:self.offsets[i + 1]] for i in self.uncompressed]
        if self.u_size + self.p_size:
            buf = np.concatenate(unc + [self.p_memory])
            total = self.comm.allreduce(buf, "sum")
            at = 0
            for part in unc:
                part[:] = total[at:at + part.size] / self.dtype.type(W)
                at += part.size
            self.p_memory[:] = total[at:]
        if self.matrices:
            for p in ps:
                self._orth(p)
            for M, p, q in zip(mats, ps, qs):
                np.matmul(M.T, p, out=q)
            self.q_memory[:] = self.comm.allreduce(self.q_memory, "sum") / self.dtype.type(W)
            for M, p, q in zip(mats, ps, qs):
                np.matmul(p, q.T, out=M)
        if self.error_feedback:
            np.subtract(g0, g, out=self.error)
        if not self.warm_start:
            self.have_q = False
        self.t += 1
        self.elements_sent += self.u_size + self.p_size + self.q_size
        self.elements_dense += self.size
        if as_list:
            res = [g[self.offsets[i]:self.offsets[i + 1]].reshape(s) for i, s in enumerate(self.shapes)]
            if out is not None:
                for i, (o, r) in enumerate(zip(out, res)):
                    check_out(o, r.shape, self.dtype, f"out[{i}]").reshape(r.shape)[...] = r
                return out
            return res
        if out is not None:
            if not in_place:
                target[:] = g
            return out
        return g.reshape(np.shape(grad)) if hasattr(grad, "shape") else g

    # -- state -------------------------------------------------------------------
    def _hyper(self):
        return {"shapes": [list(s) for s in self.shapes], "dtype": str(self.dtype), "rank": self.rank,
                "error_feedback": self.error_feedback, "warm_start": self.warm_start,
                "seed": self.seed, "min_compression_rate": self.min_compression_rate,
                "epsilon": self.epsilon}

    def state_dict(self) -> dict:
        """Copies of the error, P and Q memories, the counters and the
        hyper-parameters (the communicator is not part of it)."""
        return {"kind": "PowerSGD", "hyper": self._hyper(), "t": self.t, "draws": self.draws,
                "have_q": self.have_q, "elements_sent": self.elements_sent,
                "elements_dense": self.elements_dense,
                "arrays": {"error": self.error.copy(), "p_memory": self.p_memory.copy(),
                           "q_memory": self.q_memory.copy()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict of a PowerSGD with the same tensors and
        hyper-parameters, exactly."""
        if not isinstance(state, dict) or state.get("kind") != "PowerSGD":
            got = state.get("kind") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state: expected a PowerSGD state_dict, got {got!r}")
        if state.get("hyper") != self._hyper():
            raise ValueError(f"state: hyper-parameters {state.get('hyper')} differ from this object's "
                             f"{self._hyper()}")
        arrays: Any = state.get("arrays")
        check_state_arrays(arrays, {"error": (self.error.shape, self.dtype),
                                    "p_memory": (self.p_memory.shape, self.dtype),
                                    "q_memory": (self.q_memory.shape, self.dtype)})
        counters = {k: check_int(state.get(k), f"state[{k!r}]", 0)
                    for k in ("t", "draws", "elements_sent", "elements_dense")}
        self.error[:] = arrays["error"]
        self.p_memory[:] = arrays["p_memory"]
        self.q_memory[:] = arrays["q_memory"]
        self.have_q = bool(state.get("have_q"))
        for k, v in counters.items():
            setattr(self, k, v)

    def __repr__(self) -> str:
        return (f"PowerSGD(tensors={len(self.shapes)}, compressed={len(self.matrices)}, rank={self.rank}, "
                f"size={self.size}, rate={self.compression_rate:.1f})")
