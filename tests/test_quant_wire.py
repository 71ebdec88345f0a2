"""Quantized payloads on the wire: round trips, exact sizes, Quantized values
inside Sparse, and hostile bytes (FormatError, never a crash)."""
import struct

import numpy as np
import pytest

import lowband
from lowband import FormatError, _core, _reference as ref
from helpers import make_vector
from quant_cases import CASES
from fuzzing import fuzz


def payloads():
    x = make_vector(3001, np.float32, "heavy", seed=4)
    out = [fn(x) for _, (fn, _) in sorted(CASES.items())]
    out += [fn(make_vector(0)) for _, (fn, _) in sorted(CASES.items())]
    out += [lowband.cast(x, "float16"), lowband.cast(x.astype(np.float64).reshape(3001, 1), "bfloat16"),
            lowband.quantize(make_vector(77, np.float16), 3, block=8)]
    return out


@pytest.mark.parametrize("i", range(len(payloads())))
def test_round_trip_and_exact_size(i):
    p = payloads()[i]
    b = lowband.encode(p)
    assert len(b) == p.nbytes
    q = lowband.decode(b)
    assert q == p and q.nbytes == len(b) and lowband.encode(q) == b
    np.testing.assert_array_equal(q.dequantize(), p.dequantize())


def test_validated_constructor_accepts_kernel_output():
    for p in payloads():
        q = lowband.Quantized(p.scheme, p.shape, p.dtype, p.params, p.arrays)
        assert q == p


@pytest.mark.parametrize("name", sorted(CASES) + ["float16", "bfloat16"])
def test_quantized_values_inside_sparse(name):
    x = make_vector(20000, np.float32, seed=7)
    sp = lowband.topk(x, 300)
    vals = lowband.cast(sp.values, name) if name in ("float16", "bfloat16") else CASES[name][0](sp.values)
    s = lowband.Sparse(sp.indices, vals, x.shape)
    b = lowband.encode(s)
    assert len(b) == s.nbytes
    back = lowband.decode(b)
    assert back == s
    dense = back.to_dense()
    expect = np.zeros_like(x)
    expect[sp.indices] = vals.dequantize()
    np.testing.assert_array_equal(dense, expect)


def test_sizes_are_the_documented_bits_per_element():
    x = make_vector(1 << 14, np.float32)
    header = len(lowband.encode(lowband.lut2bit(x[:0]))) - 16   # frame + table with no codes
    n = x.size
    # frame 16, scheme/dtype/nparams 3, 2 params, narrays 1, 2 section lengths, codes, scale, crc
    assert lowband.sign(x).nbytes == 16 + 3 + 2 * 9 + 1 + 2 * 8 + n // 8 + 4 + 4
    assert lowband.lut2bit(x).nbytes == header + n // 4 + 16
    assert lowband.quantize(x, 4, block=64).nbytes - lowband.quantize(x[:0], 4, block=64).nbytes \
        == n // 2 + 4 * n // 64


def _body(p):
    return bytearray(lowband.encode(p)[:-4])


def _recrc(body):
    return bytes(body) + struct.pack("<I", ref.crc32c(bytes(body)))


def _arrays_start(p):
    """Offset of the first array section of a top-level Quantized payload."""
    return 8 + 8 * len(p.shape) + 3 + 9 * len(lowband._payload.get_scheme(p.scheme).params) + 1


def _corrupt_array(p, name, index, value, dtype):
    body = _body(p)
    off = _arrays_start(p)
    for a in lowband._payload.get_scheme(p.scheme).arrays:
        length = struct.unpack("<Q", body[off:off + 8])[0]
        if a == name:
            body[off + 8 + index * np.dtype(dtype).itemsize:off + 8 + (index + 1) * np.dtype(dtype).itemsize] = \
                np.array([value], dtype).tobytes()
            return _recrc(body)
        off += 8 + length
    raise KeyError(name)


