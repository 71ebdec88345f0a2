"""lowband.optim.CO2 against a one-loop NumPy twin: one-round-stale outer
momentum, the staleness gap penalty, in-place outer-momentum clipping."""
import numpy as np
import pytest

from lowband.optim import CO2, SGD
from lowband.sim import Cluster
from fed_twins import LeastSquares, co2_twin

W, D = 3, 5


def run(steps, prob, **kw):
    grads = prob.grad_fns()
    cl = Cluster(W)

    def worker(comm):
        x = np.zeros(D)
        opt = CO2(x, comm, lambda p: SGD(p, 0.05), 4, **kw)
        applied = [opt.step(grads[comm.rank](x.copy())) for _ in range(steps)]
        return x, opt, applied
    out = cl.run(worker)
    return np.stack([o[0] for o in out]), [o[1] for o in out], out[0][2], cl


@pytest.mark.parametrize("kw", [dict(staleness=1), dict(staleness=0), dict(staleness=1, outer_lr=1.5, outer_momentum=0.3),
                                dict(staleness=1, gap_penalty=2.0), dict(staleness=1, gap_penalty="adaptive"),
                                dict(staleness=1, clip=0.01, outer_momentum=0.9)])
def test_co2_matches_its_twin(kw):
    prob = LeastSquares(W, D, seed=4)
    X, opts, applied, _ = run(20, prob, **kw)
    want = co2_twin(np.zeros(D), prob.grad_fns(), 20, 0.05, 4, kw.get("outer_lr", 1.0),
                    kw.get("outer_momentum", 0.5), kw["staleness"], kw.get("gap_penalty"), kw.get("clip"))
    np.testing.assert_allclose(X, want, rtol=1e-12, atol=1e-12)
    assert all(np.array_equal(x, X[0]) for x in X)
    assert applied == [t % 4 == 3 and (kw["staleness"] == 0 or t > 3) for t in range(20)]


def test_co2_sync_without_momentum_is_local_sgd_and_clip_is_in_place():
    prob = LeastSquares(W, D, seed=1)
    X, _, _, cl = run(8, prob, staleness=0, outer_momentum=0.0)
    grads = prob.grad_fns()
    x = np.zeros((W, D))
    for t in range(1, 9):
        x = np.stack([x[i] - 0.05 * grads[i](x[i].copy()) for i in range(W)])
        if t % 4 == 0:
            x[:] = x.mean(0)
    np.testing.assert_allclose(X, x, rtol=1e-12, atol=1e-14)
    assert cl.by_collective["allreduce"]["sent"][0] == 2 * 2 * (W - 1) * -(-D // W) * 8
    _, opts, _, _ = run(12, prob, staleness=1, clip=1e-3)
    assert np.abs(opts[0].momentum).max() <= 1e-3


def test_co2_state_dict_round_trip():
    prob = LeastSquares(W, D, seed=2)
    straight, _, _, _ = run(14, prob, staleness=1, gap_penalty="adaptive")
    grads = prob.grad_fns()

    def worker(comm):
        x = np.zeros(D)
        opt = CO2(x, comm, lambda p: SGD(p, 0.05), 4, gap_penalty="adaptive")
        for _ in range(6):
            opt.step(grads[comm.rank](x.copy()))
        st = opt.state_dict()
        y = x.copy()
        opt2 = CO2(y, comm, lambda p: SGD(p, 0.05), 4, gap_penalty="adaptive")
        opt2.load_state_dict(st)
        for _ in range(8):
            opt2.step(grads[comm.rank](y.copy()))
        return y
    np.testing.assert_array_equal(np.stack(Cluster(W).run(worker)), straight)


def test_co2_bad_input():
    def make(**kw):
        return Cluster(1).run(lambda c: CO2(np.zeros(4), c, lambda p: SGD(p, 0.1), 2, **kw))
    with pytest.raises(ValueError, match="staleness"):
        make(staleness=2)
    with pytest.raises(ValueError, match="gap_penalty: expected None, a number > 0 or 'adaptive', got 'auto'"):
        make(gap_penalty="auto")
    with pytest.raises(ValueError, match="clip"):
        make(clip=0.0)
    with pytest.raises(ValueError, match="layers: the sizes add up to 3, params has 4"):
        make(layers=[1, 2])
    with pytest.raises(ValueError, match="inner: the inner optimizer must update the same params array"):
        Cluster(1).run(lambda c: CO2(np.zeros(4), c, SGD(np.zeros(4), 0.1), 2))
