"""Exact top-k against its NumPy twin: sizes, dtypes, ties, layouts,
instruction-set paths, thread counts and bad input."""
import numpy as np
import pytest

import lowband
from lowband import _reference as ref
from helpers import (FLOATS, KINDS, LARGE, SIZES, THREADS, assert_same, assert_sparse_matches,
                     make_vector, noncontiguous, unchanged)


def ks_for(n):
    return sorted({0, 1, n // 100, n // 7, n // 2, max(n - 1, 0), n} & set(range(n + 1)))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", SIZES)
def test_matches_reference_over_sizes(n, dtype):
    x = make_vector(n, dtype, "normal", seed=n)
    for k in ks_for(n):
        p = unchanged(lowband.topk, x, k)
        assert_sparse_matches(p, *ref.topk(x, k), shape=x.shape)
        assert p.indices.dtype == np.uint32 and p.dtype == dtype


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("kind", KINDS)
def test_structured_inputs(kind, dtype):
    for n in (1000, 70001):
        x = make_vector(n, dtype, kind, seed=3)
        for k in ks_for(n):
            assert_sparse_matches(lowband.topk(x, k), *ref.topk(x, k))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("kind", KINDS)
def test_large_fast_and_fallback_paths(kind, dtype):
    # n >= 2**20 takes the sampled one-pass path; ties/equal/zeros overflow
    # its candidate buffers and take the two-pass radix path.
    x = make_vector(LARGE, dtype, kind, seed=11)
    for k in (1, 17, LARGE // 1000, LARGE // 100, LARGE // 3):
        assert_sparse_matches(lowband.topk(x, k), *ref.topk(x, k))


def test_ties_go_to_lower_index():
    x = np.array([1.0, -3.0, 3.0, 2.0, -3.0, 3.0], dtype=np.float32)
    p = lowband.topk(x, 2)
    assert p.indices.tolist() == [1, 2]
    assert p.values.tolist() == [-3.0, 3.0]


def test_negative_zero_is_kept_with_its_sign():
    x = np.array([-0.0, 0.0, -0.0], dtype=np.float64)
    p = lowband.topk(x, 2)
    assert p.indices.tolist() == [0, 1]
    assert np.signbit(p.values).tolist() == [True, False]


@pytest.mark.parametrize("dtype", FLOATS)
def test_ratio(dtype):
    x = make_vector(1000, dtype)
    assert lowband.topk(x, ratio=0.01).nnz == 10
    assert lowband.topk(x, ratio=0.0).nnz == 0
    assert lowband.topk(x, ratio=1.0).nnz == 1000
    assert lowband.topk(x, ratio=0.0001).nnz == 1   # at least one when ratio > 0
    assert lowband.topk(x[:0], ratio=0.5).nnz == 0


def test_multidimensional_and_noncontiguous():
    x = make_vector(6 * 7 * 11, np.float32, seed=5).reshape(6, 7, 11)
    p = unchanged(lowband.topk, x, 20)
    assert p.shape == (6, 7, 11)
    assert_sparse_matches(p, *ref.topk(x, 20))
    xt = x.transpose(2, 0, 1)
    assert_sparse_matches(lowband.topk(xt, 20), *ref.topk(np.ascontiguousarray(xt), 20))
    v = noncontiguous(make_vector(5001, np.float64))
    assert_sparse_matches(unchanged(lowband.topk, v, 50), *ref.topk(v.copy(), 50))
    big_endian = make_vector(100, np.float32).astype(">f4")
    assert_sparse_matches(lowband.topk(big_endian, 5), *ref.topk(big_endian.astype("<f4"), 5))


def test_list_input():
    p = lowband.topk([1.0, -5.0, 2.0], 1)
    assert p.indices.tolist() == [1] and p.dtype == np.float64


@pytest.mark.parametrize("n", [5000, LARGE])
def test_byte_identical_for_any_thread_count(n):
    x = make_vector(n, np.float32, "heavy", seed=1)
    base = lowband.topk(x, n // 100, threads=1)
    for t in THREADS:
        p = lowband.topk(x, n // 100, threads=t)
        assert_same(p.indices, base.indices)
        assert_same(p.values, base.values)
    lowband.set_num_threads(3)
    assert lowband.topk(x, n // 100) == base


def test_every_isa_path_agrees(isa):
    for dtype in FLOATS:
        for kind in ("normal", "ties", "sparse"):
            x = make_vector(LARGE, dtype, kind, seed=2)
            k = LARGE // 100
            assert_sparse_matches(lowband.topk(x, k, threads=2), *ref.topk(x, k))
            y = make_vector(1003, dtype, kind, seed=2)
            assert_sparse_matches(lowband.topk(y, 10), *ref.topk(y, 10))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_raises_with_index(bad, dtype):
    for n in (10, LARGE):
        x = make_vector(n, dtype)
        x[n // 2] = bad
        x[n - 1] = bad
        with pytest.raises(ValueError, match=f"flat index {n // 2}\\b"):
            lowband.topk(x, 3)
        with pytest.raises(ValueError, match="check_finite=False"):
            lowband.topk(x, 0)
        with pytest.raises(ValueError):
            lowband.topk(x, n)


@pytest.mark.parametrize("dtype", FLOATS)
def test_nonfinite_ordering_when_unchecked(dtype):
    x = np.array([1.0, np.inf, np.nan, -np.inf, 5.0, -np.nan], dtype=dtype)
    p = lowband.topk(x, 4, check_finite=False)
    # NaN ranks above +-Inf, which rank above every finite value
    assert p.indices.tolist() == [1, 2, 3, 5]
    assert_sparse_matches(p, *ref.topk(x, 4))
    big = make_vector(LARGE, dtype)
    big[[3, 99, 100000]] = [np.nan, np.inf, -np.inf]
    assert_sparse_matches(lowband.topk(big, 1000, check_finite=False), *ref.topk(big, 1000))


@pytest.mark.parametrize("x", [np.arange(10), np.ones(4, dtype=bool), np.ones(3, dtype=np.complex64),
                               np.array(["a"]), np.ones(5, dtype=np.int8)])
def test_wrong_dtype(x):
    with pytest.raises(TypeError, match="x: expected a float32, float64, float16 or bfloat16 array, got dtype"):
        lowband.topk(x, 1)


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(k=-1), ValueError, r"k: expected 0 <= k <= n \(n = 10\), got -1"),
    (dict(k=11), ValueError, r"got 11"),
    (dict(k=1.5), TypeError, "k: expected an int, got float"),
    (dict(k=True), TypeError, "k: expected an int, got bool"),
    (dict(ratio=1.5), ValueError, r"ratio: expected a finite number in \[0.0, 1.0\], got 1.5"),
    (dict(ratio=-0.1), ValueError, "ratio"),
    (dict(ratio=float("nan")), ValueError, "ratio"),
    (dict(ratio="0.1"), TypeError, "ratio"),
    (dict(), TypeError, "exactly one of k= or ratio="),
    (dict(k=1, ratio=0.1), TypeError, "exactly one"),
    (dict(k=1, threads=0), ValueError, "threads"),
    (dict(k=1, threads=2.0), TypeError, "threads"),
    (dict(k=1, threads=True), TypeError, "threads"),
])
def test_bad_arguments(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        lowband.topk(make_vector(10), **kwargs)


def test_numpy_integer_k_is_accepted():
    x = make_vector(100)
    assert lowband.topk(x, np.int64(5)).nnz == 5
