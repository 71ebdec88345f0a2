"""lowband.torch.ProcessGroupCommunicator on real gloo ranks, against
lowband.sim.Cluster on the same inputs, with every byte handed to torch
counted by a wrapper around the dist functions."""
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

import lowband  # noqa: E402
import lowband.sim as sim  # noqa: E402
from _dist import CountingDist, spawn  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def scenario(comm):
    """Only the Communicator interface: runs on sim.Cluster and on torch."""
    r, W = comm.rank, comm.world_size
    rng = np.random.default_rng(100 + r)
    out = []
    x32 = rng.standard_normal(1001).astype(np.float32)
    out.append(comm.allreduce(x32))
    out.append(comm.allreduce(rng.standard_normal((7, 5)), "mean"))
    out.append(comm.allreduce(np.arange(10, dtype=np.int64) * (r + 1)))
    out.append(comm.allreduce(np.zeros(0, dtype=np.float32)))
    # payloads of different sizes on different ranks
    g = rng.standard_normal(500)
    parts = comm.allgather(lowband.threshold(g, 1.0 + 0.3 * r))
    out += [p.to_dense() for p in parts]
    parts = comm.allgather(lowband.sign(g.astype(np.float32), scale="rms"))
    out += [p.dequantize() for p in parts]
    sent = [np.full(3 + 2 * j + r, 10.0 * r + j) for j in range(W)]
    got = comm.alltoall(sent)
    out += [p.array for p in got]
    b = comm.broadcast(np.arange(4.0) * 3 if r == W - 1 else None, root=W - 1)
    out.append(b.array)
    b = comm.broadcast(lowband.topk(g, k=7) if r == 0 else None)
    out.append(b.to_dense())
    we, n = np.zeros(203, np.float32), 203
    bounds = sim.chunk_bounds(n, W)
    se = np.zeros(bounds[r + 1] - bounds[r], np.float32)
    for step in range(3):
        v = rng.standard_normal(n).astype(np.float32)
        out.append(comm.compressed_allreduce(v, "sign:rms", we, se))
    out += [we.copy(), se.copy()]
    out.append(comm.compressed_allreduce(rng.standard_normal(50), "topk:5"))
    comm.barrier()
    return out


def torch_scenario(rank, world, deterministic):
    import lowband.torch as lt
    comm = lt.ProcessGroupCommunicator(deterministic=deterministic)
    with CountingDist() as counting:
        out = scenario(comm)
    return out, (comm.bytes_sent, comm.bytes_received, comm.calls), (counting.sent, counting.received,
                                                                      counting.calls)


def check_against_cluster(world, deterministic):
    results = spawn(torch_scenario, world, deterministic)
    expected = sim.Cluster(world).run(scenario)
    for rank, (out, mine, counted) in enumerate(results):
        assert mine == counted, f"rank {rank}: counters {mine} != bytes handed to torch {counted}"
        assert len(out) == len(expected[rank])
        for i, (got, want) in enumerate(zip(out, expected[rank])):
            assert got.dtype == want.dtype and got.shape == want.shape, (rank, i)
            if deterministic or world == 2 or i not in (0, 1):
                np.testing.assert_array_equal(got, want, err_msg=f"rank {rank} output {i}")
            else:   # a ring allreduce adds in its own order
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"rank {rank} output {i}")


def test_two_ranks_match_the_cluster():
    check_against_cluster(2, False)


@pytest.mark.slow
def test_four_ranks_deterministic_match_the_cluster_bitwise():
    check_against_cluster(4, True)


