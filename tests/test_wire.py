"""Wire format: round trips, exact sizes, canonical index choice, the C
codecs against their twins, and hostile bytes (FormatError, never a crash)."""
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lowband
from lowband import FormatError, _core, _reference as ref, wire
from fuzzing import fuzz
from helpers import FLOATS, make_vector


def sample_payloads():
    x32 = make_vector(3001, np.float32, "heavy")
    x64 = make_vector(3000, np.float64).reshape(3, 1000, 1)
    return [
        lowband.topk(x32, 30),                                # varint indices
        lowband.topk(x32, 2000),                              # bitmap indices
        lowband.topk(make_vector(50), 3),                     # raw indices
        lowband.topk(x64, 17),
        lowband.randomk(x32, 40, seed=7, step=2),             # seeded indices
        lowband.topk(x32, 0),
        lowband.topk(make_vector(0), 0),
        lowband.threshold(x32, 2.0),
        lowband.Dense(x64),
        lowband.Dense(np.float32(3.0)),
        lowband.Sparse([0, 5], np.array([1.0, 2.0], np.float16), (2, 3)),
    ]


@pytest.mark.parametrize("i", range(11))
def test_round_trip_and_exact_size(i):
    p = sample_payloads()[i]
    b = lowband.encode(p)
    assert len(b) == p.nbytes
    q = lowband.decode(b)
    assert q == p and type(q) is type(p)
    assert lowband.encode(q) == b
    assert q.nbytes == len(b)


def test_index_encoding_is_the_smallest():
    cases = {"raw": (np.array([1 << 29, (1 << 30) + 7, 3 << 30]), (3 << 30) + 1),  # gaps need 5-byte varints
             "varint": (np.arange(0, 10000, 50), 10000), "bitmap": (np.arange(0, 10000, 2), 10000)}
    for name, (idx, n) in cases.items():
        p = lowband.Sparse(idx, np.ones(idx.size, np.float32), n)
        sizes = _core.index_sizes(p.indices, n)
        enc = lowband.encode(p)[8 + 8 + 8]  # header(8) + shape(8) + nnz(8) -> encoding byte
        assert enc == int(np.argmin(sizes)) == ["raw", "varint", "bitmap"].index(name)


def test_layout_of_a_small_payload_is_as_documented():
    p = lowband.Sparse([1, 4], np.array([0.5, -2.0], np.float32), 6)
    b = lowband.encode(p)
    body = (b"LBND" + bytes([1, 1, 1, 1]) + struct.pack("<Q", 6) + struct.pack("<Q", 2)
            + bytes([2]) + struct.pack("<Q", 1) + bytes([0b010010])  # bitmap (1 byte) wins
            + bytes([0]) + struct.pack("<Q", 8) + np.array([0.5, -2.0], "<f4").tobytes())
    assert b == body + struct.pack("<I", ref.crc32c(body))


def test_crc_matches_bitwise_reference(isa):
    for n in (0, 1, 7, 8, 9, 1000):
        data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
        assert _core.crc32c(data) == ref.crc32c(data)
    assert _core.crc32c(b"123456789") == 0xE3069283  # the standard check value


def test_crc_interleaved_streams(isa):
    # inputs of 12 KiB and more run as three interleaved crc32 streams joined
    # by a GF(2) shift: check the joins against the bitwise reference, a
    # running crc split anywhere, and several 192 KiB blocks plus a tail
    # against the slicing-by-8 table
    for n in (3 * 4096, 3 * 4096 + 9, 3 * 4096 + 8 * 3 + 5):
        data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
        assert _core.crc32c(data) == ref.crc32c(data)
        assert _core.crc32c(data[777:], _core.crc32c(data[:777])) == ref.crc32c(data)
    data = np.random.default_rng(0).integers(0, 256, 3 * 3 * 65536 + 12345, dtype=np.uint8).tobytes()
    want = _core.crc32c(data)
    lowband._core.set_isa("scalar")
    try:
        assert _core.crc32c(data) == want
    finally:
        lowband._core.set_isa(isa)


