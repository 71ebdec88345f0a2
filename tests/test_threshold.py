"""threshold(x, tau): all |x| >= tau."""
import numpy as np
import pytest

import lowband
from lowband import _reference as ref
from helpers import FLOATS, KINDS, SIZES, THREADS, assert_sparse_matches, make_vector, noncontiguous, unchanged


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", SIZES)
def test_matches_reference(n, dtype):
    x = make_vector(n, dtype, seed=n)
    for tau in (0.0, 0.5, 1.0, 2.5, 1e30):
        assert_sparse_matches(unchanged(lowband.threshold, x, tau), *ref.threshold(x, tau))


@pytest.mark.parametrize("kind", KINDS)
def test_structured(kind):
    x = make_vector(70001, np.float32, kind)
    for tau in (0.0, 1.0, 2.0):
        assert_sparse_matches(lowband.threshold(x, tau), *ref.threshold(x, tau))


def test_tau_between_float32_values_is_exact():
    # 0.1 is not a float32: float32(0.1) > 0.1, and the next lower float is < 0.1
    below = np.nextafter(np.float32(0.1), np.float32(0))
    x = np.array([below, np.float32(0.1), 0.2], dtype=np.float32)
    assert lowband.threshold(x, 0.1).indices.tolist() == [1, 2]
    assert lowband.threshold(x, float(np.float32(0.1))).indices.tolist() == [1, 2]
    assert lowband.threshold(x, float(below)).indices.tolist() == [0, 1, 2]


def test_2d_noncontiguous_and_threads():
    x = make_vector(300007, np.float64, "heavy")
    base = lowband.threshold(x, 3.0, threads=1)
    for t in THREADS:
        assert lowband.threshold(x, 3.0, threads=t) == base
    v = noncontiguous(make_vector(1001))
    assert_sparse_matches(lowband.threshold(v, 1.0), *ref.threshold(v.copy(), 1.0))
    assert lowband.threshold(make_vector(60).reshape(6, 10), 1.0).shape == (6, 10)


def test_nonfinite():
    x = make_vector(100)
    x[7] = np.inf
    with pytest.raises(ValueError, match="flat index 7"):
        lowband.threshold(x, 1.0)
    x[8] = np.nan
    assert_sparse_matches(lowband.threshold(x, 1.0, check_finite=False), *ref.threshold(x, 1.0))


@pytest.mark.parametrize("tau,exc", [(-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                                     ("1", TypeError), (None, TypeError)])
def test_bad_tau(tau, exc):
    with pytest.raises(exc, match="tau"):
        lowband.threshold(make_vector(10), tau)
