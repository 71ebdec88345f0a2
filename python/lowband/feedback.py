"""Error feedback: the state that makes biased compressors converge.

One object per tensor (or flat buffer).  ``obj.step(grad) -> payload`` is
what a worker sends; the state arrays are plain float32/float64 attributes
you can read; ``state_dict()`` / ``load_state_dict()`` round-trip exactly
and refuse a state of the wrong kind, shape or dtype.  Update rules (Seide
et al. 2014 and Karimireddy et al. 2019 for EF14; Richtarik et al. 2021 for
EF21; Gao et al. 2024 for EControl; Lin et al. 2018 for DGC; SparseLoCo's
decayed error feedback):

``ErrorFeedback``    EF14:      p = e + g;  send C(p);  e = p - D(C(p))
``DecayedFeedback``  SparseLoCo: p = beta*e + g; send C(p); e = p - D(C(p))
``EF21``             h += D(C(g - h)); send C(g - h)   (server: g = mean h)
``EF21W``            send C(g/weight - h); h += D(.)   (server: sum w_i h_i)
``EControl``         d = C(eta*e + g - h); e += g - h - D(d); h += D(d)
``DGC``              u = mu*u + g; v += u; send top-k(v); zero v (and u) there

For the common compressors (top-k, chunked top-k, random-k, sign,
blockwise) ``ErrorFeedback`` and ``DecayedFeedback`` run compensate +
compress + residual update as one fused C pass when available; the generic
path gives identical bytes.  Each object holds a lock: ``step`` on one
object from several Python threads is serialised.
"""
from __future__ import annotations

import contextlib
import math
import threading
from types import SimpleNamespace

import numpy as np

from . import _fused
from ._payload import Dense, Quantized, Sparse
from ._validate import (FLOAT_DTYPES, as_float_array, check_choice, check_finite_array,
                        check_finite_number, check_int, check_ratio, check_seed, check_state_arrays,
                        check_state_step, check_threads, from_torch, group_arrays)
from .compressors import Compressor, SampledTopK, TopK, from_spec

__all__ = ["ErrorFeedback", "DecayedFeedback", "GroupedErrorFeedback", "EF21", "EF21W", "EF21Server",
           "EControl", "DGC", "DGC_WARMUP_DENSITIES", "ef21_step_size", "ef21w_weights"]


def _like(like, name="like"):
    """(shape, dtype) of the buffer the state mirrors: an array or (shape, dtype)."""
    if isinstance(like, tuple) and len(like) == 2 and not isinstance(like[0], (int, np.integer)):
        shape, dtype = tuple(like[0]), np.dtype(like[1])
    else:
        arr = np.asarray(from_torch(like, name))
        shape, dtype = arr.shape, arr.dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: error-feedback state is float32 or float64, got {dtype}")
    return shape, dtype


def _check_grad_finite(g, name="grad"):
    """ValueError naming the first non-finite element of g (before any state
    is touched)."""
    check_finite_array(g, name)


def _subtract_decoded(e, payload, threads):
    """e -= D(payload), in place (e is the flat state, payload of e's size)."""
    if isinstance(payload, Sparse):
        vals = payload.values_array() if isinstance(payload.values, Quantized) else payload.values
        e[payload.indices] -= vals.astype(e.dtype, copy=False)
    elif isinstance(payload, Quantized):
        e -= payload.dequantize(threads=threads).reshape(-1).astype(e.dtype, copy=False)
    elif isinstance(payload, Dense):
        e -= payload.array.reshape(-1).astype(e.dtype, copy=False)
    else:
        raise TypeError(f"compressor returned {type(payload).__name__}, expected a payload")


def _decoded(payload, n, dtype, threads):
    """D(payload) as a flat array of n elements."""
    out = np.zeros(n, dtype=dtype)
    _subtract_decoded(out, payload, threads)
    return np.negative(out, out=out)


