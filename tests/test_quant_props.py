"""Property tests: unbiasedness of the randomised quantizers (the mean of
D(C(x)) over many seeds is x, within a statistical tolerance), stochastic
rounding's mean error on constant inputs, and round trips."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lowband
from quant_cases import CASES, UNBIASED


UNBIASED_FNS = {
    "q4_sr": lambda x, s: lowband.quantize(x, 4, block=16, rounding="stochastic", seed=s),
    "q1_sr": lambda x, s: lowband.quantize(x, 1, block=16, rounding="stochastic", seed=7, step=s),
    "q2_sr": lambda x, s: lowband.quantize(x, 2, block=None, rounding="stochastic", seed=s),
    "qsgd": lambda x, s: lowband.qsgd(x, 2, seed=s, block=16),
    "terngrad": lambda x, s: lowband.terngrad(x, seed=s, clip=None),
    "natural": lambda x, s: lowband.natural(x, seed=1, step=s),
}


def level_gap(name, p, x):
    """Per element, the distance between the two values it can decode to."""
    n = x.size
    if name in ("q4_sr", "q2_sr", "q1_sr"):
        block = p.params["block"] or n
        g = np.repeat(p.scales.astype(np.float64), block)[:n]
        return 2 * g if name == "q1_sr" else g
    if name == "qsgd":
        return np.repeat(p.scales.astype(np.float64) / p.params["levels"], p.params["block"])[:n]
    if name == "terngrad":
        return np.full(n, float(p.scales[0]))
    return np.maximum(np.abs(x), np.ldexp(1.0, int(p.arrays["top"][0]) - 126))  # natural


@pytest.mark.parametrize("name", sorted(UNBIASED_FNS))
@given(st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=48))
@settings(max_examples=15, deadline=None, derandomize=True)
def test_unbiased(name, values):
    # E[D(C(x))] = x: the mean over T seeds is within 5 standard errors
    # (plus 8 gaps / T, for elements whose rounding is nearly certain)
    x = np.array(values, np.float32)
    fn = UNBIASED_FNS[name]
    T = 1000
    dec = np.array([fn(x, s).dequantize().astype(np.float64) for s in range(T)])
    tol = 5 * dec.std(axis=0) / np.sqrt(T) + 8 * level_gap(name, fn(x, 0), x) / T + 1e-6 * np.abs(x)
    assert np.all(np.abs(dec.mean(axis=0) - x) <= tol)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_stochastic_rounding_mean_error_on_constant_inputs(bits):
    # blocks of one peak (fixing the scale) and many copies of a constant that
    # sits between two levels: the mean error over the copies must vanish
    n, block = 1 << 16, 1024
    for c in (0.3, -0.77, 0.051):
        x = np.full(n, c, np.float32)
        x[::block] = 1.0
        p = lowband.quantize(x, bits, block=block, rounding="stochastic", seed=11)
        d = p.dequantize().astype(np.float64)
        keep = np.ones(n, bool)
        keep[::block] = False
        err = d[keep] - c
        step = float(p.scales[0]) * (2 if bits == 1 else 1)
        assert abs(err.mean()) < 4 * step / np.sqrt(keep.sum())
        nearest = lowband.quantize(x, bits, block=block).dequantize().astype(np.float64)[keep] - c
        assert abs(nearest.mean()) > 0 or bits == 8   # nearest rounding is biased here


def test_scheme_flags():
    x = np.ones(10, np.float32)
    assert lowband.quantize(x, 4, rounding="stochastic", seed=1).unbiased
    assert not lowband.quantize(x, 4).unbiased
    for name in UNBIASED:
        assert CASES[name][0](x).unbiased
    assert lowband.cast(x, "float16").summable and not lowband.sign(x).summable


@given(st.sampled_from(sorted(CASES)), st.lists(st.floats(-2.0 ** 100, 2.0 ** 100, width=32), max_size=300),
       st.sampled_from([np.float32, np.float64]))
@settings(max_examples=200, deadline=None)
def test_round_trip_property(name, values, dtype):
    x = np.array(values, dtype)
    p = CASES[name][0](x)
    b = lowband.encode(p)
    q = lowband.decode(b)
    assert q == p and len(b) == p.nbytes
    d = q.dequantize()
    assert d.shape == x.shape and np.isfinite(d).all()
