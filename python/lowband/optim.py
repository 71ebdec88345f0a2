"""Communication-efficient optimizers over flat NumPy parameter vectors.

Every optimizer is one rank's object: it owns nothing but its state, updates
``params`` (a float32/float64 ndarray) in place, and talks to the other
ranks only through ``comm`` (a ``lowband.sim`` communicator: the in-process
``Cluster`` or ``lowband.torch.ProcessGroupCommunicator``).  All ranks must call ``step`` in
lockstep.  docs/optim.md maps each class to its paper.

``SGD``, ``AdamW``   local (``comm=None``) or data-parallel (gradients
                     averaged with a dense allreduce) baselines; also the
                     inner optimizers of ``DiLoCo``.
``OneBitAdam``       1-bit Adam (Tang et al. 2021): exact Adam for
                     ``freeze_step`` steps, then frozen variance and
                     momentum averaged by a 1-bit two-phase compressed
                     allreduce with worker and server error feedback.
``DGCSGD``           Deep Gradient Compression (Lin et al. 2018): momentum
                     correction in the compressor memory, sparse allgather,
                     plain SGD step.
``DiLoCo``           DiLoCo with optional compression and decayed error
                     feedback; ``DiLoCo.sparseloco`` (SparseLoCo) and
                     ``DiLoCo.streaming`` (Streaming DiLoCo) configure it.
``SeedReplayZO``     Just One Byte (Zelikman et al. 2023): zeroth-order
                     steps where only the projected-gradient scalars travel.

Each has ``state_dict()`` / ``load_state_dict(state)``: exact round trip of
every array (error buffers included), refused for another kind, another
shape or dtype, or other hyper-parameters.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from . import _core
from ._payload import Dense
from ._validate import (FLOAT_DTYPES, check_choice, check_finite_array, check_finite_number,
                        check_int, check_seed, check_state_arrays, check_state_step, from_torch)
from .compressors import Chain, ChunkedTopK, from_spec
from .feedback import DGC, DecayedFeedback
from .sim import (chunk_bounds, deepspeed_compressed_allreduce, deepspeed_padded_size,
                  reduce_payloads)

__all__ = ["Optimizer", "SGD", "AdamW", "OneBitAdam", "DGCSGD", "DiLoCo", "SeedReplayZO",
           "perturbation", "ZO_DOMAIN", "Signum", "ZeroOneAdam", "OneBitLamb", "weights_digest", "CO2"]

_COMM_METHODS = ("allreduce", "allgather", "alltoall", "broadcast", "barrier", "compressed_allreduce")


def _check_params(params):
    params = from_torch(params, "params")      # a tensor: updated in place through a view
    if not isinstance(params, np.ndarray):
        raise TypeError(f"params: expected a float32 or float64 ndarray, got {type(params).__name__}")
    if params.dtype not in FLOAT_DTYPES:
        raise TypeError(f"params: expected a float32 or float64 ndarray, got dtype {params.dtype}")
    if not (params.flags.c_contiguous and params.flags.writeable and params.dtype.isnative):
        raise ValueError("params: expected a writeable C-contiguous array (it is updated in place)")
    return params


def _check_comm(comm, required=True):
    if comm is None and not required:
        return None
    missing = [m for m in ("rank", "world_size", *_COMM_METHODS) if not hasattr(comm, m)]
    if missing:
        raise TypeError(f"comm: expected a lowband.sim communicator (with {', '.join(_COMM_METHODS)}), "
                        f"got {type(comm).__name__}")
    return comm


def _check_lr(lr, name="lr"):
    return check_finite_number(lr, name, 0.0)


def _check_betas(betas):
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
    return (check_finite_number(betas[0], "betas[0]", 0.0, 1.0, hi_open=True),
            check_finite_number(betas[1], "betas[1]", 0.0, 1.0, hi_open=True))


def _transactional(step):
    """Wraps an optimizer's ``step``: params and the whole state (children
    included) are saved first; if the step raises, or leaves a non-finite
    value in params or in a state array, both are put back exactly and the
    step raises, so a failed step changes nothing on this rank.  (Other
    ranks may already have finished their part of a collective: a failure
    inside a distributed step must still be handled on every rank.)"""
    @functools.wraps(step)
    def run(self, *args, **kwargs):
        saved = (self.flat.copy(), self.state_dict())
        try:
            out = step(self, *args, **kwargs)
            what = "overflowed (the step was undone)"
            check_finite_array(self.flat, f"{type(self).__name__}.step: params", what)
            for name, arr in self._arrays.items():
                check_finite_array(arr, f"{type(self).__name__}.step: the state {name!r}", what)
            return out
        except BaseException:
            self.flat[:] = saved[0]
            self.load_state_dict(saved[1])
            raise
    run.transactional = True
    return run


class Optimizer:
    """Base class: params, comm, step counter ``t``, named state arrays,
    child objects with their own state (feedback memories, an inner
    optimizer) and the state_dict machinery.  Every subclass's ``step`` is
    transactional (``_transactional``) and every gradient must be finite."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("step")
        if step is not None and not getattr(step, "transactional", False):
            cls.step = _transactional(step)

    def __init__(self, params, comm=None, *, comm_required=True):
        self.params = _check_params(params)
        self.flat = self.params.reshape(-1)          # a view: updates land in params
        self.comm = _check_comm(comm, comm_required)
        self.t = 0
        self._arrays = {}

    # -- state -------------------------------------------------------------
    def _new_state(self, name, size=None):
        """A zero state array of params' dtype (size: params' size)."""
        arr = np.zeros(self.flat.size if size is None else size, dtype=self.flat.dtype)
        self._arrays[name] = arr
        return arr

    def _hyper(self):
        return {}

    def _children(self):
        return {}

    def _extra_state(self):
        return {}

    def _load_extra_state(self, extra):
        pass

    def state_dict(self):
        """Copies of every state array, the step, hyper-parameters and the
        children's state dicts."""
        return {"kind": type(self).__name__, "t": self.t, "hyper": self._hyper(),
                "arrays": {n: a.copy() for n, a in self._arrays.items()},
                "children": {n: c.state_dict() for n, c in self._children().items()},
                "extra": self._extra_state()}

    def load_state_dict(self, state):
        """Restore a state_dict of the same kind, shapes, dtypes and
        hyper-parameters, exactly (error buffers included)."""
        kind = type(self).__name__
        if not isinstance(state, dict) or state.get("kind") != kind:
            got = state.get("kind") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state: expected a {kind} state_dict, got {got!r}")
        if state.get("hyper") != self._hyper():
            raise ValueError(f"state: hyper-parameters {state.get('hyper')} differ from this optimizer's {self._hyper()}")
        arrays = state.get("arrays", {})
        check_state_arrays(arrays, {k: (v.shape, v.dtype) for k, v in self._arrays.items()})
        children = state.get("children", {})
        if set(children) != set(self._children()):
            raise ValueError(f"state: expected children {sorted(self._children())}, got {sorted(children)}")
        t = check_state_step(state.get("t"))
        for name, child in self._children().items():
            child.load_state_dict(children[name])
        for name, mine in self._arrays.items():
            mine[:] = arrays[name]
        self._load_extra_state(state.get("extra", {}))
        self.t = t

    # -- helpers -------------------------------------------------------------
    def _grad(self, grad, name="grad"):
        grad = from_torch(grad, name)
        if not isinstance(grad, np.ndarray):
            raise TypeError(f"{name}: expected an ndarray, got {type(grad).__name__}")
        if grad.dtype != self.flat.dtype:
            raise TypeError(f"{name}: expected dtype {self.flat.dtype} (the params'), got {grad.dtype}")
        if grad.size != self.flat.size or (grad.shape != self.params.shape and grad.ndim != 1):
            raise ValueError(f"{name}: expected shape {self.params.shape}, got {grad.shape}")
        return check_finite_array(np.ascontiguousarray(grad).reshape(-1), name)

    def _average(self, g):
        """The gradient averaged over the ranks (as is without a comm)."""
        return g if self.comm is None else self.comm.allreduce(g, "mean")

    def __repr__(self):
        hyper = ", ".join(f"{k}={v!r}" for k, v in self._hyper().items())
        return f"{type(self).__name__}(n={self.flat.size}, {hyper})"


# --------------------------------------------------------------------------
# Dense baselines / inner optimizers
# --------------------------------------------------------------------------

class SGD(Optimizer):
    """SGD with momentum, PyTorch's rule: g = avg(grad) + wd*x;
    b = mu*b + g; d = g + mu*b (Nesterov) or b; x -= lr*d.
    ``comm`` given: the gradient is first averaged by a dense allreduce."""

    def __init__(self, params, lr, momentum=0.0, *, nesterov=False, weight_decay=0.0, comm=None):
        super().__init__(params, comm, comm_required=False)
        self.lr = _check_lr(lr)
        self.momentum = check_finite_number(momentum, "momentum", 0.0, 1.0)
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov: Nesterov momentum needs momentum > 0, got momentum=0.0")
        self.weight_decay = check_finite_number(weight_decay, "weight_decay", 0.0)
        self.buf = self._new_state("momentum") if self.momentum else None

    def _hyper(self):
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay}

    def step(self, grad):
        g = self._average(self._grad(grad))
        x = self.flat
        if self.weight_decay:
            g = g + x.dtype.type(self.weight_decay) * x
        if self.momentum:
            mu = x.dtype.type(self.momentum)
            self.buf *= mu
            self.buf += g
            g = g + mu * self.buf if self.nesterov else self.buf
        x -= x.dtype.type(self.lr) * g
        self.t += 1


