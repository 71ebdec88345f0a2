"""DGC's sampled top-k: exact twin, bounds, fallbacks."""
import math

import numpy as np
import pytest

import lowband
from lowband import _reference as ref
from helpers import FLOATS, KINDS, THREADS, assert_sparse_matches, make_vector, unchanged


def check_against_twin(x, ratio, seed=0, step=0, sample_ratio=0.01):
    p, info = lowband.topk_sampled(x, ratio, sample_ratio=sample_ratio, seed=seed, step=step,
                                   return_info=True)
    idx, vals, rinfo = ref.topk_sampled(x, info["k"], sample_ratio, seed, step)
    assert_sparse_matches(p, idx, vals)
    for key in ("num_samples", "iterations", "exact_fallback"):
        assert info[key] == rinfo[key], key
    return p, info


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [0, 1, 100, 10007, 300007, 1 << 20])
def test_matches_reference(n, dtype):
    x = make_vector(n, dtype, seed=n)
    for ratio in (0.0, 0.001, 0.01, 0.1, 1.0):
        check_against_twin(x, ratio, seed=3, step=1)


@pytest.mark.parametrize("kind", KINDS)
def test_structured_inputs_match_reference(kind):
    x = make_vector(200003, np.float32, kind, seed=2)
    for ratio in (0.001, 0.01):
        check_against_twin(x, ratio, seed=1)


@pytest.mark.parametrize("kind", ["normal", "heavy", "sparse", "ties"])
def test_count_lands_in_bounds(kind):
    for seed in range(20):
        x = make_vector(100003, np.float32, kind, seed=seed)
        for ratio in (0.001, 0.01):
            p, info = lowband.topk_sampled(x, ratio, seed=seed, step=seed, return_info=True)
            k = info["k"]
            assert math.ceil(0.8 * k) <= p.nnz <= math.floor(1.3 * k)
            # what is kept is the largest magnitudes: nothing dropped beats anything kept
            kept = np.abs(p.values).min()
            rest = np.delete(np.abs(x), p.indices.astype(np.int64))
            assert rest.max() <= kept


def test_adaptation_lowers_threshold_or_falls_back():
    # a heavy-tailed vector whose sample overestimates the threshold
    x = np.zeros(100000, np.float32)
    x[::50] = 1.0
    x[::1000] = 100.0
    p, info = lowband.topk_sampled(x, 0.01, seed=0, return_info=True)
    assert 800 <= p.nnz <= 1300
    assert info["iterations"] > 0 or info["exact_fallback"]


@pytest.mark.parametrize("t", THREADS)
def test_thread_independent(t):
    x = make_vector(1 << 20, np.float32, "heavy")
    assert lowband.topk_sampled(x, 0.01, seed=1, threads=t) == lowband.topk_sampled(x, 0.01, seed=1, threads=1)


def test_input_unchanged_and_2d():
    x = make_vector(200 * 300).reshape(200, 300)
    p = unchanged(lowband.topk_sampled, x, 0.01, seed=2)
    assert p.shape == (200, 300)


def test_nonfinite():
    x = make_vector(50000)
    x[123] = np.nan
    with pytest.raises(ValueError, match="flat index 123"):
        lowband.topk_sampled(x, 0.01, seed=0)


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(ratio=0.01), TypeError, "seed"),
    (dict(ratio=1.5, seed=0), ValueError, "ratio"),
    (dict(ratio=0.01, seed=0, sample_ratio=0.0), ValueError, "sample_ratio"),
    (dict(ratio=0.01, seed=0, sample_ratio=1.5), ValueError, "sample_ratio"),
    (dict(ratio=0.01, seed=-3), ValueError, "seed"),
])
def test_bad_arguments(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        lowband.topk_sampled(make_vector(1000), **kwargs)
