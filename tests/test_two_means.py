"""sign(x, scale="two_means") (Seide et al., Interspeech 2014) against its
NumPy twin: sizes, dtypes, blocks, structured inputs, threads, instruction
sets, decoding, error feedback, the wire and bad input."""
import numpy as np
import pytest

import lowband
from lowband import FormatError, _reference as ref
from helpers import FLOATS, KINDS, SIZES, THREADS, assert_same, make_vector, noncontiguous, unchanged


def twin_decode(x, block):
    """What the payload of x must decode to: per block, the mean of the
    non-negative elements where x >= 0, minus the mean of the negative
    ones elsewhere (float32 scales, decoded in x's working precision)."""
    codes, scales = ref.sign_two_means(x, block)
    b = block or max(x.size, 1)
    blk = np.arange(x.size) // b
    wd = np.float64 if x.dtype == np.float64 else np.float32
    pos, neg = scales[0::2].astype(wd), scales[1::2].astype(wd)
    return np.where(x >= 0, pos[blk] if x.size else pos[:0], -neg[blk] if x.size else neg[:0])


def check(x, block=None, threads=None):
    p = unchanged(lowband.sign, x, scale="two_means", block=block, threads=threads)
    flat = np.ascontiguousarray(x).reshape(-1)
    codes, scales = ref.sign_two_means(flat, block or 0)
    assert_same(p.arrays["codes"], codes, "codes")
    assert_same(p.arrays["scales"], scales, "scales")
    assert p.shape == x.shape and p.dtype == x.dtype and p.params == {"scale": 3, "block": block or 0}
    assert_same(p.dequantize().reshape(-1), twin_decode(flat, block or 0).astype(x.dtype), "decode")
    return p


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", SIZES)
def test_matches_twin_over_sizes(n, dtype):
    x = make_vector(n, dtype, seed=n)
    check(x)
    if n <= 4099:
        for block in (1, 7, 64, 4096):
            check(x, block)


@pytest.mark.parametrize("kind", KINDS)
def test_structured_inputs(kind):
    for dtype in FLOATS:
        x = make_vector(4099, dtype, kind, seed=2)
        x[:64] = 0.0
        check(x)
        check(x, 64)


def test_means_are_the_means_of_each_side():
    x = np.array([3.0, -1.0, 0.0, -2.0, 5.0, -0.0], np.float32)
    p = lowband.sign(x, scale="two_means")
    np.testing.assert_array_equal(p.arrays["scales"], [2.0, 1.5])      # (3+0+5-0)/4, (1+2)/2
    np.testing.assert_array_equal(p.dequantize(), [2.0, -1.5, 2.0, -1.5, 2.0, 2.0])
    only_pos = lowband.sign(np.array([1.0, 3.0], np.float32), scale="two_means")
    np.testing.assert_array_equal(only_pos.arrays["scales"], [2.0, 0.0])


def test_least_squared_error_for_the_sign_partition():
    """The two means minimise ||x - D||^2 over decoders constant on each sign
    side, so they beat every one-scale sign quantizer."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        x = (rng.standard_normal(999) + rng.normal(0, 2)).astype(np.float64)
        e2 = np.sum((x - lowband.sign(x, scale="two_means").dequantize()) ** 2)
        for scale in ("l1", "rms"):
            assert e2 <= np.sum((x - lowband.sign(x, scale=scale).dequantize()) ** 2) * (1 + 1e-12)


@pytest.mark.parametrize("threads", THREADS)
def test_same_bytes_for_every_thread_count(threads):
    x = make_vector(300007, np.float32, seed=9)
    for block in (None, 1000, 65536 * 3):
        assert lowband.sign(x, scale="two_means", block=block, threads=threads) == \
            lowband.sign(x, scale="two_means", block=block, threads=1)


def test_every_isa(isa):
    check(make_vector(70001, np.float32, "heavy", seed=4))
    check(make_vector(4099, np.float64, seed=5), 100)


def test_layouts_and_narrow_dtypes():
    x = make_vector(6 * 7 * 11, np.float32, seed=5).reshape(6, 7, 11)
    p = check(x)
    assert p.dequantize().shape == (6, 7, 11)
    check(x.transpose(2, 0, 1), 13)
    check(noncontiguous(make_vector(1001, np.float64)), 50)
    h = make_vector(1001, np.float16, seed=6)
    ph = lowband.sign(h, scale="two_means", block=100)
    assert ph.dtype == np.float16
    want = twin_decode(h.astype(np.float32), 100).astype(np.float16)
    assert_same(ph.dequantize(), want, "float16 decode")


def test_error_feedback_residual_matches_decode():
    """The fused error-feedback path (scheme residual) leaves exactly
    e - D(C(e)), the generic path's bytes."""
    rng = np.random.default_rng(1)
    for dtype in FLOATS:
        fused = lowband.ErrorFeedback(lowband.Sign("two_means", block=64), np.zeros(3001, dtype))
        e = np.zeros(3001, dtype)
        for _ in range(4):
            g = rng.standard_normal(3001).astype(dtype)
            p = fused.step(g)
            z = e + g
            assert p == lowband.sign(z, scale="two_means", block=64)
            e = z - p.dequantize()
            assert_same(fused.error.reshape(-1), e, "residual")


def test_spec_and_wire():
    c = lowband.from_spec("sign:two_means:block=32")
    assert c.spec == "sign:two_means:block=32" and lowband.from_spec(c.spec) == c
    x = make_vector(1003, np.float32, seed=1)
    for p in (c.compress(x), lowband.sign(x, scale="two_means"), lowband.sign(x[:0], scale="two_means")):
        b = lowband.encode(p)
        assert len(b) == p.nbytes
        assert lowband.decode(b) == p
    # 1 bit per element plus 64 bits per block
    assert (lowband.sign(x, scale="two_means", block=32).nbytes
            - lowband.sign(x, scale="l1", block=32).nbytes) == 4 * 32


def test_bad_input_and_hostile_payloads():
    x = make_vector(100, np.float32)
    with pytest.raises(ValueError, match="scale"):
        lowband.sign(x, scale="two-means")
    bad = x.copy()
    bad[17] = np.nan
    with pytest.raises(ValueError, match="17"):
        lowband.sign(bad, scale="two_means")
    with pytest.raises(ValueError, match="too large"):
        lowband.sign(np.array([1e300, 1e300]), scale="two_means")
    p = lowband.sign(x, scale="two_means", block=10)
    for value in (np.nan, -1.0, np.inf):
        s = p.arrays["scales"].copy()
        s[3] = value
        with pytest.raises(ValueError, match="scales"):
            lowband.Quantized("sign", p.shape, p.dtype, p.params, {"codes": p.codes, "scales": s})
    with pytest.raises(ValueError, match="scales"):   # one scale per block is the wrong layout
        lowband.Quantized("sign", p.shape, p.dtype, p.params, {"codes": p.codes, "scales": p.scales[:10]})
    with pytest.raises(ValueError, match="scale"):
        lowband.Quantized("sign", p.shape, p.dtype, {"scale": 4, "block": 10}, p.arrays)
    data = bytearray(lowband.encode(p))
    data[-20] ^= 0xFF
    with pytest.raises(FormatError):
        lowband.decode(bytes(data))
