"""DDP communication hooks: compressed gradient averaging in two lines.

::

    state = lowband.torch.hooks.CompressionState(compressor="topk:0.01", feedback="ef")
    ddp.register_comm_hook(state, lowband.torch.hooks.compression_hook)

    state = lowband.torch.hooks.PowerSGDState(rank=2)
    ddp.register_comm_hook(state, lowband.torch.hooks.powersgd_hook)

Both hooks share one bucket machinery (``_BucketState``):

- plain allreduce (divide by W, then sum: exactly torch's ``allreduce_hook``)
  for the first ``start_iter`` iterations, while DDP still rebuilds its
  buckets; the iteration counter advances when ``bucket.is_last()``;
- per-tensor compression inside each bucket, the state keyed by the
  parameter (its position in the order DDP first shows the parameters), so
  bucket rebuilds, ``gradient_as_bucket_view``, ``static_graph``, several
  buckets and ``no_sync`` accumulation need nothing special; the top-k
  tensors of a bucket (with or without EF) are compressed in one grouped C
  call (``ErrorFeedback.step_group`` / ``lowband.topk_group``), with the
  bytes of the tensor-by-tensor calls;
- tensors that are 1-D, smaller than ``min_numel``, not float32/float64, or
  (PowerSGD) not worth a low-rank factorisation go out uncompressed, in one
  batched allreduce per bucket;
- each bucket's collectives run to completion inside its hook call, in a
  fixed order, so buckets never interleave differently on different ranks
  (torch's own ``powerSGD_hook`` chains them through callbacks and can
  mismatch on gloo with several buckets);
- the averaged gradient is written in place into ``bucket.buffer()``, and
  the returned future resolves to that buffer;
- ``state.bytes_sent`` counts the bytes this rank handed to torch,
  ``state.bytes_dense`` what the plain allreduce of the same buckets would
  have handed it; ``state_dict()`` / ``load_state_dict()`` and pickling
  (without the process group) checkpoint everything.
"""
# no `from __future__ import annotations`: DDP checks the hooks' annotation objects
import warnings
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from .._payload import Dense, Quantized, Sparse
from .._validate import check_choice, check_finite_number, check_int
from ..compressors import Cast, Chain, Compressor, Identity, RandomK, TopK, from_spec
from ..feedback import EF21, EControl, ErrorFeedback
from ..sim import chunk_bounds, reduce_payloads
from ..sparsify import aggregate, topk_group
from ..wire import decode
from ._interop import as_numpy, as_tensor
from .comm import ProcessGroupCommunicator

__all__ = ["CompressionState", "compression_hook", "PowerSGDState", "powersgd_hook"]

FEEDBACKS = ("ef", "ef21", "econtrol", "none")
BACKENDS = ("auto", "c", "torch")
_FLOATS = (torch.float32, torch.float64)


def _completed(value):
    fut = torch.futures.Future()
    fut.set_result(value)
    return fut


