"""Quantizers against their NumPy twins: sizes, dtypes, structured inputs,
layouts, thread counts, instruction-set paths, dequantization and bad input."""
import numpy as np
import pytest

import lowband
from lowband import _reference as ref
from helpers import FLOATS, KINDS, LARGE, SIZES, THREADS, assert_same, make_vector, noncontiguous, unchanged
from quant_cases import CASES, payload_arrays, twin_dequantize

NAMES = sorted(CASES)


def check_against_twin(name, x):
    fn, twin = CASES[name]
    p = unchanged(fn, x)
    flat = np.ascontiguousarray(x).reshape(-1)
    expect = twin(flat)
    for got, want, what in zip(payload_arrays(p), expect, ("codes", "aux")):
        assert_same(got, want, f"{name} {what}")
    assert p.shape == x.shape and p.dtype == x.dtype
    d = p.dequantize()
    assert_same(d, twin_dequantize(p), f"{name} dequantize")
    return p


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", SIZES)
def test_matches_reference_over_sizes(n, dtype):
    x = make_vector(n, dtype, "normal", seed=n)
    for name in NAMES:
        check_against_twin(name, x)


@pytest.mark.parametrize("kind", KINDS)
def test_structured_inputs(kind):
    for dtype in FLOATS:
        x = make_vector(4099, dtype, kind, seed=3)
        x[:64] = 0.0   # an all-zero block
        for name in NAMES:
            check_against_twin(name, x)


def test_extreme_magnitudes():
    rng = np.random.default_rng(1)
    for dtype, lo, hi in ((np.float32, -140, 120), (np.float64, -300, 30)):
        x = (rng.standard_normal(3001) * 2.0 ** rng.integers(lo, hi, 3001)).astype(dtype)
        x[5] = np.finfo(dtype).tiny / 4   # subnormal
        for name in NAMES:
            if name.startswith("sign_rms") and dtype == np.float64:
                continue
            check_against_twin(name, x)


@pytest.mark.parametrize("name", NAMES)
def test_layouts(name):
    x = make_vector(6 * 7 * 11, np.float32, seed=5).reshape(6, 7, 11)
    p = check_against_twin(name, x)
    assert p.dequantize().shape == (6, 7, 11)
    check_against_twin(name, x.transpose(2, 0, 1))
    v = noncontiguous(make_vector(5001, np.float64))
    p = unchanged(CASES[name][0], v)
    assert p == CASES[name][0](v.copy())
    be = make_vector(100, np.float32).astype(">f4")
    assert CASES[name][0](be) == CASES[name][0](be.astype("<f4"))
    assert CASES[name][0]([1.0, -2.0, 0.5]).dtype == np.float64


@pytest.mark.parametrize("name", NAMES)
def test_half_precision_inputs(name):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x32 = make_vector(5003, np.float32, "heavy", seed=2) / 10
    for dt in (np.float16, ml_dtypes.bfloat16):
        x = x32.astype(dt)
        p = unchanged(CASES[name][0], x)
        expect = CASES[name][1](x.astype(np.float32))
        for got, want in zip(payload_arrays(p), expect):
            assert_same(got, want, name)
        out_dt = np.dtype(dt)   # a half-precision input decodes to its own dtype
        assert p.dtype == out_dt
        assert_same(p.dequantize(), twin_dequantize(p), name)
        assert lowband.decode(lowband.encode(p)) == p


@pytest.mark.parametrize("name", NAMES)
def test_byte_identical_for_any_thread_count(name):
    x = make_vector(LARGE, np.float32, "heavy", seed=1)
    fn = CASES[name][0]
    base = fn(x, threads=1)
    for t in THREADS:
        assert fn(x, threads=t) == base
        assert_same(base.dequantize(threads=t), base.dequantize(threads=1))
    lowband.set_num_threads(3)
    assert fn(x) == base


def test_every_isa_path_agrees(isa):
    for dtype in FLOATS:
        for n in (1003, 70001):
            x = make_vector(n, dtype, "normal", seed=2)
            for name in NAMES:
                check_against_twin(name, x)
    y = make_vector(3000, np.float32)
    for dt, code in ((np.float16, "float16"), ("bfloat16", "bfloat16")):
        p = lowband.cast(y, dt)
        assert_same(p.dequantize(), twin_dequantize(p))


