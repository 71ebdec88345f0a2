"""Compressor objects, Chain and spec strings (sparsifiers; the quantizer
compressors are covered with the quantizers)."""
import numpy as np
import pytest

import lowband
from lowband import compressors as C
from helpers import make_vector


X = make_vector(10000, np.float32, "heavy", seed=1)


@pytest.mark.parametrize("comp,direct", [
    (C.TopK(ratio=0.01), lambda x: lowband.topk(x, ratio=0.01)),
    (C.TopK(37), lambda x: lowband.topk(x, 37)),
    (C.Threshold(2.0), lambda x: lowband.threshold(x, 2.0)),
    (C.ChunkedTopK(256, 8), lambda x: lowband.topk_chunked(x, 256, 8)),
])
def test_sparsifiers_equal_the_functions(comp, direct):
    p = comp.compress(X)
    assert p == direct(X)
    d = comp.decompress(p)
    assert np.array_equal(d, p.to_dense())
    out = np.empty_like(X)
    assert comp.decompress(p, out=out) is out
    assert comp.sparsifier and not comp.summable and not comp.unbiased


def test_randomized_compressors_advance_their_step():
    rk = C.RandomK(ratio=0.01, seed=5)
    a, b = rk.compress(X), rk.compress(X)
    assert (a.seed, a.step, b.step) == (5, 0, 1)
    assert a == lowband.randomk(X, ratio=0.01, seed=5, step=0)
    assert rk.compress(X, step=0) == a and rk.step == 2
    assert rk.summable and not rk.unbiased and C.RandomK(10, rescale=True).unbiased
    s = C.SampledTopK(0.01, seed=3)
    assert s.compress(X) == lowband.topk_sampled(X, 0.01, seed=3, step=0)
    assert s.compress(X) == lowband.topk_sampled(X, 0.01, seed=3, step=1)


def test_tiles_and_2d():
    m = X.reshape(100, 100)
    c = C.ChunkedTopK((32, 32), 4)
    assert c.compress(m) == lowband.topk_chunked(m, (32, 32), 4)
    assert c.spec == "chunked:32x32:4"
    assert C.from_spec(c.spec) == c


def test_identity():
    c = C.Identity()
    p = c.compress(X)
    assert isinstance(p, lowband.Dense) and np.array_equal(c.decompress(p), X)


@pytest.mark.parametrize("spec,expect", [
    ("topk:0.01", C.TopK(ratio=0.01)),
    ("topk:100", C.TopK(100)),
    ("TopK:0.5", C.TopK(ratio=0.5)),
    ("randomk:0.01:seed=7", C.RandomK(ratio=0.01, seed=7)),
    ("randomk:50:seed=7:rescale=true", C.RandomK(50, seed=7, rescale=True)),
    ("threshold:0.5", C.Threshold(0.5)),
    ("chunked:4096:128", C.ChunkedTopK(4096, 128)),
    ("chunked:64x64:128", C.ChunkedTopK((64, 64), 128)),
    ("sampled:0.001", C.SampledTopK(0.001)),
    ("dgc:0.001:seed=2", C.SampledTopK(0.001, seed=2)),
    ("sign:rms", C.Sign("rms")),
    ("sign:l1:block=256", C.Sign("l1", block=256)),
    ("blockwise:4", C.Blockwise(4)),
    ("quantize:8:block=128:rounding=stochastic:seed=3", C.Blockwise(8, block=128, rounding="stochastic", seed=3)),
    ("qsgd:256", C.QSGD(256)),
    ("terngrad:seed=4", C.TernGrad(seed=4)),
    ("natural", C.Natural()),
    ("minifloat:e3m0", C.MiniFloat(3, 0)),
    ("e3m0:block=64", C.MiniFloat(3, 0, block=64)),
    ("lut2bit", C.Lut2Bit()),
    ("fp16", C.Cast("float16")),
    ("cast:bfloat16", C.Cast("bfloat16")),
    ("none", C.Identity()),
    ("topk:0.01+lut2bit", C.Chain(C.TopK(ratio=0.01), C.Lut2Bit())),
    ("chunked:64x64:128+lut2bit", C.Chain(C.ChunkedTopK((64, 64), 128), C.Lut2Bit())),
    ("randomk:0.01+fp16", C.Chain(C.RandomK(ratio=0.01), C.Cast("float16"))),
])
def test_spec_strings(spec, expect):
    c = C.from_spec(spec)
    assert c == expect
    assert C.from_spec(c.spec) == c   # the canonical spec rebuilds it


def test_dict_and_list_specs():
    assert C.from_spec({"name": "topk", "ratio": 0.01}) == C.TopK(ratio=0.01)
    assert C.from_spec({"name": "topk", "args": [10], "then": {"name": "lut2bit"}}) == \
        C.from_spec("topk:10+lut2bit")
    assert C.from_spec(["topk:0.01", "fp16"]) == C.from_spec("topk:0.01+fp16")
    c = C.TopK(3)
    assert C.from_spec(c) is c


def test_chain_properties():
    ch = C.from_spec("randomk:0.01:rescale=true+fp16")
    assert ch.summable and not ch.unbiased and ch.randomized
    assert not C.from_spec("topk:0.01+lut2bit").summable


