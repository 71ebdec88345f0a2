"""Chunked (1-D) and tiled (2-D) top-k, SparseLoCo's selection."""
import numpy as np
import pytest

import lowband
from lowband import _reference as ref
from helpers import FLOATS, KINDS, THREADS, assert_sparse_matches, make_vector, noncontiguous, unchanged


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [0, 1, 7, 64, 4096, 4097, 10007, 300007])
def test_chunked_matches_reference(n, dtype):
    x = make_vector(n, dtype, seed=n)
    for chunk, k in ((1, 0), (1, 1), (7, 3), (64, 2), (4096, 128), (4096, 4096), (1000, 999)):
        p = unchanged(lowband.topk_chunked, x, chunk, k)
        assert_sparse_matches(p, *ref.topk_chunked(x, chunk, k))


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_structured(kind):
    x = make_vector(20000, np.float32, kind)
    assert_sparse_matches(lowband.topk_chunked(x, 256, 8), *ref.topk_chunked(x, 256, 8))


def test_last_short_chunk_keeps_min_k():
    p = lowband.topk_chunked(np.arange(1, 11, dtype=np.float32), 4, 3)
    # chunks [1..4], [5..8], [9, 10]: the last keeps both
    assert p.indices.tolist() == [1, 2, 3, 5, 6, 7, 8, 9]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,tile,k", [((64, 64), (64, 64), 128), ((128, 96), (64, 32), 40),
                                          ((100, 70), (64, 64), 10), ((5, 3), (2, 2), 4),
                                          ((1, 1), (4, 4), 1), ((0, 5), (2, 2), 1), ((257, 300), (16, 64), 0)])
def test_tiled_matches_reference(shape, tile, k, dtype):
    x = make_vector(int(np.prod(shape)), dtype, seed=4).reshape(shape)
    p = unchanged(lowband.topk_chunked, x, tile, k)
    assert_sparse_matches(p, *ref.topk_tiled(x, tile[0], tile[1], k), shape=shape)


def test_threads_and_layouts():
    x = make_vector(512 * 600, np.float32, "heavy").reshape(512, 600)
    base = lowband.topk_chunked(x, (64, 64), 32, threads=1)
    flat = lowband.topk_chunked(x, 4096, 64, threads=1)
    for t in THREADS:
        assert lowband.topk_chunked(x, (64, 64), 32, threads=t) == base
        assert lowband.topk_chunked(x, 4096, 64, threads=t) == flat
    v = noncontiguous(make_vector(3001))
    assert_sparse_matches(lowband.topk_chunked(v, 100, 5), *ref.topk_chunked(v.copy(), 100, 5))


def test_nonfinite_reports_first_bad_index():
    x = make_vector(10000)
    x[[5000, 20]] = [np.nan, np.inf]
    with pytest.raises(ValueError, match="flat index 20\\b"):
        lowband.topk_chunked(x, 64, 4, threads=2)
    m = make_vector(64 * 64).reshape(64, 64)
    m[10, 3] = np.nan
    with pytest.raises(ValueError, match=f"flat index {10 * 64 + 3}"):
        lowband.topk_chunked(m, (8, 8), 2)
    assert lowband.topk_chunked(x, 64, 4, check_finite=False).nnz > 0


@pytest.mark.parametrize("args,exc,msg", [
    ((0, 1), ValueError, "chunk"), ((-4, 1), ValueError, "chunk"), ((4, 5), ValueError, "k_per_chunk"),
    ((4, -1), ValueError, "k_per_chunk"), ((4.0, 1), TypeError, "chunk"),
    (((4, 4, 4), 1), ValueError, "chunk"), (((4, 0), 1), ValueError, r"chunk\[1\]"),
    (((2, 2), 5), ValueError, "k_per_chunk"),
])
def test_bad_arguments(args, exc, msg):
    with pytest.raises(exc, match=msg):
        lowband.topk_chunked(make_vector(16).reshape(4, 4), *args)


def test_tile_mode_needs_2d():
    with pytest.raises(ValueError, match="2-D"):
        lowband.topk_chunked(make_vector(16), (2, 2), 1)


@pytest.mark.parametrize("dtype", FLOATS)
def test_chunked_sampled_path_on_every_isa_path(isa, dtype):
    """Chunks of 1024+ elements take a sampled bound and one vectorised collect
    (falling back to the full selection when the bound is too high): every
    structured input, k from 1 to half a chunk, and non-finite values (the
    first bad index, and what check_finite=False selects)."""
    for kind in KINDS:
        x = make_vector(3 * 4096 + 1500, dtype, kind, seed=11)
        for chunk, k in ((4096, 128), (4096, 1), (1024, 512), (2048, 300), (5000, 64)):
            assert_sparse_matches(lowband.topk_chunked(x, chunk, k), *ref.topk_chunked(x, chunk, k))
    # a chunk reuses the bound of the one before while it fits: scales that
    # jump up and down between chunks make it too low, then too high
    x = make_vector(12 * 2048, dtype, seed=13)
    x *= np.repeat(np.array([1, 1, 1e3, 1e3, 1e-3, 1, 0, 1, 1e6, 5, 5, 1], dtype), 2048)
    for t in (1, 3):
        assert_sparse_matches(lowband.topk_chunked(x, 2048, 100, threads=t),
                              *ref.topk_chunked(x, 2048, 100))
    x = make_vector(5000, dtype, seed=12)
    x[[4500, 3000, 3001]] = [np.inf, -np.inf, np.nan]
    with pytest.raises(ValueError, match="flat index 3000\\b"):
        lowband.topk_chunked(x, 4096, 128)
    p = lowband.topk_chunked(x, 2500, 64, check_finite=False)
    i, v = ref.topk_chunked(np.where(np.isnan(x), np.inf, x), 2500, 64)
    assert p.indices.tolist() == i.tolist()
