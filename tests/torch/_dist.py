"""Run a function on W gloo ranks in spawned processes, for the torch tests.

``spawn(fn, world_size, *args, timeout=..., **kwargs)`` starts W processes
(the "spawn" start method: no inherited OpenMP or torch state), each joins a
gloo group over 127.0.0.1 on a free port, runs ``fn(rank, world_size,
*args, **kwargs)`` with one thread, and sends back its (picklable) result.
It returns the W results in rank order, raises AssertionError carrying every
failing rank's traceback, and TimeoutError (after killing the ranks) when
they do not finish in ``timeout`` seconds.  ``fn`` must be importable (a
module-level function of a test module or of this one).

``CountingDist`` wraps the torch.distributed collectives of a rank and adds
up the bytes of the tensors handed to them (inputs sent, outputs received),
to check a communicator's own counters.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import shutil
import socket
import sys
import tempfile
import time
import traceback

TORCH_TIMEOUT = 60


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, folder, fn, args, kwargs):
    os.environ["OMP_NUM_THREADS"] = "1"
    path = os.path.join(folder, f"{rank}.pkl")
    try:
        import torch
        import torch.distributed as dist
        import lowband
        torch.set_num_threads(1)
        lowband.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=TORCH_TIMEOUT))
        try:
            result = fn(rank, world, *args, **kwargs)
        finally:
            dist.destroy_process_group()
        with open(path, "wb") as f:
            pickle.dump(("ok", result), f)
    except BaseException:  # noqa: BLE001 - reported to the parent
        with open(path, "wb") as f:
            pickle.dump(("error", traceback.format_exc()), f)
        sys.exit(1)


def spawn(fn, world_size=2, *args, timeout=120, **kwargs):
    """[fn(0, W, ...), ..., fn(W-1, W, ...)] from W gloo processes."""
    ctx = mp.get_context("spawn")
    folder = tempfile.mkdtemp(prefix="lowband-dist-")
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world_size, port, folder, fn, args, kwargs),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        if any(p.is_alive() for p in procs):
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
            raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in {timeout} s")
        results, errors = [], []
        for r, p in enumerate(procs):
            path = os.path.join(folder, f"{r}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {r}: exited with code {p.exitcode} and no result")
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "ok":
                results.append(value)
            else:
                errors.append(f"rank {r}:\n{value}")
        if errors:
            raise AssertionError("\n".join(errors))
        return results
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
        shutil.rmtree(folder, ignore_errors=True)


class CountingDist:
    """Wraps dist.all_reduce, all_gather_single / all_gather_into_tensor,
    all_to_all_single and broadcast of this process and counts the bytes of
    the tensors handed to them: ``sent`` (inputs; broadcast: on the root),
    ``received`` (outputs; broadcast: elsewhere), ``calls``.  Use as a
    context manager."""

    NAMES = ("all_reduce", "all_gather_single", "all_gather_into_tensor", "all_to_all_single",
             "broadcast")

    def __init__(self):
        import torch.distributed as dist
        self.dist = dist
        self.sent = self.received = self.calls = 0
        self.saved = {}

    @staticmethod
    def _n(t):
        return t.numel() * t.element_size()

    def _wrap(self, name, fn):
        dist = self.dist

        def wrapper(*args, **kwargs):
            self.calls += 1
            if name == "all_reduce":
                self.sent += self._n(args[0])
                self.received += self._n(args[0])
            elif name == "broadcast":
                t = args[0]
                src = args[1] if len(args) > 1 else kwargs.get("src")
                if src == dist.get_rank():
                    self.sent += self._n(t)
                else:
                    self.received += self._n(t)
            else:     # (output, input, ...)
                self.received += self._n(args[0])
                self.sent += self._n(args[1])
            return fn(*args, **kwargs)
        return wrapper

    def __enter__(self):
        for name in self.NAMES:
            if name == "all_gather_into_tensor" and hasattr(self.dist, "all_gather_single"):
                continue   # a deprecated alias that calls all_gather_single
            fn = getattr(self.dist, name, None)
            if fn is not None:
                self.saved[name] = fn
                setattr(self.dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.dist, name, fn)
        return False
