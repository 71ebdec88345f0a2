"""lowband.federated: every method against its one-loop NumPy twin
(tests/fed_twins.py), reproducible client sampling, identical replicas,
byte accounting, state_dict round trips and bad input."""
import numpy as np
import pytest

import lowband
from lowband import federated as fed
from lowband.sim import Cluster
from fed_twins import LeastSquares, fed_twin

N, D = 5, 6


def run(cls, rounds, problem, *args, x0=None, cluster=None, **kw):
    """Run ``rounds`` rounds of cls on a Cluster(N); every rank's params."""
    x0 = np.zeros(problem.d) if x0 is None else x0
    grads = problem.grad_fns()
    cluster = cluster or Cluster(len(grads))

    def worker(comm):
        x = x0.copy()
        opt = cls(x, comm, *args, **kw)
        for _ in range(rounds):
            opt.round(grads[comm.rank])
        return x, opt
    out = cluster.run(worker)
    return [o[0] for o in out], [o[1] for o in out]


CASES = [
    ("fedavg", fed.FedAvg, (), dict(lr=0.05, local_steps=3, clients_per_round=3, seed=4), {}),
    ("fedavg", fed.FedAvg, (), dict(lr=0.05, local_steps=2, clients_per_round=2,
                                    weights=[1, 2, 3, 4, 5], compressor="topk:2"), {}),
    ("scaffold", fed.Scaffold, (), dict(lr=0.05, local_steps=3, clients_per_round=3, seed=1), {}),
    ("scallion", fed.Scallion, ("randomk:2:seed=5:rescale=True",),
     dict(lr=0.05, local_steps=3, clients_per_round=3, alpha=0.4), {}),
    ("scafcom", fed.Scafcom, ("topk:2",), dict(lr=0.05, local_steps=3, clients_per_round=4, beta=0.3), {}),
    ("fedspeed", fed.FedSpeed, (), dict(lr=0.05, local_steps=3, clients_per_round=3, lam=0.5,
                                        rho=0.05, alpha=0.5), {}),
    ("fedspeed", fed.FedSpeed, (), dict(lr=0.05, local_steps=2, prox_correction=False), {}),
]


@pytest.mark.parametrize("name,cls,args,kw,_", CASES)
def test_method_matches_its_twin_and_replicas_agree(name, cls, args, kw, _):
    prob = LeastSquares(N, D, seed=3)
    xs, opts = run(cls, 6, prob, *args, **kw)
    for x in xs[1:]:
        np.testing.assert_array_equal(x, xs[0])        # bit-identical replicas
    tw = dict(lr=kw["lr"], K=kw["local_steps"], S=kw.get("clients_per_round"), seed=kw.get("seed", 0))
    extra = {"weights": "weights", "compressor": "compressor", "alpha": "alpha", "beta": "beta",
             "lam": "lam", "rho": "rho", "prox_correction": "prox"}
    for k, v in kw.items():
        if k in extra:
            tw[extra[k]] = v
    if name == "fedspeed":
        tw["mix"] = kw.get("alpha", 0.5)
        tw.pop("alpha", None)
    if args:
        tw["compressor"] = args[0]
    want = fed_twin(name, np.zeros(D), prob.grad_fns(), 6, **tw)
    np.testing.assert_allclose(xs[0], want, rtol=1e-12, atol=1e-12)
    assert opts[0].t == 6


def test_sampling_is_seeded_and_reproducible():
    a = [fed.sample_clients(20, 5, 7, r).tolist() for r in range(10)]
    b = [fed.sample_clients(20, 5, 7, r).tolist() for r in range(10)]
    c = [fed.sample_clients(20, 5, 8, r).tolist() for r in range(10)]
    assert a == b and a != c
    assert all(len(set(s)) == 5 and s == sorted(s) and max(s) < 20 for s in a)
    assert len({tuple(s) for s in a}) > 1                      # rounds differ
    assert fed.sample_clients(4, 4, 0, 3).tolist() == [0, 1, 2, 3]
    # every client is drawn about S/N of the time
    counts = np.bincount(np.concatenate([fed.sample_clients(10, 3, 1, r) for r in range(3000)]), minlength=10)
    assert np.all(np.abs(counts / 3000 - 0.3) < 0.05)


def test_rounds_return_the_participants_and_same_seed_same_model():
    prob = LeastSquares(N, D, seed=0)
    x1, o1 = run(fed.FedAvg, 4, prob, lr=0.05, local_steps=2, clients_per_round=2, seed=9)
    x2, _ = run(fed.FedAvg, 4, prob, lr=0.05, local_steps=2, clients_per_round=2, seed=9)
    x3, _ = run(fed.FedAvg, 4, prob, lr=0.05, local_steps=2, clients_per_round=2, seed=10)
    np.testing.assert_array_equal(x1[0], x2[0])
    assert not np.array_equal(x1[0], x3[0])
    assert o1[0].last_round["clients"] == fed.sample_clients(N, 2, 9, 3).tolist()