@pytest.mark.parametrize("spec,exc,msg", [
    ("", ValueError, "expected"), ("topk", ValueError, "one positional"), ("nope:1", ValueError, "unknown compressor"),
    ("topk:0.1:0.2", ValueError, "one positional"), ("topk:abc", ValueError, "count"),
    ("topk:1.5", ValueError, "ratio"), ("topk:-3", ValueError, "k"), ("randomk:0.1:seed=-1", ValueError, "seed"),
    ("sign:max", ValueError, "scale"), ("chunked:64", ValueError, "chunked takes"),
    ("chunked:64:65", ValueError, "k_per_chunk"), ("lut2bit+topk:0.1", ValueError, "first"),
    ("topk:0.1+topk:0.1", ValueError, "then"), ("topk:0.1+fp16+fp16", ValueError, "at most two"),
    ("minifloat:x3", ValueError, "format"), ("topk:0.1:bogus=1", ValueError, "bad arguments"),
    ("topk:0.1++fp16", ValueError, "expected"), ("blockwise:4:seed=1:5", ValueError, "positional"),
])
def test_bad_specs(spec, exc, msg):
    with pytest.raises(exc, match=msg):
        C.from_spec(spec)


def test_bad_spec_types():
    with pytest.raises(TypeError):
        C.from_spec(3)
    with pytest.raises(ValueError, match="name"):
        C.from_spec({"ratio": 0.1})
    with pytest.raises(TypeError, match="exactly one"):
        C.TopK()
    with pytest.raises(TypeError):
        C.TopK(10).decompress(np.zeros(3))


@pytest.mark.parametrize("comp,direct", [
    (C.Sign("l1"), lambda x, s: lowband.sign(x, scale="l1")),
    (C.Sign("rms", block=256), lambda x, s: lowband.sign(x, scale="rms", block=256)),
    (C.Blockwise(4), lambda x, s: lowband.quantize(x, 4, block=64)),
    (C.Blockwise(8, block=128, rounding="stochastic", seed=3),
     lambda x, s: lowband.quantize(x, 8, block=128, rounding="stochastic", seed=3, step=s)),
    (C.QSGD(16, seed=2), lambda x, s: lowband.qsgd(x, 16, seed=2, step=s)),
    (C.TernGrad(seed=4), lambda x, s: lowband.terngrad(x, seed=4, step=s)),
    (C.Natural(seed=5), lambda x, s: lowband.natural(x, seed=5, step=s)),
    (C.MiniFloat(3, 0), lambda x, s: lowband.minifloat(x, 3, 0, block=128)),
    (C.Lut2Bit(), lambda x, s: lowband.lut2bit(x)),
    (C.Cast("float16"), lambda x, s: lowband.cast(x, "float16")),
    (C.Cast("bfloat16"), lambda x, s: lowband.cast(x, "bfloat16")),
])
def test_quantizers_equal_the_functions(comp, direct):
    for step in range(2):
        p = comp.compress(X)
        assert p == direct(X, step)
        assert np.array_equal(comp.decompress(p), p.dequantize())
        assert lowband.decode(lowband.encode(p)) == p
    assert C.from_spec(comp.spec) == comp


def test_unbiased_flags():
    assert C.QSGD(4).unbiased and C.Natural().unbiased and C.Blockwise(4, rounding="stochastic").unbiased
    assert not C.Blockwise(4).unbiased and not C.Sign().unbiased and not C.Lut2Bit().unbiased
    assert C.TernGrad(clip=None).unbiased and not C.TernGrad().unbiased
    assert C.Cast().summable and not C.Sign().summable


@pytest.mark.parametrize("spec", ["topk:0.01+lut2bit", "topk:0.01+fp16", "chunked:64x64:128+lut2bit",
                                  "randomk:0.01:seed=3+bf16", "topk:50+blockwise:8:block=16",
                                  "sampled:0.01+sign:none", "threshold:2.0+qsgd:8"])
def test_chains_end_to_end(spec):
    c = C.from_spec(spec)
    x = X.reshape(100, 100) if "x" in spec.split(":")[1] else X
    p = c.compress(x)
    assert isinstance(p, lowband.Sparse) and isinstance(p.values, lowband.Quantized)
    b = lowband.encode(p)
    assert len(b) == p.nbytes
    q = lowband.decode(b)
    assert q == p
    dense = c.decompress(q)
    assert dense.shape == x.shape
    expect = np.zeros(x.size, np.float32)
    expect[p.indices] = p.values.dequantize()
    assert np.array_equal(dense.reshape(-1), expect)
    # fewer bytes than the raw sparse payload
    assert p.nbytes < c.first.compress(x, step=0).nbytes or "fp16" in spec or "bf16" in spec


def test_half_input_chain_keeps_dtype():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    xb = X.astype(ml_dtypes.bfloat16)
    p = C.from_spec("topk:0.01+lut2bit").compress(xb)
    assert p.dtype == xb.dtype and p.values.dtype == xb.dtype
    assert lowband.decode(lowband.encode(p)) == p
