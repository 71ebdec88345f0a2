"""float16 / bfloat16 input to the selection kernels and half payloads."""
import numpy as np
import pytest

import lowband
from lowband import _reference as ref
from lowband._validate import BFLOAT16
from helpers import make_vector

HALVES = [np.dtype(np.float16)] + ([BFLOAT16] if BFLOAT16 is not None else [])


@pytest.mark.parametrize("dt", HALVES, ids=str)
def test_selection_of_half_input(dt):
    x = make_vector(70001, np.float32, "heavy").astype(dt)
    wide = x.astype(np.float32)
    cases = [
        (lowband.topk(x, 500), ref.topk(wide, 500)),
        (lowband.threshold(x, 2.0), ref.threshold(wide, 2.0)),
        (lowband.topk_chunked(x, 1000, 9), ref.topk_chunked(wide, 1000, 9)),
        (lowband.randomk(x, 300, seed=1), ref.randomk(wide, 300, 1, 0)),
    ]
    for p, (idx, vals) in cases:
        assert p.dtype == dt and p.values.dtype == dt
        assert np.array_equal(p.indices, idx)
        assert p.values.tobytes() == vals.astype(dt).tobytes()
        assert lowband.decode(lowband.encode(p)) == p
        assert lowband.aggregate([p]).dtype == np.float32
    s = lowband.topk_sampled(x, 0.01, seed=2)
    assert s.dtype == dt


def test_nonfinite_half():
    x = make_vector(100, np.float32).astype(np.float16)
    x[9] = np.inf
    with pytest.raises(ValueError, match="flat index 9"):
        lowband.topk(x, 3)
