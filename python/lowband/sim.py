"""Collectives that move encoded payloads, and an in-process cluster.

A *communicator* is one rank's view of a group of ``world_size`` workers.
Its interface is small on purpose, so that the optimizers in
``lowband.optim`` run unchanged on the embedded simulator (``Cluster``) or
on torch.distributed (``lowband.torch.ProcessGroupCommunicator``):

``comm.rank``, ``comm.world_size``
``comm.allreduce(array, op="sum"|"mean") -> ndarray``
    dense float or int arrays; the result is the sum of the contributions
    added in rank order (then divided by W for "mean").
``comm.allgather(payload) -> list``
    one payload per rank, in rank order; sizes may differ between ranks.
``comm.alltoall(payloads) -> list``
    ``payloads[j]`` goes to rank j; item j of the result came from rank j.
``comm.broadcast(payload, root=0) -> payload``
``comm.barrier()``
``comm.compressed_allreduce(array, compressor, worker_error, server_error)``
    DeepSpeed's two-phase compressed allreduce (below), built on alltoall
    and allgather.

A payload is any lowband payload (``Sparse``, ``Quantized``, ``Dense``); a
plain float ndarray is wrapped as ``Dense``.  Payloads cross the wire as
``lowband.encode`` bytes and every receiver gets ``lowband.decode`` of them
(a validated copy), so only message contents decide the results.

Byte accounting (per rank, ``bytes_sent`` / ``bytes_received``):

- allgather, alltoall, broadcast: the encoded size of each message
  (``payload.nbytes == len(lowband.encode(payload))``), counted once per
  destination rank, as if every message went straight to its receiver.  A
  rank's message to itself crosses no wire and is not counted.  allgather:
  rank r sends ``(W-1) * nbytes_r`` and receives ``sum_{j != r} nbytes_j``;
  broadcast: the root sends ``(W-1) * nbytes``, each other rank receives
  ``nbytes``.
- allreduce: a ring allreduce of the raw buffer (no lowband header): the
  buffer is cut into W chunks of ``ceil(n / W)`` elements (the last ones
  padded) and each rank sends, and receives, ``2 (W-1)`` chunks:
  ``2 * (W-1) * ceil(n / W) * itemsize`` bytes.  The values are the exact
  rank-ordered sum, not what a ring's summation order would give.

Two-phase compressed allreduce (1-bit Adam, Tang et al. 2021; DeepSpeed's
``compressed_allreduce``)::

    z = array + worker_error, cut into W chunks (``chunk_bounds``)
    phase 1: chunk j -> C(z_j) -> rank j (alltoall);  worker_error = z - D(C(z))
    rank j:  zbar = (1/W) sum_i D(C(z_j^i)) (rank order) + server_error
             send C(zbar) to everyone (allgather);  server_error = zbar - D(C(zbar))
    result:  the concatenation of the W decoded server chunks

Chunking: DeepSpeed pads the buffer to a multiple of W * lcm(W, 8) so that
every rank's chunk of packed signs is whole bytes.  lowband does not pad:
chunk boundaries fall on multiples of 8 elements (chunk length
``8 * ceil(n / (8 W))``), the last chunks are shorter or empty, and each
chunk is its own payload whose bit packing is whole bytes by construction.
``worker_error`` has the array's size and ``server_error`` the size of this
rank's chunk (``chunk_bounds(n, W)[rank:rank + 2]``), so no error ever
accumulates on padding.  Each chunk is compressed on its own (with
``Sign("rms")``: one RMS scale per chunk, where DeepSpeed's worker phase
uses one scale for the whole buffer).
"""
from __future__ import annotations

import math
import threading

import numpy as np

from ._payload import Dense, Quantized, Sparse
from ._validate import as_float_array, check_choice, check_finite_number, check_int, from_torch
from .sparsify import aggregate
from .wire import decode, encode

__all__ = ["Communicator", "Cluster", "TorchCommunicator", "chunk_bounds", "reduce_payloads",
           "deepspeed_compressed_allreduce", "deepspeed_padded_size",
           "decoded", "COLLECTIVES"]

COLLECTIVES = ("allreduce", "allgather", "alltoall", "broadcast")
_REDUCE_OPS = ("sum", "mean")
CHUNK_ALIGN = 8


