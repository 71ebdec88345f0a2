"""Just One Byte (lowband.optim.SeedReplayZO): int8 scalars with their
documented scale, machines that sit out or join, the weight digest; and
EF21-W's step-size rule (lowband.ef21_step_size, ef21w_weights)."""
import math

import numpy as np
import pytest

import lowband
from lowband import optim as O, sim
from helpers import make_vector
from problems import LeastSquares


def problem(W):
    prob = LeastSquares(W=W, d=20, m=30, spread=0.2, seed=1)
    return prob, (lambda rank: (lambda x: float(np.sum((prob.A[rank] @ x - prob.b[rank]) ** 2) / 60)))


def twin_round(x, t, W, samples, seed, lr, eps, loss_of, active, int8):
    """One round by hand: the scalars of the active machines, 8-bit coded as
    lowband.quantize(p, 8, block=None) when int8, replayed in order."""
    sent = []
    for m in range(W):
        if m not in active:
            sent.append(np.zeros(0))
            continue
        p = np.empty(samples)
        for s in range(samples):
            z = O.perturbation(seed, t, m, s, x.size)
            p[s] = (loss_of(m)(x + eps * z) - loss_of(m)(x - eps * z)) / (2 * eps)
        if int8:
            step = np.float32(np.abs(p).max() / 127)
            step = step if float(step) >= np.abs(p).max() / 127 else np.nextafter(step, np.float32(np.inf))
            codes = np.clip(np.rint(p / np.float64(step)), -127, 127)
            p = codes * np.float64(step)
        sent.append(p)
    total = sum(v.size for v in sent)
    for m, values in enumerate(sent):
        for s, v in enumerate(values):
            x = x - np.float64((lr / total) * float(v) * eps) * O.perturbation(seed, t, m, s, x.size)
    return x


@pytest.mark.parametrize("int8", [False, True])
def test_rounds_with_machines_leaving_and_joining_match_the_twin(int8):
    W, samples, rounds = 3, 3, 6
    prob, loss_of = problem(W)
    # who takes part in each round: rank 2 leaves for rounds 2-3, rank 0 for round 4
    active = [{0, 1, 2}, {0, 1, 2}, {0, 1}, {0, 1}, {1, 2}, {0, 1, 2}]
    cluster = sim.Cluster(W)

    def fn(comm):
        x = np.zeros(prob.d)
        opt = O.SeedReplayZO(x, comm, lr=50.0, eps=1e-3, samples=samples, seed=4,
                             scalar_dtype="int8" if int8 else "float64")
        for t in range(rounds):
            opt.step(loss_of(comm.rank), participate=comm.rank in active[t])
        return x, opt.digest(), opt.digest(3), opt.replicas_agree()

    res = cluster.run(fn)
    want = np.zeros(prob.d)
    for t in range(rounds):
        want = twin_round(want, t, W, samples, 4, 50.0, 1e-3, loss_of, active[t], int8)
    for x, dig, dig3, agree in res:
        np.testing.assert_allclose(x, want, rtol=1e-12, atol=1e-15)
        assert dig == res[0][1] and dig3 == res[0][2] and agree
    assert prob.loss(res[0][0]) < prob.loss(np.zeros(prob.d))
    if int8:   # one byte per scalar: samples codes + a 4-byte scale + the header
        q = lowband.quantize(np.ones(samples), 8, block=None)
        assert q.arrays["codes"].size == samples


def test_int8_bytes_are_one_per_scalar():
    W, samples = 2, 30
    prob, loss_of = problem(W)
    sizes = {}
    for dtype in ("float64", "int8"):
        cluster = sim.Cluster(W)

        def fn(comm):
            opt = O.SeedReplayZO(np.zeros(prob.d), comm, samples=samples, scalar_dtype=dtype)
            opt.step(loss_of(comm.rank))

        cluster.run(fn)
        sizes[dtype] = int(cluster.bytes_sent[0])
    assert sizes["int8"] == lowband.quantize(np.ones(samples), 8, block=None).nbytes
    assert sizes["float64"] == lowband.Dense(np.zeros(samples)).nbytes


def test_join_copies_the_replica_and_the_digest_sees_a_difference():
    W = 3
    prob, loss_of = problem(W)
    cluster = sim.Cluster(W)

    def fn(comm):
        x = np.zeros(prob.d) if comm.rank else make_vector(prob.d, np.float64, seed=1)
        opt = O.SeedReplayZO(x, comm, samples=2, seed=1)
        if comm.rank == 0:
            opt.t = 5
        before = opt.replicas_agree()
        opt.join(root=0)
        after = opt.replicas_agree()
        opt.step(loss_of(comm.rank))
        return before, after, opt.t, opt.digest(), opt.replicas_agree()

    res = cluster.run(fn)
    assert [r[0] for r in res] == [False] * W and [r[1] for r in res] == [True] * W
    assert {r[2] for r in res} == {6} and len({r[3] for r in res}) == 1 and all(r[4] for r in res)
    x = np.array([1.0004, -0.0, 2.0])
    assert O.weights_digest(x, 3) == O.weights_digest(np.array([1.0, 0.0, 2.0]), 3)
    assert O.weights_digest(x) != O.weights_digest(np.array([1.0, 0.0, 2.0]))


