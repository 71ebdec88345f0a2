"""lowband.dither (natural and linear dithering, Horvath et al. 2019)
against its NumPy twin: codes, bit counts, decoding, unbiasedness, threads,
the Elias-gamma wire form and hostile streams."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lowband
from lowband import FormatError, _reference as ref
from helpers import FLOATS, KINDS, SIZES, THREADS, assert_same, make_vector, noncontiguous, unchanged

PARTS = ("natural", "linear")
NORMS = ("max", "l2")


def check(x, levels, partition, norm, seed=5, step=0, threads=None):
    p = unchanged(lowband.dither, x, levels, partition=partition, norm=norm, seed=seed, step=step,
                  threads=threads)
    flat = np.ascontiguousarray(x).reshape(-1)
    nat, l2 = partition == "natural", norm == "l2"
    stream, scale, nbits = ref.dither(flat, levels, nat, l2, seed, step)
    assert_same(p.arrays["codes"], stream, "stream")
    assert_same(p.arrays["scales"], scale, "norm")
    assert p.params == {"levels": levels, "partition": PARTS.index(partition),
                        "norm": NORMS.index(norm), "nbits": nbits}
    assert p.shape == x.shape and p.dtype == x.dtype and p.unbiased
    idx, _ = ref.dither_indices(flat, levels, nat, l2, seed, step)
    assert_same(p.dequantize().reshape(-1), ref.dither_decode(idx, levels, nat, scale[0], x.dtype), "decode")
    return p


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", SIZES)
def test_matches_twin_over_sizes(n, dtype):
    x = make_vector(n, dtype, seed=n)
    for i, (part, norm) in enumerate((a, b) for a in PARTS for b in NORMS):
        check(x, (1, 3, 8, 127)[i], part, norm, seed=n, step=i)


@pytest.mark.parametrize("kind", KINDS)
def test_structured_inputs(kind):
    for dtype in FLOATS:
        x = make_vector(4099, dtype, kind, seed=2)
        for part in PARTS:
            for norm in NORMS:
                check(x, 4, part, norm)


def test_extreme_magnitudes_and_levels():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(3001) * 2.0 ** rng.integers(-60, 60, 3001)).astype(np.float64)
    for levels in (1, 2, 16, 100, 127):
        for part in PARTS:
            p = check(x, levels, part, "max")
            assert p.params["nbits"] <= x.size * lowband._schemes.DitherScheme.max_bits(levels)


@pytest.mark.parametrize("threads", THREADS)
def test_same_bytes_for_every_thread_count(threads):
    x = make_vector(300007, np.float32, seed=9)
    for part in PARTS:
        assert lowband.dither(x, 6, partition=part, norm="l2", seed=1, threads=threads) == \
            lowband.dither(x, 6, partition=part, norm="l2", seed=1, threads=1)


def test_every_isa(isa):
    check(make_vector(70001, np.float32, "heavy", seed=4), 5, "natural", "l2")
    check(make_vector(999, np.float64, seed=5), 3, "linear", "max")


def test_layouts_and_narrow_dtypes():
    x = make_vector(6 * 7 * 11, np.float32, seed=5).reshape(6, 7, 11)
    assert check(x, 4, "natural", "max").dequantize().shape == (6, 7, 11)
    check(x.transpose(2, 0, 1), 4, "linear", "l2")
    check(noncontiguous(make_vector(1001, np.float64)), 2, "natural", "l2")
    h = make_vector(1001, np.float16, seed=6)
    ph = lowband.dither(h, 8, seed=2)
    idx, norm = ref.dither_indices(h.astype(np.float32), 8, True, False, 2, 0)
    assert_same(ph.dequantize(), ref.dither_decode(idx, 8, True, norm, np.float16), "float16")


def test_levels_are_the_documented_ones():
    x = np.array([1.0, -0.5, 0.25, 0.0, -1.0], np.float32)   # max norm 1: every r is a level
    for part, levels, want in (("natural", 3, [3, -2, 1, 0, -3]), ("linear", 4, [4, -2, 1, 0, -4])):
        p = lowband.dither(x, levels, partition=part, seed=0)
        np.testing.assert_array_equal(p.dequantize(), x)
        idx, _ = ref.dither_indices(x, levels, part == "natural", False, 0, 0)
        np.testing.assert_array_equal(idx, want)
    # gamma codes of m + 1: 1 bit for a zero, 3 + 1 (sign) bits for m in {1, 2}
    p = lowband.dither(np.array([0.0, 0.5, -1.0], np.float32), 2, partition="linear", seed=0)
    assert p.params["nbits"] == 1 + 4 + 4


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("norm", NORMS)
def test_unbiased(part, norm):
    """The mean over 4000 seeds is within 5 standard errors of x in every
    coordinate (a statistical test that fails for a biased rounding), up to
    the 2^-24 resolution of the rounding probabilities."""
    x = (make_vector(48, np.float64, seed=3) * np.geomspace(1e-3, 1, 48))
    draws = np.stack([lowband.dither(x, 3, partition=part, norm=norm, seed=s).dequantize()
                      for s in range(4000)])
    se = draws.std(axis=0) / np.sqrt(len(draws))
    assert np.all(np.abs(draws.mean(axis=0) - x) <= 5 * se + 2.0 ** -23 * np.abs(x).max())


def test_natural_beats_linear_at_equal_levels():
    """Natural levels reach down to 2^(1-s): on spread-out magnitudes their
    variance is far below uniform levels' (Horvath et al., Theorem 7)."""
    x = make_vector(20000, np.float64, "heavy", seed=1)
    err = {}
    for part in PARTS:
        err[part] = np.mean([np.sum((lowband.dither(x, 8, partition=part, seed=s).dequantize() - x) ** 2)
                             for s in range(5)])
    assert err["natural"] < 0.5 * err["linear"]