class _BucketState:
    """What every lowband hook shares: the group, the iteration counter,
    plain allreduce before ``start_iter``, parameter slots, the bypass
    allreduce, byte counters and checkpointing.  Subclasses implement
    ``_compressible(grad)``, ``_compress(items)`` (items: (slot, grad) of
    one bucket, to be replaced in place by their mean over ranks),
    ``_config()`` and the per-slot state (``_slot_state`` /
    ``_load_slot``)."""

    def __init__(self, process_group, start_iter, min_numel):
        self.process_group = process_group
        self.start_iter = check_int(start_iter, "start_iter", 0)
        self.min_numel = check_int(min_numel, "min_numel", 0)
        self.iter = 0
        self.bytes_sent = 0
        self.bytes_dense = 0
        self._init_runtime()

    def _init_runtime(self):
        self._comm = None
        self._slots = {}       # Parameter -> slot (order of first sight)
        self._pending = {}     # slot -> saved state waiting for its tensor

    @property
    def comm(self):
        """The ProcessGroupCommunicator (made on first use)."""
        if self._comm is None:
            self._comm = ProcessGroupCommunicator(self.process_group)
        return self._comm

    def _slot(self, param):
        slot = self._slots.get(param)
        if slot is None:
            slot = self._slots[param] = len(self._slots)
        return slot

    # -- the hook body ---------------------------------------------------------
    def _run(self, bucket):
        comm = self.comm
        buf = bucket.buffer()
        slots = [self._slot(p) for p in bucket.parameters()]
        before = comm.bytes_sent
        self.bytes_dense += buf.numel() * buf.element_size()
        if self.iter < self.start_iter or comm.world_size == 1:
            buf.div_(comm.world_size)       # torch's allreduce_hook, bit for bit
            fut = comm._all_reduce(buf).then(lambda f: f.value()[0]) if comm.world_size > 1 \
                else _completed(buf)
        else:
            grads = bucket.gradients()
            views = [self._view(buf, g) for g in grads]
            plain = [v for v in views if not self._compressible(v)]
            items = [(s, v) for s, v in zip(slots, views) if self._compressible(v)]
            if plain:
                self._allreduce_mean(plain)
            if items:
                self._compress(items)
            for g, v in zip(grads, views):
                if g.data_ptr() != v.data_ptr():
                    g.copy_(v)
            fut = _completed(buf)
        self.bytes_sent += comm.bytes_sent - before
        if bucket.is_last():
            self.iter += 1
        return fut

    @staticmethod
    def _view(buf, grad):
        """grad as a view into buf (DDP's gradients() are such views)."""
        start = buf.data_ptr()
        end = start + buf.numel() * buf.element_size()
        if start <= grad.data_ptr() < end and grad.is_contiguous():
            return grad
        raise RuntimeError("lowband hooks: a bucket gradient is not a view of bucket.buffer()")

    def _allreduce_mean(self, tensors):
        """tensors <- their mean over ranks, in one allreduce (divide first,
        as torch's hooks do)."""
        W = self.comm.world_size
        flat = torch.cat([t.reshape(-1) for t in tensors])
        flat.div_(W)
        self.comm.allreduce(flat, out=flat)
        pos = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[pos:pos + n].view_as(t))
            pos += n

    def _big(self, grad):
        return grad.dim() >= 2 and grad.numel() >= self.min_numel and grad.dtype in _FLOATS

    # -- checkpoints -------------------------------------------------------------
    def _config(self):
        return {"start_iter": self.start_iter, "min_numel": self.min_numel}

    def state_dict(self) -> dict:
        """Iteration, byte counters, configuration and every tensor's state
        (keyed by slot: the order in which DDP first passed the parameters)."""
        slots = dict(self._pending)
        for slot, st in self._slot_states().items():
            slots[slot] = self._save_slot(st)
        return {"kind": type(self).__name__, "config": self._config(), "iter": self.iter,
                "bytes_sent": self.bytes_sent, "bytes_dense": self.bytes_dense, "slots": slots}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict of the same kind and configuration; each
        tensor's state is installed when its parameter is first seen."""
        if not isinstance(state, dict) or state.get("kind") != type(self).__name__:
            got = state.get("kind") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state: expected a {type(self).__name__} state_dict, got {got!r}")
        if state.get("config") != self._config():
            raise ValueError(f"state: configuration {state.get('config')} differs from this "
                             f"state's {self._config()}")
        self.iter = check_int(state["iter"], "state['iter']", 0)
        self.bytes_sent = int(state["bytes_sent"])
        self.bytes_dense = int(state["bytes_dense"])
        self._clear_slots()          # (the parameter slots stay: same model, same order)
        self._pending = dict(state["slots"])

    def __getstate__(self):
        d = {k: v for k, v in self.__dict__.items()
             if k not in ("process_group", "_comm", "_slots", "_pending") and not k.startswith("_st")}
        d["_saved"] = self.state_dict()
        return d

    def __setstate__(self, d):
        saved = d.pop("_saved")
        self.__dict__.update(d)
        self.process_group = None
        self._init_runtime()
        self._init_slots()
        self.load_state_dict(saved)
        warnings.warn(f"{type(self).__name__} unpickled: it uses the default process group",
                      stacklevel=2)

    # -- per-slot state (subclasses) ---------------------------------------------
    def _init_slots(self):
        raise NotImplementedError

    def _slot_states(self):
        raise NotImplementedError

    def _clear_slots(self):
        raise NotImplementedError

    @staticmethod
    def _save_slot(st):
        raise NotImplementedError

    def _compressible(self, grad):
        raise NotImplementedError

    def _compress(self, items):
        raise NotImplementedError

    def _take_pending(self, slot):
        return self._pending.pop(slot, None)