def test_full_mode_refuses_sitting_out_and_int8():
    prob, loss_of = problem(1)

    def fn(comm):
        for kw, step_kw in (({"mode": "full"}, {"participate": False}),
                            ({"mode": "full", "scalar_dtype": "int8"}, {})):
            opt = O.SeedReplayZO(np.zeros(prob.d), comm, samples=1, **kw)
            with pytest.raises(ValueError, match="replay"):
                opt.step(loss_of(0), **step_kw)
        with pytest.raises(ValueError, match="scalar_dtype"):
            O.SeedReplayZO(np.zeros(prob.d), comm, scalar_dtype="int4")
        with pytest.raises(ValueError, match="decimals"):
            O.weights_digest(np.zeros(3), decimals=-1)

    sim.Cluster(1).run(fn)


# ---------------------------------------------------------------------------
# EF21-W's step size
# ---------------------------------------------------------------------------

def test_ef21_step_size_rules():
    Ls = [1.0, 1.0, 1.0, 100.0]           # L_QM = 50.01, L_AM = 25.75
    L, alpha = 30.0, 0.25
    xi = math.sqrt(0.75) / (1 - math.sqrt(0.75))
    assert lowband.ef21_step_size(L, Ls, alpha) == pytest.approx(1 / (L + 25.75 * xi), rel=1e-15)
    assert lowband.ef21_step_size(L, Ls, alpha, rule="qm") == \
        pytest.approx(1 / (L + math.sqrt(10003 / 4) * xi), rel=1e-15)
    assert lowband.ef21_step_size(L, Ls, 1.0) == 1 / L           # no compression: xi = 0
    w = lowband.ef21w_weights(Ls)
    assert w == pytest.approx([4 / 103, 4 / 103, 4 / 103, 400 / 103]) and sum(w) == pytest.approx(4)
    for args, exc, msg in (((0.0, Ls, 0.5), ValueError, "L"), ((1.0, [], 0.5), ValueError, "smoothness"),
                           ((1.0, [1.0, -1.0], 0.5), ValueError, r"smoothness\[1\]"),
                           ((1.0, Ls, 0.0), ValueError, "alpha"), ((1.0, Ls, 1.5), ValueError, "alpha"),
                           ((1.0, 3.0, 0.5), TypeError, "smoothness")):
        with pytest.raises(exc, match=msg):
            lowband.ef21_step_size(*args)
    with pytest.raises(ValueError, match="rule"):
        lowband.ef21_step_size(1.0, Ls, 0.5, rule="gm")


def test_ef21w_with_the_am_step_converges_where_the_qm_step_is_slower():
    """Heterogeneous least squares, Top-1: EF21-W with 1/(L + L_AM xi) gets
    the gradient norm lower in the same rounds than EF21 with 1/(L + L_QM xi)."""
    rng = np.random.default_rng(0)
    n, d, m = 4, 10, 20
    A = [rng.standard_normal((m, d)) * s for s in (1.0, 1.0, 1.0, 6.0)]
    b = [rng.standard_normal(m) for _ in range(n)]
    Li = [float(np.linalg.eigvalsh(a.T @ a / m).max()) for a in A]
    H = sum(a.T @ a / m for a in A) / n
    L = float(np.linalg.eigvalsh(H).max())
    grad = lambda i, x: A[i].T @ (A[i] @ x - b[i]) / m
    full = lambda x: sum(grad(i, x) for i in range(n)) / n
    alpha = 1 / d

    def run(weighted, gamma, rounds=300):
        weights = lowband.ef21w_weights(Li) if weighted else [1.0] * n
        ws = [lowband.EF21W("topk:1", np.zeros(d), w) for w in weights]
        server = lowband.EF21Server(np.zeros(d), weights=weights)
        x = np.zeros(d)
        server.update([w.step(grad(i, x)) for i, w in enumerate(ws)])
        for _ in range(rounds):
            x = x - gamma * server.g
            server.update([w.step(grad(i, x)) for i, w in enumerate(ws)])
        return float(np.sum(full(x) ** 2))

    old = run(False, lowband.ef21_step_size(L, Li, alpha, rule="qm"))
    new = run(True, lowband.ef21_step_size(L, Li, alpha))
    assert new < 0.5 * old