class _Transaction:
    """The context manager of _Stateful._transaction (a class, not a
    generator: a step on a small tensor costs a few microseconds)."""

    __slots__ = ("obj", "t", "lr", "txn")

    def __init__(self, obj):
        self.obj = obj

    def __enter__(self):
        obj = self.obj
        if obj._backup is None:
            obj._backup = {n: np.empty_like(getattr(obj, n)) for n in obj._state_names}
        backup = obj._backup
        for n in obj._state_names:
            backup[n][...] = getattr(obj, n)   # same dtype and shape: np.copyto's bytes
        self.t, self.lr = obj.t, getattr(obj, "_lr", None)
        self.txn = {"finite": False}
        return self.txn

    def __exit__(self, exc_type, exc, tb):
        obj = self.obj
        try:
            if exc_type is None and not self.txn["finite"]:
                for n in obj._state_names:
                    check_finite_array(getattr(obj, n), f"{type(obj).__name__}.step: the state {n!r}",
                                       "overflowed (the step was undone)")
        except BaseException:
            self._restore()
            raise
        if exc_type is not None:
            self._restore()
        return False

    def _restore(self):
        self.obj._put_back(self.obj._backup, self.t, self.lr)


class _Stateful:
    """Shared machinery: shape/dtype, named state arrays, lock, state_dict."""

    _state_names: tuple = ()

    def __init__(self, like, threads=None):
        self.shape, self.dtype = _like(like)
        self.size = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        self.threads = check_threads(threads)
        self.t = 0
        self._lock = threading.Lock()
        for name in self._state_names:
            setattr(self, name, np.zeros(self.size, dtype=self.dtype))
        self._backup = None

    def _put_back(self, arrays, t, lr):
        """Restore the state arrays (name -> saved copy), t and the last lr."""
        for n in self._state_names:
            np.copyto(getattr(self, n), arrays[n])
        self.t = t
        if hasattr(self, "_lr"):
            self._lr = lr

    def _transaction(self):
        """Every step runs inside this (with the lock held), except one the
        sign or top-k kernels take (they check all they need before they
        write, so they cannot fail halfway: see _fused.direct_step): the state is
        copied first, and if the step raises, or leaves a non-finite value in
        the state (an overflow: finite input never becomes Inf silently),
        the copy is put back, so a failed step leaves the state byte for
        byte as it was and raises.  ``as txn``: a dict; a step that proved
        its state finite sets txn["finite"] = True (no check then)."""
        return _Transaction(self)

    def _grad(self, grad, name="grad"):
        if (type(grad) is np.ndarray and grad.dtype == self.dtype and grad.size == self.size
                and (grad.ndim == 1 or grad.shape == self.shape)):
            flags = grad.flags   # the common case: what as_float_array returns as it is
            if flags.c_contiguous and flags.aligned:
                return grad.reshape(-1)
        g = as_float_array(grad, name)
        if g.size != self.size or (g.shape != self.shape and g.ndim != 1):
            raise ValueError(f"{name}: expected shape {self.shape}, got {g.shape}")
        g = g.reshape(-1)
        if g.dtype != self.dtype:
            raise TypeError(f"{name}: expected dtype {self.dtype} (the state's), got {g.dtype}")
        return g

    def _hyper(self):
        return {}

    def state_dict(self):
        """Copies of the state arrays plus the step and hyper-parameters."""
        with self._lock:
            return {"kind": type(self).__name__, "t": self.t, "hyper": self._hyper(),
                    "arrays": {n: getattr(self, n).reshape(self.shape).copy() for n in self._state_names}}

    def load_state_dict(self, state):
        """Restore a state_dict of the same kind, shape and dtype (exactly)."""
        if not isinstance(state, dict) or state.get("kind") != type(self).__name__:
            got = state.get("kind") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state: expected a {type(self).__name__} state_dict, got {got!r}")
        arrays = state.get("arrays", {})
        check_state_arrays(arrays, {n: (self.shape, self.dtype) for n in self._state_names})
        if state.get("hyper", {}) != self._hyper():
            raise ValueError(f"state: hyper-parameters {state.get('hyper')} differ from this object's {self._hyper()}")
        t = check_state_step(state.get("t", 0))
        with self._lock:
            for name in self._state_names:
                getattr(self, name)[:] = arrays[name].reshape(-1)
            self.t = t

    def reset(self):
        with self._lock:
            for name in self._state_names:
                getattr(self, name)[:] = 0
            self.t = 0


