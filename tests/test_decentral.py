"""lowband.decentral: topologies and mixing matrices, neighbour exchange and
its per-link bytes, D-PSGD / CHOCO-SGD, DADAO, DIMAT and the final merge,
each against a one-process NumPy twin (tests/fed_twins.py)."""
import math

import numpy as np
import pytest

import lowband
from lowband import decentral as dc
from lowband.sim import Cluster
from fed_twins import LeastSquares, dadao_twin, dpsgd_twin

TOPOLOGIES = [dc.Topology.ring(7), dc.Topology.torus(3, 4), dc.Topology.exponential(10),
              dc.Topology.complete(5), dc.Topology.random_regular(10, 3, seed=2), dc.Topology.ring(2),
              dc.Topology.ring(1)]


@pytest.mark.parametrize("top", TOPOLOGIES, ids=lambda t: t.name)
def test_mixing_is_symmetric_doubly_stochastic(top):
    W = top.mixing
    np.testing.assert_allclose(W, W.T)
    np.testing.assert_allclose(W.sum(0), 1)
    np.testing.assert_allclose(W.sum(1), 1)
    assert np.all(W >= 0) and np.all((W > 0) == (top.adjacency | np.eye(top.n, dtype=bool)))
    assert top.connected
    for i in range(top.n):
        assert top.neighbors(i) == sorted(j for j in range(top.n) if top.adjacency[i, j])


def test_known_weights_and_gaps():
    n = 9
    ring = dc.Topology.ring(n)
    np.testing.assert_allclose(ring.mixing[0, [n - 1, 0, 1]], [1 / 3] * 3)
    assert ring.spectral_gap == pytest.approx(1 - (1 / 3 + 2 / 3 * math.cos(2 * math.pi / n)))
    assert np.allclose(dc.Topology.torus(4, 4).mixing[5][dc.Topology.torus(4, 4).neighbors(5)], 0.2)
    assert dc.Topology.complete(6).spectral_gap == pytest.approx(1.0)
    assert sorted(dc.Topology.exponential(8).neighbors(0)) == [1, 2, 4, 6, 7]
    gaps = [dc.Topology.ring(16).spectral_gap, dc.Topology.torus(4, 4).spectral_gap,
            dc.Topology.exponential(16).spectral_gap]
    assert gaps[0] < gaps[1] < gaps[2]
    a, b = dc.Topology.random_regular(12, 4, seed=5), dc.Topology.random_regular(12, 4, seed=5)
    assert np.array_equal(a.adjacency, b.adjacency) and set(a.degrees) == {4}
    assert not np.array_equal(a.adjacency, dc.Topology.random_regular(12, 4, seed=6).adjacency)
    # DADAO's constants on a cycle: L_norm = L/|E|, chi1 = |E| / lambda_2(L)
    k = dc.Topology.ring(6).dadao_constants()
    assert k["chi1"] == pytest.approx(6 / (2 - 2 * math.cos(2 * math.pi / 6)))
    assert k["chi2"] == pytest.approx(0.5 * 6 * (5 / 6))       # edge resistance (n-1)/n, times |E|
    assert k["comm_rate"] == pytest.approx(math.sqrt(2 * k["chi1"] * k["chi2"]))


def test_neighbor_exchange_counts_bytes_per_link():
    top = dc.Topology.ring(5)
    cl = Cluster(5)
    payloads = [lowband.Dense(np.arange(r + 1, dtype=np.float32)) for r in range(5)]
    got = cl.run(lambda comm: comm.neighbor_exchange(payloads[comm.rank], top.neighbors(comm.rank)))
    for r in range(5):
        assert sorted(got[r]) == top.neighbors(r)
        for j, p in got[r].items():
            assert p == payloads[j]
    sizes = np.array([p.nbytes for p in payloads])
    want = top.adjacency * sizes[:, None]
    np.testing.assert_array_equal(cl.link_bytes, want)
    np.testing.assert_array_equal(cl.bytes_sent, want.sum(1))
    np.testing.assert_array_equal(cl.bytes_received, want.sum(0))
    np.testing.assert_array_equal(cl.by_collective["neighbor"]["sent"], want.sum(1))
    with pytest.raises(ValueError, match="must be symmetric"):
        Cluster(3).run(lambda comm: comm.neighbor_exchange(payloads[0], [1] if comm.rank == 0 else []))
    with pytest.raises(ValueError, match=r"neighbors: expected distinct ranks other than 0, got \[0\]"):
        Cluster(2).run(lambda comm: comm.neighbor_exchange(payloads[0], [comm.rank]))
    with pytest.raises(TypeError, match="neighbors: expected a list of ranks, got int"):
        Cluster(2).run(lambda comm: comm.neighbor_exchange(payloads[0], 1))