def test_out_argument():
    x = make_vector(1000, np.float32).reshape(10, 100)
    p = lowband.quantize(x, 4)
    out = np.empty((10, 100), np.float32)
    assert p.dequantize(out=out) is out
    assert_same(out, p.dequantize())
    with pytest.raises(TypeError):
        p.dequantize(out=np.empty((10, 100), np.float64))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_raises_with_index(name, bad):
    for n in (10, LARGE):
        x = make_vector(n, np.float32)
        x[n // 2] = bad
        x[n - 1] = bad
        with pytest.raises(ValueError, match=f"flat index {n // 2}\\b"):
            CASES[name][0](x)
    y = make_vector(100, np.float64)
    y[3] = bad
    p = CASES[name][0](y, check_finite=False)   # unspecified values, but no crash
    assert p.size == 100


def test_float64_scale_overflow_is_reported():
    x = np.array([1e300, 1.0], np.float64)
    for fn in (lambda v: lowband.quantize(v, 4), lambda v: lowband.qsgd(v, 1, seed=0),
               lambda v: lowband.sign(v, scale="rms")):
        with pytest.raises(ValueError, match="too large for the float32 scale"):
            fn(x)


def test_documented_code_mappings():
    x = np.array([-1.0, -0.5, 0.0, -0.0, 0.25, 1.0, 0.5, 0.75], np.float32)
    p = lowband.sign(x, scale="none")
    assert p.codes.tolist() == [0b11111100] and p.dequantize().tolist() == [-1, -1, 1, 1, 1, 1, 1, 1]
    q = lowband.quantize(x, 4, block=8)
    assert q.scales.tolist() == [np.float32(1 / 7)]
    assert lowband.unpack_bits(q.codes, 4, 8).tolist() == [0, 4, 7, 7, 9, 14, 10, 12]  # 0.5 / d = 3.4999998: d is rounded up
    m = lowband.minifloat(np.array([1.0, -0.5, 0.3, 0.0, 0.01], np.float32), 3, 0, block=8)
    assert m.arrays["exponents"].tolist() == [0]   # absmax 1 <= (2 - 1) * 2^0
    assert lowband.unpack_bits(m.codes, 4, 5).tolist() == [7, 8 + 6, 5, 0, 1]
    assert m.dequantize().tolist() == [1.0, -0.5, 0.25, 0.0, 2.0 ** -6]
    ll = lowband.lut2bit(np.array([-3.0, -1.0, 0.0, 1.0, 3.0], np.float32))
    assert lowband.unpack_bits(ll.codes, 2, 5).tolist() == [1, 2, 2, 2, 3]


def test_e3m0_relative_error_is_bounded():
    x = make_vector(100000, np.float32, seed=3)
    p = lowband.minifloat(x, 3, 0, block=128)
    d = p.dequantize()
    scale = np.ldexp(1.0, np.repeat(p.arrays["exponents"].astype(int), 128)[:x.size])
    inrange = np.abs(x) >= scale * 2.0 ** -6
    rel = np.abs(d[inrange] - x[inrange]) / np.abs(x[inrange])
    assert rel.max() <= np.sqrt(2) - 1


@pytest.mark.parametrize("fn,kwargs,exc,msg", [
    ("sign", dict(scale="l2"), ValueError, "scale: expected one of 'l1', 'rms', 'none', 'two_means', got 'l2'"),
    ("sign", dict(scale=1), TypeError, "scale"),
    ("sign", dict(block=0), ValueError, r"block: expected an int in \[1, "),
    ("sign", dict(block=2.0), TypeError, "block: expected an int, got float"),
    ("quantize", dict(bits=5), ValueError, "bits: expected one of 1, 2, 3, 4, 8, got 5"),
    ("quantize", dict(bits="4"), TypeError, "bits: expected an int"),
    ("quantize", dict(bits=4, rounding="up"), ValueError, "rounding"),
    ("quantize", dict(bits=4, rounding="stochastic"), TypeError, "seed"),
    ("quantize", dict(bits=4, rounding="stochastic", seed=-1), ValueError, "seed"),
    ("quantize", dict(bits=4, step=2**56), ValueError, "step"),
    ("quantize", dict(bits=4, block=-3), ValueError, "block"),
    ("qsgd", dict(levels=0, seed=1), ValueError, r"levels: expected an int in \[1, 127\], got 0"),
    ("qsgd", dict(levels=128, seed=1), ValueError, "levels"),
    ("qsgd", dict(levels=4), TypeError, "seed"),
    ("terngrad", dict(seed=1, clip=0.0), ValueError, "clip"),
    ("terngrad", dict(seed=1, clip="2"), TypeError, "clip"),
    ("natural", dict(seed=2**64), ValueError, "seed"),
    ("minifloat", dict(exp_bits=0, man_bits=0), ValueError, "exp_bits"),
    ("minifloat", dict(exp_bits=3, man_bits=4), ValueError, "man_bits"),
    ("minifloat", dict(exp_bits=5, man_bits=3), ValueError, "at most 7"),
    ("minifloat", dict(exp_bits=3, man_bits=0, block=0), ValueError, "block"),
    ("lut2bit", dict(threads=0), ValueError, "threads"),
    ("cast", dict(dtype="float8"), ValueError, "dtype: expected one of 'float16', 'bfloat16'"),
    ("cast", dict(dtype=np.int8), ValueError, "dtype"),
    ("cast", dict(dtype=3), TypeError, "dtype"),
])
def test_bad_arguments(fn, kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        getattr(lowband, fn)(make_vector(10), **kwargs)


@pytest.mark.parametrize("x", [np.arange(10), np.ones(4, dtype=bool), np.ones(3, dtype=np.complex64),
                               np.array(["a"]), np.ones(3, dtype=np.int8)])
def test_wrong_dtype(x):
    for name in NAMES:
        with pytest.raises(TypeError, match="x: expected a float32, float64, float16 or bfloat16 array"):
            CASES[name][0](x)
    with pytest.raises(TypeError, match="x: expected"):
        lowband.cast(x, "float16")


@pytest.mark.parametrize("dt", FLOATS)
def test_casts_against_twins(dt):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(20001) * 2.0 ** rng.integers(-150, 14, 20001)).astype(dt)
    x[:4] = [0.0, -0.0, 65504.0, -65519.0]
    h = lowband.cast(x, "float16")
    assert_same(h.codes, x.astype(np.float16).view(np.uint16))
    assert_same(h.dequantize(), x.astype(np.float16).astype(dt))
    b = lowband.cast(x, "bfloat16")
    assert_same(b.codes, ref.to_bfloat16_bits(x))
    assert_same(b.dequantize(), ref.from_bfloat16_bits(b.codes).astype(dt))
    ml_dtypes = pytest.importorskip("ml_dtypes")
    if dt == np.float32:
        assert_same(b.codes, x.astype(ml_dtypes.bfloat16).view(np.uint16))
    assert h.summable and lowband.decode(lowband.encode(b)) == b


def test_cast_overflow_and_nonfinite():
    with pytest.raises(ValueError, match="flat index 1 that overflows float16"):
        lowband.cast(np.array([1.0, 70000.0], np.float32), "float16")
    assert lowband.cast(np.array([1e39], np.float64), np.float16, check_finite=False).dequantize()[0] == np.inf
    with pytest.raises(ValueError, match="flat index 0"):
        lowband.cast(np.array([np.nan], np.float32), "bfloat16")
    f16 = make_vector(100, np.float16)
    p = lowband.cast(f16, "float16")
    assert p.dtype == np.float16
    assert_same(p.dequantize(), f16)


def test_minifloat_edge_values_on_every_isa_path(isa):
    """The vectorised minifloat kernels against the twin where rounding is
    delicate: ties, subnormal inputs and results, block exponents at the clamp
    (+-127, where 2^-k is not a normal float), and Inf/NaN (check_finite=False,
    one element a block: the twin's block exponent is defined for finite
    blocks only)."""
    edges = [3e38, 1e38, -2e37, 1.0, -1e-45, 0.0, -0.0, 5e-39, -2.5, 1.5, 0.75, -0.375, 1.75, 1.875,
             2 ** -6, 2 ** -7, 3 * 2 ** -8]
    rng = np.random.default_rng(7)
    base = np.array(edges * 9, np.float64)
    ties = rng.integers(-16, 17, 500) / 8.0
    wide = rng.standard_normal(700) * np.exp2(rng.integers(-150, 124, 700))
    special = np.array(edges + [np.inf, -np.inf, np.nan, -np.nan])
    cases = [(x64, block) for x64 in (base, base * 1e-30, ties, wide) for block in (1, 12, 128)]
    with np.errstate(over="ignore", invalid="ignore"):
        for x64, block in cases + [(special, 1)]:
            for x in (x64.astype(np.float32), x64):
                for E, M in ((3, 0), (1, 0), (2, 1), (4, 3), (5, 2), (2, 3)):
                    p = lowband.minifloat(x, E, M, block=block, check_finite=False)
                    codes, exps = ref.minifloat(x, E, M, block)
                    assert_same(p.codes, codes, f"minifloat E{E}M{M} block {block} {x.dtype}")
                    if np.isfinite(x).all():
                        assert_same(p.arrays["exponents"], exps, "exponents")