# ---------------------------------------------------------------------------
# compression_hook
# ---------------------------------------------------------------------------

def _summable_parts(payload):
    """(the array of a summable payload that peers add up, rebuild(summed))."""
    if isinstance(payload, Dense):
        return payload.array.reshape(-1), lambda a: Dense(a.reshape(payload.shape))
    if isinstance(payload, Quantized) and payload.scheme in ("float16", "bfloat16"):
        codes = payload.arrays["codes"]
        if payload.scheme == "float16":
            vals = codes.view(np.float16)
        else:
            from .._validate import BFLOAT16
            vals = codes.view(BFLOAT16)
        return vals, lambda a: Quantized._make(payload.scheme, payload.shape, payload.dtype, payload.params,
                                               {"codes": a.view(np.uint16)})
    if isinstance(payload, Sparse) and payload.seed is not None:
        if isinstance(payload.values, Quantized):
            vals, inner = _summable_parts(payload.values)
        else:
            vals, inner = payload.values, lambda a: a
        return vals, lambda a: Sparse._make(payload.indices, inner(a), payload.shape, payload.dtype,
                                            payload.seed, payload.step)
    raise TypeError(f"a {type(payload).__name__} payload cannot be summed by peers")


def _collective_for(comp, feedback):
    """"allreduce" (summable payloads), "two_phase" (quantized codes with EF
    or none) or "allgather" (sparse payloads; anything with EF21/EControl)."""
    summable = isinstance(comp, (Identity, Cast, RandomK)) or (
        isinstance(comp, Chain) and isinstance(comp.first, RandomK) and isinstance(comp.then, Cast))
    if summable:
        return "allreduce"
    if comp.sparsifier or isinstance(comp, Chain) or feedback in ("ef21", "econtrol"):
        return "allgather"
    return "two_phase"


class _Slot:
    """One tensor's compression state (flat, the gradient's size)."""

    def __init__(self, spec, feedback, n, dtype, eta, chunk):
        like = ((n,), dtype)
        self.comp = from_spec(spec)
        self.fb = None
        self.server = None        # EF21/EControl: the mean of the h_i; two-phase: server error
        self.worker = None        # two-phase: worker error
        if chunk is not None:
            if feedback == "ef":
                self.worker = np.zeros(n, dtype)
                self.server = np.zeros(chunk, dtype)
        elif feedback == "ef":
            self.fb = ErrorFeedback(self.comp, like)
        elif feedback == "ef21":
            self.fb = EF21(self.comp, like)
            self.server = np.zeros(n, dtype)
        elif feedback == "econtrol":
            self.fb = EControl(self.comp, like, eta)
            self.server = np.zeros(n, dtype)
        if self.fb is not None:
            self.comp = self.fb.compressor

    def message(self, g):
        return self.fb.step(g) if self.fb is not None else self.comp.compress(g)

    def save(self):
        return {"comp_step": self.comp.step,
                "fb": None if self.fb is None else self.fb.state_dict(),
                "server": None if self.server is None else self.server.copy(),
                "worker": None if self.worker is None else self.worker.copy()}

    def load(self, saved, where):
        for name in ("server", "worker"):
            mine, theirs = getattr(self, name), saved[name]
            if (mine is None) != (theirs is None) or (mine is not None and (
                    theirs.shape != mine.shape or theirs.dtype != mine.dtype)):
                raise ValueError(f"state: {where} {name} does not fit this tensor")
            if mine is not None:
                mine[:] = theirs
        if self.fb is not None:
            self.fb.load_state_dict(saved["fb"])
        self.comp.step = int(saved["comp_step"])


