"""Benchmark suite: DDP hooks and the process-group communicator on 2 gloo ranks.

Spawns two processes (127.0.0.1, one thread each by default) and, on one
model in one run, times a DDP training step (forward, backward, hook,
SGD step; median over the timed steps after warm-up) with no hook, torch's
``fp16_compress_hook`` and ``powerSGD_hook``, and lowband's hooks (top-k 1%
+ EF, sign + EF, PowerSGD), and the bytes per step each hands to torch;
then the communicator against bare torch.distributed: an allreduce of 16 Mi
float32 against ``dist.all_reduce``, and a 4 MB payload allgather against
``all_gather_object`` (with lowband's encode/decode: CRC-32C and copies),
and the same for the bare bytes (the transport alone).

Targets: lowband's PowerSGD step no slower than torch's at the same rank;
top-k 1% + EF within 1.3x of the fp16 hook's step; the allreduce within
1.2x of ``dist.all_reduce``; the allgather at least 1.8x faster than
``all_gather_object``.  Run it on an otherwise quiet machine:
``python -m lowband bench torch``.
"""
import datetime
import multiprocessing as mp
import os
import pickle
import socket
import statistics
import tempfile
import time
import traceback

RUN_BY_DEFAULT = False   # it spawns two processes for a minute: only when named

WARMUP = 12              # hooks compress from iteration 10
STEPS = 20
HOOKS = (
    # name, kind, options
    ("no hook", "none", None),
    ("torch fp16_compress_hook", "fp16_hook", None),
    ("torch powerSGD_hook r=2", "torch_powersgd", dict(matrix_approximation_rank=2, start_powerSGD_iter=10)),
    ("lowband topk 1% + EF", "compression", dict(compressor="topk:0.01", feedback="ef", start_iter=10)),
    ("lowband sign + EF", "compression", dict(compressor="sign", feedback="ef", start_iter=10)),
    ("lowband PowerSGD r=2", "powersgd", dict(rank=2, start_iter=10)),
)


def _model(width, depth):
    import torch
    import torch.nn as nn
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def make_hook(kind, **opts):
    """(state, hook) for DDP's register_comm_hook by name: "none" (DDP's own
    allreduce, no hook), torch's "allreduce_hook", "fp16_hook" and
    "torch_powersgd", lowband's "powersgd", or any other name for lowband's
    compression hook with CompressionState(**opts) (``grouped=False``: the
    bucket's tensors are compressed one call each instead of one grouped call)."""
    import lowband.torch as lt
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook as ps
    if kind == "none":
        return None, None
    if kind == "allreduce_hook":
        return None, default_hooks.allreduce_hook
    if kind == "fp16_hook":
        return None, default_hooks.fp16_compress_hook
    if kind == "torch_powersgd":
        return ps.PowerSGDState(None, **opts), ps.powerSGD_hook
    if kind == "powersgd":
        return lt.hooks.PowerSGDState(**opts), lt.hooks.powersgd_hook
    grouped = opts.pop("grouped", True)
    state = lt.hooks.CompressionState(**opts)
    state._grouped = grouped
    return state, lt.hooks.compression_hook


class _Counting:
    """Bytes of the tensors handed to all_reduce / all_gather / all_to_all."""

    def __init__(self, dist):
        self.dist, self.bytes, self.saved = dist, 0, {}

    def __enter__(self):
        for name in ("all_reduce", "all_gather_single", "all_to_all_single", "all_gather"):
            fn = getattr(self.dist, name, None)
            if fn is None:
                continue
            self.saved[name] = fn

            def wrapper(*args, _fn=fn, _name=name, **kwargs):
                t = args[0] if _name == "all_reduce" else args[1]
                if isinstance(t, (list, tuple)):
                    t = t[0] if t else None
                if t is not None:
                    self.bytes += t.numel() * t.element_size()
                return _fn(*args, **kwargs)
            setattr(self.dist, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.dist, name, fn)


