"""lowband.sim: the in-process cluster, its collectives and byte counters,
the two-phase compressed allreduce, errors and the torch adapter."""
import threading
import time

import numpy as np
import pytest

import lowband
import lowband.sim as sim
from helpers import assert_same, make_vector


def test_run_returns_results_in_rank_order():
    cluster = sim.Cluster(3)
    assert cluster.run(lambda comm, a, b=0: (comm.rank, comm.world_size, a + b), 10, b=5) == [
        (0, 3, 15), (1, 3, 15), (2, 3, 15)]


@pytest.mark.parametrize("W", [1, 2, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_allreduce_is_the_rank_ordered_sum(W, dtype):
    n = 37
    inputs = [(make_vector(n, np.float64, "heavy", seed=r) * 1000).astype(dtype) for r in range(W)]
    want = inputs[0].copy()
    for a in inputs[1:]:
        want += a
    ops = ["sum"] + (["mean"] if np.dtype(dtype).kind == "f" else [])
    for op in ops:
        res = sim.Cluster(W).run(lambda comm: comm.allreduce(inputs[comm.rank], op))
        expect = want / W if op == "mean" else want
        for r in res:
            assert_same(r, expect.astype(dtype), op)


@pytest.mark.parametrize("W,n,dtype", [(1, 10, np.float32), (2, 7, np.float64), (4, 10, np.float32),
                                       (3, 1, np.int32), (5, 0, np.float64)])
def test_allreduce_counts_a_ring(W, n, dtype):
    cluster = sim.Cluster(W)
    cluster.run(lambda comm: comm.allreduce(np.ones(n, dtype)))
    per_rank = 2 * (W - 1) * -(-n // W) * np.dtype(dtype).itemsize
    assert list(cluster.bytes_sent) == [per_rank] * W
    assert list(cluster.bytes_received) == [per_rank] * W
    assert list(cluster.by_collective["allreduce"]["sent"]) == [per_rank] * W


def test_allgather_variable_sizes_and_exact_counters():
    W, n = 4, 5000
    payloads = [lowband.topk(make_vector(n, seed=r), k=3 ** r) for r in range(W)]
    payloads[2] = lowband.Dense(make_vector(17, np.float64, seed=9))
    cluster = sim.Cluster(W)
    got = cluster.run(lambda comm: comm.allgather(payloads[comm.rank]))
    for r in range(W):
        assert [type(p) for p in got[r]] == [type(p) for p in payloads]
        assert all(a == b for a, b in zip(got[r], payloads))
    sizes = [len(lowband.encode(p)) for p in payloads]
    assert sizes == [p.nbytes for p in payloads]
    for r in range(W):
        assert cluster.bytes_sent[r] == (W - 1) * sizes[r]
        assert cluster.bytes_received[r] == sum(sizes) - sizes[r]
    assert cluster.bytes_sent.sum() == cluster.bytes_received.sum()


def test_received_payloads_are_copies():
    x = np.arange(6.0)

    def fn(comm):
        got = comm.allgather(x)
        got[comm.rank].array[:] = -1        # a receiver may scribble on its copy
        comm.barrier()
        return [p.array.copy() for p in got]

    for res in sim.Cluster(3).run(fn):
        assert all(np.array_equal(a, np.arange(6.0)) or a[0] == -1 for a in res)
    assert np.array_equal(x, np.arange(6.0))


def test_alltoall_routes_and_counts():
    W = 4
    cluster = sim.Cluster(W)

    def fn(comm):
        items = [lowband.Dense(np.full(1 + j + comm.rank, 10.0 * comm.rank + j)) for j in range(W)]
        return comm.alltoall(items)

    res = cluster.run(fn)
    for r in range(W):
        for j in range(W):
            assert np.array_equal(res[r][j].array, np.full(1 + j + r, 10.0 * j + r))
    size = lambda i, j: lowband.Dense(np.zeros(1 + i + j)).nbytes   # noqa: E731
    for r in range(W):
        assert cluster.bytes_sent[r] == sum(size(r, j) for j in range(W) if j != r)
        assert cluster.bytes_received[r] == sum(size(j, r) for j in range(W) if j != r)


def test_broadcast_and_counters_reset():
    W = 3
    cluster = sim.Cluster(W)
    payload = lowband.topk(make_vector(1000), k=10)
    res = cluster.run(lambda comm: comm.broadcast(payload if comm.rank == 1 else None, root=1))
    assert all(p == payload for p in res)
    assert list(cluster.bytes_sent) == [0, 2 * payload.nbytes, 0]
    assert list(cluster.bytes_received) == [payload.nbytes, 0, payload.nbytes]
    cluster.reset_counters()
    assert cluster.bytes_sent.sum() == 0 and cluster.by_collective["broadcast"]["sent"].sum() == 0


def test_results_do_not_depend_on_thread_timing():
    W = 4

    def fn(comm):
        rng = np.random.default_rng(comm.rank)
        out = []
        for step in range(5):
            time.sleep(rng.random() * 1e-3)   # ranks arrive in a random order
            g = rng.standard_normal(200).astype(np.float32)
            out.append(comm.allreduce(g, "mean"))
            out.append(lowband.aggregate(comm.allgather(lowband.topk(g, k=7)), op="mean"))
        return out

    first = sim.Cluster(W).run(fn)
    second = sim.Cluster(W).run(fn)
    for a, b in zip(first, second):
        for x, y in zip(a, b):
            assert_same(x, y)
    for r in range(1, W):
        for x, y in zip(first[0], first[r]):
            assert_same(x, y)


# ---------------------------------------------------------------------------
# compressed allreduce
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n,W", [(0, 3), (1, 4), (10, 4), (64, 8), (1001, 3), (17, 1)])
def test_chunk_bounds(n, W):
    b = sim.chunk_bounds(n, W)
    assert len(b) == W + 1 and b[0] == 0 and b[-1] == n
    assert all(x <= y for x, y in zip(b, b[1:]))
    assert all(x % 8 == 0 for x in b[:-1] if x < n)
    # balanced up to the alignment: the longest chunk is 8 * ceil(n / 8W) (or n)
    assert max(y - x for x, y in zip(b, b[1:])) == min(n, 8 * -(-n // (8 * W)))


def compressed_allreduce_twin(arrays, compress, worker_errors, server_errors):
    """Plain NumPy twin of the two-phase algorithm (sim module doc)."""
    W, n = len(arrays), arrays[0].size
    b = sim.chunk_bounds(n, W)
    dec = lambda p: sim.decoded(p)   # noqa: E731
    sent = []
    for i in range(W):
        z = arrays[i] + worker_errors[i]
        parts = [compress(z[b[j]:b[j + 1]]) for j in range(W)]
        worker_errors[i] = z - np.concatenate([dec(p) for p in parts])
        sent.append(parts)
    out = []
    for j in range(W):
        zbar = dec(sent[0][j])
        for i in range(1, W):
            zbar = zbar + dec(sent[i][j])
        zbar = zbar / W + server_errors[j]
        q = compress(zbar)
        server_errors[j] = zbar - dec(q)
        out.append(dec(q))
    return np.concatenate(out), worker_errors, server_errors


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,W", [(1000, 4), (13, 3), (3, 4)])
def test_compressed_allreduce_matches_twin(dtype, n, W):
    spec = "topk:0.1"
    b = sim.chunk_bounds(n, W)
    steps = 3
    arrays = [[make_vector(n, dtype, "heavy", seed=10 * s + r) for r in range(W)] for s in range(steps)]
    cluster = sim.Cluster(W)

    def fn(comm):
        we = np.zeros(n, dtype)
        se = np.zeros(b[comm.rank + 1] - b[comm.rank], dtype)
        outs = [comm.compressed_allreduce(arrays[s][comm.rank], spec, we, se) for s in range(steps)]
        return outs, we, se

    res = cluster.run(fn)
    comp = lowband.from_spec(spec)
    we = [np.zeros(n, dtype) for _ in range(W)]
    se = [np.zeros(b[j + 1] - b[j], dtype) for j in range(W)]
    for s in range(steps):
        want, we, se = compressed_allreduce_twin(arrays[s], comp.compress, we, se)
        for r in range(W):
            assert_same(res[r][0][s], want.astype(dtype), f"step {s} rank {r}")
    for r in range(W):
        assert_same(res[r][1], we[r].astype(dtype))
        assert_same(res[r][2], se[r].astype(dtype))
    # the counters are exactly one alltoall plus one allgather per call
    total = cluster.by_collective["alltoall"]["sent"] + cluster.by_collective["allgather"]["sent"]
    assert np.array_equal(cluster.bytes_sent, total)


def test_compressed_allreduce_identity_is_the_mean():
    W, n = 4, 101
    arrays = [make_vector(n, np.float64, seed=r) for r in range(W)]
    res = sim.Cluster(W).run(lambda comm: (
        comm.compressed_allreduce(arrays[comm.rank], "none"),
        comm.allreduce(arrays[comm.rank], "mean")))
    for got, want in res:
        assert_same(got, want)


def test_compressed_allreduce_without_errors_and_bad_errors():
    W, n = 2, 50

    def fn(comm):
        x = np.ones(n)
        with pytest.raises(ValueError, match="worker_error: expected 50 elements, got 49"):
            comm.compressed_allreduce(x, "topk:3", np.zeros(n - 1), None)
        with pytest.raises(TypeError, match="server_error: expected dtype float64"):
            comm.compressed_allreduce(x, "topk:3", None, np.zeros(sim.chunk_bounds(n, W)[1], np.float32))
        with pytest.raises(TypeError, match="worker_error: expected an ndarray"):
            comm.compressed_allreduce(x, "topk:3", [0.0] * n, None)
        return comm.compressed_allreduce(x, "none")

    for r in sim.Cluster(W).run(fn):
        assert np.array_equal(r, np.ones(n))


# ---------------------------------------------------------------------------
# failures: exceptions, mismatches, timeouts, bad arguments
# ---------------------------------------------------------------------------

def test_worker_exception_aborts_the_others_and_is_reraised():
    def fn(comm):
        if comm.rank == 2:
            raise KeyError("boom in rank 2")
        for _ in range(3):
            comm.allreduce(np.ones(3))

    t0 = time.monotonic()
    with pytest.raises(KeyError, match="boom in rank 2") as info:
        sim.Cluster(4).run(fn)
    assert time.monotonic() - t0 < 10
    assert any("rank 2" in note for note in getattr(info.value, "__notes__", []))
    assert threading.active_count() < 10


def test_mismatched_collectives_raise():
    def fn(comm):
        if comm.rank == 0:
            return comm.allreduce(np.ones(2))
        return comm.allgather(np.ones(2))

    with pytest.raises(RuntimeError, match="mismatched collectives"):
        sim.Cluster(2).run(fn)

    def early_return(comm):
        if comm.rank == 1:
            comm.barrier()

    with pytest.raises(RuntimeError, match="return from fn"):
        sim.Cluster(2).run(early_return)


def test_mismatched_arguments_raise():
    with pytest.raises(ValueError, match="rank 1 passed"):
        sim.Cluster(2).run(lambda comm: comm.allreduce(np.ones(2 + comm.rank)))
    with pytest.raises(ValueError, match="ranks disagree on the broadcast root"):
        sim.Cluster(2).run(lambda comm: comm.broadcast(np.ones(2), root=comm.rank))


def test_timeout_instead_of_hang():
    def fn(comm):
        if comm.rank == 1:
            time.sleep(0.5)
        comm.barrier()

    with pytest.raises(TimeoutError, match="timed out after 0.1 s"):
        sim.Cluster(2, timeout=0.1).run(fn)
    assert sim.Cluster(2, timeout=None).run(fn) == [None, None]


def test_bad_arguments():
    with pytest.raises(TypeError, match="world_size: expected an int"):
        sim.Cluster("2")
    with pytest.raises(ValueError, match="world_size: expected an int in \\[1, 4096\\], got 0"):
        sim.Cluster(0)
    with pytest.raises(ValueError, match="timeout"):
        sim.Cluster(2, timeout=0)
    with pytest.raises(TypeError, match="fn: expected a callable"):
        sim.Cluster(2).run(3)
    with pytest.raises(ValueError, match="n: expected an int >= 0"):
        sim.chunk_bounds(-1, 2)

    def fn(comm):
        with pytest.raises(ValueError, match="op: expected one of 'sum', 'mean', got 'max'"):
            comm.allreduce(np.ones(2), "max")
        with pytest.raises(TypeError, match="op='mean' needs a float array"):
            comm.allreduce(np.ones(2, np.int64), "mean")
        with pytest.raises(TypeError, match="array: expected an ndarray, got list"):
            comm.allreduce([1.0, 2.0])
        with pytest.raises(TypeError, match="array: expected a float or integer array"):
            comm.allreduce(np.ones(2, bool))
        with pytest.raises(TypeError, match="payload: expected a Sparse, Quantized, Dense or float ndarray"):
            comm.allgather("hello")
        with pytest.raises(TypeError, match="array: expected float16, bfloat16, float32 or float64"):
            comm.allgather(np.ones(2, np.int32))
        with pytest.raises(ValueError, match="payloads: expected 2 payloads \\(one per rank\\), got 1"):
            comm.alltoall([np.ones(1)])
        with pytest.raises(TypeError, match="payloads: expected a list of 2 payloads"):
            comm.alltoall(np.ones(2))
        with pytest.raises(ValueError, match="root: expected an int in \\[0, 1\\], got 2"):
            comm.broadcast(np.ones(1), root=2)
        return True

    assert sim.Cluster(2).run(fn) == [True, True]


def test_reduce_payloads():
    n = 100
    ps = [lowband.topk(make_vector(n, seed=s), k=10) for s in range(3)]
    assert_same(sim.reduce_payloads(ps, "mean"), lowband.aggregate(ps, op="mean"))
    dense = [lowband.Dense(p.to_dense()) for p in ps]
    want = (dense[0].array + dense[1].array + dense[2].array) / 3
    assert_same(sim.reduce_payloads(dense, "mean"), want)
    with pytest.raises(ValueError, match="contributor_mean' needs Sparse payloads, got Dense"):
        sim.reduce_payloads(dense, "contributor_mean")
    with pytest.raises(ValueError, match="payloads: expected at least one payload"):
        sim.reduce_payloads([])


# The torch.distributed communicator is tested in tests/torch/test_torch_comm.py.