class _Residual(_Stateful):
    """p = decay*e + scale*g; send C(p); e = p - D(C(p))."""

    _state_names: tuple = ("error",)
    error: np.ndarray

    def __init__(self, compressor, like, *, decay=1.0, threads=None):
        super().__init__(like, threads)
        self.compressor = from_spec(compressor)
        self.decay = check_finite_number(decay, "decay", 0.0, 1.0)

    def _hyper(self):
        return {"compressor": self.compressor.spec, "decay": self.decay}

    @staticmethod
    def step_group(feedbacks, grads):
        """One step of every object: ``[feedbacks[i].step(grads[i]) ...]``
        (without ``lr``), as one C call when every compressor is a TopK
        (each with its own k or ratio) and the objects share dtype and decay.
        The payloads are byte for byte those of the separate steps, on any
        thread count.  Transactional: if any step fails (a non-finite
        gradient, an overflow), every object's state is left as it was and
        the error names ``grads[i]``."""
        return _step_group(feedbacks, grads)

    def _step(self, grad, scale, lr=None):
        g = self._grad(grad)
        with self._lock:
            if lr is None or getattr(self, "_lr", None) in (None, lr):
                # sign and top-k: kernels that check everything before they
                # write (a failure raises with the state unchanged): no snapshot
                payload = _fused.direct_step(self, self.error, g, scale)
                if payload is not None:
                    if lr is not None:
                        self._lr = lr
                    self.t += 1
                    return payload
            return self._step_txn(g, scale, lr)

    def _step_txn(self, g, scale, lr):
        with self._transaction() as txn:
            rescaled = False
            if lr is not None:   # ErrorFeedback's learning-rate-aware rescaling
                if self._lr is not None and lr != self._lr:
                    self.error *= self.dtype.type(self._lr / lr)
                    rescaled = True
                self._lr = lr
            e = self.error
            payload = _fused.residual_step(self, e, g, scale)
            # the fused kernels refuse a non-finite p, and for these compressors
            # p - D(C(p)) is 0, p or at most max(|p|, |D|): the state is finite
            txn["finite"] = (payload is not None and not rescaled
                             and _fused.finite_residual(self.compressor))
            if payload is None:   # the generic path
                _check_grad_finite(g)
                if self.decay != 1.0:
                    e *= self.dtype.type(self.decay)
                if scale != 1.0:
                    e += self.dtype.type(scale) * g
                else:
                    e += g
                payload = self.compressor.compress(e.reshape(self.shape), step=self.t)
                _subtract_decoded(e, payload, self.threads)
            self.t += 1
            return payload


def _step_group(feedbacks, grads):
    """One step of every object of a group (see _Residual.step_group)."""
    if not isinstance(feedbacks, (list, tuple)):
        raise TypeError(f"feedbacks: expected a list of ErrorFeedback/DecayedFeedback objects, got "
                        f"{type(feedbacks).__name__}")
    if not isinstance(grads, (list, tuple)):
        raise TypeError(f"grads: expected a list of arrays or tensors, got {type(grads).__name__}")
    if len(grads) != len(feedbacks):
        raise ValueError(f"grads: expected {len(feedbacks)} (one per feedback object), got {len(grads)}")
    fbs = list(feedbacks)
    for i, fb in enumerate(fbs):
        if not isinstance(fb, _Residual) or isinstance(fb, GroupedErrorFeedback):
            raise TypeError(f"feedbacks[{i}]: expected an ErrorFeedback or DecayedFeedback, got "
                            f"{type(fb).__name__}")
    if len({id(fb) for fb in fbs}) != len(fbs):
        raise ValueError("feedbacks: an object appears more than once (each steps once per call)")
    gs = [fb._grad(g, f"grads[{i}]") for i, (fb, g) in enumerate(zip(fbs, grads))]
    if not fbs:
        return []
    first = fbs[0]
    fused = (all(type(fb.compressor) is TopK for fb in fbs)
             and len({(fb.dtype, fb.decay) for fb in fbs}) == 1)
    if fused:
        threads = first.threads if first.threads is not None else first.compressor.threads
        with contextlib.ExitStack() as stack:
            for fb in sorted(fbs, key=id):   # one lock order for every caller
                stack.enter_context(fb._lock)
            # all or nothing, no snapshot: a failure leaves every state as it was
            out = _fused.residual_group([fb.compressor for fb in fbs], [fb.error for fb in fbs], gs,
                                        [fb.shape for fb in fbs], first.dtype, first.decay, threads)
            for fb in fbs:
                fb.t += 1
            return out
    for i, g in enumerate(gs):   # before any state is touched
        _check_grad_finite(g, f"grads[{i}]")
    saved = [({n: getattr(fb, n).copy() for n in fb._state_names}, fb.t, getattr(fb, "_lr", None))
             for fb in fbs]
    out = []
    try:
        for fb, g in zip(fbs, gs):
            out.append(fb._step(g, 1.0))
    except BaseException:
        for fb, (arrays, t, lr) in zip(fbs[:len(out)], saved):
            with fb._lock:
                fb._put_back(arrays, t, lr)
        raise
    return out