def _ddp_times(rank, width, depth, batch):
    """Every configuration's DDP model is built first; the timed steps then
    take turns (one step of each per round), so that a load change on the
    machine hits all of them alike."""
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(rank))
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(rank))
    runs = []
    for name, kind, opts in HOOKS:
        model = _model(width, depth)
        # one bucket: torch's powerSGD_hook can mismatch on gloo with several
        ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1024)
        state, hook = make_hook(kind, **(opts or {}))
        if hook is not None:
            ddp.register_comm_hook(state, hook)
        runs.append((name, ddp, torch.optim.SGD(model.parameters(), lr=0.01), [], [0]))
    for step in range(WARMUP + STEPS):
        for name, ddp, opt, times, counted in runs:
            with _Counting(dist) as c:
                dist.barrier()
                t0 = time.perf_counter()
                opt.zero_grad()
                nn.functional.cross_entropy(ddp(x), y).backward()
                opt.step()
                dt = time.perf_counter() - t0
            if step >= WARMUP:
                times.append(dt)
                counted[0] += c.bytes
    return [(name, statistics.median(times) * 1e3, counted[0] // STEPS) for name, _, _, times, counted in runs]


def _comm_times(rank, reps):
    """Each pair of implementations alternates rep by rep (medians)."""
    import numpy as np
    import torch
    import torch.distributed as dist
    import lowband
    import lowband.torch as lt
    comm = lt.ProcessGroupCommunicator()

    def pair(fns):
        for fn in fns.values():
            fn()
        ts = {k: [] for k in fns}
        for _ in range(reps):
            for k, fn in fns.items():
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                ts[k].append(time.perf_counter() - t0)
        return {k: statistics.median(v) * 1e3 for k, v in ts.items()}

    a = np.random.default_rng(rank).standard_normal(16 << 20, dtype=np.float32)
    t = torch.from_numpy(a.copy())
    out = pair({"allreduce 16 Mi float32: dist.all_reduce": lambda: dist.all_reduce(t),
                "allreduce 16 Mi float32: comm.allreduce(out=a)": lambda: comm.allreduce(a, out=a),
                "allreduce 16 Mi float32: comm.allreduce (new array)": lambda: comm.allreduce(a)})
    p = lowband.Dense(np.random.default_rng(rank).standard_normal(1 << 20, dtype=np.float32))
    objs = [None, None]
    wire = lowband.encode(p)
    out.update(pair({"allgather 4 MB payload: all_gather_object": lambda: dist.all_gather_object(objs, p),
                     "allgather 4 MB payload: comm.allgather": lambda: comm.allgather(p),
                     "allgather 4 MB bytes: all_gather_object": lambda: dist.all_gather_object(objs, wire),
                     "allgather 4 MB bytes: comm.allgather_bytes": lambda: comm.allgather_bytes([wire])}))
    return out


def _rank(rank, world, port, folder, opts):
    os.environ.setdefault("OMP_NUM_THREADS", str(opts["threads"]))
    path = os.path.join(folder, f"{rank}.pkl")
    try:
        import torch
        import torch.distributed as dist
        import lowband
        torch.set_num_threads(opts["threads"])
        lowband.set_num_threads(opts["threads"])
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=300))
        try:
            res = {"ddp": _ddp_times(rank, opts["width"], opts["depth"], opts["batch"]),
                   "comm": _comm_times(rank, opts["reps"])}
        finally:
            dist.destroy_process_group()
        with open(path, "wb") as f:
            pickle.dump(("ok", res), f)
    except BaseException:  # noqa: BLE001 - reported by the parent
        with open(path, "wb") as f:
            pickle.dump(("error", traceback.format_exc()), f)


