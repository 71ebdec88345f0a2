"""Small tensors: the serial top-k below 1 Ki elements, the fast paths of
the range and scale checks, and decode of hostile scales, each against the
NumPy twin or the general path it stands in for."""
import numpy as np
import pytest

import lowband
from lowband import _reference as ref
from lowband._payload import Quantized
from lowband._schemes import SCHEMES
from lowband._validate import BFLOAT16
from helpers import FLOATS, KINDS, assert_sparse_matches, make_vector


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [5, 511, 512, 513, 1024])   # both sides of the serial path's bound
def test_topk_around_the_serial_bound(n, dtype):
    for kind in KINDS:
        x = make_vector(n, dtype, kind, seed=n)
        for k in (1, 2, n // 100, n // 3, n - 1):
            if 0 < k < n:
                assert_sparse_matches(lowband.topk(x, k), *ref.topk(x, k))


@pytest.mark.parametrize("dtype", FLOATS)
def test_topk_serial_path_non_finite(dtype):
    x = np.array([1.0, -2.0, np.nan, 3.0, -np.inf, 0.5, np.inf, -7.0], dtype=dtype)
    with pytest.raises(ValueError, match=r"x has a non-finite value \(nan\) at flat index 2"):
        lowband.topk(x, 3)
    p = lowband.topk(x, 4, check_finite=False)   # NaN above +-Inf above finite values
    assert_sparse_matches(p, *ref.topk(x, 4))
    assert p.indices.tolist() == [2, 4, 6, 7]


def _exact_range(q):
    """check_range with its fast path switched off: the general path."""
    sch = SCHEMES[q.scheme]
    saved = sch.range_args
    sch.range_args = lambda q: None
    try:
        sch.check_range(q)
        return True
    except ValueError:
        return False
    finally:
        del sch.range_args
        assert sch.range_args == saved


def _fast_range(q):
    try:
        SCHEMES[q.scheme].check_range(q)
        return True
    except ValueError:
        return False


def _out_dtypes():
    return [np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)] + (
        [BFLOAT16] if BFLOAT16 is not None else [])


@pytest.mark.parametrize("nblocks", [1, 3, 64, 65, 200])   # python and numpy reductions
def test_range_fast_path_agrees_with_the_general_path(nblocks):
    rng = np.random.default_rng(nblocks)
    f32max = float(np.finfo(np.float32).max)
    specials = [0.0, 1.0, 4679.0, 4680.0, 9357.0, 9358.0, 32752.0, 65504.0, 65520.0,
                f32max / 8, f32max / 7, f32max / 2, f32max, np.inf, np.nan, -1.0]
    for dtype in _out_dtypes():
        for top in specials:
            scales = rng.uniform(0, 1, nblocks).astype(np.float32)
            scales[rng.integers(nblocks)] = top
            cases = [("blockwise", {"bits": b, "block": 1}, b) for b in (1, 2, 4, 8)]
            cases.append(("sign", {"scale": 1, "block": 1}, 1))
            for scheme, params, bits in cases:
                codes = np.zeros((nblocks * bits + 7) // 8, np.uint8)
                q = Quantized._make(scheme, (nblocks,), dtype, params,
                                    {"codes": codes, "scales": scales})
                assert _fast_range(q) == _exact_range(q), (scheme, params, dtype, top)


@pytest.mark.parametrize("n", [16, 64 * 4, 65 * 64])   # few scales (python) and many (numpy)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0])
def test_decode_refuses_bad_scales(n, bad):
    x = np.linspace(-1, 1, n, dtype=np.float32)
    q = lowband.quantize(x, 4, block=4 if n > 16 else 64)
    scales = q.arrays["scales"].copy()
    scales[-1] = bad
    forged = Quantized._make(q.scheme, q.shape, q.dtype, q.params, {**q.arrays, "scales": scales})
    with pytest.raises(lowband.FormatError, match="scales: expected finite, non-negative"):
        lowband.decode(lowband.encode(forged))
    with pytest.raises(ValueError, match="scales: expected finite, non-negative"):
        Quantized(q.scheme, q.shape, q.dtype, q.params, {**q.arrays, "scales": scales})
    assert lowband.decode(lowband.encode(q)) == q


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_quantize_still_refuses_an_overflowing_encoding(dtype):
    big = np.finfo(dtype).max
    x = np.array([big, -big, 1.0], dtype=dtype)
    # the largest values: quantize either refuses the payload (a code would
    # decode to Inf) or it decodes to finite values, fast range path or not
    for bits in (2, 4, 8):
        try:
            q = lowband.quantize(x, bits)
        except ValueError as exc:
            assert "cannot be decoded" in str(exc)
            continue
        assert np.isfinite(q.dequantize().astype(np.float64)).all()


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [100, 70000])   # the serial and the sampled top-k paths
def test_topk_step_failure_leaves_state(n, dtype):
    from lowband.feedback import ErrorFeedback
    fb = ErrorFeedback(lowband.compressors.TopK(k=5), np.zeros(n, dtype))
    big = np.full(n, np.finfo(dtype).max * 0.75, dtype)
    nan = make_vector(n, dtype, "heavy", seed=3)
    nan[n // 2] = np.nan
    fb.step(big)   # the residual keeps n - 5 entries of big
    before, t = fb.error.copy(), fb.t
    for bad, msg in ((big, "overflowed"), (nan, f"flat index {n // 2}")):
        with pytest.raises(ValueError, match=msg):
            fb.step(bad)
        assert fb.error.tobytes() == before.tobytes() and fb.t == t
    g = make_vector(n, dtype, "heavy", seed=4) / 1e6
    p = fb.step(g)   # then as the generic step: p = e + g, send its top-5, keep the rest
    pe = before + g
    idx = np.sort(np.argsort(-np.abs(pe), kind="stable")[:5])
    assert p.indices.tolist() == idx.tolist() and p.values.tobytes() == pe[idx].tobytes()
    pe[idx] = 0
    assert fb.error.tobytes() == pe.tobytes() and fb.t == t + 1
