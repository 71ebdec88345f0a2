"""PowerSGD (Vogels et al. 2019, as PyTorch's powerSGD_hook runs it): the C
orthogonalisation against its NumPy twin, determinism, bad input, and the
PowerSGD object on lowband.sim.Cluster against a plain NumPy transcription of
the algorithm."""
import numpy as np
import pytest

import lowband
from lowband import _reference as ref
from lowband.powersgd import PowerSGD, orthogonalize
from lowband.sim import Cluster

from helpers import FLOATS, THREADS, assert_same


def _matrix(shape, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ---------------------------------------------------------------- orthogonalize

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 1), (5, 1), (7, 3), (100, 4), (3, 5), (4099, 2), (2, 10, 3)])
@pytest.mark.parametrize("epsilon", [0.0, 1e-3])
def test_orthogonalize_matches_twin(dtype, shape, epsilon):
    a = _matrix(shape, dtype, seed=len(shape) + shape[-1])
    expect = ref.powersgd_orthogonalize(a, epsilon)
    got = a.copy()
    assert orthogonalize(got, epsilon) is got
    assert_same(got, expect, f"{shape} {np.dtype(dtype)}")


@pytest.mark.parametrize("dtype", FLOATS)
def test_orthogonalize_gives_orthonormal_columns(dtype):
    a = _matrix((300, 4), dtype)
    q = orthogonalize(a.copy())
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(q.T.astype(np.float64) @ q, np.eye(4), atol=tol)
    # same column space as the input: a = q (q^T a)
    np.testing.assert_allclose(q @ (q.T @ a), a, atol=100 * tol)


@pytest.mark.parametrize("dtype", FLOATS)
def test_orthogonalize_zero_and_dependent_columns(dtype):
    a = _matrix((50, 4), dtype)
    a[:, 1] = 0                      # zero column: stays 0 (no NaN)
    a[:, 3] = 2 * a[:, 0]            # dependent column: projected to ~0
    got = orthogonalize(a.copy())
    assert np.isfinite(got).all()
    assert not got[:, 1].any()
    assert_same(got, ref.powersgd_orthogonalize(a), "degenerate")
    eps = orthogonalize(a.copy(), 1e-8)
    assert_same(eps, ref.powersgd_orthogonalize(a, 1e-8), "epsilon")


@pytest.mark.parametrize("dtype", FLOATS)
def test_orthogonalize_same_bytes_for_every_thread_count(dtype):
    a = _matrix((2 * 4096 * 3 + 5, 4), dtype, seed=3)      # 6 blocks, past the GIL grain
    results = [orthogonalize(a.copy(), threads=t) for t in THREADS]
    for t, r in zip(THREADS[1:], results[1:]):
        assert_same(r, results[0], f"threads={t}")
    assert_same(results[0], ref.powersgd_orthogonalize(a), "twin")


def test_orthogonalize_bad_input():
    with pytest.raises(TypeError, match="a:"):
        orthogonalize([[1.0, 2.0]])
    with pytest.raises(TypeError, match="float32 or float64"):
        orthogonalize(np.ones((3, 2), np.int32))
    with pytest.raises(TypeError, match="float32 or float64"):
        orthogonalize(np.ones((3, 2), np.float16))
    with pytest.raises(ValueError, match="2 dimensions"):
        orthogonalize(np.ones(3))
    with pytest.raises(ValueError, match="C-contiguous"):
        orthogonalize(np.ones((3, 4))[:, ::2])
    ro = np.ones((3, 2))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        orthogonalize(ro)
    with pytest.raises(ValueError, match="epsilon"):
        orthogonalize(np.ones((3, 2)), -1.0)
    with pytest.raises(ValueError, match="threads"):
        orthogonalize(np.ones((3, 2)), threads=0)
    bad = _matrix((10, 3), np.float32)
    bad[4, 2] = np.nan
    keep = bad.copy()
    with pytest.raises(ValueError, match="14"):          # flat index 4*3 + 2
        orthogonalize(bad)
    assert_same(bad, keep, "untouched on error")
    huge = np.full((4, 1), 1e200)
    with pytest.raises(ValueError, match="overflow"):
        orthogonalize(huge)


# -------------------------------------------------------------- the algorithm