@given(st.lists(st.integers(0, 2**40), unique=True, max_size=200), st.integers(0, 3))
@settings(max_examples=200, deadline=None)
def test_index_codecs_round_trip(values, extra):
    idx = np.array(sorted(values), dtype=np.uint64)
    n = (int(idx[-1]) if idx.size else 0) + 1 + extra
    sizes = _core.index_sizes(idx, n)
    for enc in (0, 1):
        b = _core.index_encode(idx, n, enc, sizes[enc])
        if enc == 1:
            assert b == ref.varint_indices(idx)
        assert np.array_equal(_core.index_decode(b, enc, idx.size, n), idx)
    if n < 5000:
        b = _core.index_encode(idx, n, 2, sizes[2])
        assert np.array_equal(_core.index_decode(b, 2, idx.size, n), idx)


@pytest.mark.parametrize("buf,enc,count,n", [
    (b"\x80", 1, 1, 100),                 # unterminated varint
    (b"\x05\x00", 1, 1, 100),             # trailing byte
    (b"\x85\x00", 1, 1, 100),             # overlong (non-canonical) varint
    (b"\x64", 1, 1, 100),                 # 100 >= n
    (b"\x05\x63", 1, 2, 100),             # 5 + 99 + 1 >= n
    (b"\xff" * 10 + b"\x01", 1, 1, 2**63),  # more than 64 bits
    (b"\x02\x00\x00\x00\x01\x00\x00\x00", 0, 2, 100),  # not ascending
    (b"\x02\x00\x00", 0, 1, 100),         # short raw
    (b"\x03", 2, 1, 8),                   # popcount 2 != 1
    (b"\x80", 2, 1, 7),                   # padding bit set
    (b"\x01\x00", 2, 1, 8),               # wrong bitmap length
])
def test_index_decode_rejects(buf, enc, count, n):
    with pytest.raises(FormatError):
        _core.index_decode(buf, enc, count, n)


def test_decode_rejects_corruption():
    b = bytearray(lowband.encode(sample_payloads()[0]))
    cases = {
        "short": bytes(b[:5]), "magic": b"XXXX" + bytes(b[4:]), "crc": bytes(b[:-1]) + bytes([b[-1] ^ 1]),
        "truncated": bytes(b[:-9]), "extended": bytes(b) + b"\x00",
    }
    for name, data in cases.items():
        with pytest.raises(FormatError):
            lowband.decode(data)


def _recrc(body):
    return bytes(body) + struct.pack("<I", ref.crc32c(bytes(body)))


def test_decode_rejects_bad_fields_even_with_valid_crc():
    good = bytearray(lowband.encode(sample_payloads()[0]))[:-4]
    for offset, value, what in [(4, 2, "version"), (5, 9, "kind"), (6, 9, "dtype"), (7, 200, "ndim"),
                                (24, 7, "index encoding")]:
        body = bytearray(good)
        body[offset] = value
        with pytest.raises(FormatError, match=what):
            lowband.decode(_recrc(body))
    body = bytearray(good)
    body[16:24] = struct.pack("<Q", 2**40)  # nnz > size
    with pytest.raises(FormatError, match="nnz"):
        lowband.decode(_recrc(body))
    body = bytearray(good)
    body[8:16] = struct.pack("<Q", 2**63)   # absurd size
    with pytest.raises(FormatError, match="overflows"):
        lowband.decode(_recrc(body))


def test_non_canonical_index_encoding_is_rejected():
    p = lowband.Sparse(np.arange(0, 100, 2), np.ones(50, np.float32), 100)
    b = bytearray(lowband.encode(p)[:-4])
    assert b[24] == 2  # bitmap is smallest
    idx = p.indices
    raw = idx.astype("<u4").tobytes()
    body = b[:24] + bytes([0]) + struct.pack("<Q", len(raw)) + raw + b[24 + 1 + 8 + 13:]
    with pytest.raises(FormatError, match="non-canonical"):
        lowband.decode(_recrc(body))


