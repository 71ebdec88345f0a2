"""lowband's ``Communicator`` over a torch.distributed process group.

``ProcessGroupCommunicator(group=None, deterministic=False)`` gives one rank
the interface of ``lowband.sim`` (``allreduce``, ``allgather``,
``alltoall``, ``broadcast``, ``barrier``, ``compressed_allreduce``), so the
NumPy optimizers of ``lowband.optim`` run unchanged on real processes, and
adds what DDP hooks need: tensors in and out, batched forms that move the
payloads of many tensors in one collective, and asynchronous forms that
return ``torch.futures.Future`` objects.

How each collective crosses torch (no pickling anywhere):

``allreduce``            ``dist.all_reduce`` on a zero-copy tensor view of
                         the array (SUM; "mean" divides afterwards).  With
                         ``deterministic=True`` the sum is added in rank
                         order, as ``lowband.sim`` does, and still moves O(n)
                         per rank: the buffer is padded to W equal chunks,
                         ``all_to_all_single`` hands chunk j of every rank to
                         rank j, which adds them in rank order, and
                         ``all_gather_single`` returns the summed chunks.
``allgather``            the ``lowband.encode`` bytes, encoded straight into
                         one padded uint8 row per rank that starts with the
                         int64 sizes; the rows are exchanged by one
                         ``all_gather_single`` (``all_gather_into_tensor`` on
                         torch < 2.6), or, on two ranks, by one
                         ``all_to_all_single`` that swaps them in place.  The
                         row width of the previous call with the same key is
                         reused; when a message does not fit, every rank
                         sees it in the sizes and all send again at the
                         known width (so the first call costs two).
``alltoall``             an ``all_to_all_single`` of the int64 sizes, then
                         one uint8 ``all_to_all_single`` with uneven splits.
``broadcast``            the size, then the bytes (``dist.broadcast``).
``compressed_allreduce`` DeepSpeed's two-phase compressed allreduce (worker
                         and server error, exactly ``lowband.sim``'s
                         arithmetic) on ``alltoall`` and ``allgather``.

Byte counters: ``bytes_sent`` adds the size of every tensor this rank hands
to torch as an input, ``bytes_received`` of every tensor torch fills for it
(``all_reduce``: the buffer, both ways; ``all_gather_single``: the input
sent, the W-times larger output received; ``all_to_all_single``: input and
output; ``broadcast``: sent by the root, received by the others); padding
and the int64 size messages included.  ``calls`` counts the torch
collectives.  A one-rank group calls no collective and counts nothing.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .._validate import as_float_array, check_choice, check_int
from .. import _core
from .._fused import _TABLE_QUANTIZERS
from .._payload import Dense, Quantized, Sparse, get_scheme
from .._validate import FLOAT_DTYPES
from ..compressors import from_spec
from ..sim import (Communicator, _as_payload, _check_error, _reduce_array, chunk_bounds, decoded,
                   reduce_payloads)
from ..wire import decode, encode, encode_into
from ._interop import as_numpy, as_tensor

__all__ = ["ProcessGroupCommunicator"]

_REDUCE_OPS = ("sum", "mean")


def _gather_fn():
    # all_gather_into_tensor was renamed all_gather_single in torch 2.6+
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _residual_step(comp, e, g):
    """e <- e + g; payload = C(e); e <- e - D(payload); returns the payload
    (the two-phase allreduce's worker and server steps, exactly
    ``lowband.sim``'s arithmetic).  The table quantizers (sign, blockwise,
    ...) run it as lowband's fused error-feedback pass in C, which gives
    the same bytes without temporaries."""
    if type(comp) in _TABLE_QUANTIZERS and e.dtype in FLOAT_DTYPES and e.dtype == g.dtype:
        _core.ef_axpby(e, g, 1.0, 1.0, True, comp.threads)
        p = comp.compress(e)
        get_scheme(p.scheme).residual(p, e, comp.threads)
        return p
    e += g
    p = comp.compress(e)
    e -= decoded(p).astype(e.dtype, copy=False)
    return p


def _done(value):
    fut = torch.futures.Future()
    fut.set_result(value)
    return fut


def _nbytes(t):
    return t.numel() * t.element_size()


def _pad8(n):
    return (n + 7) & ~7


def _pad64(n):
    return (n + 63) & ~63


def _blob_bytes(x):
    """Bytes-like item of a gather: itself, or a payload's wire bytes."""
    return encode(x) if isinstance(x, (Sparse, Quantized, Dense)) else x