def chunk_bounds(n, world_size, align=CHUNK_ALIGN):
    """The W+1 offsets that cut n elements into W chunks for the compressed
    allreduce: chunk length ``align * ceil(n / (align * W))``, boundaries
    clipped to n (so the last chunks may be shorter or empty)."""
    n = check_int(n, "n", 0)
    world_size = check_int(world_size, "world_size", 1)
    align = check_int(align, "align", 1)
    chunk = align * -(-n // (align * world_size))
    return [min(j * chunk, n) for j in range(world_size + 1)]


def decoded(payload):
    """The flat dense array a payload stands for."""
    if isinstance(payload, Sparse):
        return payload.to_dense().reshape(-1)
    if isinstance(payload, Quantized):
        return payload.dequantize().reshape(-1)
    if isinstance(payload, Dense):
        return payload.array.reshape(-1).copy()
    raise TypeError(f"payload: expected a Sparse, Quantized or Dense, got {type(payload).__name__}")


def reduce_payloads(payloads, op="mean"):
    """Combine W decoded payloads into one flat array, adding in list order.

    ``op``: "sum", "mean" (the sum divided by W) or "contributor_mean"
    (SparseLoCo: each coordinate divided by the number of Sparse payloads
    that hold it).  Sparse payloads go through ``lowband.aggregate`` (no
    dense vector per payload); others are decoded and summed.
    """
    check_choice(op, "op", ("sum", "mean", "contributor_mean"))
    payloads = list(payloads)
    if not payloads:
        raise ValueError("payloads: expected at least one payload, got none")
    if all(isinstance(p, Sparse) for p in payloads):
        return aggregate(payloads, op=op).reshape(-1)
    if op == "contributor_mean":
        kinds = sorted({type(p).__name__ for p in payloads})
        raise ValueError(f"op: 'contributor_mean' needs Sparse payloads, got {', '.join(kinds)}")
    total = decoded(payloads[0])
    for i, p in enumerate(payloads[1:], 1):
        d = decoded(p)
        if d.shape != total.shape:
            raise ValueError(f"payloads[{i}]: {d.size} elements, payloads[0] has {total.size}")
        total += d.astype(total.dtype, copy=False)
    if op == "mean":
        total /= len(payloads)
    return total


def _as_payload(payload, name="payload"):
    payload = from_torch(payload, name)
    if isinstance(payload, (Sparse, Quantized, Dense)):
        return payload
    if isinstance(payload, np.ndarray):
        return Dense(payload)
    raise TypeError(f"{name}: expected a Sparse, Quantized, Dense or float ndarray, got {type(payload).__name__}")


def _reduce_array(array, name="array"):
    """A contiguous float or int ndarray for allreduce."""
    array = from_torch(array, name)
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name}: expected an ndarray, got {type(array).__name__}")
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected a float or integer array, got dtype {array.dtype}")
    return np.ascontiguousarray(array)