class CompressionState(_BucketState):
    """State of ``compression_hook``: any lowband compressor with error
    feedback, on torch.distributed.

    ``compressor``   a spec or Compressor (``"topk:0.01"``, ``"sign"``,
                     ``"randomk:0.01"``, ``"fp16"``, ``"topk:0.01+lut2bit"``...);
                     every compressed tensor gets its own copy.
    ``feedback``     "ef" (EF14 residual), "ef21", "econtrol" (with ``eta``)
                     or "none".
    ``start_iter``   iterations of plain allreduce first (DDP rebuilds its
                     buckets during iterations 0-1).
    ``min_numel``    tensors smaller than this (and 1-D ones) are averaged
                     uncompressed.
    ``backend``      "auto" (the C core for CPU tensors, torch code for
                     others), "c", or "torch" (torch-native codecs:
                     topk, chunked top-k, threshold, randomk, sign,
                     blockwise, qsgd, fp16/bf16 casts, none; with
                     feedback "ef" or "none"; anything else raises
                     ValueError here, listing them).

    The collective follows the codec: summable payloads (shared-seed
    random-k values, float16/bfloat16 casts, none) are divided by W and
    allreduced; sign and other quantized codes go through the two-phase
    compressed allreduce (worker and server error) with ``feedback="ef"``
    or "none"; sparse payloads (and everything under EF21/EControl) are
    all-gathered as ``lowband.encode`` bytes, one gather per bucket, and
    averaged in C (``lowband.aggregate``).
    """

    def __init__(self, process_group: Optional[Any] = None, compressor: Any = "topk:0.01", feedback: str = "ef",
                 start_iter: int = 10, *, min_numel: int = 1024, eta: float = 0.1, backend: str = "auto") -> None:
        super().__init__(process_group, start_iter, min_numel)
        comp = from_spec(compressor)
        self.compressor = comp.spec
        self.feedback = check_choice(feedback, "feedback", FEEDBACKS)
        self.eta = check_finite_number(eta, "eta", 0.0)
        self.backend = check_choice(backend, "backend", BACKENDS)
        self.collective = _collective_for(comp, self.feedback)
        self._init_slots()
        if self.backend == "torch":
            from ._codecs import check_supported
            check_supported(comp, self.feedback)

    def _init_slots(self):
        self._st = {}

    def _slot_states(self):
        return self._st

    def _clear_slots(self):
        self._st = {}

    @staticmethod
    def _save_slot(st):
        return st.save()

    def _config(self):
        return {**super()._config(), "compressor": self.compressor, "feedback": self.feedback,
                "eta": self.eta, "backend": self.backend}

    def __repr__(self):
        return (f"CompressionState(compressor={self.compressor!r}, feedback={self.feedback!r}, "
                f"start_iter={self.start_iter}, iter={self.iter}, collective={self.collective!r})")

    def _compressible(self, grad):
        return self._big(grad)

    def _state(self, slot, g, torch_side):
        st = self._st.get(slot)
        if st is None:
            n = g.numel()
            if torch_side:
                from ._codecs import TorchSlot
                st = TorchSlot(self.compressor, self.feedback, g, self.comm)
            else:
                chunk = None
                if self.collective == "two_phase":
                    b = chunk_bounds(n, self.comm.world_size)
                    chunk = b[self.comm.rank + 1] - b[self.comm.rank]
                st = _Slot(self.compressor, self.feedback, n, as_numpy(g).dtype, self.eta, chunk)
            saved = self._take_pending(slot)
            if saved is not None:
                st.load(saved, f"slot {slot}")
            self._st[slot] = st
        return st

    def _compress(self, items):
        torch_side = self.backend == "torch" or (self.backend == "auto" and items[0][1].device.type != "cpu")
        if torch_side:
            from ._codecs import check_supported, compress_bucket, sparse_messages
            if self.backend == "auto":
                check_supported(from_spec(self.compressor), self.feedback)
            pairs = [(self._state(s, g, True), g) for s, g in items]
            if self.collective != "allgather":
                compress_bucket(self.comm, pairs, self.collective)
                return
            # sparse: the C path's payloads and exchange; the mean is formed
            # on the host (in place for CPU tensors) and copied to the device
            hosts = [g if g.device.type == "cpu" else torch.empty(g.shape, dtype=g.dtype) for _, g in items]
            flats = [as_numpy(h, "gradient").reshape(-1) for h in hosts]
            self._gather_mean(sparse_messages(pairs), [st for st, _ in pairs], flats, items[0][0])
            for h, (_, g) in zip(hosts, items):
                if h is not g:
                    g.copy_(h)
            return
        states = [self._state(s, g, False) for s, g in items]
        flats = [as_numpy(g, "gradient").reshape(-1) for _, g in items]
        getattr(self, "_" + self.collective)(states, flats, items[0][0])

    # -- the three collectives (C core) ---------------------------------------
    def _finish(self, st, mean, out):
        """out <- the averaged gradient, given the mean of the decoded messages."""
        if st.server is not None and st.worker is None:     # EF21 / EControl
            st.server += mean
            out[:] = st.server
        elif mean is not out:
            out[:] = mean

    def _allreduce(self, states, flats, key):
        W = self.comm.world_size
        payloads = [st.message(g) for st, g in zip(states, flats)]
        parts = [_summable_parts(p) for p in payloads]
        groups = {}
        for t, (vals, _) in enumerate(parts):
            groups.setdefault(str(vals.dtype), []).append(t)
        summed = [None] * len(parts)
        for ts in groups.values():
            flat = np.concatenate([parts[t][0] for t in ts])
            tensor = as_tensor(flat)
            tensor.div_(W)
            self.comm.allreduce(tensor, out=tensor)
            pos = 0
            for t in ts:
                n = parts[t][0].size
                summed[t] = flat[pos:pos + n]
                pos += n
        for t, (st, g) in enumerate(zip(states, flats)):
            p = parts[t][1](summed[t])
            if st.server is not None:
                mean = st.comp.decompress(p).reshape(-1)
                self._finish(st, mean, g)
            else:
                st.comp.decompress(p, out=g)

    _grouped = True     # top-k tensors of a bucket in one C call (False: one by one)

    def _messages(self, states, flats):
        """Every tensor's message, the top-k ones (with EF or none) of the
        bucket as one grouped call: the same payloads as st.message(g)."""
        out = [None] * len(states)
        if self._grouped:
            ef = [t for t, st in enumerate(states)
                  if isinstance(st.fb, ErrorFeedback) and type(st.comp) is TopK]
            plain = [t for t, st in enumerate(states)
                     if st.fb is None and st.worker is None and type(st.comp) is TopK]
            if len(ef) > 1:
                sent = ErrorFeedback.step_group([states[t].fb for t in ef], [flats[t] for t in ef])
                for t, p in zip(ef, sent):
                    out[t] = p
            if len(plain) > 1:    # every slot has its copy of one spec
                comp = states[plain[0]].comp
                amount = ({"k": [min(comp.k, flats[t].size) for t in plain]} if comp.k is not None
                          else {"ratio": comp.ratio})
                sent = topk_group([flats[t] for t in plain], **amount, threads=comp.threads)
                for t, p in zip(plain, sent):
                    out[t] = p
        return [p if p is not None else st.message(g) for p, st, g in zip(out, states, flats)]

    def _allgather(self, states, flats, key):
        self._gather_mean(self._messages(states, flats), states, flats, key)

    def _gather_mean(self, payloads, states, flats, key):
        """flats <- the mean over ranks of each tensor's payload (both
        backends' sparse messages): each payload is encoded straight into
        the send buffer; the padded width of this bucket's previous gather
        (key: its first slot) is reused, so a bucket costs one collective
        while its sizes fit."""
        rows = self.comm.allgather_encoded(payloads, reuse=True, key=("hook", key))
        W = self.comm.world_size
        for t, (st, g) in enumerate(zip(states, flats)):
            ps = [decode(rows[r][t], expect_shape=(g.size,), expect_dtype=g.dtype, copy=False)
                  for r in range(W)]
            if st.server is None and all(isinstance(p, Sparse) for p in ps):
                aggregate(ps, op="mean", out=g)
            else:
                self._finish(st, reduce_payloads(ps, "mean").astype(g.dtype, copy=False), g)

    def _two_phase(self, states, flats, key):
        self.comm.compressed_allreduce_many(flats, [st.comp for st in states],
                                            [st.worker for st in states],
                                            [st.server for st in states], outs=flats)