def test_decode_accepts_memoryview_and_rejects_non_bytes():
    b = lowband.encode(sample_payloads()[2])
    assert lowband.decode(memoryview(b)) == sample_payloads()[2]
    assert lowband.decode(bytearray(b)) == sample_payloads()[2]
    with pytest.raises(TypeError, match="bytes-like"):
        lowband.decode("not bytes")
    with pytest.raises(TypeError):
        lowband.encode(np.zeros(3))


def test_fuzz_quick():
    assert fuzz([lowband.encode(p) for p in sample_payloads()], 3000) > 0


def test_decode_checks_what_the_receiver_expects():
    p = lowband.topk(make_vector(100, np.float32), 5)
    b = lowband.encode(p)
    assert lowband.decode(b, expect_shape=(100,), expect_dtype=np.float32, max_size=100) == p
    assert lowband.decode(b, expect_shape=100) == p
    with pytest.raises(FormatError, match="expected"):
        lowband.decode(b, expect_shape=(10, 10))
    with pytest.raises(FormatError, match="dtype"):
        lowband.decode(b, expect_dtype=np.float64)
    with pytest.raises(FormatError, match="max_size"):
        lowband.decode(b, max_size=99)
    huge = lowband.Sparse(np.zeros(0, np.uint64), np.zeros(0, np.float32), (1 << 40,))
    hb = lowband.encode(huge)
    assert lowband.decode(hb).size == 1 << 40      # valid, and cheap to decode
    with pytest.raises(FormatError, match="max_size"):
        lowband.decode(hb, max_size=1 << 30)
    with pytest.raises(ValueError, match="max_size"):
        lowband.decode(b, max_size=-1)


def test_encode_into_equals_encode():
    payloads = [lowband.Dense(np.arange(10, dtype=np.float32)),
                lowband.Sparse([1, 4], np.array([0.5, -2.0], np.float32), 6),
                lowband.quantize(np.linspace(-1, 1, 300, dtype=np.float32), 4)]
    for p in payloads:
        want = lowband.encode(p)
        buf = bytearray(len(want) + 5)
        assert wire.encode_into(p, buf, offset=5) == len(want)
        assert bytes(buf[5:5 + len(want)]) == want
        arr = np.zeros(len(want), np.uint8)
        wire.encode_into(p, arr)
        assert arr.tobytes() == want
    with pytest.raises(ValueError, match="out: needs"):
        wire.encode_into(payloads[0], bytearray(10))
    with pytest.raises(TypeError, match="out: expected a writable"):
        wire.encode_into(payloads[0], bytes(1000))


def test_decode_without_copies_validates_the_same_and_shares_memory():
    x = np.random.default_rng(3).standard_normal(1000).astype(np.float32)
    payloads = [lowband.Dense(x), lowband.topk(x, k=30), lowband.quantize(x, 4),
                lowband.sign(x.astype(np.float64), scale="rms", block=100)]
    for p in payloads:
        b = lowband.encode(p)
        got = wire.decode(b, copy=False)
        assert got == wire.decode(b) == p
        if isinstance(got, lowband.Dense):   # its values lie aligned: a read-only view
            assert np.shares_memory(got.array, np.frombuffer(b, np.uint8)) and not got.array.flags.writeable
        bad = bytearray(b)
        bad[len(b) // 2] ^= 1
        with pytest.raises(FormatError, match="CRC"):
            wire.decode(bytes(bad), copy=False)
    buf = bytearray(lowband.encode(payloads[0]))
    got = wire.decode(buf, copy=False)
    assert got.array.flags.writeable and np.shares_memory(got.array, np.frombuffer(buf, np.uint8))