def _write(dst, pos, n, x):
    """dst[pos:pos+n] <- item x (bytes-like, or a payload encoded in place)."""
    if isinstance(x, (Sparse, Quantized, Dense)):
        encode_into(x, dst, pos)
    else:
        dst[pos:pos + n] = np.frombuffer(x, dtype=np.uint8)


class ProcessGroupCommunicator(Communicator):
    """One rank's lowband collectives over ``group`` (None: the default
    group) of an initialised torch.distributed; see the module doc.  Works
    on gloo with CPU tensors and on any backend whose collectives take the
    tensors' device."""

    def __init__(self, group: Optional[Any] = None, deterministic: bool = False) -> None:
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ProcessGroupCommunicator: torch.distributed is not initialised "
                               "(call torch.distributed.init_process_group first)")
        self.group = group
        self.deterministic = bool(deterministic)
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.calls = 0
        self._scratch: dict = {}
        self._widths: dict = {}

    def _buffer(self, name, n, reuse):
        """n bytes of uint8: fresh, or (``reuse``) from a buffer kept between
        calls (no page faults for repeated large messages)."""
        if not reuse:
            return np.empty(n, dtype=np.uint8)
        buf = self._scratch.get(name)
        if buf is None or buf.size < n:
            buf = self._scratch[name] = np.empty(max(n, int(1.25 * (0 if buf is None else buf.size))), np.uint8)
        return buf[:n]

    def __repr__(self):
        return (f"ProcessGroupCommunicator(rank={self.rank}, world_size={self.world_size}, "
                f"deterministic={self.deterministic})")

    # -- the torch calls (every byte counted here) ---------------------------
    def _tally(self, sent, received):
        self.bytes_sent += sent
        self.bytes_received += received
        self.calls += 1

    def _all_reduce(self, t):
        self._tally(_nbytes(t), _nbytes(t))
        return dist.all_reduce(t, group=self.group, async_op=True).get_future()

    def _all_gather(self, out, inp):
        self._tally(_nbytes(inp), _nbytes(out))
        return _gather_fn()(out, inp, group=self.group, async_op=True).get_future()

    def _all_to_all(self, out, inp, out_splits=None, in_splits=None):
        self._tally(_nbytes(inp), _nbytes(out))
        return dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group,
                                      async_op=True).get_future()

    def _broadcast(self, t, root):
        if self.rank == root:
            self._tally(_nbytes(t), 0)
        else:
            self._tally(0, _nbytes(t))
        src = root if self.group is None else dist.get_global_rank(self.group, root)
        return dist.broadcast(t, src, group=self.group, async_op=True).get_future()

    # -- running a protocol synchronously or as a future ---------------------
    def _run(self, gen, async_op):
        """Drive a protocol generator: it yields the futures of the torch
        collectives it launched and returns its result.  Synchronously, or
        (``async_op``) as a Future whose callbacks launch each next step as
        soon as the previous collective completes."""
        if not async_op:
            try:
                fut = next(gen)
                while True:
                    fut.wait()
                    fut = gen.send(None)
            except StopIteration as stop:
                return stop.value
        result = torch.futures.Future()

        def advance(prev):
            try:
                if prev is not None:
                    prev.wait()      # re-raises a failed collective
                    fut = gen.send(None)
                else:
                    fut = next(gen)
            except StopIteration as stop:
                result.set_result(stop.value)
                return
            except BaseException as exc:  # noqa: BLE001 - handed to the future
                result.set_exception(exc)
                return
            fut.then(advance)

        advance(None)
        return result

    # -- allreduce -------------------------------------------------------------
    def allreduce(self, array: Any, op: str = "sum", *, out: Any = None) -> Any:
        """The sum (or mean) of every rank's array, as a new array (or in
        ``out``, which may be ``array`` itself).  Takes an ndarray or a
        tensor (any device) and returns the same kind."""
        return self._run(self._allreduce(array, op, out), False)

    def allreduce_async(self, array: Any, op: str = "sum", *, out: Any = None) -> torch.futures.Future:
        """``allreduce`` as a torch Future resolving to the result."""
        return self._run(self._allreduce(array, op, out), True)

    def _allreduce(self, array, op, out):
        check_choice(op, "op", _REDUCE_OPS)
        if isinstance(array, torch.Tensor):
            if not array.is_floating_point() and op == "mean":
                raise TypeError(f"array: op='mean' needs a float tensor, got {array.dtype}")
            src = array.detach()
            if out is None:
                res = src.clone(memory_format=torch.contiguous_format)
            else:
                if not isinstance(out, torch.Tensor) or out.shape != src.shape or out.dtype != src.dtype:
                    raise ValueError(f"out: expected a tensor of shape {tuple(src.shape)} and dtype "
                                     f"{src.dtype}, got {getattr(out, 'dtype', type(out).__name__)}")
                if not out.is_contiguous():
                    raise ValueError("out: expected a contiguous tensor")
                if out.data_ptr() != src.data_ptr():
                    out.copy_(src)
                res = out
            flat = res.view(-1)
            result = res
        else:
            arr = _reduce_array(array)
            if op == "mean" and arr.dtype.kind != "f":
                raise TypeError(f"array: op='mean' needs a float array, got dtype {arr.dtype}")
            if out is None:
                res = arr.copy()
            else:
                if not isinstance(out, np.ndarray) or out.shape != arr.shape or out.dtype != arr.dtype:
                    raise ValueError(f"out: expected an array of shape {arr.shape} and dtype {arr.dtype}")
                if not (out.flags.c_contiguous and out.flags.writeable):
                    raise ValueError("out: expected a writeable C-contiguous array")
                if not np.shares_memory(out, arr):
                    out[...] = arr
                res = out
            flat = as_tensor(res.reshape(-1))
            result = res
        W = self.world_size
        if W > 1 and flat.numel() > 0:
            if self.deterministic:
                yield from self._ordered_sum(flat)
            else:
                yield self._all_reduce(flat)
        if op == "mean" and W > 1:
            flat.div_(W)
        return result

    def _ordered_sum(self, flat):
        """flat <- the sum of every rank's flat, added in rank order."""
        W, n = self.world_size, flat.numel()
        c = -(-n // W)
        send = flat.new_zeros(W * c)
        send[:n] = flat
        recv = torch.empty_like(send)
        yield self._all_to_all(recv, send)
        rows = recv.view(W, c)
        acc = rows[0].clone()
        for r in range(1, W):
            acc += rows[r]
        gathered = torch.empty_like(send)
        yield self._all_gather(gathered, acc)
        flat.copy_(gathered[:n])

    # -- bytes: the batched transports -----------------------------------------
    def allgather_bytes(self, blobs: Sequence[Any], *, reuse: bool = False,
                        key: Any = None) -> List[List[memoryview]]:
        """Every rank's list of byte strings (same count on every rank), in
        rank order: ``result[r][t]`` is rank r's ``blobs[t]`` (a memoryview
        of a fresh receive buffer).  One padded uint8 gather when the padded width of an
        earlier call with the same ``key`` and count still fits every rank,
        two otherwise (see ``allgather_encoded``).  ``reuse=True``: the
        views are read-only and point into a buffer that the next call
        overwrites (for callers that decode at once)."""
        items = [memoryview(b).cast("B") for b in blobs]
        return self._run(self._gather_items([(b.nbytes, b) for b in items], reuse=reuse, key=key), False)

    def allgather_encoded(self, payloads: Sequence[Any], *, reuse: bool = False,
                          key: Any = None) -> List[List[memoryview]]:
        """``allgather_bytes`` of the payloads' wire bytes, each encoded
        straight into the send buffer (``lowband.wire.encode_into``: no
        intermediate bytes).  The message of each rank is ``T`` int64 sizes,
        then the blobs, each at an 8-byte-aligned offset, padded to a width
        common to all ranks.  The width comes from the previous call with
        the same ``key`` (and payload count): when every rank's message
        fits (each rank sees every rank's sizes), that one gather is all;
        otherwise every rank sees the same shortfall and all re-send at the
        now known width.  So a steady stream of similar sizes costs one
        collective per call, and the first call two (sizes, then bytes)."""
        items = [(p.nbytes, p) for p in (_as_payload(p, f"payloads[{t}]") for t, p in enumerate(payloads))]
        return self._run(self._gather_items(items, reuse=reuse, key=key), False)

    def _recv(self, width, reuse):
        """The W-row receive buffer (uint8): a grow-only buffer kept between
        calls, or (not ``reuse``) a fresh one that the caller may keep,
        taken from lowband's output pool, whose pages stay mapped from one
        call to the next (no page faults while gloo fills it)."""
        n = self.world_size * width
        return self._tensor("gather-recv", n) if reuse else torch.from_numpy(_core.empty((n,), np.uint8))

    def _exchange(self, out, row, width):
        """Every rank's ``row`` into row r of ``out`` (W x width).  Two ranks
        swap rows with one ``all_to_all_single`` whose input is this rank's
        row of ``out`` itself (no copy; on gloo it takes about half the time
        of ``all_gather_single`` of the same bytes); more ranks gather."""
        if self.world_size == 2:
            r = self.rank
            splits = [0, width] if r == 0 else [width, 0]
            return self._all_to_all(out[(1 - r) * width:(2 - r) * width], row, splits, splits)
        return self._all_gather(out, row)

    def _tensor(self, name, n):
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < n:
            grown = max(n, int(1.25 * (0 if buf is None else buf.numel())))
            buf = self._scratch[name] = torch.empty(grown, dtype=torch.uint8)
        return buf[:n]

    def _gather_items(self, items, table=None, reuse=False, key=None):
        """The protocol behind ``allgather_bytes`` / ``allgather_encoded``:
        ``items`` are (size, bytes-like or payload).  ``table`` (W x T
        sizes), when every rank can compute it, fixes the width up front."""
        W, T = self.world_size, len(items)
        if W == 1:
            return [[memoryview(_blob_bytes(x)).toreadonly() for _, x in items]]
        if T == 0:
            return [[] for _ in range(W)]
        head = 8 * T
        mine = [int(n) for n, _ in items]
        need = head + sum(_pad8(n) for n in mine)
        if table is not None:
            table = np.asarray(table, dtype=np.int64).reshape(W, T)
            width = _pad64(max(head + sum(_pad8(int(n)) for n in row) for row in table))
        else:
            width = self._widths.get((key, T), head)
        while True:
            out = self._recv(width, reuse)
            # two ranks: the message is built in place in this rank's row of
            # the receive buffer; more: in a send buffer
            row = out[self.rank * width:(self.rank + 1) * width] if W == 2 else self._tensor("gather-send", width)
            s = row.numpy()
            s[:head].view(np.int64)[:] = mine
            if need <= width:
                pos = head
                for n, x in items:
                    _write(s, pos, n, x)
                    pos += n
                    s[pos:_pad8(pos)] = 0
                    pos = _pad8(pos)
                s[pos:] = 0
            else:
                s[head:] = 0     # this rank's message does not fit: sizes only
            yield self._exchange(out, row, width)
            rows = out.numpy().reshape(W, width)
            sizes = rows[:, :head].copy().view(np.int64).reshape(W, T)
            if (sizes < 0).any():
                raise RuntimeError(f"allgather: a rank sent a negative size: {sizes.tolist()}")
            needs = [head + sum(_pad8(int(n)) for n in row) for row in sizes]
            if table is not None and not np.array_equal(sizes, table):
                raise RuntimeError(f"allgather: the sizes sent {sizes.tolist()} differ from the "
                                   f"size table {table.tolist()}")
            if max(needs) <= width:
                break
            width = _pad64(max(needs))   # every rank sees the same headers
        if table is None:
            # keep the width while it fits; shrink it when messages halve
            top = _pad64(max(needs))
            self._widths[(key, T)] = top if top > width or 2 * top < width else width
        view = memoryview(out.numpy())
        if reuse:
            view = view.toreadonly()
        result = []
        for r in range(W):
            pos, row = r * width + head, []
            for n in sizes[r]:
                n = int(n)
                row.append(view[pos:pos + n])
                pos = _pad8(pos + n)
            result.append(row)
        return result

    def alltoall_bytes(self, blobs: Sequence[Sequence[Any]], *, reuse: bool = False) -> List[List[memoryview]]:
        """``blobs[j]`` (a list of T byte strings, T the same for every j
        and rank) goes to rank j; ``result[i][t]`` is what rank i sent this
        rank as its t-th blob.  Two collectives: the sizes, then one uint8
        ``all_to_all_single`` with uneven splits.  ``reuse`` as in
        ``allgather_bytes``."""
        return self._run(self._alltoall_bytes(blobs, reuse=reuse), False)

    def _alltoall_bytes(self, blobs, table=None, reuse=False):
        """``table[i][t]``: the size of what rank i sends here as blob t, when
        every rank can compute it (saves the size exchange)."""
        W = self.world_size
        if not isinstance(blobs, (list, tuple)) or len(blobs) != W:
            raise ValueError(f"blobs: expected {W} lists (one per rank), got {len(blobs)}")
        rows = [[memoryview(b).cast("B") for b in row] for row in blobs]
        T = len(rows[0])
        if any(len(row) != T for row in rows):
            raise ValueError(f"blobs: every destination needs the same number of blobs, got "
                             f"{[len(row) for row in rows]}")
        if W == 1 or T == 0:
            return rows if W == 1 else [[] for _ in range(W)]
        mine = np.array([[len(b) for b in row] for row in rows], dtype=np.int64)
        if table is None:
            sizes = torch.from_numpy(mine.reshape(-1).copy())
            got_sizes = torch.empty_like(sizes)
            yield self._all_to_all(got_sizes, sizes)
            table = got_sizes.view(W, T).numpy()
        table = np.asarray(table, dtype=np.int64).reshape(W, T)
        in_splits = [int(s) for s in mine.sum(axis=1)]
        out_splits = [int(s) for s in table.sum(axis=1)]
        send = self._buffer("a2a-send", sum(in_splits), reuse)
        pos = 0
        for row in rows:
            for b in row:
                send[pos:pos + len(b)] = np.frombuffer(b, dtype=np.uint8)
                pos += len(b)
        out = self._buffer("a2a-recv", sum(out_splits), reuse)
        yield self._all_to_all(torch.from_numpy(out), torch.from_numpy(send), out_splits, in_splits)
        view = memoryview(out).toreadonly()
        result, pos = [], 0
        for i in range(W):
            row = []
            for s in table[i]:
                row.append(view[pos:pos + int(s)])
                pos += int(s)
            result.append(row)
        return result

    # -- payload collectives (the Communicator interface) -----------------------
    def allgather(self, payload: Any) -> list:
        """Every rank's payload (decoded copies), in rank order."""
        return [row[0] for row in self.allgather_many([payload])]

    def allgather_async(self, payload: Any) -> torch.futures.Future:
        """``allgather`` as a Future resolving to the list of payloads."""
        p = _as_payload(payload)
        return self._run(self._gather_items([(p.nbytes, p)]), True).then(
            lambda f: [decode(row[0], copy=False) for row in f.value()])

    def allgather_many(self, payloads: Sequence[Any]) -> List[list]:
        """``result[r][t]``: rank r's ``payloads[t]``; every rank passes the
        same number of payloads; one size exchange and one byte gather for
        all of them."""
        # a fresh receive buffer, decoded without copies: the payloads'
        # arrays are views of it (each its own bytes) and keep it alive
        return [[decode(b, copy=False) for b in row] for row in self.allgather_encoded(payloads)]

    def alltoall(self, payloads: Sequence[Any]) -> list:
        """Send ``payloads[j]`` to rank j; item j of the result is what rank
        j sent to this rank."""
        self._check_alltoall(payloads)
        wires = [[encode(_as_payload(p, f"payloads[{j}]"))] for j, p in enumerate(payloads)]
        return [decode(row[0]) for row in self.alltoall_bytes(wires, reuse=True)]

    def alltoall_async(self, payloads: Sequence[Any]) -> torch.futures.Future:
        """``alltoall`` as a Future resolving to the list of payloads."""
        self._check_alltoall(payloads)
        wires = [[encode(_as_payload(p, f"payloads[{j}]"))] for j, p in enumerate(payloads)]
        return self._run(self._alltoall_bytes(wires), True).then(
            lambda f: [decode(row[0]) for row in f.value()])

    def _check_alltoall(self, payloads):
        if not isinstance(payloads, (list, tuple)):
            raise TypeError(f"payloads: expected a list of {self.world_size} payloads, got {type(payloads).__name__}")
        if len(payloads) != self.world_size:
            raise ValueError(f"payloads: expected {self.world_size} payloads (one per rank), got {len(payloads)}")

    def broadcast(self, payload: Any = None, root: int = 0) -> Any:
        """The root's payload on every rank (other ranks' ``payload`` is ignored)."""
        return self._run(self._broadcast_payload(payload, root), False)

    def broadcast_async(self, payload: Any = None, root: int = 0) -> torch.futures.Future:
        """``broadcast`` as a Future resolving to the payload."""
        return self._run(self._broadcast_payload(payload, root), True)

    def _broadcast_payload(self, payload, root):
        root = check_int(root, "root", 0, self.world_size - 1)
        wire = encode(_as_payload(payload)) if self.rank == root else None
        if self.world_size == 1:
            return decode(wire)
        size = torch.tensor([len(wire) if wire is not None else 0], dtype=torch.int64)
        yield self._broadcast(size, root)
        buf = np.empty(int(size[0]), dtype=np.uint8)
        if wire is not None:
            buf[:] = np.frombuffer(wire, dtype=np.uint8)
        yield self._broadcast(torch.from_numpy(buf), root)
        return decode(buf)

    def barrier(self) -> None:
        """Wait until every rank reaches the barrier."""
        if self.world_size > 1:
            dist.barrier(group=self.group)

    # -- the two-phase compressed allreduce -------------------------------------
    def compressed_allreduce(self, array: Any, compressor: Any, worker_error: Optional[np.ndarray] = None,
                             server_error: Optional[np.ndarray] = None) -> np.ndarray:
        """The mean of every rank's array through DeepSpeed's two-phase
        compressed allreduce, with ``lowband.sim``'s arithmetic (see its
        module doc); ``worker_error`` / ``server_error`` are updated in place."""
        out = self.compressed_allreduce_many([array], [compressor], [worker_error], [server_error])[0]
        return out.reshape(np.shape(array))

    def compressed_allreduce_many(self, arrays: Sequence[Any], compressors: Sequence[Any],
                                  worker_errors: Optional[Sequence[Optional[np.ndarray]]] = None,
                                  server_errors: Optional[Sequence[Optional[np.ndarray]]] = None,
                                  outs: Optional[Sequence[Optional[np.ndarray]]] = None) -> List[np.ndarray]:
        """``compressed_allreduce`` of several arrays at once: each array is
        chunked and compressed on its own (results identical to one call
        per array), but all chunks bound for one rank travel as one message
        (two ``alltoall_bytes`` / ``allgather_bytes`` exchanges in all).
        ``outs[t]`` (optional) receives array t's flat result."""
        T = len(arrays)
        worker_errors = [None] * T if worker_errors is None else list(worker_errors)
        server_errors = [None] * T if server_errors is None else list(server_errors)
        if len(compressors) != T or len(worker_errors) != T or len(server_errors) != T:
            raise ValueError(f"compressors, worker_errors, server_errors: expected {T} each (one per array)")
        W, rank = self.world_size, self.rank
        comps, flats, bounds = [], [], []
        to_rank: List[List[bytes]] = [[] for _ in range(W)]
        fixed = True
        for t in range(T):
            comp = from_spec(compressors[t])
            x = as_float_array(arrays[t], f"arrays[{t}]").reshape(-1)
            b = chunk_bounds(x.size, W)
            _check_error(worker_errors[t], f"worker_errors[{t}]", x.size, x.dtype)
            _check_error(server_errors[t], f"server_errors[{t}]", b[rank + 1] - b[rank], x.dtype)
            we = worker_errors[t]
            for j in range(W):
                if we is not None:
                    p = _residual_step(comp, we.reshape(-1)[b[j]:b[j + 1]], x[b[j]:b[j + 1]])
                else:
                    p = comp.compress(x[b[j]:b[j + 1]])
                fixed = fixed and isinstance(p, (Quantized, Dense))
                to_rank[j].append(encode(p))
            comps.append(comp)
            flats.append(x)
            bounds.append(b)
        # Quantized and Dense payloads have a size fixed by compressor, shape and
        # dtype: what rank i sends here for chunk `rank` has the size of this
        # rank's own chunk-`rank` message, and rank i's reply in phase 2 the
        # size of chunk i's message, so neither phase exchanges sizes
        got = self._run(self._alltoall_bytes(to_rank, [[len(b) for b in to_rank[self.rank]]] * W
                                             if fixed else None, reuse=True), False)
        replies = []
        for t in range(T):
            x, b, comp, se = flats[t], bounds[t], comps[t], server_errors[t]
            shape = (b[rank + 1] - b[rank],)
            mine = reduce_payloads([decode(got[i][t], expect_shape=shape, copy=False) for i in range(W)],
                                   "mean").astype(x.dtype, copy=False)
            if se is not None:
                reply = _residual_step(comp, se.reshape(-1), mine)
            else:
                reply = comp.compress(mine)
            replies.append(encode(reply))
        table = [[len(b) for b in to_rank[i]] for i in range(W)] if fixed else None
        rows = self._run(self._gather_items([(len(b), b) for b in replies], table, reuse=True,
                                             key="two-phase"), False)
        results = []
        for t in range(T):
            x, b = flats[t], bounds[t]
            given = None if outs is None else outs[t]
            out = np.empty(x.size, dtype=x.dtype) if given is None else given.reshape(-1)
            for i in range(W):
                p = decode(rows[i][t], expect_shape=(b[i + 1] - b[i],), copy=False)
                out[b[i]:b[i + 1]] = decoded(p)
            results.append(out)
        return results

    # -- tensors -----------------------------------------------------------------
    @staticmethod
    def as_numpy(tensor: torch.Tensor, name: str = "tensor") -> np.ndarray:
        """A zero-copy NumPy view of a contiguous CPU tensor (bfloat16 as
        ``ml_dtypes.bfloat16`` through a uint16 view)."""
        return as_numpy(tensor, name)