class AdamW(Optimizer):
    """AdamW, PyTorch's rule: x *= 1 - lr*wd; m = b1*m + (1-b1)*g;
    v = b2*v + (1-b2)*g^2; x -= (lr/(1-b1^t)) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
    ``comm`` given: the gradient is first averaged by a dense allreduce."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, *, comm=None):
        super().__init__(params, comm, comm_required=False)
        self.lr = _check_lr(lr)
        self.betas = _check_betas(betas)
        self.eps = check_finite_number(eps, "eps", 0.0)
        self.weight_decay = check_finite_number(weight_decay, "weight_decay", 0.0)
        self.exp_avg = self._new_state("exp_avg")
        self.exp_avg_sq = self._new_state("exp_avg_sq")

    def _hyper(self):
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay}

    def step(self, grad):
        g = self._average(self._grad(grad))
        x, f = self.flat, self.flat.dtype.type
        b1, b2 = self.betas
        self.t += 1
        if self.weight_decay:
            x *= f(1 - self.lr * self.weight_decay)
        _adam_moments(self.exp_avg, self.exp_avg_sq, g, b1, b2)
        denom = np.sqrt(self.exp_avg_sq) / f(math.sqrt(1 - b2 ** self.t)) + f(self.eps)
        x -= f(self.lr / (1 - b1 ** self.t)) * (self.exp_avg / denom)


def _adam_moments(m, v, g, b1, b2):
    f = m.dtype.type
    m *= f(b1)
    m += f(1 - b1) * g
    v *= f(b2)
    v += f(1 - b2) * (g * g)


# --------------------------------------------------------------------------
# 1-bit Adam
# --------------------------------------------------------------------------

class OneBitAdam(Optimizer):
    """1-bit Adam (Tang et al., ICML 2021), as DeepSpeed implements it.

    Warm-up, the first ``freeze_step`` steps: exact Adam on the averaged
    gradient (dense allreduce), without bias correction:
    m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; x -= lr*(m/(sqrt(v)+eps) + wd*x).

    Compression stage: v is frozen; each rank updates m with its *local*
    gradient, then m = compressed_allreduce(m) (two-phase, 1-bit signs with
    an RMS scale, worker and server error feedback: ``lowband.sim``), then
    m *= momentum_mask and the same parameter update.  ``momentum_mask``
    is DeepSpeed's ``exp_avg_mask``, for entries whose gradient is always
    zero (signs cannot encode 0, so their momentum would become +-scale and
    their update scale/eps): an array of 0/1, or "auto" for the entries
    whose variance is still exactly 0 when the warm-up ends.  ``error_feedback=False`` drops both error buffers (an
    ablation).  ``freeze_step`` is required: the paper uses 15-25% of the
    total steps.  Unlike DeepSpeed, the error buffers are part of the state
    dict and are restored, not reset, by ``load_state_dict``.

    ``exchange``: "chunked" (``comm.compressed_allreduce``: chunks on
    8-element boundaries, one RMS scale per chunk, no padding) or
    "deepspeed" (``lowband.sim.deepspeed_compressed_allreduce``: DeepSpeed's
    exact exchange, the momentum padded to a multiple of W * lcm(W, 8), one
    worker scale for the whole buffer, sign codes only, no compression on
    one rank; ``compressor`` must stay "sign:rms").
    """

    def __init__(self, params, comm, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 freeze_step, compressor="sign:rms", error_feedback=True, momentum_mask=None,
                 exchange="chunked"):
        super().__init__(params, comm)
        self.exchange = check_choice(exchange, "exchange", ("chunked", "deepspeed"))
        self.lr = _check_lr(lr)
        self.betas = _check_betas(betas)
        self.eps = check_finite_number(eps, "eps", 0.0)
        self.weight_decay = check_finite_number(weight_decay, "weight_decay", 0.0)
        self.freeze_step = check_int(freeze_step, "freeze_step", 0)
        self.compressor = from_spec(compressor)
        if self.exchange == "deepspeed" and self.compressor.spec != "sign:rms":
            raise ValueError(f"compressor: exchange='deepspeed' sends RMS-scaled signs ('sign:rms'), "
                             f"got {self.compressor.spec!r}")
        self.error_feedback = bool(error_feedback)
        self.mask_mode = None
        self.momentum_mask = None
        if isinstance(momentum_mask, str):
            check_choice(momentum_mask, "momentum_mask", ("auto",))
            self.mask_mode = "auto"
            self.momentum_mask = self._new_state("momentum_mask")
            self.momentum_mask[:] = 1
        elif momentum_mask is not None:
            mask = np.asarray(from_torch(momentum_mask, "momentum_mask"))
            if mask.size != self.flat.size:
                raise ValueError(f"momentum_mask: expected {self.flat.size} elements, got {mask.size}")
            self.mask_mode = "given"
            self.momentum_mask = self._new_state("momentum_mask")
            self.momentum_mask[:] = mask.reshape(-1)
        self.exp_avg = self._new_state("exp_avg")
        self.exp_avg_sq = self._new_state("exp_avg_sq")
        self.worker_error = self.server_error = None
        if self.error_feedback and self.exchange == "deepspeed":
            padded = deepspeed_padded_size(self.flat.size, self.comm.world_size)
            self.worker_error = self._new_state("worker_error", padded)
            self.server_error = self._new_state("server_error", padded // self.comm.world_size)
        elif self.error_feedback:
            bounds = chunk_bounds(self.flat.size, self.comm.world_size)
            self.worker_error = self._new_state("worker_error")
            self.server_error = self._new_state("server_error",
                                                bounds[self.comm.rank + 1] - bounds[self.comm.rank])

    def _hyper(self):
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay,
                "freeze_step": self.freeze_step, "compressor": self.compressor.spec,
                "error_feedback": self.error_feedback, "momentum_mask": self.mask_mode,
                "exchange": self.exchange}

    @property
    def compressing(self):
        """Whether the next step is in the compression stage."""
        return self.t >= self.freeze_step

    def step(self, grad):
        g = self._grad(grad)
        x, f = self.flat, self.flat.dtype.type
        b1, b2 = self.betas
        m = self.exp_avg
        if not self.compressing:
            _adam_moments(m, self.exp_avg_sq, self.comm.allreduce(g, "mean"), b1, b2)
        else:
            if self.mask_mode == "auto" and self.t == self.freeze_step:
                self.momentum_mask[:] = self.exp_avg_sq != 0
            m *= f(b1)
            m += f(1 - b1) * g
            if self.exchange == "chunked":
                m[:] = self.comm.compressed_allreduce(m, self.compressor, self.worker_error, self.server_error)
            elif self.comm.world_size > 1:
                we, se = self.worker_error, self.server_error
                if we is None:          # no error feedback: fresh zeros every step
                    padded = deepspeed_padded_size(m.size, self.comm.world_size)
                    we, se = np.zeros(padded, m.dtype), np.zeros(padded // self.comm.world_size, m.dtype)
                m[:] = deepspeed_compressed_allreduce(self.comm, m, we, se)
            if self.momentum_mask is not None:
                m *= self.momentum_mask
        update = m / (np.sqrt(self.exp_avg_sq) + f(self.eps))
        if self.weight_decay:
            update += f(self.weight_decay) * x
        x -= f(self.lr) * update
        self.t += 1


# --------------------------------------------------------------------------
# Deep Gradient Compression
# --------------------------------------------------------------------------

def _segments(tensors, n):
    """(shapes, [(slice, compressed)]) for the tensors packed into a flat
    vector of n: tensors with more than one dimension are compressed (DGC
    compresses weights, not biases)."""
    if tensors is None:
        return None, [(slice(0, n), True)]
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"tensors: expected a list of shapes, got {type(tensors).__name__}")
    shapes, out, start = [], [], 0
    for i, shape in enumerate(tensors):
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        shape = tuple(check_int(s, f"tensors[{i}]", 1) for s in shape)
        size = math.prod(shape)
        shapes.append(shape)
        out.append((slice(start, start + size), len(shape) > 1))
        start += size
    if start != n:
        raise ValueError(f"tensors: the shapes hold {start} elements, params has {n}")
    return shapes, out


def _clip_norm(g, max_norm):
    """g scaled down to L2 norm <= max_norm (g itself when it already is)."""
    norm = float(np.sqrt(np.dot(g.astype(np.float64), g.astype(np.float64))))
    return g * g.dtype.type(max_norm / norm) if norm > max_norm else g


class DGCSGD(Optimizer):
    """Deep Gradient Compression (Lin et al., ICLR 2018), as its authors'
    code runs it.

    ``tensors`` lists the shapes packed into params (None: one compressed
    tensor).  Per step, for every tensor with more than one dimension:
    ``lowband.DGC`` memory (optional clipping to ``clip``, momentum
    correction u = mu*u + g, v = v + u, sampled top-``ratio`` selection of v,
    v and, with ``masking``, u zeroed where sent), allgather of the Sparse
    payloads, and d = (1/W) * scatter-sum.  Other tensors (biases): the
    local gradient (clipped) is averaged by a dense allreduce and takes
    local momentum (u = mu*u + g; d = u, Nesterov d = mu*(u+g) + g).
    Weight decay has its own momentum, as in the authors' DGCSGD:
    b = mu*b + wd*x; d += b (Nesterov: wd*x + mu*b).  Then x -= lr*d.

    The paper rescales the clipping threshold by W^-1/2: pass the rescaled
    value; it applies to each tensor's local gradient.  ``warmup_steps``:
    steps per stage of the paper's sparsity warm-up (75%, 93.75%,
    98.4375%, 99.6%, then ``ratio``); the paper uses one epoch per stage.
    """

    def __init__(self, params, comm, lr, momentum=0.9, ratio=0.001, *, nesterov=False, clip=None,
                 masking=True, warmup_steps=None, weight_decay=0.0, tensors=None, exact=False,
                 sample_ratio=0.01, seed=0):
        super().__init__(params, comm)
        self.lr = _check_lr(lr)
        self.momentum = check_finite_number(momentum, "momentum", 0.0, 1.0)
        self.nesterov = bool(nesterov)
        self.weight_decay = check_finite_number(weight_decay, "weight_decay", 0.0)
        self.clip = None if clip is None else check_finite_number(clip, "clip", 0.0, lo_open=True)
        self.tensors, segments = _segments(tensors, self.flat.size)
        like = lambda s: np.empty(s.stop - s.start, self.flat.dtype)   # noqa: E731
        self.memories = [(s, DGC(like(s), ratio, momentum=self.momentum, nesterov=self.nesterov,
                                 clip=self.clip, masking=masking, warmup_steps=warmup_steps,
                                 exact=exact, sample_ratio=sample_ratio, seed=seed))
                         for s, compressed in segments if compressed]
        self.dense = [s for s, compressed in segments if not compressed]
        n_dense = sum(s.stop - s.start for s in self.dense)
        self.dense_momentum = self._new_state("dense_momentum", n_dense) if self.dense else None
        self.wd_momentum = self._new_state("wd_momentum") if self.weight_decay and self.momentum else None

    def _hyper(self):
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov, "clip": self.clip,
                "weight_decay": self.weight_decay, "tensors": self.tensors}

    def _children(self):
        return {f"dgc.{i}": mem for i, (_, mem) in enumerate(self.memories)}

    def step(self, grad):
        g = self._grad(grad)
        x, f = self.flat, self.flat.dtype.type
        mu = f(self.momentum)
        d = np.empty_like(x)
        payloads = [memory.step(g[s]) for s, memory in self.memories]
        if len(payloads) > 1 and hasattr(self.comm, "allgather_many"):
            rows = self.comm.allgather_many(payloads)      # one exchange for every tensor
            gathered = [[row[t] for row in rows] for t in range(len(payloads))]
        else:
            gathered = [self.comm.allgather(p) for p in payloads]
        for (s, _), got in zip(self.memories, gathered):
            d[s] = reduce_payloads(got, "mean")
        if self.dense:
            local = [g[s] if self.clip is None else _clip_norm(g[s], self.clip) for s in self.dense]
            avg = self.comm.allreduce(np.concatenate(local), "mean")
            u = self.dense_momentum
            if self.nesterov:
                u += avg
                u *= mu
                avg = u + avg
            else:
                u *= mu
                u += avg
                avg = u
            start = 0
            for s in self.dense:
                d[s] = avg[start:start + s.stop - s.start]
                start += s.stop - s.start
        if self.weight_decay:
            decay = f(self.weight_decay) * x
            if self.wd_momentum is not None:
                b = self.wd_momentum
                b *= mu
                b += decay
                decay = decay + mu * b if self.nesterov else b
            d += decay
        x -= f(self.lr) * d
        self.t += 1


# --------------------------------------------------------------------------
# DiLoCo, SparseLoCo, Streaming DiLoCo
# --------------------------------------------------------------------------

def _fragments(n, fragments, layers):
    """Index sets of the P fragments: the vector is cut into ``layers``
    (sizes; default P equal parts) and fragment p holds layers p, p+P, ...
    (Streaming DiLoCo's strided pattern).  A contiguous fragment is a slice."""
    P = check_int(fragments, "fragments", 1)
    if layers is None:
        if P > max(n, 1):
            raise ValueError(f"fragments: expected at most {n} fragments for {n} parameters, got {P}")
        sizes = [len(a) for a in np.array_split(np.arange(n), P)]
    else:
        sizes = [check_int(s, f"layers[{i}]", 1) for i, s in enumerate(layers)]
        if sum(sizes) != n:
            raise ValueError(f"layers: the sizes add up to {sum(sizes)}, params has {n}")
        if len(sizes) < P:
            raise ValueError(f"fragments: expected at most {len(sizes)} fragments (one layer each at least), got {P}")
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    out = []
    for p in range(P):
        ids = range(p, len(sizes), P)
        if len(ids) == 1:
            out.append(slice(int(starts[p]), int(starts[p + 1])))
        else:
            out.append(np.concatenate([np.arange(starts[i], starts[i + 1]) for i in ids]))
    return out


def _frag_size(frag):
    return frag.stop - frag.start if isinstance(frag, slice) else len(frag)


def _piece_shape(shape, size):
    """The shape a piece is compressed as: 2-D for tensors of two or more
    dimensions, flat otherwise."""
    if shape is None or len(shape) < 2:
        return (size,)
    return (shape[0], size // shape[0])


def _largest_divisor(n, cap):
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _tensor_compressor(compressor, shape):
    """SparseLoCo's per-tensor tiling of a ``ChunkedTopK(C, k)`` sparsifier
    (alone or first in a Chain): 2-D tiles of the largest divisors up to
    sqrt(C), 1-D chunks of min(C, n); k scaled to the tile size (at least
    1).  Any other compressor is returned as is."""
    first = compressor.first if isinstance(compressor, Chain) else compressor
    if not isinstance(first, ChunkedTopK) or isinstance(first.chunk, tuple):
        return compressor
    C, k = first.chunk, first.k_per_chunk
    if len(shape) >= 2:
        side = max(1, math.isqrt(C))
        rows, cols = shape[0], math.prod(shape[1:])
        h, w = _largest_divisor(rows, side), _largest_divisor(cols, side)
        tile, kt = (h, w), max(1, round(h * w * k / C))
    else:
        tile = min(C, shape[0])
        kt = max(1, round(tile * k / C))
    sparsifier = ChunkedTopK(tile, kt, threads=first.threads)
    return Chain(sparsifier, compressor.then) if isinstance(compressor, Chain) else sparsifier


class DiLoCo(Optimizer):
    """DiLoCo (Douillard et al. 2023) and its compressed variants.

    Every ``step(grad)`` is one inner step (``inner.step(grad)`` on params).
    Fragment p (``fragments`` P, strided over ``layers``) syncs at the
    inner steps t = off_p + k*H (k >= 1, off_p = floor(p*H/P)):

    - outer gradient delta = x_global - x_local on the fragment;
    - exchanged: a dense allreduce mean (``compressor=None``), or each rank
      sends C(delta) (or, with ``feedback=beta``, SparseLoCo's decayed error
      feedback: e = beta*e + delta, send C(e), e -= D(C(e))) by allgather,
      combined by ``aggregate`` ("mean": sum/W, "contributor_mean": per
      coordinate over the ranks that sent it);
    - outer SGD on x_global: b = mu*b + agg, update = agg + mu*b (Nesterov)
      or b (mu = 0: update = agg); x_global -= outer_lr * update;
    - after ``overlap`` (tau) more inner steps: x_local = alpha*x_local +
      (1-alpha)*x_global on the fragment (tau = 0, alpha = 0: plain DiLoCo).

    ``tensors``: the shapes of the tensors packed into params (``layers``
    defaults to their sizes).  With a compressor, each tensor of a fragment
    is then compressed on its own (its own payload, statistics and error
    buffer, as SparseLoCo's authors do): a ``ChunkedTopK(C, k)``
    sparsifier becomes, per 2-D tensor (r, c) (more dimensions: (r, rest)),
    tiles of h x w with h, w the largest divisors of r, c up to sqrt(C)
    keeping round(h*w*k/C) (at least 1) each, and per 1-D tensor of n
    elements chunks of min(C, n) keeping round(min(C, n)*k/C); tiles never
    cross a tensor boundary.  Other compressors run unchanged on each
    tensor.  Without ``tensors`` the fragment is one flat vector.

    ``inner``: an optimizer over the same params array, or a factory
    ``inner(params) -> optimizer``.  x_global starts as params when DiLoCo
    is built: build it once params hold the (identical) initial values.  Defaults are DiLoCo's (outer Nesterov
    SGD, lr 0.7, momentum 0.9); ``sparseloco`` and ``streaming`` build the
    other papers' configurations.
    """

    def __init__(self, params, comm, inner, H, *, outer_lr=0.7, outer_momentum=0.9, nesterov=True,
                 compressor=None, feedback=None, aggregate="mean", fragments=1, layers=None,
                 overlap=0, alpha=0.0, tensors=None):
        super().__init__(params, comm)
        if isinstance(inner, type) or (callable(inner) and not hasattr(inner, "step")):
            inner = inner(self.params)          # a factory (or an optimizer class)
        self.inner = inner
        if not hasattr(self.inner, "step") or not hasattr(self.inner, "state_dict"):
            raise TypeError(f"inner: expected an optimizer (with step and state_dict) or a factory, "
                            f"got {type(inner).__name__}")
        inner_params = getattr(self.inner, "params", None)
        if not (isinstance(inner_params, np.ndarray) and inner_params.size == self.flat.size
                and np.shares_memory(inner_params, self.params)):
            raise ValueError("inner: the inner optimizer must update the same params array")
        self.H = check_int(H, "H", 1)
        self.outer_lr = _check_lr(outer_lr, "outer_lr")
        self.outer_momentum = check_finite_number(outer_momentum, "outer_momentum", 0.0, 1.0)
        self.nesterov = bool(nesterov)
        self.compressor = None if compressor is None else from_spec(compressor)
        self.beta = None if feedback is None else check_finite_number(feedback, "feedback", 0.0, 1.0)
        if self.beta is not None and self.compressor is None:
            raise ValueError("feedback: error feedback needs a compressor, got compressor=None")
        self.aggregate = check_choice(aggregate, "aggregate", ("mean", "contributor_mean"))
        sparsifying = self.compressor is not None and (self.compressor.sparsifier
                                                       or isinstance(self.compressor, Chain))
        if self.aggregate == "contributor_mean" and not sparsifying:
            raise ValueError("aggregate: 'contributor_mean' needs a sparsifying compressor "
                             f"(top-k ...), got {self.compressor.spec if self.compressor else None!r}")
        self.overlap = check_int(overlap, "overlap", 0, self.H - 1)
        self.alpha = check_finite_number(alpha, "alpha", 0.0, 1.0)
        self.tensors = None
        if tensors is not None:
            self.tensors, _ = _segments(tensors, self.flat.size)
            sizes = [math.prod(t) for t in self.tensors]
            if layers is not None and [int(s) for s in layers] != sizes:
                raise ValueError(f"layers: expected the tensors' sizes {sizes} (or None), got {list(layers)}")
            layers = sizes
        self.layers = None if layers is None else [int(s) for s in layers]
        self.fragments = _fragments(self.flat.size, fragments, layers)
        P = len(self.fragments)
        if P > self.H:
            raise ValueError(f"fragments: expected at most H = {self.H} fragments (distinct offsets), got {P}")
        self.offsets = [p * self.H // P for p in range(P)]
        self.x_global = self._new_state("x_global")
        self.x_global[:] = self.flat
        self.outer_buf = self._new_state("outer_momentum") if self.outer_momentum else None
        # parts[p]: (offset in the fragment, size, shape, compressor) of each
        # separately compressed piece of fragment p
        self.parts = [[(0, _frag_size(frag), None, self.compressor)] for frag in self.fragments]
        if self.tensors is not None and self.compressor is not None:
            P = len(self.fragments)
            self.parts = []
            for p in range(P):
                off, pieces = 0, []
                for shape in self.tensors[p::P]:
                    size = math.prod(shape)
                    pieces.append((off, size, shape, _tensor_compressor(self.compressor, shape)))
                    off += size
                self.parts.append(pieces)
        self.feedbacks = []
        if self.beta is not None:
            dtype = self.flat.dtype
            self.feedbacks = [DecayedFeedback(comp, np.empty(_piece_shape(shape, size), dtype), self.beta)
                              for pieces in self.parts for _, size, shape, comp in pieces]
        self.pending = []     # (inner step at which to mix, fragment)

    # -- configurations ------------------------------------------------------
    @classmethod
    def sparseloco(cls, params, comm, inner, H=15, *, chunk=4096, k=128, values="lut2bit", beta=0.95,
                   tensors=None):
        """SparseLoCo (Sarfi et al. 2025): top-``k`` per ``chunk`` (128 of
        4096, 3.1%), kept values as 2-bit LUT codes (``values=None``: raw),
        decayed error feedback beta = 0.95, contributor-mean aggregation,
        and no outer momentum: x_global -= agg (outer lr 1).  Paper setup:
        H = 15, inner AdamW lr 1e-3, wd 0.1, gradient clipping 1.0.
        ``tensors`` (the shapes packed into params): each tensor tiled on
        its own (64 x 64 tiles of 2-D tensors for chunk 4096) with its own
        2-bit statistics, as the authors' code does; without it, chunks of
        the flat vector and one set of statistics."""
        sparsifier = ChunkedTopK(chunk, k)
        compressor = sparsifier if values is None else Chain(sparsifier, values)
        return cls(params, comm, inner, H, outer_lr=1.0, outer_momentum=0.0, nesterov=False,
                   compressor=compressor, feedback=beta, aggregate="contributor_mean", tensors=tensors)

    @classmethod
    def streaming(cls, params, comm, inner, H, fragments, *, layers=None, overlap=1, alpha=0.5,
                  compressor="minifloat:e3m0", outer_lr=0.7, outer_momentum=0.9, nesterov=True):
        """Streaming DiLoCo (Douillard et al. 2025): ``fragments`` P in the
        strided pattern over ``layers`` (the paper: 3 layers per fragment),
        staggered syncs, overlap tau = 1 with mixing alpha = 0.5, outer
        gradients as E3M0 minifloats, outer Nesterov SGD (0.7, 0.9)."""
        return cls(params, comm, inner, H, outer_lr=outer_lr, outer_momentum=outer_momentum,
                   nesterov=nesterov, compressor=compressor, aggregate="mean", fragments=fragments,
                   layers=layers, overlap=overlap, alpha=alpha)

    # -- state ---------------------------------------------------------------
    def _hyper(self):
        hyper = {"H": self.H, "outer_lr": self.outer_lr, "outer_momentum": self.outer_momentum,
                "nesterov": self.nesterov, "compressor": self.compressor.spec if self.compressor else None,
                "feedback": self.beta, "aggregate": self.aggregate, "fragments": len(self.fragments),
                "layers": self.layers, "overlap": self.overlap, "alpha": self.alpha}
        if self.tensors is not None:
            hyper["tensors"] = [list(t) for t in self.tensors]
        return hyper

    def _children(self):
        kids = {"inner": self.inner}
        kids.update({f"feedback.{p}": fb for p, fb in enumerate(self.feedbacks)})
        return kids

    def _extra_state(self):
        return {"pending": [list(item) for item in self.pending]}

    def _load_extra_state(self, extra):
        self.pending = [(int(t), int(p)) for t, p in extra.get("pending", [])]

    # -- the algorithm -------------------------------------------------------
    def syncs_at(self, t):
        """The fragments whose outer step happens after inner step t."""
        return [p for p, off in enumerate(self.offsets) if t - off >= self.H and (t - off) % self.H == 0]

    def step(self, grad):
        """One inner step; outer steps and mixes that fall on it.  Returns
        the fragments that synced."""
        self.inner.step(grad)
        self.t += 1
        due = [p for t, p in self.pending if t == self.t]
        self.pending = [(t, p) for t, p in self.pending if t != self.t]
        for p in due:
            self._mix(p)
        synced = self.syncs_at(self.t)
        for p in synced:
            self._outer_step(p)
            if self.overlap:
                self.pending.append((self.t + self.overlap, p))
            else:
                self._mix(p)
        return synced

    def _outer_step(self, p):
        frag = self.fragments[p]
        delta = self.x_global[frag] - self.flat[frag]
        if self.compressor is None:
            agg = self.comm.allreduce(delta, "mean")
        else:
            agg = np.empty_like(delta)
            first = sum(len(pieces) for pieces in self.parts[:p])
            for j, (off, size, shape, comp) in enumerate(self.parts[p]):
                piece = delta[off:off + size].reshape(_piece_shape(shape, size))
                payload = self.feedbacks[first + j].step(piece) if self.feedbacks else comp.compress(piece)
                agg[off:off + size] = reduce_payloads(self.comm.allgather(payload), self.aggregate)
        f = self.flat.dtype.type
        if self.outer_buf is not None:
            mu = f(self.outer_momentum)
            buf = mu * self.outer_buf[frag] + agg
            self.outer_buf[frag] = buf
            agg = agg + mu * buf if self.nesterov else buf
        self.x_global[frag] -= f(self.outer_lr) * agg

    def _mix(self, p):
        frag = self.fragments[p]
        if self.alpha == 0:
            self.flat[frag] = self.x_global[frag]
        else:
            f = self.flat.dtype.type
            self.flat[frag] = f(self.alpha) * self.flat[frag] + f(1 - self.alpha) * self.x_global[frag]


# --------------------------------------------------------------------------
# Just One Byte: seed-replay zeroth-order steps
# --------------------------------------------------------------------------

ZO_DOMAIN = 200          # Philox domain of the perturbations (200..255 are for callers)
_MAX_MACHINES = 1 << 16
_MAX_SAMPLES = 1 << 16


def perturbation(seed, step, machine, sample, n):
    """The float64 perturbation z ~ N(0, I_n) of (round ``step``, machine,
    sample), regenerated bit for bit by every rank.

    Philox4x32-10 keyed by ``seed``, stream (domain 200, step), counter
    block ``machine << 48 | sample << 32 | i`` for i < ceil(n/2).  Block i
    gives two 53-bit uniforms u1 = (a + 1) * 2^-53 in (0, 1] and
    u2 = b * 2^-53 in [0, 1) (a, b: the top 53 bits of lanes 1:0 and 3:2),
    and Box-Muller gives z[2i] = r*cos(2*pi*u2), z[2i+1] = r*sin(2*pi*u2),
    r = sqrt(-2*ln u1).  (NumPy's log/cos/sin: machines replaying each
    other's seeds must share the NumPy build and CPU path to agree in the
    last bit.)
    """
    seed = check_seed(seed)
    machine = check_int(machine, "machine", 0, _MAX_MACHINES - 1)
    sample = check_int(sample, "sample", 0, _MAX_SAMPLES - 1)
    n = check_int(n, "n", 0, 1 << 33)
    blocks = -(-n // 2)
    first = (machine << 48) | (sample << 32)
    w = _core.philox(seed, step, ZO_DOMAIN, first, 4 * blocks).reshape(-1, 4).astype(np.uint64)
    a = ((w[:, 1] << np.uint64(32)) | w[:, 0]) >> np.uint64(11)
    b = ((w[:, 3] << np.uint64(32)) | w[:, 2]) >> np.uint64(11)
    u1 = (a.astype(np.float64) + 1.0) * 2.0 ** -53
    theta = (2.0 * np.pi) * (b.astype(np.float64) * 2.0 ** -53)
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.empty(2 * blocks)
    z[0::2] = r * np.cos(theta)
    z[1::2] = r * np.sin(theta)
    return z[:n]


class SeedReplayZO(Optimizer):
    """Just One Byte (Zelikman et al. 2023): distributed MeZO/SPSA where
    only scalars travel.

    Round t, rank m, sample s: z = ``perturbation(seed, t, m, s, n)``;
    p = (L(x + eps*z) - L(x - eps*z)) / (2*eps), evaluated on a scratch copy
    (x itself is never perturbed, so it stays bit-identical on all ranks).
    The ``samples`` scalars of every rank are allgathered (as
    ``scalar_dtype``: float64 by default; the paper's code sends fp16, the
    paper 8 bits) and every rank replays all N = W*samples of them in
    (rank, sample) order: x -= c*z with c = (lr/N)*p*eps (the authors'
    code keeps that eps, so the effective step on the estimate is lr*eps).
    ``mode="full"``: each rank sends its c*z vectors instead (the
    full-vector reference, same result bit for bit, d times the bytes).

    ``step(loss_fn, participate=True)``: ``loss_fn(x) -> float`` is this
    rank's loss at the parameter vector x (an array shaped like params);
    returns the mean of this rank's 2*samples loss evaluations (nan when it
    does not participate).  ``scalar_dtype="int8"``: the paper's one byte
    per scalar: each machine's scalars travel as 8-bit codes with one
    float32 scale (``lowband.quantize(p, 8, block=None)``: step d = max|p|
    / 127 rounded up, code round(p / d)), and every rank, the sender
    included, replays the decoded values, so replicas stay identical.
    Joining and leaving (replay mode): a rank that calls ``step(...,
    participate=False)`` sends no scalars this round but replays the
    others'; N is the number of scalars actually sent; ``join(root)``
    copies the parameters and the round counter from ``root`` (a new or
    returning machine); ``digest()`` / ``replicas_agree()`` check that
    the replicas hold the same weights (SHA-256 of the raw bytes, or of
    the weights rounded to ``decimals`` as the authors' MD5 check does).  Defaults are the code's:
    eps 1e-3, lr 0.1, 30 samples per machine per round.
    """

    def __init__(self, params, comm, lr=0.1, eps=1e-3, samples=30, seed=0, *, mode="replay",
                 scalar_dtype="float64"):
        super().__init__(params, comm)
        self.lr = _check_lr(lr)
        self.eps = check_finite_number(eps, "eps", 0.0, lo_open=True)
        self.samples = check_int(samples, "samples", 1, _MAX_SAMPLES)
        self.seed = check_seed(seed)
        self.mode = check_choice(mode, "mode", ("replay", "full"))
        self.scalar_dtype = np.dtype(check_choice(str(scalar_dtype), "scalar_dtype",
                                                  ("float64", "float32", "float16", "int8")))
        if self.comm.world_size > _MAX_MACHINES:
            raise ValueError(f"comm: at most {_MAX_MACHINES} ranks, got {self.comm.world_size}")
        self._scratch = np.empty_like(self.params)

    def _hyper(self):
        return {"lr": self.lr, "eps": self.eps, "samples": self.samples, "seed": self.seed,
                "mode": self.mode, "scalar_dtype": str(self.scalar_dtype)}

    def _z(self, machine, sample):
        z = perturbation(self.seed, self.t, machine, sample, self.flat.size)
        return z.astype(self.flat.dtype, copy=False)

    def _coefficient(self, p, total):
        return self.flat.dtype.type((self.lr / total) * float(p) * self.eps)

    def _probe(self, loss_fn, s, losses):
        """This rank's projected gradient for sample `s`: the central
        difference of loss_fn at x +- eps z (both losses appended to
        `losses`); a non-finite loss raises before anything changed."""
        x, eps = self.flat, self.flat.dtype.type(self.eps)
        scratch = self._scratch.reshape(-1)
        z = self._z(self.comm.rank, s)
        np.add(x, eps * z, out=scratch)
        plus = float(loss_fn(self._scratch))
        np.subtract(x, eps * z, out=scratch)
        minus = float(loss_fn(self._scratch))
        if not (math.isfinite(plus) and math.isfinite(minus)):
            raise ValueError(f"loss_fn: returned a non-finite loss ({plus!r}, {minus!r}) "
                             f"for sample {s}; the step was not taken")
        losses += [plus, minus]
        return (plus - minus) / (2.0 * self.eps)

    def step(self, loss_fn, *, participate=True):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        x = self.flat
        W, rank = self.comm.world_size, self.comm.rank
        total = W * self.samples
        if self.mode == "replay":
            return self._replay_round(loss_fn, self.samples if participate else 0)
        if not participate or self.scalar_dtype.kind == "i":
            raise ValueError("participate=False and scalar_dtype='int8' need mode='replay'")
        scalars, losses = np.empty(self.samples, self.scalar_dtype), []
        for s in range(self.samples):
            scalars[s] = self._probe(loss_fn, s, losses)
        mine = np.stack([self._coefficient(scalars[s], total) * self._z(rank, s)
                         for s in range(self.samples)])
        for vectors in self.comm.allgather(Dense(mine)):
            for v in vectors.array:
                x -= v
        self.t += 1
        return float(np.mean(losses))

    def _replay_round(self, loss_fn, count):
        """One replay-mode round: this rank's ``count`` scalars (0: it sits
        out) are allgathered and every rank replays all the decoded
        scalars in (rank, sample) order, N being how many were sent."""
        from .quantize import quantize
        scalars = np.empty(count, np.float64 if self.scalar_dtype.kind == "i" else self.scalar_dtype)
        losses = []
        for s in range(scalars.size):
            scalars[s] = self._probe(loss_fn, s, losses)
        if self.scalar_dtype.kind == "i":
            payload = quantize(scalars, 8, block=None)
        else:
            payload = Dense(scalars.astype(self.scalar_dtype))
        gathered = []
        for p in self.comm.allgather(payload):
            gathered.append(p.array if isinstance(p, Dense) else p.dequantize())
        total, x = sum(g.size for g in gathered), self.flat
        for m, values in enumerate(gathered):
            for s in range(values.size):
                x -= self._coefficient(values[s], total) * self._z(m, s)
        self.t += 1
        return float(np.mean(losses)) if losses else float("nan")

    def join(self, root=0):
        """Copy the parameters and the round counter from rank ``root`` (a
        collective: every rank calls it; a machine that joins or returns
        starts from the root's replica)."""
        state = self.comm.broadcast(Dense(np.concatenate([[float(self.t)], self.flat.astype(np.float64)])),
                                    root)
        arr = state.array
        self.t = int(arr[0])
        self.flat[:] = arr[1:].astype(self.flat.dtype)

    def digest(self, decimals=None):
        """``weights_digest`` of this replica's parameters."""
        return weights_digest(self.flat, decimals)

    def replicas_agree(self, decimals=None):
        """Whether every rank's digest equals this rank's (a collective)."""
        mine = np.frombuffer(bytes.fromhex(self.digest(decimals)), np.uint8).astype(np.float64)
        digests = [d.array for d in self.comm.allgather(Dense(mine))]
        return all(np.array_equal(d, digests[0]) for d in digests)


# --------------------------------------------------------------------------
# signSGD / Signum with majority vote
# --------------------------------------------------------------------------

class Signum(Optimizer):
    """signSGD and Signum with majority vote (Bernstein et al., "signSGD:
    Compressed Optimisation for Non-Convex Problems", ICML 2018; "signSGD
    with Majority Vote is Communication Efficient and Fault Tolerant", ICLR
    2019).

    Each rank keeps its own momentum m = beta * m + (1 - beta) * grad
    (beta = 0: signSGD, m = grad) and sends sign(m), 1 bit per element,
    through an allgather; every rank takes the elementwise majority
    s = sign(sum of the signs) in C on the packed bits (a tie, possible
    with an even world size, gives +1) and steps x -= lr * (s + wd * x).
    Without ``comm`` (or with one rank) it is single-worker Signum.
    Wire: d/8 bytes (plus a small header) sent to each other rank per step.
    """

    def __init__(self, params, comm=None, lr=1e-4, beta=0.9, weight_decay=0.0):
        super().__init__(params, comm, comm_required=False)
        self.lr = _check_lr(lr)
        self.beta = check_finite_number(beta, "beta", 0.0, 1.0, hi_open=True)
        self.weight_decay = check_finite_number(weight_decay, "weight_decay", 0.0)
        self.momentum = self._new_state("momentum")

    def _hyper(self):
        return {"lr": self.lr, "beta": self.beta, "weight_decay": self.weight_decay}

    def step(self, grad):
        from .quantize import sign
        from .vote import majority_vote
        g = self._grad(grad)
        x, f, m = self.flat, self.flat.dtype.type, self.momentum
        m *= f(self.beta)
        m += f(1 - self.beta) * g
        mine = sign(m, scale="none")
        if self.comm is not None and self.comm.world_size > 1:
            vote = majority_vote(self.comm.allgather(mine))
        else:
            vote = mine
        d = vote.dequantize().reshape(-1)
        if self.weight_decay:
            d = d + f(self.weight_decay) * x
        x -= f(self.lr) * d
        self.t += 1


# --------------------------------------------------------------------------
# 0/1 Adam and 1-bit LAMB (DeepSpeed's other compressed optimizers)
# --------------------------------------------------------------------------

def _momentum_mask(opt, mask):
    if mask is None:
        return None
    if isinstance(mask, str):
        check_choice(mask, "momentum_mask", ("auto",))
        out = opt._new_state("momentum_mask")
        out[:] = 1
        return out
    arr = np.asarray(from_torch(mask, "momentum_mask"))
    if arr.size != opt.flat.size:
        raise ValueError(f"momentum_mask: expected {opt.flat.size} elements, got {arr.size}")
    out = opt._new_state("momentum_mask")
    out[:] = arr.reshape(-1)
    return out


def _exchange(opt, exchange, compressor):
    """Checks ``exchange`` and makes the error buffers it needs."""
    opt.exchange = check_choice(exchange, "exchange", ("chunked", "deepspeed"))
    opt.compressor = from_spec(compressor)
    if opt.exchange == "deepspeed" and opt.compressor.spec != "sign:rms":
        raise ValueError(f"compressor: exchange='deepspeed' sends RMS-scaled signs ('sign:rms'), "
                         f"got {opt.compressor.spec!r}")
    W = opt.comm.world_size
    if opt.exchange == "deepspeed":
        padded = deepspeed_padded_size(opt.flat.size, W)
        return opt._new_state("worker_error", padded), opt._new_state("server_error", padded // W)
    bounds = chunk_bounds(opt.flat.size, W)
    return (opt._new_state("worker_error"),
            opt._new_state("server_error", bounds[opt.comm.rank + 1] - bounds[opt.comm.rank]))


def _compressed_average(opt, a):
    """The 1-bit compressed average of every rank's ``a`` (opt.exchange)."""
    if opt.exchange == "chunked":
        return opt.comm.compressed_allreduce(a, opt.compressor, opt.worker_error, opt.server_error)
    return deepspeed_compressed_allreduce(opt.comm, a, opt.worker_error, opt.server_error)


class ZeroOneAdam(Optimizer):
    """0/1 Adam (Lu et al. 2022, "Maximizing Communication Efficiency for
    Large-scale Training via 0/1 Adam"), DeepSpeed's update rule.

    Steps are counted as DeepSpeed counts them (its first call only
    allocates): step k of this object is DeepSpeed's step s = k + 1.

    Phase A, the first ``var_freeze_step`` steps.  On variance steps
    (s % var_interval == 0) the gradient is averaged by a dense allreduce
    and v = b2 v + (1-b2) g^2, m = b1 m + (1-b1) g; on the other steps only
    m moves, with the gradient averaged by the 1-bit compressed allreduce
    (``comm.compressed_allreduce``, worker and server error feedback).
    Every step x -= lr (m / (sqrt(v) + eps) + wd x), without bias
    correction.  After every ``var_update_scaler`` variance steps the
    interval doubles, so full-precision rounds thin out exponentially.
    Phase B (v frozen; both error buffers are zeroed once when it starts):
    local steps m = b1 m + (1-b1) g_local, x -= lr d, u -= lr d (d the
    update above), lrs += lr; every ``local_step_interval`` steps the ranks
    synchronise: x -= u; u *= sqrt(v) + eps; u = compressed_allreduce(u);
    m = -u / lrs; x += u / (sqrt(v) + eps); u = 0, lrs = 0.  The interval
    doubles every ``local_step_scaler`` steps up to ``local_step_clipper``.

    As in DeepSpeed, with one rank nothing is compressed: phase A moves m
    only on variance steps and the phase-B synchronisation leaves u as it
    is.  ``momentum_mask`` (0/1 per element, DeepSpeed's exp_avg_mask)
    multiplies every compressed average; "auto" (a lowband addition) masks
    the entries whose variance is still exactly 0 after each variance step
    (gradients that are always zero: signs cannot encode 0, so their
    momentum would become +-scale and their update scale / eps).
    ``exchange``: "chunked" (``comm.compressed_allreduce``) or "deepspeed"
    (``lowband.sim.deepspeed_compressed_allreduce``: DeepSpeed's padded
    exchange with one worker scale), as for ``OneBitAdam``.
    """

    def __init__(self, params, comm, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 var_freeze_step, var_update_scaler=16, local_step_scaler=32678,
                 local_step_clipper=16, compressor="sign:rms", momentum_mask=None,
                 exchange="chunked"):
        super().__init__(params, comm)
        self.lr = _check_lr(lr)
        self.betas = _check_betas(betas)
        self.eps = check_finite_number(eps, "eps", 0.0)
        self.weight_decay = check_finite_number(weight_decay, "weight_decay", 0.0)
        self.var_freeze_step = check_int(var_freeze_step, "var_freeze_step", 0)
        self.var_update_scaler = check_int(var_update_scaler, "var_update_scaler", 1)
        self.local_step_scaler = check_int(local_step_scaler, "local_step_scaler", 1)
        self.local_step_clipper = check_int(local_step_clipper, "local_step_clipper", 1)
        self.worker_error, self.server_error = _exchange(self, exchange, compressor)
        self.momentum_mask = _momentum_mask(self, momentum_mask)
        self._auto_mask = isinstance(momentum_mask, str)
        self.exp_avg = self._new_state("exp_avg")
        self.exp_avg_sq = self._new_state("exp_avg_sq")
        self.accumulator = self._new_state("momentum_accumulator")
        self._counters = {"var_interval": 1, "var_counter": 0, "local_step_interval": 1,
                          "local_step_counter": 0, "frozen": False}
        self.lrs = 0.0

    def _hyper(self):
        return {"betas": self.betas, "eps": self.eps,
                "weight_decay": self.weight_decay, "var_freeze_step": self.var_freeze_step,
                "var_update_scaler": self.var_update_scaler,
                "local_step_scaler": self.local_step_scaler,
                "local_step_clipper": self.local_step_clipper, "compressor": self.compressor.spec,
                "momentum_mask": "auto" if self._auto_mask else self.momentum_mask is not None,
                "exchange": self.exchange}

    def _extra_state(self):
        return dict(self._counters, lrs=self.lrs)

    def _load_extra_state(self, extra):
        for k in self._counters:
            self._counters[k] = type(self._counters[k])(extra[k])
        self.lrs = float(extra["lrs"])

    @property
    def frozen(self):
        """Whether the next step is in phase B (variance frozen, local steps)."""
        return self._counters["frozen"]

    @property
    def var_interval(self):
        return self._counters["var_interval"]

    @property
    def local_step_interval(self):
        return self._counters["local_step_interval"]

    def _compressed_mean(self, a):
        out = _compressed_average(self, a)
        if self.momentum_mask is not None:
            out *= self.momentum_mask
        return out

    def _denom(self):
        return np.sqrt(self.exp_avg_sq) + self.flat.dtype.type(self.eps)

    def step(self, grad):
        g = self._grad(grad)
        x, f, c = self.flat, self.flat.dtype.type, self._counters
        b1, b2 = self.betas
        m, v, u = self.exp_avg, self.exp_avg_sq, self.accumulator
        s = self.t + 2
        multi = self.comm.world_size > 1
        if not c["frozen"]:
            var_step = s % c["var_interval"] == 0
            if var_step:
                _adam_moments(m, v, self.comm.allreduce(g, "mean"), b1, b2)
                if self._auto_mask:
                    self.momentum_mask[:] = v != 0
            elif multi:
                m *= f(b1)
                m += f(1 - b1) * self._compressed_mean(g)
            update = m / self._denom()
            if self.weight_decay:
                update += f(self.weight_decay) * x
            x -= f(self.lr) * update
            if var_step:
                c["var_counter"] += 1
                if c["var_counter"] == self.var_update_scaler:
                    c["var_counter"] = 0
                    c["var_interval"] *= 2
            if s > self.var_freeze_step:
                c["frozen"] = True
                self.worker_error[:] = 0
                self.server_error[:] = 0
        else:
            m *= f(b1)
            m += f(1 - b1) * g
            self.lrs += self.lr
            update = m / self._denom()
            if self.weight_decay:
                update += f(self.weight_decay) * x
            x -= f(self.lr) * update
            u -= f(self.lr) * update
            if s % c["local_step_interval"] == 0:
                denom = self._denom()
                x -= u
                u *= denom
                if multi:
                    u[:] = self._compressed_mean(u)
                m[:] = -(u / f(self.lrs))
                x += u / denom
                u[:] = 0
                self.lrs = 0.0
            c["local_step_counter"] += 1
            if c["local_step_counter"] == self.local_step_scaler:
                c["local_step_counter"] = 0
                c["local_step_interval"] = min(self.local_step_clipper, c["local_step_interval"] * 2)
        self.t += 1


def _layer_bounds(n, layers):
    if layers is None:
        return [0, n]
    sizes = [check_int(s, f"layers[{i}]", 1) for i, s in enumerate(layers)]
    if sum(sizes) != n:
        raise ValueError(f"layers: the sizes add up to {sum(sizes)}, params has {n}")
    return [0, *np.cumsum(sizes).tolist()]


def _norm(a):
    return math.sqrt(float(np.dot(a, a)))


class OneBitLamb(Optimizer):
    """1-bit LAMB (Li et al. 2021, "1-bit LAMB: Communication Efficient
    Large-Scale Large-Batch Training with LAMB's Convergence Speed"),
    DeepSpeed's update rule on a flat vector cut into ``layers`` (sizes;
    default one layer).

    Warm-up, the first ``freeze_step`` steps: LAMB on the dense-averaged
    gradient without bias correction, per layer: m, v as Adam; d = m /
    (sqrt(v) + eps) + wd x; trust ratio c = clamp(||x|| / ||d||, min_coeff,
    max_coeff) (1 when either norm is 0); x -= lr c d; the frozen ratio
    follows r = coeff_beta r + (1 - coeff_beta) c (when c != 1).  The last
    warm-up step copies v into v_fresh.

    Compression stage (v frozen): once, each layer's momentum scale
    s_j = ||m_j|| / sqrt(n_j) gives scaling_coeff_j = mean(s) / s_j (1 for
    a zero momentum), so one 1-bit scale suits every layer.  Each step m_j =
    (b1 m_j + (1-b1) g_j) * scaling_coeff_j with the local gradient; the
    whole m goes through one compressed allreduce (``comm.compressed_
    allreduce``, worker and server error feedback), is divided back and
    masked; g~ = (m - b1 m_prev) / (1-b1) refreshes v_fresh = b2 v_fresh +
    (1-b2) g~^2; per layer d = m / (sqrt(v) + eps) (+ wd x) and factor =
    max((sqrt(v) + eps) / (sqrt(v_fresh) + eps)), blended towards 1 by
    min(1, ||m/(sqrt v + eps)|| / ||d||) with weight decay, clamped to
    [factor_min, factor_max] and to +-factor_threshold of the last factor;
    x -= lr r factor d.  With one rank nothing is compressed (as DeepSpeed).
    ``momentum_mask``: 0/1 per element (DeepSpeed's exp_avg_mask), or
    "auto" (a lowband addition) for the entries whose variance is exactly 0
    when the compression stage starts.  ``exchange``: "chunked" or
    "deepspeed", as for ``ZeroOneAdam``.
    """

    def __init__(self, params, comm, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 freeze_step, layers=None, max_coeff=10.0, min_coeff=0.01, coeff_beta=0.9,
                 factor_max=4.0, factor_min=0.5, factor_threshold=0.1, compressor="sign:rms",
                 momentum_mask=None, exchange="chunked"):
        super().__init__(params, comm)
        self.lr = _check_lr(lr)
        self.betas = _check_betas(betas)
        self.eps = check_finite_number(eps, "eps", 0.0)
        self.weight_decay = check_finite_number(weight_decay, "weight_decay", 0.0)
        self.freeze_step = check_int(freeze_step, "freeze_step", 0)
        self.bounds = _layer_bounds(self.flat.size, layers)
        self.max_coeff = check_finite_number(max_coeff, "max_coeff", 0.0, lo_open=True)
        self.min_coeff = check_finite_number(min_coeff, "min_coeff", 0.0, self.max_coeff)
        self.coeff_beta = check_finite_number(coeff_beta, "coeff_beta", 0.0, 1.0)
        self.factor_max = check_finite_number(factor_max, "factor_max", 0.0, lo_open=True)
        self.factor_min = check_finite_number(factor_min, "factor_min", 0.0, self.factor_max)
        self.factor_threshold = check_finite_number(factor_threshold, "factor_threshold", 0.0)
        self.worker_error, self.server_error = _exchange(self, exchange, compressor)
        self.momentum_mask = _momentum_mask(self, momentum_mask)
        self._auto_mask = isinstance(momentum_mask, str)
        self.exp_avg = self._new_state("exp_avg")
        self.exp_avg_sq = self._new_state("exp_avg_sq")
        self.exp_avg_sq_fresh = self._new_state("exp_avg_sq_fresh")
        L = len(self.bounds) - 1
        self.coeff_freeze = [0.0] * L
        self.last_factor = [1.0] * L
        self.scaling_coeff = None
        self.lamb_coeffs = []

    def _hyper(self):
        return {"betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay,
                "freeze_step": self.freeze_step, "layers": list(np.diff(self.bounds).tolist()),
                "max_coeff": self.max_coeff, "min_coeff": self.min_coeff,
                "coeff_beta": self.coeff_beta, "factor_max": self.factor_max,
                "factor_min": self.factor_min, "factor_threshold": self.factor_threshold,
                "compressor": self.compressor.spec,
                "momentum_mask": "auto" if self._auto_mask else self.momentum_mask is not None,
                "exchange": self.exchange}

    def _extra_state(self):
        return {"coeff_freeze": list(self.coeff_freeze), "last_factor": list(self.last_factor),
                "scaling_coeff": None if self.scaling_coeff is None else list(self.scaling_coeff)}

    def _load_extra_state(self, extra):
        self.coeff_freeze = [float(c) for c in extra["coeff_freeze"]]
        self.last_factor = [float(c) for c in extra["last_factor"]]
        sc = extra["scaling_coeff"]
        self.scaling_coeff = None if sc is None else [float(c) for c in sc]

    @property
    def compressing(self):
        """Whether the next step is in the compression stage."""
        return self.t >= self.freeze_step

    def _layers(self):
        return [slice(a, b) for a, b in zip(self.bounds[:-1], self.bounds[1:])]

    def step(self, grad):
        g = self._grad(grad)
        x, f = self.flat, self.flat.dtype.type
        b1, b2 = self.betas
        m, v, vf = self.exp_avg, self.exp_avg_sq, self.exp_avg_sq_fresh
        self.lamb_coeffs = []
        if not self.compressing:
            _adam_moments(m, v, self.comm.allreduce(g, "mean"), b1, b2)
            if self.t + 1 == self.freeze_step:
                vf[:] = v
            for j, sl in enumerate(self._layers()):
                w_norm = _norm(x[sl])
                update = m[sl] / (np.sqrt(v[sl]) + f(self.eps))
                if self.weight_decay:
                    update += f(self.weight_decay) * x[sl]
                u_norm = _norm(update)
                coeff = 1.0
                if w_norm != 0 and u_norm != 0:
                    coeff = min(max(w_norm / u_norm, self.min_coeff), self.max_coeff)
                if coeff != 1.0:
                    self.coeff_freeze[j] = (self.coeff_beta * self.coeff_freeze[j]
                                            + (1 - self.coeff_beta) * coeff)
                self.lamb_coeffs.append(coeff)
                x[sl] -= f(self.lr * coeff) * update
            self.t += 1
            return
        layers = self._layers()
        if self.scaling_coeff is None:
            if self._auto_mask:
                self.momentum_mask[:] = v != 0
            scales = [_norm(m[sl]) / math.sqrt(sl.stop - sl.start) for sl in layers]
            united = sum(scales) / len(scales)
            self.scaling_coeff = [united / s if s else 1.0 for s in scales]
        m_prev = m.copy()
        m *= f(b1)
        m += f(1 - b1) * g
        for sl, sc in zip(layers, self.scaling_coeff):
            m[sl] *= f(sc)
        if self.comm.world_size > 1:
            m[:] = _compressed_average(self, m)
        for sl, sc in zip(layers, self.scaling_coeff):
            m[sl] /= f(sc)
        if self.momentum_mask is not None:
            m *= self.momentum_mask
        g_rec = (m - m_prev * f(b1)) / f(1 - b1)
        vf *= f(b2)
        vf += f(1 - b2) * (g_rec * g_rec)
        for j, sl in enumerate(layers):
            denom = np.sqrt(v[sl]) + f(self.eps)
            prelim = m[sl] / denom
            update = prelim + f(self.weight_decay) * x[sl] if self.weight_decay else prelim
            u_norm = _norm(update)
            factor = float(np.max(denom / (np.sqrt(vf[sl]) + f(self.eps))))
            if self.weight_decay:
                ratio = min(1.0, _norm(prelim) / u_norm)
                factor = factor * ratio + (1.0 - ratio)
            factor = min(max(factor, self.factor_min), self.factor_max)
            last = self.last_factor[j]
            factor = min(max(factor, last * (1.0 - self.factor_threshold)),
                         last * (1.0 + self.factor_threshold))
            self.last_factor[j] = factor
            coeff = self.coeff_freeze[j] * factor
            self.lamb_coeffs.append(coeff)
            x[sl] -= f(self.lr * coeff) * update
        self.t += 1


def weights_digest(x, decimals=None):
    """SHA-256 hex digest of an array's float64 values (C order), rounded
    to ``decimals`` first when given (Just One Byte's replica check hashes
    the weights rounded to 3 decimals; None hashes the exact bits)."""
    import hashlib
    a = np.ascontiguousarray(np.asarray(x, dtype=np.float64)).reshape(-1)
    if decimals is not None:
        a = np.round(a, check_int(decimals, "decimals", 0, 17)) + 0.0   # + 0.0: -0 -> +0
    return hashlib.sha256(a.tobytes()).hexdigest()

# --------------------------------------------------------------------------
# CO2: local SGD with asynchronous, one-round-stale outer momentum
# --------------------------------------------------------------------------

class CO2(Optimizer):
    """CO2 (Sun et al., ICLR 2024): local-updating with the parameter
    average overlapped with the next round of local steps.

    Every ``step(grad)`` is one inner step (``inner``: an optimizer over the
    same params, or a factory ``inner(params)``).  After every ``H`` inner
    steps (a round boundary):

    - the average of the local models, x_bar = allreduce mean of params
      (dense), is started; with ``staleness=1`` it is used only at the next
      boundary, as an asynchronous all-reduce overlapping the next round
      would be (the simulator computes it at once and holds it back);
      ``staleness=0`` uses it at once (synchronous local SGD with outer
      momentum);
    - the outer step uses the stale average of the round that just arrived:
      d = (theta - x_bar_stale) / lambda; m = mu m + d; ``clip`` c given:
      m clamped to [-c, c] element-wise, in place (the released code's clamp
      is not in place, a no-op); theta -= outer_lr m; params <- theta.
      The first boundary with ``staleness=1`` has nothing to apply yet:
      params <- theta.
    - lambda, the staleness gap penalty (per layer of ``layers``, a list of
      sizes; None: one layer): ``gap_penalty=None`` 1; a number: that
      constant divisor (the released code's ``co2_gap_penalty``, default
      1.0); "adaptive": lambda = 1 + ||theta - theta_then|| / ||theta -
      x_bar_stale||, theta_then the anchor that stale round started from,
      i.e. the outer step is shrunk by how far the anchor moved while the
      average was in flight (a gap-aware reading after Barkai et al. 2019;
      the paper's exact per-layer form is not reproduced here).  With
      staleness 0 the gap is 0 and lambda = 1.

    The outer state (theta, m) is replicated on every rank (CO2 shards it;
    the result is the same).  Defaults: the released code's (mu 0.5,
    outer_lr 1.0).
    """

    def __init__(self, params, comm, inner, H, *, outer_lr=1.0, outer_momentum=0.5, staleness=1,
                 gap_penalty=None, clip=None, layers=None):
        super().__init__(params, comm)
        if isinstance(inner, type) or (callable(inner) and not hasattr(inner, "step")):
            inner = inner(self.params)
        self.inner = inner
        inner_params = getattr(inner, "params", None)
        if not hasattr(inner, "step") or not hasattr(inner, "state_dict"):
            raise TypeError(f"inner: expected an optimizer (with step and state_dict) or a factory, "
                            f"got {type(inner).__name__}")
        if not (isinstance(inner_params, np.ndarray) and np.shares_memory(inner_params, self.params)):
            raise ValueError("inner: the inner optimizer must update the same params array")
        self.H = check_int(H, "H", 1)
        self.outer_lr = _check_lr(outer_lr, "outer_lr")
        self.outer_momentum = check_finite_number(outer_momentum, "outer_momentum", 0.0, 1.0)
        self.staleness = check_int(staleness, "staleness", 0, 1)
        if gap_penalty is None or gap_penalty == "adaptive":
            self.gap_penalty = gap_penalty
        elif isinstance(gap_penalty, str):
            raise ValueError(f"gap_penalty: expected None, a number > 0 or 'adaptive', got {gap_penalty!r}")
        else:
            self.gap_penalty = check_finite_number(gap_penalty, "gap_penalty", 0.0, lo_open=True)
        self.clip = None if clip is None else check_finite_number(clip, "clip", 0.0, lo_open=True)
        self.layers = None if layers is None else [check_int(s, "layers[i]", 1) for s in layers]
        if self.layers is not None and sum(self.layers) != self.flat.size:
            raise ValueError(f"layers: the sizes add up to {sum(self.layers)}, params has {self.flat.size}")
        bounds = np.cumsum([0] + (self.layers or [self.flat.size]))
        self._slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        self.theta = self._new_state("theta")
        self.theta[:] = self.flat
        self.momentum = self._new_state("momentum")
        self.start = self._new_state("start")              # anchor the current round started from
        self.start[:] = self.flat
        self.in_flight = self._new_state("in_flight")      # the average held back one round
        self.in_flight_start = self._new_state("in_flight_start")
        self.have_in_flight = False

    def _hyper(self):
        return {"H": self.H, "outer_lr": self.outer_lr, "outer_momentum": self.outer_momentum,
                "staleness": self.staleness, "gap_penalty": self.gap_penalty, "clip": self.clip,
                "layers": self.layers}

    def _children(self):
        return {"inner": self.inner}

    def _extra_state(self):
        return {"have_in_flight": self.have_in_flight}

    def _load_extra_state(self, extra):
        self.have_in_flight = bool(extra.get("have_in_flight", False))

    def step(self, grad):
        """One inner step; at a round boundary the outer step.  Returns True
        when an outer step was applied."""
        self.inner.step(grad)
        self.t += 1
        if self.t % self.H:
            return False
        avg = self.comm.allreduce(self.flat.copy(), "mean")
        if self.staleness == 0:
            use, use_start = avg, self.start.copy()
        elif self.have_in_flight:
            use, use_start = self.in_flight.copy(), self.in_flight_start.copy()
        else:
            use = None
        if self.staleness:
            self.in_flight[:] = avg
            self.in_flight_start[:] = self.start
            self.have_in_flight = True
        applied = use is not None
        if applied:
            self._outer(use, use_start)
        self.flat[:] = self.theta
        self.start[:] = self.theta
        return applied

    def _outer(self, avg, then):
        f = self.flat.dtype.type
        d = self.theta - avg
        for sl in self._slices:
            lam = 1.0
            if self.gap_penalty == "adaptive":
                gap = float(np.linalg.norm((self.theta[sl] - then[sl]).astype(np.float64)))
                size = float(np.linalg.norm(d[sl].astype(np.float64)))
                lam = 1.0 + (gap / size if size > 0 else 0.0)
            elif self.gap_penalty is not None:
                lam = self.gap_penalty
            if lam != 1.0:
                d[sl] /= f(lam)
        self.momentum *= f(self.outer_momentum)
        self.momentum += d
        if self.clip is not None:
            np.clip(self.momentum, -self.clip, self.clip, out=self.momentum)
        self.theta -= f(self.outer_lr) * self.momentum
