"""aggregate() and Sparse.to_dense() against the twin."""
import numpy as np
import pytest

import lowband
from lowband import _reference as ref
from helpers import FLOATS, THREADS, assert_same, make_vector


def payloads(n, w, dtype, density=0.01, seed=0):
    return [lowband.topk(make_vector(n, dtype, "normal", seed=seed + i), ratio=density) for i in range(w)]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("op", ["sum", "mean", "contributor_mean"])
@pytest.mark.parametrize("n,w", [(1, 1), (10, 3), (1000, 8), (100003, 8), (300007, 5)])
def test_matches_reference(n, w, op, dtype):
    ps = payloads(n, w, dtype, density=0.3)
    got = lowband.aggregate(ps, op=op)
    assert_same(got, ref.aggregate([(p.indices, p.values) for p in ps], n, dtype, op))


def test_overlapping_coordinates_contributor_mean():
    a = lowband.Sparse([0, 2], np.array([1.0, 3.0], np.float32), 4)
    b = lowband.Sparse([2, 3], np.array([5.0, 7.0], np.float32), 4)
    assert lowband.aggregate([a, b], op="contributor_mean").tolist() == [1.0, 0.0, 4.0, 7.0]
    assert lowband.aggregate([a, b], op="mean").tolist() == [0.5, 0.0, 4.0, 3.5]
    assert lowband.aggregate([a, b], op="sum").tolist() == [1.0, 0.0, 8.0, 7.0]


def test_to_dense_and_out():
    x = make_vector(3000, np.float64).reshape(30, 100)
    p = lowband.topk(x, 50)
    d = p.to_dense()
    assert d.shape == (30, 100)
    expect = np.zeros_like(x)
    expect.reshape(-1)[p.indices] = p.values
    assert_same(d, expect)
    out = np.full((30, 100), 7.0)
    assert p.to_dense(out=out) is out and np.array_equal(out, expect)
    flat_out = np.full(3000, 7.0)
    lowband.aggregate([p], op="sum", out=flat_out)
    assert np.array_equal(flat_out, expect.reshape(-1))


@pytest.mark.parametrize("t", THREADS)
def test_thread_independent(t):
    ps = payloads(300007, 8, np.float32, 0.05)
    base = lowband.aggregate(ps, op="mean", threads=1)
    assert_same(lowband.aggregate(ps, op="mean", threads=t), base)


def test_bad_inputs():
    ps = payloads(100, 2, np.float32, 0.1)
    with pytest.raises(ValueError, match="op: expected one of"):
        lowband.aggregate(ps, op="max")
    with pytest.raises(ValueError, match="at least one"):
        lowband.aggregate([])
    with pytest.raises(ValueError, match=r"payloads\[1\]: shape"):
        lowband.aggregate([ps[0], lowband.topk(make_vector(101), 3)])
    with pytest.raises(ValueError, match=r"payloads\[1\]: .*dtype"):
        lowband.aggregate([ps[0], lowband.topk(make_vector(100, np.float64), 3)])
    with pytest.raises(TypeError, match=r"payloads\[0\]: expected a Sparse"):
        lowband.aggregate([np.zeros(100)])
    with pytest.raises(TypeError, match="out: expected dtype float32"):
        lowband.aggregate(ps, out=np.zeros(100))
    with pytest.raises(ValueError, match="out: expected shape"):
        lowband.aggregate(ps, out=np.zeros(99, np.float32))
    with pytest.raises(ValueError, match="writeable"):
        lowband.aggregate(ps, out=np.zeros(200, np.float32)[::2])
    with pytest.raises(TypeError, match="out: expected an ndarray"):
        lowband.aggregate(ps, out=[0.0] * 100)


def test_core_rejects_bad_indices_without_crashing():
    out = np.zeros(10, np.float32)
    v = np.ones(2, np.float32)
    with pytest.raises(ValueError, match="dense size"):
        lowband._core.aggregate([(np.array([1, 10], np.uint32), v)], "sum", out)
    with pytest.raises(ValueError, match="ascending"):
        lowband._core.aggregate([(np.array([3, 3], np.uint32), v)], "sum", out)
    with pytest.raises(TypeError):
        lowband._core.aggregate([(np.array([1, 2], np.int64), v)], "sum", out)