def _reference_run(grads_per_step, shapes, world, rank, ef=True, warm=True, seed=0, min_rate=2.0):
    """A plain transcription of torch's powerSGD_hook (one flat buffer per
    rank), run over all ranks in lockstep; sums in rank order."""
    sizes = [int(np.prod(s)) for s in shapes]
    offs = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    dtype = grads_per_step[0][0].dtype
    mats = []
    for i, s in enumerate(shapes):
        if len(s) >= 2:
            n, m = s[0], sizes[i] // s[0]
            r = min(n, m, rank)
            if (n + m) * r * min_rate < n * m:
                mats.append((i, n, m, r))
    mats = sorted(mats, key=lambda mm: [mm2[1:3] for mm2 in mats].index(mm[1:3]))   # grouped by shape
    unc = [i for i in range(len(shapes)) if i not in [mm[0] for mm in mats]]
    err = [np.zeros(offs[-1], dtype) for _ in range(world)]
    qs, draws, outs = None, 0, []
    for grads in grads_per_step:
        gs = [g.copy() for g in grads]
        if ef:
            for w in range(world):
                gs[w] += err[w]
        g0 = [g.copy() for g in gs]
        if qs is None or not warm:
            rng = np.random.default_rng([seed, draws])
            draws += 1
            qs = [ref.powersgd_orthogonalize(rng.standard_normal((m, r)).astype(dtype)) for _, _, m, r in mats]
        else:
            qs = [ref.powersgd_orthogonalize(q) for q in qs]
        M = [[gs[w][offs[i]:offs[i + 1]].reshape(n, m) for i, n, m, _ in mats] for w in range(world)]
        ps = [sum_rank_order([M[w][j] @ qs[j] for w in range(world)]) for j in range(len(mats))]
        for i in unc:
            mean = sum_rank_order([gs[w][offs[i]:offs[i + 1]] for w in range(world)]) / dtype.type(world)
            for w in range(world):
                gs[w][offs[i]:offs[i + 1]] = mean
        ps = [ref.powersgd_orthogonalize(p) for p in ps]
        qs = [sum_rank_order([M[w][j].T @ ps[j] for w in range(world)]) / dtype.type(world)
              for j in range(len(mats))]
        for w in range(world):
            for j in range(len(mats)):
                M[w][j][...] = ps[j] @ qs[j].T
            if ef:
                err[w] = g0[w] - gs[w]
        outs.append(gs)
    return outs


def sum_rank_order(items):
    total = items[0].copy()
    for a in items[1:]:
        total += a
    return total


SHAPES = [(16, 12), (12,), (40, 3, 3), (5, 2), (3,), (16, 12)]


def _grads(steps, world, shapes, dtype, seed=0):
    n = sum(int(np.prod(s)) for s in shapes)
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(n).astype(dtype) for _ in range(world)] for _ in range(steps)]


def _run_cluster(world, grads_per_step, shapes, **kw):
    def worker(comm):
        psgd = PowerSGD(shapes, comm, dtype=grads_per_step[0][0].dtype, **kw)
        return [psgd.step(g[comm.rank]) for g in grads_per_step], psgd
    return Cluster(world).run(worker)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("rank,ef,warm", [(1, True, True), (2, True, False), (3, False, True)])
def test_cluster_matches_reference_and_ranks_agree(world, dtype, rank, ef, warm):
    grads = _grads(3, world, SHAPES, dtype, seed=world)
    res = _run_cluster(world, grads, SHAPES, rank=rank, error_feedback=ef, warm_start=warm)
    expect = _reference_run(grads, SHAPES, world, rank, ef, warm)
    for t in range(3):
        for w in range(world):
            assert_same(res[w][0][t], res[0][0][t], f"step {t} rank {w} vs rank 0")
        assert_same(res[0][0][t], expect[t][0], f"step {t} vs reference")
    # the error buffers are rank-local and differ
    if ef:
        assert not np.array_equal(res[0][1].error, res[1][1].error)