def compression_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: compressed averaging of ``bucket`` with a
    ``CompressionState`` (see its doc)."""
    return state._run(bucket)


# ---------------------------------------------------------------------------
# PowerSGD
# ---------------------------------------------------------------------------

def _orthogonalize(m, eps=0.0):
    """Modified Gram-Schmidt on the columns of m (n x r), in place, as
    torch's powerSGD_hook does for rank <= 2 (we do it for every rank, so
    the result does not depend on a LAPACK build).  CPU tensors go through
    lowband's deterministic C kernel (``lowband.powersgd.orthogonalize``,
    zero-copy), others through torch."""
    if m.device.type == "cpu" and m.dtype in _FLOATS and m.is_contiguous():
        from ..powersgd import orthogonalize
        orthogonalize(m, eps)
        return
    for i in range(m.shape[1]):
        col = m[:, i:i + 1]
        if eps == 0:
            col /= torch.linalg.norm(col)
        else:
            col /= torch.linalg.norm(col) + eps
        if i + 1 < m.shape[1]:
            rest = m[:, i + 1:]
            rest -= torch.sum(col * rest, dim=0) * col


class PowerSGDState(_BucketState):
    """State of ``powersgd_hook``: PowerSGD (Vogels et al., 2019) with the
    same steps as torch's ``powerSGD_hook``, per tensor instead of per
    bucket buffer.

    ``rank``                  the approximation rank r;
    ``start_iter``            plain allreduce before it;
    ``min_compression_rate``  a (n x m) tensor is compressed only when
                              (n + m) r * rate < n m (torch's rule); 1-D
                              tensors never are;
    ``error_feedback``        keep M - P Q^T per tensor and add it next step;
    ``warm_start``            reuse Q across steps;
    ``seed``                  the initial Q draws: ``numpy.random.RandomState
                              (seed)`` gives each tensor a torch seed, as
                              torch's hook does (the same on every rank).

    Per bucket: one allreduce of the uncompressed tensors, one of all P
    factors, one of all Q factors (3 collectives, like torch's), each run
    to completion in the hook call.
    """

    def __init__(self, process_group: Optional[Any] = None, rank: int = 1, start_iter: int = 10,
                 min_compression_rate: float = 2, error_feedback: bool = True, warm_start: bool = True,
                 seed: int = 0, *, orthogonalization_epsilon: float = 0.0) -> None:
        super().__init__(process_group, start_iter, 0)
        self.rank = check_int(rank, "rank", 1)
        self.min_compression_rate = check_finite_number(min_compression_rate, "min_compression_rate", 0.0)
        self.error_feedback = bool(error_feedback)
        self.warm_start = bool(warm_start)
        self.seed = check_int(seed, "seed", 0, 2**32 - 1)
        self.orthogonalization_epsilon = check_finite_number(orthogonalization_epsilon,
                                                             "orthogonalization_epsilon", 0.0)
        self._init_slots()

    def _init_slots(self):
        self.rng = np.random.RandomState(self.seed)
        self._stp = {}       # slot -> {"q": Tensor, "error": Tensor or None}

    def _slot_states(self):
        return self._stp

    def _clear_slots(self):
        self._stp = {}

    @staticmethod
    def _save_slot(st):
        return {k: (None if v is None else v.detach().cpu().clone()) for k, v in st.items()}

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["rng"] = self.rng.get_state()
        return sd

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.rng.set_state(state["rng"])

    def _config(self):
        return {**super()._config(), "rank": self.rank, "min_compression_rate": self.min_compression_rate,
                "error_feedback": self.error_feedback, "warm_start": self.warm_start, "seed": self.seed}

    def __repr__(self):
        return f"PowerSGDState(rank={self.rank}, start_iter={self.start_iter}, iter={self.iter})"

    def _shape(self, g):
        n = g.shape[0]
        m = g.numel() // n
        return n, m, min(n, m, self.rank)

    def _compressible(self, g):
        if g.dim() < 2 or g.dtype not in _FLOATS:
            return False
        n, m, r = self._shape(g)
        return (n + m) * r * self.min_compression_rate < n * m

    def _state(self, slot, g):
        st = self._stp.get(slot)
        if st is None:
            saved = self._take_pending(slot)
            if saved is not None:
                st = {k: (None if v is None else v.to(g.device)) for k, v in saved.items()}
            else:
                st = {"q": None, "error": torch.zeros_like(g).view(-1) if self.error_feedback else None}
            self._stp[slot] = st
        return st

    def _new_q(self, m, r, like):
        # torch's powerSGD_hook: a torch seed from the numpy RandomState, randn on CPU
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.rng.randint(1_000_000_000))
            return torch.randn(m, r, device="cpu", dtype=like.dtype).to(like.device)

    def _compress(self, items):
        W = self.comm.world_size
        states = [self._state(s, g) for s, g in items]
        mats, ps, qs, copies = [], [], [], []
        for st, (_, g) in zip(states, items):
            n, m, r = self._shape(g)
            flat = g.view(-1)
            if st["error"] is not None:
                flat += st["error"]
                copies.append(flat.clone())
            else:
                copies.append(None)
            if st["q"] is None or not self.warm_start:
                st["q"] = self._new_q(m, r, g)
            _orthogonalize(st["q"], self.orthogonalization_epsilon)
            mat = g.view(n, m)
            mats.append(mat)
            ps.append(torch.matmul(mat, st["q"]))
        p_flat = torch.cat([p.reshape(-1) for p in ps])
        self.comm.allreduce(p_flat, out=p_flat)
        pos = 0
        for i, p in enumerate(ps):
            p.copy_(p_flat[pos:pos + p.numel()].view_as(p))
            pos += p.numel()
            _orthogonalize(p, self.orthogonalization_epsilon)
            qs.append(torch.matmul(mats[i].t(), p))
        q_flat = torch.cat([q.reshape(-1) for q in qs])
        self.comm.allreduce(q_flat, out=q_flat)
        q_flat.div_(W)
        pos = 0
        for i, (st, (_, g)) in enumerate(zip(states, items)):
            q = qs[i]
            q.copy_(q_flat[pos:pos + q.numel()].view_as(q))
            pos += q.numel()
            torch.matmul(ps[i], q.t(), out=mats[i])
            if st["error"] is not None:
                torch.sub(copies[i], g.view(-1), out=st["error"])
            st["q"] = q if self.warm_start else None


def powersgd_hook(state: PowerSGDState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: PowerSGD averaging of ``bucket`` with a
    ``PowerSGDState`` (see its doc)."""
    return state._run(bucket)
