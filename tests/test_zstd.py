"""The optional lossless stage (lowband.lossless, spec "...+zstd"): exact
sizes, round trips of every payload kind, hostile bytes, and a clear error
without the zstandard package."""
import sys

import numpy as np
import pytest

import lowband
from lowband import FormatError, lossless
from helpers import assert_same, make_vector

pytest.importorskip("zstandard")

SPECS = ["topk:0.01+zstd", "sign+zstd", "blockwise:4+zstd:level=9", "topk:0.01+lut2bit+zstd",
         "fedzip:0.01+zstd", "dither:4:seed=1+zstd", "randomk:0.05:seed=2+zstd", "fp16+zstd",
         "none+zstd"]


@pytest.mark.parametrize("spec", SPECS)
def test_round_trip_and_exact_size(spec):
    c = lowband.from_spec(spec)
    assert lowband.from_spec(c.spec) == c and c.spec.endswith(spec[spec.index("+zstd"):])
    x = make_vector(20000, np.float32, seed=3).reshape(100, 200)
    p = c.compress(x, step=1)
    inner = lossless.unwrap(p)
    assert inner == c.inner.compress(x, step=1) and p.shape == x.shape and p.dtype == x.dtype
    b = lowband.encode(p)
    assert len(b) == p.nbytes
    q = lowband.decode(b)
    assert q == p
    assert_same(q.dequantize(), c.inner.decompress(inner))


def test_error_feedback_through_the_stage():
    fb = lowband.ErrorFeedback("topk:10+zstd", np.zeros(1000))
    plain = lowband.ErrorFeedback("topk:10", np.zeros(1000))
    rng = np.random.default_rng(0)
    for _ in range(3):
        g = rng.standard_normal(1000)
        assert lossless.unwrap(fb.step(g)) == plain.step(g)
    assert_same(fb.error, plain.error)


def test_hostile_payloads():
    x = make_vector(3000, np.float32, seed=1)
    p = lossless.zstd(lowband.topk(x, 30))

    def build(params=None, data=None):
        return lowband.Quantized("zstd", p.shape, p.dtype, {**p.params, **(params or {})},
                                 {"data": p.arrays["data"] if data is None else data})

    assert build() == p
    with pytest.raises(ValueError, match="header says|at most"):
        build({"raw": p.params["raw"] - 1})
    with pytest.raises(ValueError, match="Zstandard"):
        build(data=np.zeros(p.params["nbytes"], np.uint8))
    other = lossless.zstd(lowband.topk(make_vector(3001), 30))
    with pytest.raises(ValueError, match="shape"):
        lowband.Quantized("zstd", p.shape, p.dtype, other.params, other.arrays)
    with pytest.raises(ValueError, match="level"):
        build({"level": 23})
    with pytest.raises(ValueError, match="already"):
        lossless.zstd(p)
    with pytest.raises(TypeError, match="payload"):
        lossless.zstd(x)
    with pytest.raises(ValueError, match="level"):
        lowband.from_spec("sign+zstd:level=0")
    with pytest.raises(ValueError, match="last stage"):
        lowband.from_spec("zstd")
    data = bytearray(lowband.encode(p))
    data[-10] ^= 0x40
    with pytest.raises(FormatError):
        lowband.decode(bytes(data))
    from fuzzing import fuzz
    assert fuzz([lowband.encode(p), lowband.encode(lossless.zstd(lowband.sign(x)))], 1500, seed=2,
                check=lambda q: q.dequantize() if q.size < 1 << 20 else None) >= 0


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(ModuleNotFoundError, match=r"lowband\[zstd\]"):
        lowband.from_spec("sign+zstd").compress(np.ones(10, np.float32))
