"""Sparse / Quantized / Dense construction, validation and properties."""
import numpy as np
import pytest

import lowband
from helpers import make_vector


def test_sparse_properties():
    p = lowband.Sparse([1, 3], np.array([2.0, -1.0]), (2, 2))
    assert p.size == 4 and p.nnz == 2 and p.density == 0.5 and p.shape == (2, 2)
    assert p.indices.dtype == np.uint32 and p.dtype == np.float64
    assert p.to_dense().tolist() == [[0.0, 2.0], [0.0, -1.0]]
    assert "nnz=2" in repr(p)


def test_sparse_index_width_follows_size():
    p = lowband.Sparse([5], np.ones(1, np.float32), 2**32 + 1)
    assert p.indices.dtype == np.uint64
    assert lowband.decode(lowband.encode(p)) == p


@pytest.mark.parametrize("indices,values,shape,exc,msg", [
    ([2, 1], [1.0, 2.0], 4, ValueError, "ascending"),
    ([1, 1], [1.0, 2.0], 4, ValueError, "ascending"),
    ([1, 4], [1.0, 2.0], 4, ValueError, ">= the size"),
    ([-1], [1.0], 4, ValueError, "non-negative"),
    ([1.5], [1.0], 4, TypeError, "integer"),
    ([[1]], [1.0], 4, TypeError, "1-D"),
    ([1, 2], [1.0], 4, ValueError, "values"),
    ([1], np.array([1], np.int32), 4, TypeError, "values"),
    ([1], [1.0], -4, ValueError, "shape"),
    ([1], [1.0], "4", TypeError, "shape"),
])
def test_sparse_rejects(indices, values, shape, exc, msg):
    with pytest.raises(exc, match=msg):
        lowband.Sparse(indices, np.asarray(values, dtype=np.float32) if isinstance(values, list) else values, shape)


def test_sparse_seeded_checks_indices():
    p = lowband.randomk(make_vector(100), 5, seed=3, step=1)
    q = lowband.Sparse(p.indices, p.values, 100, seed=3, step=1)
    assert q == p and q.summable
    with pytest.raises(ValueError, match="random-k"):
        lowband.Sparse(p.indices, p.values, 100, seed=4, step=1)
    with pytest.raises(TypeError, match="together"):
        lowband.Sparse(p.indices, p.values, 100, seed=4)


def test_dense_payload():
    d = lowband.Dense(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert d.nbytes == len(lowband.encode(d))
    assert np.array_equal(d.to_dense(), d.array)
    with pytest.raises(TypeError):
        lowband.Dense(np.arange(3))


def test_quantized_unknown_scheme():
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        lowband.Quantized("nope", (3,), np.float32, {}, {})


def test_register_scheme_validates():
    class Bad(lowband.Scheme):
        name, wire_id = "bad", 0
    with pytest.raises(ValueError, match="wire_id"):
        lowband.register_scheme(Bad())
    with pytest.raises(TypeError):
        lowband.register_scheme(object())