BAD_CONTENTS = [
    ("sign_l1", "scales", 0, np.nan, np.float32, "scales"),
    ("sign_l1", "scales", 0, -1.0, np.float32, "scales"),
    ("q4", "scales", 2, np.inf, np.float32, "scales"),
    ("q4", "codes", 0, 0xFF, np.uint8, "invalid code at element 0"),
    ("q3_tensor", "codes", 0, 0b111, np.uint8, "invalid code at element 0"),
    ("q2", "codes", 1, 0b11000000, np.uint8, "invalid code at element 7"),
    ("qsgd", "codes", 0, 0x0F, np.uint8, "invalid code"),
    ("terngrad", "codes", 0, 0x03, np.uint8, "invalid code"),
    ("terngrad", "scales", 0, np.nan, np.float32, "scales"),
    ("natural", "codes", 0, 0x80, np.uint8, "never 128"),
    ("natural", "top", 0, 128, np.int16, "top"),
    ("natural", "top", 0, -2000, np.int16, "top"),
    ("e3m0", "codes", 0, 0x08, np.uint8, "never 8"),
    ("e3m0", "exponents", 0, -128, np.int8, "exponents"),
    ("lut2bit", "table", 1, np.inf, np.float32, "table"),
]


@pytest.mark.parametrize("case", BAD_CONTENTS, ids=[f"{c[0]}-{c[1]}-{c[5][:10]}" for c in BAD_CONTENTS])
def test_bad_contents_are_rejected(case):
    name, array, index, value, dtype, msg = case
    p = CASES[name][0](make_vector(1003, np.float32, seed=1))
    with pytest.raises(FormatError, match=msg):
        lowband.decode(_corrupt_array(p, array, index, value, dtype))


def test_padding_bits_are_rejected():
    p = lowband.quantize(make_vector(3, np.float32), 3, block=8)   # 9 bits: 7 bits of padding
    last = p.arrays["codes"].size - 1
    bad = _corrupt_array(p, "codes", last, int(p.arrays["codes"][last]) | 0x80, np.uint8)
    with pytest.raises(FormatError, match="padding"):
        lowband.decode(bad)


def test_float16_exponent_limits_are_checked():
    p = lowband.minifloat(make_vector(100, np.float16), 3, 0, block=50)
    assert p.arrays["exponents"].max() <= 15
    with pytest.raises(FormatError, match="exponents"):
        lowband.decode(_corrupt_array(p, "exponents", 0, 16, np.int8))
    q = lowband.natural(make_vector(100, np.float16), seed=1)
    with pytest.raises(FormatError, match="top"):
        lowband.decode(_corrupt_array(q, "top", 0, 16, np.int16))


@pytest.mark.parametrize("scheme,params,msg", [
    ("blockwise", {"bits": 5, "block": 64}, "bits"),
    ("blockwise", {"bits": 4, "block": 2**41}, "block"),
    ("sign", {"scale": 3, "block": 0}, "scale"),
    ("qsgd", {"levels": 0, "block": 0}, "levels"),
    ("qsgd", {"levels": 128, "block": 0}, "levels"),
    ("minifloat", {"exp_bits": 6, "man_bits": 0, "block": 8}, "exp_bits"),
    ("minifloat", {"exp_bits": 3, "man_bits": 5, "block": 8}, "man_bits"),
])
def test_bad_parameters_are_rejected(scheme, params, msg):
    base = {"blockwise": CASES["q4"], "sign": CASES["sign_l1"], "qsgd": CASES["qsgd"],
            "minifloat": CASES["e3m0"]}[scheme][0](make_vector(64, np.float32))
    body = _body(base)
    off = 8 + 8 + 3
    for i, (name, _) in enumerate(lowband._payload.get_scheme(scheme).params):
        body[off + 9 * i + 1:off + 9 * i + 9] = struct.pack("<Q", params[name])
    with pytest.raises(FormatError, match=msg):
        lowband.decode(_recrc(body))
    with pytest.raises(ValueError):
        lowband.Quantized(scheme, base.shape, base.dtype, params, base.arrays)


def test_fuzz_quantized_payloads():
    def check(p):
        assert np.asarray(p.dequantize()).size == p.size

    seeds = [lowband.encode(p) for p in payloads()[:21]]
    assert fuzz(seeds, 3000, seed=3, fix_crc=0.7, check=check) > 0
