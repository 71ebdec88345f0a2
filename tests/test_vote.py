"""majority_vote on packed sign bits against its NumPy twin, the Signum
compressor, and lowband.optim.Signum (signSGD / Signum with majority vote,
Bernstein et al. 2018, 2019) against a NumPy twin in lowband.sim.Cluster."""
import numpy as np
import pytest

import lowband
from lowband import _reference as ref, sim
from lowband.optim import Signum
from helpers import FLOATS, SIZES, THREADS, assert_same, make_vector


def signs(n, W, seed=0, dtype=np.float32, kind="normal"):
    return [lowband.sign(make_vector(n, dtype, kind, seed=seed + w), scale="none") for w in range(W)]


@pytest.mark.parametrize("n", SIZES)
def test_matches_twin(n):
    for W in (1, 2, 3, 4, 5, 8, 9):
        ps = signs(n, W, seed=n + W)
        v = lowband.majority_vote(ps)
        assert_same(v.arrays["codes"], ref.majority_vote([p.codes for p in ps], n), f"W={W}")
        assert v.shape == (n,) and v.scheme == "sign" and v.params == {"scale": 0, "block": 0}
        for t in (1, W):
            assert_same(lowband.majority_vote(ps, threshold=t).codes,
                        ref.majority_vote([p.codes for p in ps], n, t), f"W={W} t={t}")


def test_many_voters_and_known_answers():
    ps = signs(1003, 37, seed=1)
    assert_same(lowband.majority_vote(ps).codes, ref.majority_vote([p.codes for p in ps], 1003))
    x = np.array([1.0, -1.0, 1.0, -1.0], np.float64)
    y = np.array([1.0, -1.0, -1.0, 1.0], np.float64)
    v = lowband.majority_vote([lowband.sign(x), lowband.sign(y, scale="rms")])
    np.testing.assert_array_equal(v.dequantize(), [1.0, -1.0, 1.0, 1.0])   # ties give +1
    assert v.dtype == np.float64
    three = lowband.majority_vote([lowband.sign(x), lowband.sign(y), lowband.sign(-x)])
    np.testing.assert_array_equal(three.dequantize(), y)


@pytest.mark.parametrize("threads", THREADS)
def test_same_bytes_for_every_thread_count(threads):
    ps = signs(300007, 5, seed=3)
    assert lowband.majority_vote(ps, threads=threads) == lowband.majority_vote(ps, threads=1)


def test_result_is_canonical_on_the_wire():
    for n in (1, 9, 64, 1000):
        v = lowband.majority_vote(signs(n, 4, seed=n))
        assert lowband.decode(lowband.encode(v)) == v


def test_bad_input():
    ps = signs(100, 3)
    with pytest.raises(ValueError, match="at least one"):
        lowband.majority_vote([])
    with pytest.raises(TypeError, match="list of sign payloads"):
        lowband.majority_vote(ps[0])
    with pytest.raises(TypeError, match=r"payloads\[1\].*sign payload"):
        lowband.majority_vote([ps[0], lowband.quantize(make_vector(100), 4)])
    with pytest.raises(TypeError, match=r"payloads\[2\]"):
        lowband.majority_vote([ps[0], ps[1], np.ones(100)])
    with pytest.raises(ValueError, match=r"payloads\[1\].*shape"):
        lowband.majority_vote([ps[0], lowband.sign(make_vector(101))])
    for t in (0, 4, -1):
        with pytest.raises(ValueError, match="threshold"):
            lowband.majority_vote(ps, threshold=t)
    with pytest.raises(TypeError, match="threshold"):
        lowband.majority_vote(ps, threshold=1.5)


# ---------------------------------------------------------------------------
# Signum: the compressor and the optimizer
# ---------------------------------------------------------------------------

def test_signum_compressor_is_the_sign_of_the_momentum():
    rng = np.random.default_rng(0)
    c = lowband.from_spec("signum:0.8")
    assert c.spec == "signum:0.8" and c == lowband.Signum(0.8)
    m = np.zeros(50, np.float32)
    for _ in range(4):
        g = rng.standard_normal(50).astype(np.float32)
        m = np.float32(0.8) * m + np.float32(0.2) * g
        p = c.compress(g)
        assert p == lowband.sign(m, scale="none")
    with pytest.raises(ValueError, match="shape"):
        c.compress(np.zeros(51, np.float32))
    c.reset()
    assert c.compress(np.ones(51, np.float32)).dequantize().tolist() == [1.0] * 51
    with pytest.raises(ValueError, match="beta"):
        lowband.Signum(1.0)


def twin_signum(x0, grads, lr, beta, wd):
    """NumPy signSGD/Signum with majority vote; grads[t][w]."""
    W = len(grads[0])
    x = x0.copy()
    f = x.dtype.type
    m = [np.zeros_like(x) for _ in range(W)]
    for step in grads:
        votes = np.zeros(x.size, np.int64)
        for w in range(W):
            m[w] = m[w] * f(beta) + f(1 - beta) * step[w]
            votes += np.where(m[w] >= 0, 1, -1)
        s = np.where(votes >= 0, 1.0, -1.0).astype(x.dtype)
        d = s + f(wd) * x if wd else s
        x = x - f(lr) * d
    return x


@pytest.mark.parametrize("W", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", FLOATS)
def test_signum_optimizer_matches_twin(W, dtype):
    n, steps = 333, 5
    rng = np.random.default_rng(W)
    x0 = make_vector(n, dtype, seed=1)
    grads = [[rng.standard_normal(n).astype(dtype) for _ in range(W)] for _ in range(steps)]
    for beta, wd in ((0.9, 0.0), (0.0, 0.01)):
        cluster = sim.Cluster(W)

        def fn(comm):
            x = x0.copy()
            opt = Signum(x, comm, lr=0.01, beta=beta, weight_decay=wd)
            for g in grads:
                opt.step(g[comm.rank])
            return x

        xs = cluster.run(fn)
        want = twin_signum(x0, grads, 0.01, beta, wd)
        for x in xs:
            assert_same(x, want, f"W={W} beta={beta}")
        if W > 1:   # one packed sign payload to each other rank per step
            per = lowband.sign(x0, scale="none").nbytes
            assert list(cluster.bytes_sent) == [steps * per * (W - 1)] * W


def test_signum_optimizer_state_and_bad_input():
    x = make_vector(10, np.float64)
    opt = Signum(x, lr=0.1)
    opt.step(make_vector(10, np.float64, seed=2))
    other = Signum(make_vector(10, np.float64), lr=0.1)
    other.load_state_dict(opt.state_dict())
    assert_same(other.momentum, opt.momentum)
    with pytest.raises(ValueError, match="hyper"):
        Signum(make_vector(10, np.float64), lr=0.2).load_state_dict(opt.state_dict())
    with pytest.raises(TypeError, match="dtype"):
        opt.step(make_vector(10, np.float32))
    with pytest.raises(ValueError, match="beta"):
        Signum(x, beta=-0.1)
    with pytest.raises(TypeError, match="comm"):
        Signum(x, comm=object())