def test_scallion_identity_is_scaffold_and_scafcom_beta1_too():
    prob = LeastSquares(N, D, seed=5)
    kw = dict(lr=0.04, local_steps=4, clients_per_round=3, seed=2)
    xs, _ = run(fed.Scaffold, 5, prob, **kw)
    xl, ol = run(fed.Scallion, 5, prob, "none", **kw)
    xc, _ = run(fed.Scafcom, 5, prob, "none", beta=1.0, **kw)
    assert ol[0].alpha == 1.0
    np.testing.assert_allclose(xl[0], xs[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(xc[0], xs[0], rtol=1e-10, atol=1e-12)


def test_scaffold_family_reaches_the_optimum_where_fedavg_stalls():
    prob = LeastSquares(4, D, batch=0, hetero=3.0, seed=1)       # full-batch gradients
    xstar = prob.solution()
    kw = dict(lr=0.02, local_steps=10)
    xa, _ = run(fed.FedAvg, 150, prob, **kw)
    xs, _ = run(fed.Scaffold, 150, prob, **kw)
    xc, _ = run(fed.Scafcom, 150, prob, "topk:3", beta=0.5, **kw)
    ea, es, ec = (np.linalg.norm(x[0] - xstar) for x in (xa, xs, xc))
    assert es < 1e-6 and ec < 1e-4 and ea > 100 * max(es, ec)


def test_byte_accounting():
    prob = LeastSquares(N, D, seed=0)
    cl = Cluster(N)
    xs, opts = run(fed.Scafcom, 3, prob, "topk:2", lr=0.05, local_steps=2, clients_per_round=2, cluster=cl)
    up_one = lowband.topk(np.arange(1.0, D + 1), k=2).nbytes
    dense = lowband.Dense(np.zeros(D)).nbytes
    empty = lowband.Dense(np.zeros(0)).nbytes
    o = opts[0]
    assert o.bytes_up == 3 * 2 * up_one                     # 3 rounds x 2 participants
    assert o.bytes_down == 3 * 2 * 2 * dense                # x and c to each participant
    assert all(p.bytes_up == o.bytes_up and p.bytes_down == o.bytes_down for p in opts)
    # the communicator: every payload (participant or empty) goes to N - 1 ranks
    part = np.zeros(N, int)
    for r in range(3):
        part[fed.sample_clients(N, 2, 0, r)] += 1
    want = (N - 1) * (part * up_one + (3 - part) * empty)
    np.testing.assert_array_equal(cl.bytes_sent, want)
    assert cl.bytes_received.sum() == cl.bytes_sent.sum()


def test_fedsb_exact_aggregation_and_bytes_independent_of_clients():
    rng = np.random.default_rng(0)
    m, n, r = 12, 10, 3
    B, R0, A = fed.lora_sb_init(rng.standard_normal((m, n)), r, lr=0.1)
    np.testing.assert_allclose(B.T @ B, np.eye(r), atol=1e-12)
    targets = [rng.standard_normal((r, r)) for _ in range(8)]

    def grads(i):
        return lambda R: (R - targets[i].reshape(-1))

    per_client = []
    for nc in (4, 8):
        cl = Cluster(nc)

        def worker(comm):
            R = R0.reshape(-1).copy()
            opt = fed.FedSB(R, comm, rank=r, lr=0.3, local_steps=2)
            before = R.copy()
            locals_ = opt._local(grads(comm.rank))
            opt.round(grads(comm.rank))
            return before, locals_, R.copy(), opt.delta(B, A), opt.last_round["up"] / nc
        out = cl.run(worker)
        mean_local = np.mean([o[1] for o in out], axis=0)
        np.testing.assert_allclose(out[0][2], mean_local, atol=1e-12)          # R = mean R_i
        full = np.mean([B @ o[1].reshape(r, r) @ A for o in out], axis=0)
        np.testing.assert_allclose(out[0][3], full, atol=1e-12)                # = mean of B R_i A
        per_client.append(out[0][4])
    assert per_client[0] == per_client[1] == lowband.Dense(np.zeros(r * r)).nbytes


def test_state_dict_round_trip_continues_identically():
    prob = LeastSquares(N, D, seed=2)
    kw = dict(lr=0.05, local_steps=2, clients_per_round=3)
    straight, _ = run(fed.Scafcom, 5, prob, "topk:2", **kw)
    grads = prob.grad_fns()

    def worker(comm):
        x = np.zeros(D)
        opt = fed.Scafcom(x, comm, "topk:2", **kw)
        for _ in range(3):
            opt.round(grads[comm.rank])
        st = opt.state_dict()
        y = np.full(D, 7.0)
        opt2 = fed.Scafcom(y, comm, "topk:2", **kw)
        opt2.load_state_dict(st)
        y[:] = x                                   # the model travels with the caller's params
        assert opt2.bytes_up == opt.bytes_up and opt2.t == 3
        for _ in range(2):
            opt2.round(grads[comm.rank])
        return y, st
    out = Cluster(N).run(worker)
    np.testing.assert_array_equal(out[0][0], straight[0])
    st = out[0][1]
    with pytest.raises(ValueError, match="hyper-parameters"):
        Cluster(N).run(lambda comm: fed.Scafcom(np.zeros(D), comm, "topk:3", **kw).load_state_dict(st))
    with pytest.raises(ValueError, match="Scaffold state_dict"):
        Cluster(N).run(lambda comm: fed.Scaffold(np.zeros(D), comm, lr=0.05, local_steps=2).load_state_dict(st))


def test_bad_input():
    def ctor(fn):
        return Cluster(2).run(lambda comm: fn(comm))
    x = np.zeros(3)
    with pytest.raises(ValueError, match=r"clients_per_round: .*got 3"):
        ctor(lambda c: fed.FedAvg(x.copy(), c, lr=0.1, local_steps=1, clients_per_round=3))
    with pytest.raises(ValueError, match="local_steps"):
        ctor(lambda c: fed.FedAvg(x.copy(), c, lr=0.1, local_steps=0))
    with pytest.raises(TypeError, match="comm"):
        fed.FedAvg(x.copy(), None, lr=0.1, local_steps=1)
    with pytest.raises(ValueError, match=r"weights: expected 2 client weights.*\(3,\)"):
        ctor(lambda c: fed.FedAvg(x.copy(), c, lr=0.1, local_steps=1, weights=[1, 2, 3]))
    with pytest.raises(ValueError, match="weights: expected finite weights > 0"):
        ctor(lambda c: fed.FedAvg(x.copy(), c, lr=0.1, local_steps=1, weights=[1, 0]))
    with pytest.raises(ValueError, match=r"compressor: SCALLION needs an unbiased compressor, got 'topk:2'"):
        ctor(lambda c: fed.Scallion(x.copy(), c, "topk:2", lr=0.1, local_steps=1))
    with pytest.raises(ValueError, match="alpha: no default"):
        ctor(lambda c: fed.Scallion(x.copy(), c, "qsgd:4", lr=0.1, local_steps=1))
    with pytest.raises(ValueError, match="beta"):
        ctor(lambda c: fed.Scafcom(x.copy(), c, "topk:2", lr=0.1, local_steps=1, beta=0.0))
    with pytest.raises(ValueError, match=r"params: expected layers \* rank\*\*2 = 4"):
        ctor(lambda c: fed.FedSB(x.copy(), c, rank=2, lr=0.1, local_steps=1))
    with pytest.raises(TypeError, match="grad_fn: expected a callable"):
        ctor(lambda c: fed.FedAvg(x.copy(), c, lr=0.1, local_steps=1).round(3))
    with pytest.raises(ValueError, match=r"grad_fn\(y\): expected shape \(3,\), got \(2,\)"):
        ctor(lambda c: fed.FedAvg(x.copy(), c, lr=0.1, local_steps=1).round(lambda y: np.zeros(2)))
    with pytest.raises(TypeError, match=r"grad_fn\(y\): expected dtype float64"):
        ctor(lambda c: fed.FedAvg(x.copy(), c, lr=0.1, local_steps=1).round(
            lambda y: np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match="rank"):
        fed.lora_sb_init(np.zeros((3, 4)), 5)


@pytest.mark.parametrize("cls,args", [(fed.FedAvg, ()), (fed.Scaffold, ()), (fed.Scafcom, ("topk:2",)),
                                      (fed.Scallion, ("randomk:2:rescale=True",)), (fed.FedSpeed, ())])
def test_float32_params_stay_float32_and_replicas_agree(cls, args):
    prob = LeastSquares(4, D, seed=8, dtype=np.float32)
    grads = prob.grad_fns()

    def worker(comm):
        x = np.zeros(D, np.float32)
        opt = cls(x, comm, *args, lr=0.05, local_steps=2, clients_per_round=2)
        for _ in range(3):
            opt.round(grads[comm.rank])
        assert all(a.dtype == np.float32 for a in opt.state_dict()["arrays"].values())
        return x
    xs = Cluster(4).run(worker)
    assert xs[0].dtype == np.float32 and np.all(np.isfinite(xs[0])) and np.any(xs[0] != 0)
    for x in xs[1:]:
        np.testing.assert_array_equal(x, xs[0])