def test_compression_decisions_and_accounting():
    cluster = Cluster(2)

    def worker(comm):
        psgd = PowerSGD(SHAPES, comm, rank=1)
        g = _grads(1, 2, SHAPES, np.float32)[0][comm.rank]
        psgd.step(g)
        psgd.step(g)
        return psgd
    psgd = cluster.run(worker)[0]
    # (16, 12): (16+12)*1*2 < 192 yes; (12,) no; (40, 9): 98 < 360 yes; (5, 2): 14 < 10 no; (3,) no
    assert psgd.compressed == [True, False, True, False, False, True]
    assert [i for i, *_ in psgd.matrices] == [0, 5, 2]          # grouped by shape
    u, p, q = 12 + 10 + 3, 16 + 40 + 16, 12 + 9 + 12
    assert (psgd.u_size, psgd.p_size, psgd.q_size) == (u, p, q)
    assert psgd.elements_sent == 2 * (u + p + q)
    assert psgd.bytes_sent == 4 * 2 * (u + p + q)
    assert psgd.bytes_dense == 4 * 2 * psgd.size
    # two allreduces per step, [uncompressed; P] and Q: ring bytes per rank
    ring = lambda n: 2 * (2 - 1) * -(-n // 2) * 4     # noqa: E731
    assert cluster.by_collective["allreduce"]["sent"][0] == 2 * (ring(u + p) + ring(q))
    assert psgd.compression_rate == pytest.approx(psgd.size / (u + p + q))


@pytest.mark.parametrize("world", [2, 4])
def test_low_rank_mean_is_recovered_exactly(world):
    """Each rank holds u_w v^T: the mean is rank 1, and one rank-1 step
    returns it (up to rounding) with no error left."""
    rng = np.random.default_rng(7)
    v = rng.standard_normal(30)
    us = [rng.standard_normal(20) for _ in range(world)]
    grads = [[np.outer(u, v).reshape(-1)] for u in us]
    mean = sum(np.outer(u, v) for u in us) / world

    def worker(comm):
        psgd = PowerSGD([(20, 30)], comm, rank=1, dtype=np.float64)
        out = psgd.step(grads[comm.rank][0])
        return out, psgd.error.copy()
    for w, (out, error) in enumerate(Cluster(world).run(worker)):
        np.testing.assert_allclose(out.reshape(20, 30), mean, rtol=1e-12, atol=1e-12)
        # the error of rank w is its own gradient minus the mean
        np.testing.assert_allclose(error, grads[w][0] - mean.reshape(-1), atol=1e-12)


def test_full_rank_is_exact_and_error_vanishes():
    """rank = min(n, m) reproduces the mean exactly (P spans everything)."""
    shapes = [(6, 40)]
    grads = _grads(1, 2, shapes, np.float64)[0]

    def worker(comm):
        psgd = PowerSGD(shapes, comm, rank=6, min_compression_rate=0.5, dtype=np.float64)
        return psgd.step(grads[comm.rank])
    for out in Cluster(2).run(worker):
        np.testing.assert_allclose(out, (grads[0] + grads[1]) / 2, atol=1e-12)


def test_list_input_and_out():
    shapes = [(8, 6), (6,)]
    grads = _grads(1, 2, shapes, np.float32)[0]

    def worker(comm):
        a = PowerSGD(shapes, comm)
        b = PowerSGD(shapes, comm)
        g = grads[comm.rank]
        flat = a.step(g)
        parts = [g[:48].reshape(8, 6), g[48:]]
        outs = [np.empty((8, 6), np.float32), np.empty(6, np.float32)]
        got = b.step(parts, out=outs)
        assert got is outs
        return flat, outs
    for flat, outs in Cluster(2).run(worker):
        assert_same(np.concatenate([outs[0].reshape(-1), outs[1]]), flat, "list vs flat")


def test_out_in_place():
    grads = _grads(1, 2, SHAPES, np.float32)[0]

    def worker(comm):
        a, b = PowerSGD(SHAPES, comm), PowerSGD(SHAPES, comm)
        g = grads[comm.rank].copy()
        expect = a.step(g)
        assert b.step(g, out=g) is g
        return expect, g
    for expect, g in Cluster(2).run(worker):
        assert_same(g, expect, "in place")


def test_state_dict_resume_bit_for_bit():
    grads = _grads(5, 2, SHAPES, np.float32, seed=11)

    def worker(comm):
        a = PowerSGD(SHAPES, comm, rank=2)
        for g in grads[:3]:
            a.step(g[comm.rank])
        state = a.state_dict()
        tail_a = [a.step(g[comm.rank]) for g in grads[3:]]
        b = PowerSGD(SHAPES, comm, rank=2)
        b.load_state_dict(state)
        tail_b = [b.step(g[comm.rank]) for g in grads[3:]]
        return tail_a, tail_b, b
    for tail_a, tail_b, b in Cluster(2).run(worker):
        for x, y in zip(tail_a, tail_b):
            assert_same(x, y, "resumed")
        assert b.t == 5


def test_state_dict_refused():
    def worker(comm):
        a = PowerSGD(SHAPES, comm, rank=2)
        with pytest.raises(ValueError, match="hyper"):
            PowerSGD(SHAPES, comm, rank=1).load_state_dict(a.state_dict())
        with pytest.raises(ValueError, match="PowerSGD"):
            a.load_state_dict({"kind": "DGC"})
        bad = a.state_dict()
        bad["arrays"]["error"] = bad["arrays"]["error"][:3]
        with pytest.raises(ValueError, match="error"):
            a.load_state_dict(bad)
    Cluster(2).run(worker)


def test_warm_start_off_draws_every_step():
    grads = _grads(3, 2, SHAPES, np.float32)

    def worker(comm):
        a = PowerSGD(SHAPES, comm, warm_start=False)
        b = PowerSGD(SHAPES, comm, warm_start=True)
        for g in grads:
            a.step(g[comm.rank])
            b.step(g[comm.rank])
        return a.draws, b.draws
    assert Cluster(2).run(worker) == [(3, 1), (3, 1)]


def test_seed_changes_q():
    grads = _grads(1, 2, SHAPES, np.float32)

    def worker(comm, seed):
        return PowerSGD(SHAPES, comm, seed=seed).step(grads[0][comm.rank])
    a = Cluster(2).run(worker, 0)[0]
    b = Cluster(2).run(worker, 1)[0]
    assert not np.array_equal(a, b)


def test_bad_arguments():
    comm = Cluster(1)

    def worker(comm):
        with pytest.raises(TypeError, match="like"):
            PowerSGD((16, 12), comm)
        with pytest.raises(TypeError, match="comm"):
            PowerSGD(SHAPES, object())
        with pytest.raises(ValueError, match="rank"):
            PowerSGD(SHAPES, comm, rank=0)
        with pytest.raises(TypeError, match="dtype"):
            PowerSGD(SHAPES, comm, dtype=np.float16)
        with pytest.raises(ValueError, match="min_compression_rate"):
            PowerSGD(SHAPES, comm, min_compression_rate=-1)
        p = PowerSGD(SHAPES, comm)
        with pytest.raises(ValueError, match="grad"):
            p.step(np.zeros(5, np.float32))
        with pytest.raises(TypeError, match="grad"):
            p.step(np.zeros(p.size, np.float64))
        bad = np.zeros(p.size, np.float32)
        bad[7] = np.inf
        with pytest.raises(ValueError, match="flat index 7"):
            p.step(bad)
        assert p.t == 0 and not p.error.any()
        with pytest.raises(ValueError, match="out"):
            p.step(np.zeros(p.size, np.float32), out=np.zeros(3, np.float32))
        with pytest.raises(ValueError, match="grad"):
            p.step([np.zeros(3, np.float32)])
    comm.run(worker)


def test_exported():
    assert lowband.PowerSGD is PowerSGD


class _Bucket:
    """What torch's powerSGD_hook reads of a DDP GradBucket."""

    def __init__(self, buf, shapes):
        self.buf, self.shapes = buf, shapes

    def buffer(self):
        return self.buf

    def gradients(self):
        out, at = [], 0
        for s in self.shapes:
            k = int(np.prod(s))
            out.append(self.buf[at:at + k].view(s))
            at += k
        return out

    def index(self):
        return 0

    def is_last(self):
        return True


@pytest.mark.parametrize("rank,warm", [(1, True), (2, True), (2, False)])
def test_matches_torch_powersgd_hook(rank, warm):
    """Given the same initial Q, lowband's PowerSGD follows torch's
    powerSGD_hook step for step (one rank: EF, warm start, uncompressed
    tensors, shape grouping), to float32 rounding."""
    torch = pytest.importorskip("torch")
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ph
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed, not initialised")
    shapes = [(16, 12), (12,), (40, 3, 3), (5, 2), (3,), (16, 12)]
    n = sum(int(np.prod(s)) for s in shapes)
    grads = [np.random.default_rng(t).standard_normal(n).astype(np.float32) for t in range(4)]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        state = ph.PowerSGDState(process_group=None, matrix_approximation_rank=rank, start_powerSGD_iter=2,
                                 warm_start=warm, random_seed=0)
        for _ in range(2):              # torch's plain-allreduce iterations
            ph.powerSGD_hook(state, _Bucket(torch.zeros(n), shapes)).wait()
        expect = []
        for g in grads:
            expect.append(ph.powerSGD_hook(state, _Bucket(torch.from_numpy(g.copy()), shapes)).wait().numpy().copy())
    finally:
        dist.destroy_process_group()
    seeds = np.random.RandomState(0)

    def worker(comm):
        psgd = PowerSGD(shapes, comm, rank=rank, warm_start=warm)
        out = []
        for g in grads:
            if not psgd.have_q or not warm:       # torch's draw for this step
                gen = torch.Generator().manual_seed(seeds.randint(1_000_000_000))
                for q in psgd.q_matrices:
                    q[:] = torch.randn(1, *q.shape, generator=gen).numpy()[0]
                psgd.have_q, psgd.warm_start = True, True
                out.append(psgd.step(g))
                psgd.warm_start = warm
            else:
                out.append(psgd.step(g))
        return out
    got = Cluster(1).run(worker)[0]
    for t, (a, b) in enumerate(zip(got, expect)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"step {t}")
