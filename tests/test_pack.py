"""pack_bits / unpack_bits against their twins: every width 1..16, every
integer dtype, tails, thread counts, ISA paths and bad input."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lowband
from lowband import _core, _reference as ref
from helpers import LARGE, SIZES, THREADS, assert_same


def codes_for(n, bits, dtype=np.uint16, seed=0):
    return np.random.default_rng(seed).integers(0, 1 << bits, n).astype(dtype)


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("n", SIZES)
def test_matches_reference(n, bits):
    if n > 5000 and bits not in (1, 4, 12):
        n = 5003
    c = codes_for(n, bits, seed=n + bits)
    buf = lowband.pack_bits(c, bits)
    assert buf.dtype == np.uint8 and buf.size == (n * bits + 7) // 8
    assert_same(buf, ref.pack_bits(c, bits))
    back = lowband.unpack_bits(buf, bits, n)
    assert_same(back, c.astype(np.uint8 if bits <= 8 else np.uint16))
    assert_same(back, ref.unpack_bits(buf, bits, n))


def test_one_bit_is_numpy_packbits_little():
    b = np.random.default_rng(1).integers(0, 2, 1001)
    assert_same(lowband.pack_bits(b, 1), np.packbits(b.astype(bool), bitorder="little"))


def test_twelve_bit_layout():
    # SparseLoCo index packing: two 12-bit codes per 3 bytes, little-endian
    buf = lowband.pack_bits(np.array([0xABC, 0x123]), 12)
    assert buf.tolist() == [0xBC, 0x3A, 0x12]
    assert lowband.unpack_bits(bytes(buf), 12, 2).tolist() == [0xABC, 0x123]


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32,
                                   np.uint64, np.int64])
def test_integer_dtypes(dtype):
    bits = 7
    c = codes_for(1000, bits, dtype)
    assert_same(lowband.pack_bits(c, bits), ref.pack_bits(c, bits))
    assert_same(lowband.pack_bits(c.reshape(10, 100)[:, ::2], bits),
                ref.pack_bits(c.reshape(10, 100)[:, ::2], bits))


def test_out_of_range_codes():
    for dtype in (np.uint8, np.int16, np.int64):
        c = np.zeros(100, dtype)
        c[37] = 16
        with pytest.raises(ValueError, match=r"codes: expected values in \[0, 16\).*flat index 37"):
            lowband.pack_bits(c, 4)
        if np.dtype(dtype).kind == "i":
            c[37] = -1
            with pytest.raises(ValueError, match="flat index 37"):
                lowband.pack_bits(c, 4)
    big = np.zeros(LARGE, np.uint8)
    big[LARGE - 3] = 2
    with pytest.raises(ValueError, match=f"flat index {LARGE - 3}"):
        lowband.pack_bits(big, 1, threads=4)


@pytest.mark.parametrize("bits", [1, 3, 4, 12, 16])
def test_threads_and_isas(bits, isa):
    c = codes_for(LARGE, bits, seed=bits)
    base = lowband.pack_bits(c, bits, threads=1)
    assert_same(base, ref.pack_bits(c, bits))
    for t in THREADS:
        assert_same(lowband.pack_bits(c, bits, threads=t), base)
        assert_same(lowband.unpack_bits(base, bits, LARGE, threads=t), c.astype(base.dtype if bits <= 8 else np.uint16)
                    if bits > 8 else c.astype(np.uint8))


def test_unpack_reads_only_what_it_needs():
    buf = lowband.pack_bits(np.arange(10) % 8, 3)
    assert lowband.unpack_bits(np.concatenate([buf, [255, 255]]).astype(np.uint8), 3, 10).tolist() == \
        (np.arange(10) % 8).tolist()
    with pytest.raises(ValueError, match="buf: expected at least 4 bytes for n=10 codes of 3 bits, got 3"):
        lowband.unpack_bits(buf[:3], 3, 10)
    assert lowband.unpack_bits(b"", 5, 0).size == 0


@pytest.mark.parametrize("call,exc,msg", [
    (lambda: lowband.pack_bits(np.ones(3), 4), TypeError, "codes: expected an integer array, got dtype float64"),
    (lambda: lowband.pack_bits(np.ones(3, bool), 4), TypeError, "codes"),
    (lambda: lowband.pack_bits(np.ones(3, int), 0), ValueError, "bits"),
    (lambda: lowband.pack_bits(np.ones(3, int), 17), ValueError, "bits"),
    (lambda: lowband.pack_bits(np.ones(3, int), 2.0), TypeError, "bits"),
    (lambda: lowband.unpack_bits(np.ones(3, np.int8), 4, 2), TypeError, "buf: expected a uint8 array"),
    (lambda: lowband.unpack_bits("abc", 4, 2), TypeError, "buf"),
    (lambda: lowband.unpack_bits(b"abc", 4, -1), ValueError, "n"),
    (lambda: lowband.unpack_bits(b"abc", 17, 1), ValueError, "bits"),
])
def test_bad_arguments(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


@given(st.integers(1, 16), st.lists(st.integers(0, 2**16 - 1), max_size=200))
@settings(max_examples=200, deadline=None)
def test_round_trip_property(bits, values):
    c = np.array(values, np.uint32) & np.uint32((1 << bits) - 1)
    buf = lowband.pack_bits(c, bits)
    assert_same(buf, ref.pack_bits(c, bits))
    assert np.array_equal(lowband.unpack_bits(buf, bits, c.size), c)
    assert _core.check_codes(buf, c.size, bits, (1 << bits) - 1, 0xFFFFFFFF) is None
