"""Where the workers of an experiment run.

``run_workers(config, fn, *args)`` calls ``fn(comm, *args)`` on
``config.workers`` ranks and returns ``(results, bytes_sent)``: the ranks'
return values and the bytes each rank sent, in rank order.

- ``sim``: ``lowband.sim.Cluster``, one thread per rank in this process.
- ``torch``: one spawned process per rank, a gloo process group on
  127.0.0.1 and ``lowband.torch.ProcessGroupCommunicator`` with
  ``deterministic=True`` (rank-ordered sums; payloads cross real process
  boundaries).  Its byte counters count every tensor handed to torch
  (padding and size messages included), so bytes differ from ``sim``'s
  payload accounting while the trained numbers agree.  ``fn`` and ``args`` must be picklable (module-level
  functions, plain data); each rank uses one thread.

The collectives add contributions in rank order on both engines, so a
deterministic algorithm gives the same numbers on either.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback

__all__ = ["run_workers"]


def run_workers(config, fn, *args, timeout=900.0):
    if config.engine == "sim":
        from ..sim import Cluster
        cluster = Cluster(config.workers, timeout=None)
        results = cluster.run(fn, *args)
        return results, [int(b) for b in cluster.bytes_sent]
    if config.engine == "torch":
        return _run_torch(config.workers, fn, args, timeout)
    raise ValueError(f"engine: expected 'sim' or 'torch', got {config.engine!r}")


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torch_rank(rank, world_size, port, fn, args, path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1, "blas")
    except ImportError:
        pass
    try:
        import torch
        import torch.distributed as dist
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size)
        try:
            from ..torch.comm import ProcessGroupCommunicator
            comm = ProcessGroupCommunicator(deterministic=True)
            out = fn(comm, *args)
            payload = ("ok", out, int(comm.bytes_sent))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        payload = ("error", traceback.format_exc(), 0)
    with open(path, "wb") as f:
        pickle.dump(payload, f)


def _run_torch(world_size, fn, args, timeout):
    try:
        import torch.multiprocessing  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("engine 'torch' needs PyTorch (pip install 'lowband[torch]')") from exc
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="lowband-exp-") as tmp:
        paths = [os.path.join(tmp, f"rank{r}.pkl") for r in range(world_size)]
        procs = [ctx.Process(target=_torch_rank, args=(r, world_size, port, fn, args, paths[r]), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
                raise TimeoutError(f"engine 'torch': a rank ran past {timeout} s")
        results, sent = [], []
        for r, path in enumerate(paths):
            if not os.path.exists(path):
                raise RuntimeError(f"engine 'torch': rank {r} exited with code {procs[r].exitcode} "
                                   "and no result")
            with open(path, "rb") as f:
                status, out, nbytes = pickle.load(f)
            if status != "ok":
                raise RuntimeError(f"engine 'torch': rank {r} failed:\n{out}")
            results.append(out)
            sent.append(nbytes)
        return results, sent