def measure(width=1024, depth=4, batch=64, threads=1, reps=5, timeout=900):
    """Both ranks' measurements: [{"ddp": [(name, ms, bytes)], "comm": {name: ms}}]."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="lowband-bench-")
    ctx = mp.get_context("spawn")
    opts = dict(width=width, depth=depth, batch=batch, threads=threads, reps=reps)
    procs = [ctx.Process(target=_rank, args=(r, 2, port, folder, opts)) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            for q in procs:
                q.kill()
            raise TimeoutError(f"bench torch: the ranks did not finish in {timeout} s")
    results = []
    for r in range(2):
        with open(os.path.join(folder, f"{r}.pkl"), "rb") as f:
            status, value = pickle.load(f)
        if status != "ok":
            raise RuntimeError(f"bench torch: rank {r} failed:\n{value}")
        results.append(value)
    return results


def rows(ctx, reps):
    """The suite's rows for the harness (measured once, in two processes)."""
    width = 1024 if not ctx.quick else 256
    # two ranks share the machine: each gets half of --threads
    results = measure(width=width, threads=max(1, ctx.threads // 2), reps=max(reps, 9))
    ddp = {name: (max(r["ddp"][i][1] for r in results), results[0]["ddp"][i][2])
           for i, (name, _, _) in enumerate(HOOKS)}
    comm = {k: max(r["comm"][k] for r in results) for k in results[0]["comm"]}
    print(f"DDP on 2 gloo ranks ({max(1, ctx.threads // 2)} thread(s) each), MLP {width} wide x 4, one bucket; "
          f"median step of the slower rank, bytes handed to torch per step (rank 0):")
    for name, (ms, nbytes) in ddp.items():
        print(f"  {name:<28} {ms:9.2f} ms/step {nbytes:>12,d} bytes/step")
    out = []
    for name, (ms, nbytes) in ddp.items():
        out.append({"suite": "torch", "case": f"DDP step: {name}", "nbytes": nbytes, "lowband_ms": ms,
                    "gbps": None, "note": f"{nbytes} bytes/step to torch", "targets": []})

    def target(row, what, ok, ratio):
        row["targets"].append({"target": what, "met": bool(ok), "ratio": ratio})

    by = {r["case"]: r for r in out}
    r = by["DDP step: lowband PowerSGD r=2"]
    ratio = ddp["torch powerSGD_hook r=2"][0] / ddp["lowband PowerSGD r=2"][0]
    r["torch_ms"] = ddp["torch powerSGD_hook r=2"][0]
    target(r, ">=1x torch powerSGD_hook", ratio >= 1.0, ratio)
    r = by["DDP step: lowband topk 1% + EF"]
    ratio = ddp["lowband topk 1% + EF"][0] / ddp["torch fp16_compress_hook"][0]
    r["torch_ms"] = ddp["torch fp16_compress_hook"][0]
    target(r, "<=1.3x fp16 hook", ratio <= 1.3, ratio)
    bare = comm["allreduce 16 Mi float32: dist.all_reduce"]
    for k in ("allreduce 16 Mi float32: comm.allreduce(out=a)", "allreduce 16 Mi float32: comm.allreduce (new array)"):
        row = {"suite": "torch", "case": k.replace("allreduce 16 Mi float32: ", "allreduce 16Mi "),
               "nbytes": 64 << 20, "lowband_ms": comm[k], "torch_ms": bare, "gbps": None,
               "note": "vs dist.all_reduce", "targets": []}
        if "out=a" in k:
            target(row, "<=1.2x dist.all_reduce", comm[k] / bare <= 1.2, comm[k] / bare)
        out.append(row)
    obj = comm["allgather 4 MB payload: all_gather_object"]
    mine = comm["allgather 4 MB payload: comm.allgather"]
    row = {"suite": "torch", "case": "allgather 4 MB payload", "nbytes": 4 << 20, "lowband_ms": mine,
           "torch_ms": obj, "gbps": None, "note": "torch = all_gather_object", "targets": []}
    target(row, ">=1.8x all_gather_object", obj / mine >= 1.8, obj / mine)
    out.append(row)
    obj = comm["allgather 4 MB bytes: all_gather_object"]
    mine = comm["allgather 4 MB bytes: comm.allgather_bytes"]
    out.append({"suite": "torch", "case": "allgather 4 MB bytes (transport)", "nbytes": 4 << 20,
                "lowband_ms": mine, "torch_ms": obj, "gbps": None,
                "note": "allgather_bytes vs all_gather_object of the same bytes (no encode/decode)",
                "targets": []})
    return out


def cases(ctx):
    """No in-process cases: ``rows`` measures in two processes."""
    return []