class ErrorFeedback(_Residual):
    """EF14 (Seide et al. / Karimireddy et al.): p = e + g, send C(p),
    e = p - D(C(p)).

    ``step(grad, lr=None)``: with ``lr`` given at every step, the residual is
    rescaled by lr_prev / lr when the learning rate changes (BytePS's
    learning-rate-aware feedback), so that e keeps meaning "gradient units at
    the current rate".
    """

    def __init__(self, compressor, like, *, threads=None):
        super().__init__(compressor, like, decay=1.0, threads=threads)
        self._lr = None

    def step(self, grad, *, lr=None):
        if lr is not None:
            lr = check_finite_number(lr, "lr", 0.0, lo_open=True)
        return self._step(grad, 1.0, lr)


class GroupedErrorFeedback(ErrorFeedback):
    """EF14 over a group of tensors whose state is one flat buffer.

    ``like``: a list of arrays or tensors, or of ``(shape, dtype)`` pairs,
    all of one float dtype.  The state ``error`` is one flat array; segment
    i is ``error[offsets[i]:offsets[i+1]]`` (``errors`` lists them as
    views).  ``step(grads)`` takes a list of gradients (one per tensor, any
    shape of the right size) or one flat buffer of ``offsets[-1]``
    elements, and returns one payload per tensor (in its shape), each
    exactly what a separate ``ErrorFeedback(compressor, like[i])`` would
    send: with the compressor applied per tensor (a ``TopK`` keeps k, or
    its ratio, of each tensor), as one C call for ``TopK`` (other
    compressors run their fused kernel tensor by tensor).  A failed step
    leaves the whole state as it was.  ``state_dict()`` holds the flat
    buffer.
    """

    def __init__(self, compressor, like, *, threads=None):
        if not isinstance(like, (list, tuple)):
            raise TypeError(f"like: expected a list of arrays, tensors or (shape, dtype) pairs, got "
                            f"{type(like).__name__}")
        likes = [_like(item, f"like[{i}]") for i, item in enumerate(like)]
        dtypes = {d for _, d in likes}
        if len(dtypes) > 1:
            raise TypeError(f"like: expected one dtype for every tensor, got {sorted(map(str, dtypes))}")
        dtype = likes[0][1] if likes else np.dtype(np.float32)
        self.shapes = [tuple(s) for s, _ in likes]
        sizes = [int(np.prod(s, dtype=np.int64)) if s else 1 for s in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        super().__init__(compressor, ((int(self.offsets[-1]),), dtype), threads=threads)
        o = self.offsets.tolist()
        self.errors = [self.error[o[i]:o[i + 1]] for i in range(len(sizes))]

    def _hyper(self):
        return {**super()._hyper(), "shapes": [list(s) for s in self.shapes]}

    def step(self, grads):
        """One EF14 step of every tensor -> a list of payloads."""
        flat = not isinstance(grads, (list, tuple))
        gs = group_arrays(grads, self.offsets if flat else None, "grads")
        if len(gs) != len(self.errors):
            raise ValueError(f"grads: expected {len(self.errors)} tensors, got {len(gs)}")
        for i, (g, e) in enumerate(zip(gs, self.errors)):
            if g.size != e.size:
                raise ValueError(f"grads[{i}]: expected shape {self.shapes[i]}, got {g.shape}")
            if g.dtype != self.dtype:
                raise TypeError(f"grads[{i}]: expected dtype {self.dtype} (the state's), got {g.dtype}")
        gs = [g.reshape(-1) for g in gs]
        comp = self.compressor
        threads = self.threads if self.threads is not None else comp.threads
        with self._lock:
            # TopK: all or nothing in one C call (a failure changes nothing), no snapshot
            out = _fused.residual_group([comp] * len(gs), self.errors, gs, self.shapes, self.dtype,
                                        1.0, threads)
            if out is None:
                out = self._step_each(gs)
            self.t += 1
            return out

    def _step_each(self, gs):
        """Tensor by tensor (the fused kernel if any, else generic), inside a
        transaction (the lock held)."""
        comp = self.compressor
        with self._transaction() as txn:
            for i, g in enumerate(gs):
                _check_grad_finite(g, f"grads[{i}]")
            out = []
            finite = _fused.finite_residual(comp)
            for e, g, shape in zip(self.errors, gs, self.shapes):
                seg = SimpleNamespace(compressor=comp, threads=self.threads, decay=1.0,
                                      shape=shape, dtype=self.dtype, t=self.t)
                payload = _fused.residual_step(seg, e, g, 1.0)
                if payload is None:
                    finite = False
                    e += g
                    payload = comp.compress(e.reshape(shape), step=self.t)
                    _subtract_decoded(e, payload, self.threads)
                out.append(payload)
            txn["finite"] = finite
            return out


class DecayedFeedback(_Residual):
    """SparseLoCo's decayed error feedback: p = beta*e + delta (the outer
    pseudo-gradient), send C(p), e = p - D(C(p))."""

    def __init__(self, compressor, like, beta, *, threads=None):
        super().__init__(compressor, like, decay=check_finite_number(beta, "beta", 0.0, 1.0),
                         threads=threads)

    @property
    def beta(self):
        return self.decay

    def step(self, delta):
        return self._step(delta, 1.0)


class EF21(_Stateful):
    """EF21 (Richtárik et al.): c = C(g - h); h += D(c); send c.  The server
    keeps g = mean_i h_i by adding the mean of the decoded messages
    (``EF21Server``)."""

    _state_names: tuple = ("h",)
    h: np.ndarray

    def __init__(self, compressor, like, *, threads=None):
        super().__init__(like, threads)
        self.compressor = from_spec(compressor)

    def _hyper(self):
        return {"compressor": self.compressor.spec}

    def _message(self, target):
        """c = C(target - h); h += D(c)."""
        d = target - self.h
        c = self.compressor.compress(d.reshape(self.shape), step=self.t)
        self.h += _decoded(c, self.size, self.dtype, self.threads)
        self.t += 1
        return c

    def step(self, grad):
        g = self._grad(grad)
        _check_grad_finite(g)
        with self._lock, self._transaction():
            return self._message(g)


class EF21W(EF21):
    """EF21-W: client i with ``weight`` = n·w_i (w_i = L_i / sum L_j) sends
    c = C(g/weight - h), h += D(c); the server forms g = (1/n) sum weight_i h_i
    (``EF21Server(..., weights=...)``).  For a positively homogeneous C (top-k)
    this is EF21 on the rescaled state weight·h; weight 1 is EF21."""

    def __init__(self, compressor, like, weight, *, threads=None):
        super().__init__(compressor, like, threads=threads)
        self.weight = check_finite_number(weight, "weight", 0.0, lo_open=True)

    def _hyper(self):
        return {"compressor": self.compressor.spec, "weight": self.weight}

    def step(self, grad):
        g = self._grad(grad)
        _check_grad_finite(g)
        with self._lock, self._transaction():
            return self._message(g / self.dtype.type(self.weight))


class EF21Server:
    """The server side of EF21 / EF21-W / EControl: the running estimate
    g = (1/n) sum_i weight_i h_i, updated from the workers' messages."""

    def __init__(self, like, *, weights=None, threads=None):
        self.shape, self.dtype = _like(like)
        self.size = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        self.weights = None if weights is None else [check_finite_number(w, "weights[i]", 0.0, lo_open=True)
                                                      for w in weights]
        self.threads = check_threads(threads)
        self.g = np.zeros(self.size, dtype=self.dtype)

    def update(self, payloads):
        """Add the mean (weighted for EF21-W) of the decoded messages; returns g."""
        payloads = list(payloads)
        if self.weights is not None and len(self.weights) != len(payloads):
            raise ValueError(f"payloads: expected {len(self.weights)} (one per weight), got {len(payloads)}")
        n = len(payloads)
        g = self.g.copy()   # computed aside, committed only when all is well
        for i, p in enumerate(payloads):
            d = _decoded(p, self.size, self.dtype, self.threads)
            w = 1.0 if self.weights is None else self.weights[i]
            g += d * self.dtype.type(w / n)
        check_finite_array(g, "EF21Server.update: the estimate", "overflowed (nothing was changed)")
        self.g[:] = g
        return self.g.reshape(self.shape)


class EControl(EF21):
    """EControl (Gao, Islamov, Stich): d = C(eta*e + g - h); e += g - h - D(d);
    h += D(d); send d.  With eta = 0 it is EF21 exactly."""

    _state_names: tuple = ("h", "e")
    e: np.ndarray

    def __init__(self, compressor, like, eta, *, threads=None):
        super().__init__(compressor, like, threads=threads)
        self.eta = check_finite_number(eta, "eta", 0.0)

    def _hyper(self):
        return {"compressor": self.compressor.spec, "eta": self.eta}

    def step(self, grad):
        g = self._grad(grad)
        _check_grad_finite(g)
        with self._lock, self._transaction():
            diff = g - self.h
            target = diff + self.dtype.type(self.eta) * self.e if self.eta else diff
            c = self.compressor.compress(target.reshape(self.shape), step=self.t)
            dec = _decoded(c, self.size, self.dtype, self.threads)
            self.e += diff - dec
            self.h += dec
            self.t += 1
            return c


# DGC's warm-up (Lin et al.): sparsity 75%, 93.75%, 98.4375%, 99.6%, then the target.
DGC_WARMUP_DENSITIES = (0.25, 0.0625, 0.015625, 0.004)


class DGC(_Stateful):
    """Deep Gradient Compression's worker state (Lin et al., ICLR 2018).

    step(grad): optional local clipping (L2 norm <= ``clip``), momentum
    correction u = mu*u + g, v = v + u (Nesterov: u = mu*(u + g),
    v = v + u + g), selection of the current density from v (DGC's sampled
    top-k, or exact with ``exact=True``), then v = 0 (and u = 0 with
    momentum-factor ``masking``) at the sent coordinates.  Returns the Sparse
    of the sent values of v.

    Warm-up: with ``warmup_steps=S`` the density follows the paper's schedule
    ``DGC_WARMUP_DENSITIES`` (75% -> 93.75% -> 98.4375% -> 99.6% sparsity),
    S steps each, then ``ratio`` (99.9% sparsity by default).  The paper
    uses one stage per epoch: pass the steps per epoch.
    """

    _state_names: tuple = ("u", "v")
    u: np.ndarray
    v: np.ndarray

    def __init__(self, like, ratio=0.001, *, momentum=0.9, nesterov=False, clip=None, masking=True,
                 warmup_steps=None, warmup=DGC_WARMUP_DENSITIES, exact=False, sample_ratio=0.01,
                 seed=0, threads=None):
        super().__init__(like, threads)
        self.ratio = check_ratio(ratio)
        self.momentum = check_finite_number(momentum, "momentum", 0.0, 1.0)
        self.nesterov = bool(nesterov)
        self.clip = None if clip is None else check_finite_number(clip, "clip", 0.0, lo_open=True)
        self.masking = bool(masking)
        self.warmup_steps = None if warmup_steps is None else check_int(warmup_steps, "warmup_steps", 1)
        self.warmup = tuple(check_ratio(d, "warmup[i]") for d in warmup)
        self.exact = bool(exact)
        self.sample_ratio = sample_ratio
        self.seed = check_seed(seed)

    def _hyper(self):
        return {"ratio": self.ratio, "momentum": self.momentum, "nesterov": self.nesterov,
                "clip": self.clip, "masking": self.masking, "warmup_steps": self.warmup_steps,
                "warmup": self.warmup, "exact": self.exact, "seed": self.seed}

    def density(self, t=None):
        """The density used at step t (default: the next step)."""
        t = self.t if t is None else t
        if self.warmup_steps is not None:
            stage = t // self.warmup_steps
            if stage < len(self.warmup):
                return max(self.warmup[stage], self.ratio)
        return self.ratio

    def step(self, grad):
        g = self._grad(grad)
        _check_grad_finite(g)
        with self._lock, self._transaction():
            if self.clip is not None:
                norm = float(np.sqrt(np.dot(g.astype(np.float64), g.astype(np.float64))))
                if norm > self.clip:
                    g = g * self.dtype.type(self.clip / norm)
            mu = self.dtype.type(self.momentum)
            u, v = self.u, self.v
            if self.nesterov:
                u += g
                u *= mu
                v += u
                v += g
            else:
                u *= mu
                u += g
                v += u
            density = self.density()
            sel = (TopK(ratio=density, threads=self.threads) if self.exact else
                   SampledTopK(density, sample_ratio=self.sample_ratio, seed=self.seed, threads=self.threads))
            payload = sel.compress(v.reshape(self.shape), step=self.t)
            v[payload.indices] = 0
            if self.masking:
                u[payload.indices] = 0
            self.t += 1
            return payload


def _smoothness(smoothness):
    try:
        Ls = [float(v) for v in smoothness]
    except TypeError:
        raise TypeError(f"smoothness: expected a sequence of numbers, got {type(smoothness).__name__}") from None
    if not Ls:
        raise ValueError("smoothness: expected at least one constant, got none")
    return [check_finite_number(v, f"smoothness[{i}]", 0.0, lo_open=True) for i, v in enumerate(Ls)]


def ef21w_weights(smoothness):
    """EF21-W's client weights n * w_i with w_i = L_i / sum_j L_j (Richtarik,
    Gasanov, Burlachenko 2024, "Error Feedback Reloaded"), for
    ``EF21W(weight=...)`` and ``EF21Server(weights=...)``."""
    Ls = _smoothness(smoothness)
    total = math.fsum(Ls)
    return [len(Ls) * L / total for L in Ls]


def ef21_step_size(L, smoothness, alpha, *, rule="am"):
    """EF21's step size gamma = 1 / (L + L_r * xi(alpha)), xi(alpha) =
    sqrt(1 - alpha) / (1 - sqrt(1 - alpha)).

    ``L``: smoothness of the average f; ``smoothness``: the clients'
    constants L_i; ``alpha`` in (0, 1]: the compressor's contraction (k/d
    for top-k; 1: no compression, gamma = 1/L).  ``rule``: "am" uses the
    arithmetic mean L_AM = mean(L_i) (EF21-W's rule, Richtarik et al. 2024;
    their Theorem 3 shows it also holds for plain EF21), "qm" the quadratic
    mean L_QM = sqrt(mean(L_i^2)) of the original EF21 analysis.  L_AM <=
    L_QM, so "am" allows a larger step (up to L_QM / L_AM times) when the
    L_i are heterogeneous.
    """
    L = check_finite_number(L, "L", 0.0, lo_open=True)
    Ls = _smoothness(smoothness)
    alpha = check_finite_number(alpha, "alpha", 0.0, 1.0, lo_open=True)
    rule = check_choice(rule, "rule", ("am", "qm"))
    Lr = math.fsum(Ls) / len(Ls) if rule == "am" else math.sqrt(math.fsum(v * v for v in Ls) / len(Ls))
    r = math.sqrt(1.0 - alpha)
    xi = r / (1.0 - r)
    return 1.0 / (L + Lr * xi)