def batched_scenario(rank, world):
    """The batched, async and tensor forms against the one-call forms."""
    import lowband.torch as lt
    comm = lt.ProcessGroupCommunicator()
    rng = np.random.default_rng(rank)
    xs = [rng.standard_normal(n).astype(np.float32) for n in (100, 37, 8)]
    payloads = [lowband.topk(x, k=3 + rank) for x in xs]
    many = comm.allgather_many(payloads)
    single = [comm.allgather(p) for p in payloads]
    same_gather = all(many[r][t] == single[t][r] for r in range(world) for t in range(3))
    fut = comm.allgather_async(payloads[0])
    same_async = fut.wait() == single[0]
    t = torch.arange(6, dtype=torch.float32) * (rank + 1)
    ptr = t.data_ptr()
    res = comm.allreduce_async(t, "mean", out=t).wait()
    in_place = res.data_ptr() == ptr
    bf = torch.full((5,), 1.5 + rank, dtype=torch.bfloat16)
    bf_sum = comm.allreduce(bf)
    u8 = comm.alltoall_bytes([[bytes([rank, j] * (j + 1))] for j in range(world)])
    a2a = [bytes(row[0]) for row in u8]
    wes = [np.zeros(x.size, np.float32) for x in xs]
    ses = [np.zeros(sim.chunk_bounds(x.size, world)[rank + 1] - sim.chunk_bounds(x.size, world)[rank],
                    np.float32) for x in xs]
    batch = comm.compressed_allreduce_many(xs, ["sign"] * 3, wes, ses)
    wes2 = [np.zeros(x.size, np.float32) for x in xs]
    ses2 = [np.zeros_like(s) for s in ses]
    one = [comm.compressed_allreduce(x, "sign", w, s) for x, w, s in zip(xs, wes2, ses2)]
    same_two_phase = all(np.array_equal(a, b) for a, b in zip(batch + wes + ses, one + wes2 + ses2))
    # the width of the previous gather with the same key is reused: sizes
    # that fit cost one collective, a message that outgrows it two
    gathers, calls = [], []
    for size, fill in ((10 + rank, rank), (12 - rank, rank + 5), (100 * (rank + 1), 7), (3, 9)):
        before = comm.calls
        rows = comm.allgather_bytes([bytes([fill]) * size, b"x" * rank], key="k")
        calls.append(comm.calls - before)
        gathers.append([[bytes(b) for b in row] for row in rows])
    encoded = comm.allgather_encoded(payloads, key="e")
    same_encoded = all(lowband.decode(encoded[r][t]) == many[r][t] for r in range(world) for t in range(3))
    return (same_gather, same_async, in_place, res.numpy(), bf_sum.float().numpy(), a2a, same_two_phase,
            gathers, calls, same_encoded)


def test_batched_async_and_tensor_forms():
    results = spawn(batched_scenario, 2)
    for rank, (same_gather, same_async, in_place, res, bf_sum, a2a, same_two_phase, gathers, calls,
               same_encoded) in enumerate(results):
        assert same_gather and same_async and in_place and same_two_phase and same_encoded
        sizes = [(10, 11), (12, 11), (100, 200), (3, 3)]
        fills = [(0, 1), (5, 6), (7, 7), (9, 9)]
        for got, (s0, s1), (f0, f1) in zip(gathers, sizes, fills):
            assert got == [[bytes([f0]) * s0, b""], [bytes([f1]) * s1, b"x"]]
        assert calls == [2, 1, 2, 1]
        np.testing.assert_array_equal(res, np.arange(6, dtype=np.float32) * 1.5)
        np.testing.assert_array_equal(bf_sum, np.full(5, 4.0, np.float32))
        assert a2a == [bytes([j, rank] * (rank + 1)) for j in range(2)]


def one_rank_scenario(rank, world):
    """Runs in a spawned one-rank gloo group (a gloo group made and torn
    down inside the pytest process can abort it from a gloo thread)."""
    import lowband.torch as lt
    comm = lt.ProcessGroupCommunicator()
    x = np.linspace(-1, 1, 50)
    np.testing.assert_array_equal(comm.allreduce(x, "mean"), x)
    p = lowband.topk(x, k=5)
    assert comm.allgather(p) == [p] and comm.alltoall([p]) == [p] and comm.broadcast(p) == p
    out = comm.compressed_allreduce(x, "topk:10", np.zeros(50), np.zeros(50))
    assert np.count_nonzero(out) == 10
    with pytest.warns(DeprecationWarning, match="ProcessGroupCommunicator"):
        old = sim.TorchCommunicator()
    assert isinstance(old, lt.ProcessGroupCommunicator)
    assert (comm.bytes_sent, comm.bytes_received, comm.calls) == (0, 0, 0)
    with pytest.raises(ValueError, match="payloads: expected 1 payloads"):
        comm.alltoall([p, p])
    with pytest.raises(TypeError, match="op='mean' needs a float"):
        comm.allreduce(np.arange(3), "mean")
    with pytest.raises(TypeError, match=r"requires grad; pass tensor.detach\(\)"):
        comm.as_numpy(torch.ones(3, requires_grad=True))
    return True


def test_one_rank_group_sends_nothing():
    assert spawn(one_rank_scenario, 1) == [True]


def test_import_lowband_does_not_import_torch():
    code = "import sys, lowband, lowband.sim; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lowband_torch_without_torch_says_how_to_install():
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import lowband.torch\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "pip install torch" in out