def _run_nodes(top, make, steps, grads, x0s):
    def worker(comm):
        x = x0s[comm.rank].copy()
        opt = make(x, comm)
        for _ in range(steps):
            opt.step(grads[comm.rank](x.copy()))
        return x
    cl = Cluster(top.n)
    return np.stack(cl.run(worker)), cl


@pytest.mark.parametrize("compressor,gamma", [(None, 1.0), ("topk:2", 0.5), ("randomk:3:seed=1", 0.3),
                                              ("none", 1.0)])
def test_dpsgd_matches_its_twin(compressor, gamma):
    top = dc.Topology.torus(2, 3)
    prob = LeastSquares(6, 5, seed=1)
    x0s = np.random.default_rng(0).standard_normal((6, 5))
    X, cl = _run_nodes(top, lambda x, c: dc.DPSGD(x, c, top, 0.05, compressor=compressor, gamma=gamma),
                       8, prob.grad_fns(), x0s)
    want = dpsgd_twin(top.mixing, x0s, prob.grad_fns(), 8, 0.05, compressor, gamma)
    np.testing.assert_allclose(X, want, rtol=1e-12, atol=1e-12)
    if compressor is None:
        dense = lowband.Dense(np.zeros(5)).nbytes
        np.testing.assert_array_equal(cl.link_bytes, 8 * dense * top.adjacency)


def test_dpsgd_consensus_contracts_by_the_spectral_gap():
    top = dc.Topology.ring(8)
    x0s = np.random.default_rng(1).standard_normal((8, 20))
    X, _ = _run_nodes(top, lambda x, c: dc.DPSGD(x, c, top, 0.1), 1, [lambda x: np.zeros(20)] * 8, x0s)
    before = np.linalg.norm(x0s - x0s.mean(0))
    after = np.linalg.norm(X - X.mean(0))
    np.testing.assert_allclose(X.mean(0), x0s.mean(0), atol=1e-12)   # averaging is preserved
    assert after <= (1 - top.spectral_gap) * before + 1e-12


def _quadratics(n, d, seed=0):
    rng = np.random.default_rng(seed)
    Hs, bs = [], []
    for _ in range(n):
        Q = rng.standard_normal((d, d))
        Hs.append(Q @ Q.T / d + np.eye(d))
        bs.append(rng.standard_normal(d) * 2)
    L = max(np.linalg.eigvalsh(H)[-1] for H in Hs)
    mu = min(np.linalg.eigvalsh(H)[0] for H in Hs)
    return Hs, bs, L, mu


def _dadao(top, Hs, bs, L, mu, horizons, comm_rate=None, seed=3):
    d = len(bs[0])

    def worker(comm):
        x = np.zeros(d)
        opt = dc.DADAO(x, comm, top, L=L, mu=mu, seed=seed, comm_rate=comm_rate)
        out = []
        for T in horizons:
            opt.run(lambda y: Hs[comm.rank] @ y - bs[comm.rank], T)
            out.append(x.copy())
        return out, opt
    cl = Cluster(top.n)
    res = cl.run(worker)
    return [np.stack([r[0][k] for r in res]) for k in range(len(horizons))], [r[1] for r in res], cl


def test_dadao_matches_its_twin_and_converges_to_the_consensus_optimum():
    top = dc.Topology.ring(4)
    Hs, bs, L, mu = _quadratics(4, 3)
    xs, opts, cl = _dadao(top, Hs, bs, L, mu, [20.0, 60.0])
    rate = top.dadao_constants()["comm_rate"]
    grads = [lambda y, i=i: Hs[i] @ y - bs[i] for i in range(4)]
    want = dadao_twin(top, L, mu, grads, 60.0, 3, rate, np.zeros(3))
    np.testing.assert_allclose(xs[1], want, rtol=1e-9, atol=1e-12)
    xstar = np.linalg.solve(sum(Hs), sum(bs))
    e20, e60 = (np.mean(np.sum((x - xstar) ** 2, 1)) for x in xs)
    assert e60 < 1e-2 * e20 and e60 < 1e-3
    msgs = sum(o.messages for o in opts)
    assert msgs % 2 == 0 and cl.link_bytes.sum() == msgs * lowband.Dense(np.zeros(3)).nbytes
    assert sum(o.gradients for o in opts) == sum(1 for e in dc.dadao_events(4, top.edges, 60.0, 4, rate, 3)
                                                 if e[2] < 0)