def test_wire_size_is_exact_and_round_trips():
    x = make_vector(10007, np.float32, seed=4)
    for part in PARTS:
        for norm in NORMS:
            p = lowband.dither(x, 7, partition=part, norm=norm, seed=1, step=3)
            b = lowband.encode(p)
            assert len(b) == p.nbytes
            q = lowband.decode(b)
            assert q == p and lowband.encode(q) == b
            assert_same(q.dequantize(), p.dequantize())
            # the codes section is ceil(nbits / 8) bytes: the rest is a fixed header
            empty = lowband.dither(x[:0], 7, partition=part, norm=norm, seed=1)
            assert p.nbytes - empty.nbytes == -(-p.params["nbits"] // 8)
    c = lowband.from_spec("dither:4:partition=linear:norm=l2:seed=3")
    assert c.spec == "dither:4:partition=linear:norm=l2:seed=3" and c.unbiased and c.randomized
    assert c.compress(x, step=2) == lowband.dither(x, 4, partition="linear", norm="l2", seed=3, step=2)
    s = lowband.Sparse(np.arange(0, 10007, 10), lowband.dither(x[::10], 4, seed=2), x.shape)
    assert lowband.decode(lowband.encode(s)) == s


def test_error_feedback_residual():
    e = np.zeros(2001)
    fb = lowband.ErrorFeedback("dither:3:seed=1", np.zeros(2001))
    rng = np.random.default_rng(0)
    for t in range(3):
        g = rng.standard_normal(2001)
        p = fb.step(g)
        z = e + g
        assert p == lowband.dither(z, 3, seed=1, step=t)
        e = z - p.dequantize()
        assert_same(fb.error.reshape(-1), e)


def _with(p, **changes):
    params = dict(p.params)
    params.update(changes.pop("params", {}))
    arrays = dict(p.arrays)
    arrays.update(changes)
    return params, arrays


def test_hostile_streams_are_rejected():
    x = make_vector(100, np.float32, seed=1)
    p = lowband.dither(x, 3, seed=1)
    codes, nb = p.arrays["codes"], p.params["nbits"]

    def build(params, arrays):
        return lowband.Quantized("dither", p.shape, p.dtype, params, arrays)

    assert build(*_with(p)) == p
    with pytest.raises(ValueError, match="spare bits|does not end"):      # a trailing 1 bit
        c = codes.copy()
        if nb % 8:
            c[-1] |= np.uint8(0x80)
        else:
            c = np.append(c, np.uint8(1))
            nb2 = nb + 1
            build(*_with(p, params={"nbits": nb2}, codes=c))
        build(*_with(p, codes=c))
    with pytest.raises(ValueError, match="malformed|does not end"):     # one bit short
        build(*_with(p, params={"nbits": nb - 1}, codes=codes[:-(-(nb - 1) // 8)].copy()
                     if (nb - 1) % 8 else codes[:(nb - 1) // 8].copy()))
    zeros = np.zeros(-(-nb // 8), np.uint8)   # gamma prefixes longer than s = 3 allows
    with pytest.raises(ValueError, match="element 0"):
        build(*_with(p, codes=zeros))
    with pytest.raises(ValueError, match="nbits"):
        build(*_with(p, params={"nbits": 99}))
    for name, value in (("levels", 0), ("levels", 128), ("partition", 2), ("norm", 2)):
        with pytest.raises(ValueError, match=name):
            build(*_with(p, params={name: value}))
    for value in (np.nan, -1.0, np.inf):
        with pytest.raises(ValueError, match="scales"):
            build(*_with(p, scales=np.array([value], np.float32)))
    # level 4 > s = 3: gamma of 5 is 00101, then a sign bit; 99 zeros after
    bits = [0, 0, 1, 0, 1, 0] + [1] * 99
    lvl = np.packbits(np.array(bits, np.uint8), bitorder="little")
    with pytest.raises(ValueError, match="element 0"):
        build(*_with(p, params={"nbits": len(bits)}, codes=lvl))


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=40), st.integers(1, 40), st.integers(1, 9))
def test_random_streams_never_crash(data, n, levels):
    """Any bytes either parse into a payload that re-encodes identically or
    raise FormatError."""
    p = lowband.dither(make_vector(n, np.float32, seed=n), levels, seed=1)
    params = dict(p.params, nbits=min(max(len(data) * 8, n), n * lowband._schemes.DitherScheme.max_bits(levels)))
    codes = np.frombuffer(data, np.uint8)[: -(-params["nbits"] // 8)]
    codes = np.concatenate([codes, np.zeros(-(-params["nbits"] // 8) - codes.size, np.uint8)])
    try:
        q = lowband.Quantized("dither", p.shape, p.dtype, params, {"codes": codes, "scales": p.scales})
    except ValueError:
        return
    assert lowband.decode(lowband.encode(q)) == q
    assert np.all(np.abs(q.dequantize()) <= p.scales[0])


def test_bad_arguments():
    x = make_vector(10, np.float32)
    for kw, exc, msg in (({"levels": 0}, ValueError, "levels"), ({"levels": 128}, ValueError, "levels"),
                         ({"levels": 2.5}, TypeError, "levels"), ({"partition": "log"}, ValueError, "partition"),
                         ({"norm": "l1"}, ValueError, "norm"), ({"seed": -1}, ValueError, "seed")):
        args = {"levels": 4, "seed": 1, **kw}
        with pytest.raises(exc, match=msg):
            lowband.dither(x, args.pop("levels"), **args)
    with pytest.raises(TypeError, match="seed"):
        lowband.dither(x, 4)
    bad = x.copy()
    bad[3] = np.inf
    with pytest.raises(ValueError, match="3"):
        lowband.dither(bad, 4, seed=1)
    with pytest.raises(ValueError, match="overflows"):
        lowband.dither(np.array([1e300, 1e300]), 4, norm="l2", seed=1)
    with pytest.raises(TypeError, match="x"):
        lowband.dither(np.arange(4), 4, seed=1)


def test_mutated_wire_bytes_decode_or_raise_format_error():
    """Mutation fuzzing of the new wire forms (dither streams, two-means
    signs, majority votes): every mutation decodes to a payload that
    re-encodes to the same bytes, or raises FormatError."""
    from fuzzing import fuzz
    x = make_vector(301, np.float32, "heavy", seed=5)
    seeds = [lowband.encode(p) for p in (
        lowband.dither(x, 3, seed=1), lowband.dither(x, 127, partition="linear", norm="l2", seed=2),
        lowband.dither(x[:5].astype(np.float64), 1, seed=3), lowband.sign(x, scale="two_means", block=16),
        lowband.majority_vote([lowband.sign(x), lowband.sign(-x), lowband.sign(x * 0.5)]),
        lowband.Sparse(np.arange(0, 301, 7), lowband.dither(x[::7], 5, seed=4), x.shape))]
    accepted = fuzz(seeds, 3000, seed=11,
                    check=lambda p: p.to_dense() if isinstance(p, lowband.Sparse) else p.dequantize())
    assert accepted > 0
