"""Random-k: twin, shared-seed contract, uniformity, rescaling, bad input."""
import numpy as np
import pytest
from scipy import stats

import lowband
from lowband import _core, _reference as ref
from helpers import FLOATS, THREADS, assert_same, assert_sparse_matches, make_vector, noncontiguous, unchanged


@pytest.mark.parametrize("n,k", [(0, 0), (1, 0), (1, 1), (2, 1), (10, 3), (10, 7), (10, 10), (97, 40),
                                 (1000, 10), (1000, 600), (70001, 700), (3_000_000, 30)])
def test_indices_match_reference(n, k):
    for seed, step in ((0, 0), (12345, 7), (2**64 - 1, 2**56 - 1)):
        got = _core.randomk_indices(n, k, seed, step)
        assert_same(got, ref.randomk_indices(n, k, seed, step))
        assert got.size == k and np.all(np.diff(got.astype(np.int64)) > 0)
        if k:
            assert int(got[-1]) < n


@pytest.mark.parametrize("dtype", FLOATS)
def test_payload_matches_reference(dtype):
    x = make_vector(5003, dtype)
    for rescale in (False, True):
        p = unchanged(lowband.randomk, x, 50, seed=9, step=3, rescale=rescale)
        assert_sparse_matches(p, *ref.randomk(x, 50, 9, 3, rescale))
        assert p.seed == 9 and p.step == 3 and p.summable
    assert lowband.randomk(x, ratio=0.01, seed=1).nnz == 50


def test_hash_and_bitmap_paths_agree_with_twin():
    # n > 2**20 with small k uses the hash set; the twin uses a Python set
    n = (1 << 22) + 5
    assert_same(_core.randomk_indices(n, 1000, 4, 2), ref.randomk_indices(n, 1000, 4, 2))
    # ... and a bitmap from a density of 1/1024 up (drawn ahead with prefetches)
    for k in (n // 1000, n // 100):
        assert_same(_core.randomk_indices(n, k, 4, 2), ref.randomk_indices(n, k, 4, 2))


def test_workers_with_same_seed_pick_same_coordinates():
    a, b = make_vector(10000, seed=1), make_vector(10000, seed=2)
    pa = lowband.randomk(a, 100, seed=42, step=5)
    pb = lowband.randomk(b, 100, seed=42, step=5)
    assert np.array_equal(pa.indices, pb.indices)
    summed = lowband.aggregate([pa, pb], op="sum")
    expect = np.zeros(10000, np.float32)
    expect[pa.indices] = a[pa.indices] + b[pa.indices]
    assert_same(summed, expect)
    assert not np.array_equal(pa.indices, lowband.randomk(a, 100, seed=42, step=6).indices)
    assert not np.array_equal(pa.indices, lowband.randomk(a, 100, seed=43, step=5).indices)


def test_uniform_marginals():
    n, k, trials = 40, 8, 4000
    counts = np.zeros(n)
    for s in range(trials):
        counts[_core.randomk_indices(n, k, s, 0).astype(np.int64)] += 1
    chi2 = ((counts - trials * k / n) ** 2 / (trials * k / n)).sum()
    assert chi2 < stats.chi2.ppf(1 - 1e-6, n - 1)


def test_uniform_over_subsets():
    # every one of the C(6, 2) = 15 subsets equally likely
    trials = 6000
    seen = {}
    for s in range(trials):
        key = tuple(_core.randomk_indices(6, 2, s, 1).tolist())
        seen[key] = seen.get(key, 0) + 1
    assert len(seen) == 15
    counts = np.array(list(seen.values()))
    chi2 = ((counts - trials / 15) ** 2 / (trials / 15)).sum()
    assert chi2 < stats.chi2.ppf(1 - 1e-6, 14)


def test_rescaled_is_unbiased():
    x = make_vector(50, np.float64, seed=3)
    est = np.zeros(50)
    trials = 20000
    for s in range(trials):
        est += lowband.randomk(x, 5, seed=s, rescale=True).to_dense()
    assert np.abs(est / trials - x).max() < 0.15 * np.abs(x).max()


@pytest.mark.parametrize("t", THREADS)
def test_thread_independent(t):
    x = make_vector(300007, np.float32)
    base = lowband.randomk(x, 3000, seed=1, threads=1)
    assert lowband.randomk(x, 3000, seed=1, threads=t) == base


@pytest.mark.parametrize("t", THREADS)
def test_indices_thread_independent(t):
    """The Philox words, the clearing and the scan of the index set run on
    the team: every team gives the twin's indices (uint32), for a sample,
    a complement and a near-full one, n not a multiple of 64."""
    n = 5 * 65536 + 37
    for k in (n // 100, n // 2 + 1000, n - 3):
        got = _core.randomk_indices(n, k, 3, 1, t)
        assert got.dtype == np.uint32
        assert_same(got, ref.randomk_indices(n, k, 3, 1))


def test_noncontiguous_and_2d():
    v = noncontiguous(make_vector(999, np.float64))
    assert_sparse_matches(lowband.randomk(v, 9, seed=1), *ref.randomk(v.copy(), 9, 1, 0))
    m = make_vector(600).reshape(20, 30)
    p = lowband.randomk(m, 9, seed=1)
    assert p.shape == (20, 30)


def test_nonfinite_checks_sent_values():
    x = make_vector(100)
    idx = lowband.randomk(x, 5, seed=1).indices
    x[idx[2]] = np.nan
    with pytest.raises(ValueError, match=f"flat index {idx[2]}"):
        lowband.randomk(x, 5, seed=1)
    assert lowband.randomk(x, 5, seed=1, check_finite=False).nnz == 5


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(k=1), TypeError, "seed"),
    (dict(k=1, seed=-1), ValueError, r"seed: expected an int in \[0, 2\*\*64\), got -1"),
    (dict(k=1, seed=2**64), ValueError, "seed"),
    (dict(k=1, seed=1.0), TypeError, "seed"),
    (dict(k=1, seed="1"), TypeError, "seed"),
    (dict(k=1, seed=1, step=-1), ValueError, "step"),
    (dict(k=1, seed=1, step=2**56), ValueError, "step"),
    (dict(k=11, seed=1), ValueError, "k: expected 0 <= k <= n"),
    (dict(ratio=2.0, seed=1), ValueError, "ratio"),
])
def test_bad_arguments(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        lowband.randomk(make_vector(10), **kwargs)


def test_every_isa_path_draws_the_same_indices(isa):
    # the draws' words come from the ISA's vectorised Philox, in batches
    for n, k in ((10, 3), (5000, 1234), (1 << 21, 3000), ((1 << 22) + 5, 1000)):
        assert_same(_core.randomk_indices(n, k, 7, 3), ref.randomk_indices(n, k, 7, 3))