def test_dadao_without_gossip_finds_each_local_minimiser():
    top = dc.Topology.ring(3)
    Hs, bs, L, mu = _quadratics(3, 3, seed=1)
    xs, _, cl = _dadao(top, Hs, bs, L, mu, [400.0], comm_rate=0.0)
    for i in range(3):
        np.testing.assert_allclose(xs[0][i], np.linalg.solve(Hs[i], bs[i]), atol=1e-6)
    assert cl.bytes_sent.sum() == 0


def test_dadao_state_dict_resumes_the_same_trajectory():
    top = dc.Topology.ring(3)
    Hs, bs, L, mu = _quadratics(3, 2, seed=2)
    straight, _, _ = _dadao(top, Hs, bs, L, mu, [10.0, 25.0])

    def worker(comm):
        g = lambda y: Hs[comm.rank] @ y - bs[comm.rank]   # noqa: E731
        x = np.zeros(2)
        opt = dc.DADAO(x, comm, top, L=L, mu=mu, seed=3)
        opt.run(g, 10.0)
        st = opt.state_dict()
        y = x.copy()
        opt2 = dc.DADAO(y, comm, top, L=L, mu=mu, seed=3)
        opt2.load_state_dict(st)
        opt2.run(g, 25.0)
        return y
    np.testing.assert_array_equal(np.stack(Cluster(3).run(worker)), straight[1])


SIZES = [4, 6, 5, 3]


def _mlp(seed):
    n = sum(a * b + b for a, b in zip(SIZES[:-1], SIZES[1:]))
    return np.random.default_rng(seed).standard_normal(n)


def test_mlp_permutation_keeps_the_function_and_alignment_undoes_it():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 4))
    theta = _mlp(1)
    perms = [rng.permutation(6), rng.permutation(5)]
    moved = dc.mlp_permute(theta, SIZES, perms)
    assert not np.allclose(moved, theta)
    np.testing.assert_allclose(dc.mlp_forward(moved, SIZES, X)[1], dc.mlp_forward(theta, SIZES, X)[1], atol=1e-12)
    back, found = dc.mlp_align(theta, moved, SIZES, X)
    np.testing.assert_array_equal(back, theta)
    inv = [np.argsort(p) for p in perms]
    assert all(np.array_equal(a, b) for a, b in zip(found, inv))


@pytest.mark.parametrize("align", [True, False])
def test_dimat_merge_matches_a_direct_computation(align):
    top = dc.Topology.ring(4)
    rng = np.random.default_rng(3)
    thetas = [_mlp(10 + i) for i in range(4)]
    batches = [rng.standard_normal((32, 4)) for _ in range(4)]
    target = [rng.standard_normal(thetas[0].size) for _ in range(4)]

    def worker(comm):
        x = thetas[comm.rank].copy()
        opt = dc.DIMAT(x, comm, top, SIZES, lr=0.1, local_steps=2, align=align)
        opt.round(lambda y: y - target[comm.rank], batches[comm.rank])
        return x
    got = np.stack(Cluster(4).run(worker))
    trained = [t - 0.1 * (t - g) for t, g in zip(thetas, target)]
    trained = [t - 0.1 * (t - g) for t, g in zip(trained, target)]
    W = top.mixing
    for i in range(4):
        want = W[i, i] * trained[i]
        for j in top.neighbors(i):
            other = dc.mlp_align(trained[i], trained[j], SIZES, batches[i])[0] if align else trained[j]
            want = want + W[i, j] * other
        np.testing.assert_allclose(got[i], want, atol=1e-12)


def test_final_merge_is_the_mean():
    xs = np.random.default_rng(0).standard_normal((3, 7))
    out = Cluster(3).run(lambda comm: dc.final_merge(xs[comm.rank].copy(), comm))
    for o in out:
        np.testing.assert_allclose(o, xs.mean(0), atol=1e-15)