def _ring_bytes(n, itemsize, world_size):
    """Bytes one rank sends (and receives) in a ring allreduce of n items."""
    return 2 * (world_size - 1) * -(-n // world_size) * itemsize if world_size > 1 else 0


class Communicator:
    """One rank's collectives over encoded payloads (see the module doc).

    Subclasses implement the transport: ``_gather_all(name, item)`` (every
    rank's item, in rank order, identical on every rank),
    ``_allreduce_raw(array, op)`` and ``barrier()``, and set ``rank`` and
    ``world_size``.  Encoding, decoding, argument checks, byte counting and
    the compressed allreduce live here, shared by every transport.
    """

    rank = 0
    world_size = 1

    def __init__(self):
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- transport (subclasses) ------------------------------------------
    def _gather_all(self, name, item):
        raise NotImplementedError

    def _allreduce_raw(self, array, op):
        raise NotImplementedError

    def barrier(self):
        """Wait until every rank reaches the barrier."""
        raise NotImplementedError

    def _count(self, collective, sent, received):
        self.bytes_sent += sent
        self.bytes_received += received

    # -- the collectives ---------------------------------------------------
    def allreduce(self, array, op="sum"):
        """The rank-ordered sum (or mean) of every rank's array."""
        check_choice(op, "op", _REDUCE_OPS)
        arr = _reduce_array(array)
        if op == "mean" and arr.dtype.kind != "f":
            raise TypeError(f"array: op='mean' needs a float array, got dtype {arr.dtype}")
        out = self._allreduce_raw(arr, op)
        ring = _ring_bytes(arr.size, arr.dtype.itemsize, self.world_size)
        self._count("allreduce", ring, ring)
        return out

    def allgather(self, payload):
        """Every rank's payload (decoded copies), in rank order."""
        wire = encode(_as_payload(payload))
        wires = self._gather_all("allgather", wire)
        others = [len(w) for j, w in enumerate(wires) if j != self.rank]
        self._count("allgather", len(wire) * len(others), sum(others))
        return [decode(w) for w in wires]

    def alltoall(self, payloads):
        """Send ``payloads[j]`` to rank j; item j of the result is what rank
        j sent to this rank."""
        if not isinstance(payloads, (list, tuple)):
            raise TypeError(f"payloads: expected a list of {self.world_size} payloads, got {type(payloads).__name__}")
        if len(payloads) != self.world_size:
            raise ValueError(f"payloads: expected {self.world_size} payloads (one per rank), got {len(payloads)}")
        wires = [encode(_as_payload(p, f"payloads[{j}]")) for j, p in enumerate(payloads)]
        rows = self._gather_all("alltoall", wires)
        got = [row[self.rank] for row in rows]
        sent = sum(len(w) for j, w in enumerate(wires) if j != self.rank)
        received = sum(len(w) for j, w in enumerate(got) if j != self.rank)
        self._count("alltoall", sent, received)
        return [decode(w) for w in got]

    def broadcast(self, payload=None, root=0):
        """The root's payload on every rank (other ranks' ``payload`` is ignored)."""
        root = check_int(root, "root", 0, self.world_size - 1)
        wire = encode(_as_payload(payload)) if self.rank == root else None
        items = self._gather_all("broadcast", (root, wire))
        roots = [r for r, _ in items]
        if len(set(roots)) != 1:
            raise ValueError(f"root: ranks disagree on the broadcast root: {roots}")
        wire = items[root][1]
        if self.rank == root:
            self._count("broadcast", len(wire) * (self.world_size - 1), 0)
        else:
            self._count("broadcast", 0, len(wire))
        return decode(wire)

    def compressed_allreduce(self, array, compressor, worker_error=None, server_error=None):
        """The mean of every rank's array through DeepSpeed's two-phase
        compressed allreduce (module doc).  ``worker_error`` (the array's
        size) and ``server_error`` (this rank's chunk size) are updated in
        place; None runs that phase without error feedback."""
        from .compressors import from_spec
        compressor = from_spec(compressor)
        x = as_float_array(array, "array").reshape(-1)
        n, W = x.size, self.world_size
        bounds = chunk_bounds(n, W)
        lo, hi = bounds[self.rank], bounds[self.rank + 1]
        worker_error = from_torch(worker_error, "worker_error")
        server_error = from_torch(server_error, "server_error")
        _check_error(worker_error, "worker_error", n, x.dtype)
        _check_error(server_error, "server_error", hi - lo, x.dtype)
        z = x + worker_error.reshape(-1) if worker_error is not None else x
        sent = [compressor.compress(z[bounds[j]:bounds[j + 1]]) for j in range(W)]
        if worker_error is not None:
            flat = worker_error.reshape(-1)
            for j, p in enumerate(sent):
                flat[bounds[j]:bounds[j + 1]] = z[bounds[j]:bounds[j + 1]] - decoded(p)
        mine = reduce_payloads(self.alltoall(sent), "mean").astype(x.dtype, copy=False)
        if server_error is not None:
            mine = mine + server_error.reshape(-1)
        reply = compressor.compress(mine)
        if server_error is not None:
            server_error.reshape(-1)[:] = mine - decoded(reply)
        parts = [decoded(p).astype(x.dtype, copy=False) for p in self.allgather(reply)]
        return np.concatenate(parts).reshape(np.shape(array))


def deepspeed_padded_size(n, world_size):
    """DeepSpeed's 1-bit Adam buffer size: n rounded up to a multiple of
    W * lcm(W, 8), so that each rank's chunk packs into whole bytes."""
    n = check_int(n, "n", 0)
    world_size = check_int(world_size, "world_size", 1)
    unit = world_size * (world_size * 8 // math.gcd(world_size, 8))
    return -(-n // unit) * unit


def deepspeed_compressed_allreduce(comm, array, worker_error, server_error):
    """DeepSpeed's ``compressed_allreduce`` (deepspeed/runtime/comm/nccl.py)
    over a lowband communicator: the mean of every rank's array.

    The array is zero-padded to ``worker_error.size`` (``deepspeed_padded_size``);
    z = padded + worker_error; ONE scale s = ||z||_2 / sqrt(N) over the
    whole padded buffer; worker_error = z - s*sign(z) (sign(0) = +1); chunk j
    of the signs (N/W elements) goes to rank j (alltoall of Sign payloads
    carrying s).  Rank j: c = sum_i (+-s_i) * (1/W) (rank order) +
    server_error; s' = ||c|| / sqrt(N/W); server_error = c - s'*sign(c);
    its signs and s' are allgathered; the result is the decoded buffer
    without the padding.  Both errors are updated in place."""
    from ._payload import Quantized
    from .quantize import sign
    x = as_float_array(array, "array").reshape(-1)
    n, W = x.size, comm.world_size
    worker_error = from_torch(worker_error, "worker_error")
    server_error = from_torch(server_error, "server_error")
    N = deepspeed_padded_size(n, W)
    _check_error(worker_error, "worker_error", N, x.dtype)
    _check_error(server_error, "server_error", N // W, x.dtype)
    f, C = x.dtype.type, N // W

    def signs(v, scale):
        codes = sign(v, scale="none").arrays["codes"]
        return Quantized("sign", (v.size,), v.dtype, {"scale": 2, "block": 0},
                         {"codes": codes, "scales": np.array([scale], np.float32)})

    z = np.zeros(N, x.dtype)
    z[:n] = x
    z += worker_error.reshape(-1)
    s = np.float32(np.sqrt(np.dot(z, z)) / math.sqrt(N)) if N else np.float32(0)
    whole = signs(z, s)
    worker_error.reshape(-1)[:] = z - decoded(whole)
    codes = whole.arrays["codes"]
    sent = [Quantized("sign", (C,), x.dtype, {"scale": 2, "block": 0},
                      {"codes": codes[j * C // 8:(j + 1) * C // 8], "scales": whole.arrays["scales"]})
            for j in range(W)]
    c = np.zeros(C, x.dtype)
    inv = f(1.0 / W)
    for p in comm.alltoall(sent):
        c += decoded(p).astype(x.dtype, copy=False) * inv
    c += server_error.reshape(-1)
    s2 = np.float32(np.sqrt(np.dot(c, c)) / math.sqrt(C)) if C else np.float32(0)
    reply = signs(c, s2)
    server_error.reshape(-1)[:] = c - decoded(reply)
    parts = [decoded(p).astype(x.dtype, copy=False) for p in comm.allgather(reply)]
    return np.concatenate(parts)[:n].reshape(np.shape(array))


def _check_error(err, name, size, dtype):
    if err is None:
        return
    if not isinstance(err, np.ndarray):
        raise TypeError(f"{name}: expected an ndarray or None, got {type(err).__name__}")
    if err.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the array's), got {err.dtype}")
    if err.size != size:
        raise ValueError(f"{name}: expected {size} elements, got {err.size}")
    if not (err.flags.c_contiguous and err.flags.writeable):
        raise ValueError(f"{name}: expected a writeable C-contiguous array (it is updated in place)")


# --------------------------------------------------------------------------
# The in-process cluster
# --------------------------------------------------------------------------

class _Aborted(Exception):
    """A rank stopped because another rank failed first."""


class _Rendezvous:
    """Barrier-synchronised exchange between the W worker threads.

    Each collective deposits one item per rank in a slot table and waits on
    a barrier; after it every rank reads all slots.  Two slot tables are
    used alternately, so a rank cannot overwrite a table another rank may
    still be reading (that would need it to pass the next barrier first).
    """

    def __init__(self, world_size, timeout):
        self.world_size = world_size
        self.timeout = timeout
        self.barrier = threading.Barrier(world_size)
        self.tables = [[None] * world_size, [None] * world_size]
        self.calls = [0] * world_size
        self.failed = False

    def abort(self):
        self.failed = True
        self.barrier.abort()

    def exchange(self, rank, name, item):
        seq = self.calls[rank]
        self.calls[rank] += 1
        table = self.tables[seq % 2]
        table[rank] = (name, seq, item)
        try:
            self.barrier.wait(self.timeout)
        except threading.BrokenBarrierError:
            if self.failed:
                raise _Aborted() from None
            self.failed = True
            raise TimeoutError(f"rank {rank}: {name} (collective #{seq}) timed out after "
                               f"{self.timeout} s waiting for the other ranks") from None
        entries = list(table)
        for r, (other, other_seq, _) in enumerate(entries):
            if other != name or other_seq != seq:
                calls = ", ".join(f"rank {j}: {e[0]} #{e[1]}" for j, e in enumerate(entries))
                raise RuntimeError(f"mismatched collectives ({calls}); every rank must call the "
                                   "same collectives in the same order")
        return [item for _, _, item in entries]


class _SimCommunicator(Communicator):
    """Rank ``rank`` of a running ``Cluster``."""

    def __init__(self, cluster, rank, rendezvous):
        super().__init__()
        self.rank = rank
        self.world_size = cluster.world_size
        self._cluster = cluster
        self._rv = rendezvous

    def _gather_all(self, name, item):
        return self._rv.exchange(self.rank, name, item)

    def _allreduce_raw(self, array, op):
        items = self._gather_all("allreduce", (op, array.copy()))
        first_op, first = items[0]
        for j, (other_op, a) in enumerate(items):
            if other_op != op or a.shape != first.shape or a.dtype != first.dtype:
                raise ValueError(f"array: rank {j} passed op={other_op!r}, {a.dtype} of shape {a.shape}; "
                                 f"rank 0 passed op={first_op!r}, {first.dtype} of shape {first.shape}")
        total = first.copy()
        for _, a in items[1:]:
            total += a
        if op == "mean":
            total /= self.world_size
        return total

    def barrier(self):
        self._gather_all("barrier", None)

    def _count(self, collective, sent, received):
        super()._count(collective, sent, received)
        self._cluster._count(self.rank, collective, sent, received)


class Cluster:
    """W workers in one process, one Python thread per rank.

    ``run(fn, *args, **kwargs)`` calls ``fn(comm, *args, **kwargs)`` on every
    rank at once (``comm`` is that rank's ``Communicator``) and returns the
    W results in rank order.  Collectives synchronise the threads; an
    exception in any worker aborts the others and is re-raised here (the
    lowest failing rank's, with a note naming the rank); a collective that
    waits more than ``timeout`` seconds raises TimeoutError instead of
    hanging (``timeout=None`` waits for ever: for ranks that compute for
    minutes between collectives).  Every rank must call the same collectives in the same order
    (a mismatch, including one rank returning while another still calls a
    collective, raises RuntimeError).

    Counters (numpy int64 arrays indexed by rank, kept across runs until
    ``reset_counters()``): ``bytes_sent``, ``bytes_received``, and
    ``by_collective[name]["sent" | "received"]`` for each name in
    ``COLLECTIVES``.  The accounting rules are in the module doc.
    """

    def __init__(self, world_size, *, timeout=120.0):
        self.world_size = check_int(world_size, "world_size", 1, 4096)
        self.timeout = None if timeout is None else check_finite_number(timeout, "timeout", 0.0, lo_open=True)
        self._lock = threading.Lock()
        self.reset_counters()

    def reset_counters(self):
        """Zero every byte counter."""
        W = self.world_size
        self.bytes_sent = np.zeros(W, dtype=np.int64)
        self.bytes_received = np.zeros(W, dtype=np.int64)
        self.by_collective = {c: {"sent": np.zeros(W, dtype=np.int64),
                                  "received": np.zeros(W, dtype=np.int64)} for c in COLLECTIVES}

    def _count(self, rank, collective, sent, received):
        # each rank writes only its own entries
        self.bytes_sent[rank] += sent
        self.bytes_received[rank] += received
        self.by_collective[collective]["sent"][rank] += sent
        self.by_collective[collective]["received"][rank] += received

    def run(self, fn, *args, **kwargs):
        """``[fn(comm_0, ...), ..., fn(comm_{W-1}, ...)]``, run concurrently."""
        if not callable(fn):
            raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("Cluster.run: this cluster is already running (runs cannot nest)")
        try:
            return self._run(fn, args, kwargs)
        finally:
            self._lock.release()

    def _run(self, fn, args, kwargs):
        W = self.world_size
        rv = _Rendezvous(W, self.timeout)
        results = [None] * W
        errors = [None] * W

        def worker(rank):
            comm = _SimCommunicator(self, rank, rv)
            try:
                results[rank] = fn(comm, *args, **kwargs)
                rv.exchange(rank, "return from fn", None)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                errors[rank] = exc
                if not isinstance(exc, _Aborted):
                    rv.abort()

        threads = [threading.Thread(target=worker, args=(r,), name=f"lowband-rank-{r}", daemon=True)
                   for r in range(W)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        real = [(r, e) for r, e in enumerate(errors) if e is not None and not isinstance(e, _Aborted)]
        if real:
            rank, exc = real[0]
            if hasattr(exc, "add_note"):
                exc.add_note(f"(raised in rank {rank} of lowband.sim.Cluster({W}))")
            raise exc
        return results

    def __repr__(self):
        return f"Cluster(world_size={self.world_size})"


# --------------------------------------------------------------------------
# torch.distributed
# --------------------------------------------------------------------------

def TorchCommunicator(group=None):
    """Deprecated alias of ``lowband.torch.ProcessGroupCommunicator(group)``
    (real collectives, no pickling; imported only when called, so that
    ``lowband.sim`` never imports torch)."""
    import warnings
    warnings.warn("lowband.sim.TorchCommunicator is deprecated; use "
                  "lowband.torch.ProcessGroupCommunicator", DeprecationWarning, stacklevel=2)
    from .torch.comm import ProcessGroupCommunicator
    return ProcessGroupCommunicator(group)
