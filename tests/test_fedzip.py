"""lowband.fedzip (FedZip, Malekijoo et al. 2021) against its NumPy twin:
top-z, the deterministic 3-means, the Huffman and gap codings, the wire
form, threads and hostile streams."""
import numpy as np
import pytest

import lowband
from lowband import _reference as ref
from helpers import FLOATS, KINDS, THREADS, assert_same, make_vector, unchanged

ENC = ("huffman", "gaps")


def check(x, ratio, encoding, iters=4, threads=None):
    p = unchanged(lowband.fedzip, x, ratio, encoding=encoding, iters=iters, threads=threads)
    flat = np.ascontiguousarray(x).reshape(-1)
    stream, cen, major, nbits, lab = ref.fedzip(flat, ratio, encoding == "gaps", iters)
    assert_same(p.arrays["codes"], stream, "stream")
    assert_same(p.arrays["centroids"], cen, "centroids")
    assert p.params == {"encoding": ENC.index(encoding), "major": major, "nbits": nbits}
    wd = np.float64 if x.dtype == np.float64 else np.float32
    assert_same(p.dequantize().reshape(-1), cen.astype(wd)[lab].astype(x.dtype), "decode")
    b = lowband.encode(p)
    assert len(b) == p.nbytes and lowband.decode(b) == p
    return p


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [0, 1, 2, 7, 97, 1000, 4099, 70001])
def test_matches_twin(n, dtype):
    x = make_vector(n, dtype, seed=n)
    for ratio in (1.0, 0.2, 0.01):
        for enc in ENC:
            check(x, ratio, enc)


@pytest.mark.parametrize("kind", KINDS)
def test_structured_inputs(kind):
    x = make_vector(4099, np.float32, kind, seed=3)
    for enc in ENC:
        check(x, 0.05, enc)
        check(x, 1.0, enc, iters=0)


@pytest.mark.parametrize("threads", THREADS)
def test_same_bytes_for_every_thread_count(threads):
    x = make_vector(300007, np.float32, seed=2)
    for enc in ENC:
        assert lowband.fedzip(x, 0.01, encoding=enc, threads=threads) == \
            lowband.fedzip(x, 0.01, encoding=enc, threads=1)


def test_sizes_and_known_answer():
    x = np.array([0.0, 5.0, 0.0, 0.0, -4.0, 0.1], np.float32)
    p = lowband.fedzip(x, 1.0, encoding="gaps", iters=4)
    # centroids (-4, 0.025, 5) after Lloyd; gap codes: element 1 (gap 2: "010" + 1 bit),
    # element 4 (gap 3: "011" + 1 bit)
    np.testing.assert_allclose(p.arrays["centroids"], [-4.0, 0.025, 5.0], rtol=1e-6)
    assert p.params["major"] == 1 and p.params["nbits"] == 8
    np.testing.assert_allclose(p.dequantize(), [0.025, 5.0, 0.025, 0.025, -4.0, 0.025], rtol=1e-6)
    h = lowband.fedzip(x, 1.0, encoding="huffman")
    assert h.params["nbits"] == 4 * 1 + 2 * 2          # four "0", two 2-bit codes
    big = make_vector(100000, np.float32, seed=1)
    gaps = lowband.fedzip(big, 0.01)
    assert gaps.params["nbits"] < 0.01 * big.size * (2 * np.log2(100) + 3)
    assert 32 * big.size / (8 * gaps.nbytes) > 200            # about 238x at 1%
    assert lowband.fedzip(big, 0.01, encoding="huffman").params["nbits"] < 1.02 * big.size


def test_spec_and_narrow_dtypes():
    c = lowband.from_spec("fedzip:0.05:encoding=huffman")
    assert c.spec == "fedzip:0.05:encoding=huffman" and lowband.from_spec(c.spec) == c
    x = make_vector(1000, np.float32, seed=4)
    assert c.compress(x) == lowband.fedzip(x, 0.05, encoding="huffman")
    h = lowband.fedzip(make_vector(1000, np.float16, seed=5), 0.1)
    assert h.dequantize().dtype == np.float16


def test_hostile_streams_and_bad_arguments():
    x = make_vector(200, np.float32, seed=1)
    p = lowband.fedzip(x, 0.05)

    def build(params=None, **arrays):
        return lowband.Quantized("fedzip", p.shape, p.dtype, {**p.params, **(params or {})},
                                 {**p.arrays, **arrays})

    assert build() == p
    with pytest.raises(ValueError, match="centroids"):
        build(centroids=np.array([0, np.nan, 1], np.float32))
    with pytest.raises(ValueError, match="major"):
        build({"major": 3})
    with pytest.raises(ValueError, match="encoding"):
        build({"encoding": 2})
    # a gap that runs past the end: gamma(255) = 7 zeros then 11111111, then a bit
    bits = [0] * 7 + [1] * 8 + [0]
    with pytest.raises(ValueError, match="element 0"):
        build({"nbits": len(bits)}, codes=np.packbits(np.array(bits, np.uint8), bitorder="little"))
    with pytest.raises(ValueError, match="element|end"):
        build({"nbits": p.params["nbits"] - 1},
              codes=np.packbits(np.unpackbits(p.codes, bitorder="little")[:p.params["nbits"] - 1],
                                bitorder="little"))
    hp = lowband.fedzip(x, 1.0, encoding="huffman")
    with pytest.raises(ValueError, match="nbits"):
        lowband.Quantized("fedzip", hp.shape, hp.dtype, {**hp.params, "nbits": 10}, hp.arrays)
    for kw, exc, msg in (({"ratio": 0.0}, ValueError, "ratio"), ({"ratio": 1.5}, ValueError, "ratio"),
                         ({"encoding": "lz"}, ValueError, "encoding"), ({"iters": -1}, ValueError, "iters")):
        args = {"ratio": 0.1, **kw}
        with pytest.raises(exc, match=msg):
            lowband.fedzip(x, args.pop("ratio"), **args)
    bad = x.copy()
    bad[7] = np.nan
    with pytest.raises(ValueError, match="7"):
        lowband.fedzip(bad, 1.0)
    from fuzzing import fuzz
    seeds = [lowband.encode(q) for q in (p, hp, lowband.fedzip(x[:9], 0.5))]
    assert fuzz(seeds, 2000, seed=3, check=lambda q: q.dequantize() if q.size < 1 << 20 else None) > 0