def test_bad_input():
    with pytest.raises(ValueError, match="adjacency: expected a symmetric matrix"):
        dc.Topology(np.array([[0, 1], [0, 0]]))
    with pytest.raises(ValueError, match="adjacency: expected no self-loops"):
        dc.Topology(np.eye(2))
    with pytest.raises(ValueError, match=r"adjacency: expected a square n x n matrix, got shape \(2, 3\)"):
        dc.Topology(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="degree: n \\* degree must be even, got n=5, degree=3"):
        dc.Topology.random_regular(5, 3)
    with pytest.raises(ValueError, match="topology: expected 3 nodes"):
        Cluster(3).run(lambda c: dc.DPSGD(np.zeros(2), c, dc.Topology.ring(4), 0.1))
    with pytest.raises(TypeError, match="topology: expected a lowband.decentral.Topology, got str"):
        Cluster(2).run(lambda c: dc.DPSGD(np.zeros(2), c, "ring", 0.1))
    with pytest.raises(ValueError, match=r"params: an MLP \[4, 6, 5, 3\] has 83 parameters, got 2"):
        Cluster(2).run(lambda c: dc.DIMAT(np.zeros(2), c, dc.Topology.ring(2), SIZES, lr=0.1))
    with pytest.raises(ValueError, match="mu: "):
        Cluster(2).run(lambda c: dc.DADAO(np.zeros(2), c, dc.Topology.ring(2), L=1.0, mu=2.0))
    with pytest.raises(ValueError, match="topology: DADAO needs a connected graph"):
        dc.Topology(np.zeros((3, 3))).dadao_constants()


class _AlltoallOnly(lowband.sim.Communicator):
    """A transport with its own alltoall and no _gather_all (as
    lowband.torch.ProcessGroupCommunicator): neighbor_exchange must ride on
    alltoall."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.rank, self.world_size = inner, inner.rank, inner.world_size

    def alltoall(self, payloads):
        return self.inner.alltoall(payloads)


def test_neighbor_exchange_over_a_transport_without_gather_all():
    top = dc.Topology.ring(4)
    payloads = [lowband.Dense(np.full(3, float(r))) for r in range(4)]
    cl = Cluster(4)
    got = cl.run(lambda comm: _AlltoallOnly(comm).neighbor_exchange(payloads[comm.rank], top.neighbors(comm.rank)))
    for r in range(4):
        assert sorted(got[r]) == top.neighbors(r)
        assert all(p == payloads[j] for j, p in got[r].items())
    assert cl.by_collective["alltoall"]["sent"].sum() > 0           # it went through alltoall


def test_dpsgd_choco_state_dict_resumes_the_same_trajectory():
    top = dc.Topology.ring(3)
    prob = LeastSquares(3, 4, seed=6)
    x0s = np.random.default_rng(2).standard_normal((3, 4))
    straight, _ = _run_nodes(top, lambda x, c: dc.DPSGD(x, c, top, 0.05, compressor="topk:2", gamma=0.4),
                             6, prob.grad_fns(), x0s)
    grads = prob.grad_fns()

    def worker(comm):
        x = x0s[comm.rank].copy()
        opt = dc.DPSGD(x, comm, top, 0.05, compressor="topk:2", gamma=0.4)
        for _ in range(3):
            opt.step(grads[comm.rank](x.copy()))
        st = opt.state_dict()
        opt2 = dc.DPSGD(x, comm, top, 0.05, compressor="topk:2", gamma=0.4)
        opt2.load_state_dict(st)
        np.testing.assert_array_equal(opt2.hat_neighbors, opt.hat_neighbors)
        for _ in range(3):
            opt2.step(grads[comm.rank](x.copy()))
        return x
    np.testing.assert_array_equal(np.stack(Cluster(3).run(worker)), straight)
    with pytest.raises(ValueError, match="hyper-parameters"):
        st = Cluster(3).run(lambda c: dc.DPSGD(np.zeros(4), c, top, 0.05, compressor="topk:2").state_dict())[0]
        Cluster(3).run(lambda c: dc.DPSGD(np.zeros(4), c, top, 0.1, compressor="topk:2").load_state_dict(st))
