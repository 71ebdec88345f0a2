"""Philox4x32-10: known-answer vectors, the NumPy twin, stream separation
and thread-count independence."""
import numpy as np
import pytest

import lowband
from lowband import _core, _reference as ref

# Random123 known-answer tests for philox4x32_10 (kat_vectors).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_reference_philox_matches_random123(counter, key, expected):
    out = ref.philox4x32_10(*[np.array([c], dtype=np.uint64) for c in counter], *key)
    assert tuple(int(o[0]) for o in out) == expected


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_core_philox_matches_random123(counter, key, expected):
    # counter = (block lo, block hi, stream lo, stream hi), key = seed words
    seed = key[0] | (key[1] << 32)
    stream = counter[2] | (counter[3] << 32)
    domain, step = stream >> 56, stream & ((1 << 56) - 1)
    block = counter[0] | (counter[1] << 32)
    words = _core.philox(seed, step, domain, block, 4)
    assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("n", [0, 1, 5, 4096, 100003])
def test_core_equals_reference(n):
    seed, step, domain, first = 0x1234_5678_9ABC_DEF0, 77, 3, 1 << 33
    assert np.array_equal(_core.philox(seed, step, domain, first, n),
                          ref.philox_words(seed, step, domain, first, n))


def test_streams_differ_by_seed_step_domain():
    base = _core.philox(1, 0, 1, 0, 64)
    assert not np.array_equal(base, _core.philox(2, 0, 1, 0, 64))
    assert not np.array_equal(base, _core.philox(1, 1, 1, 0, 64))
    assert not np.array_equal(base, _core.philox(1, 0, 2, 0, 64))


def test_uniform_bits():
    w = _core.philox(9, 0, 0, 0, 1 << 16)
    bits = np.unpackbits(w.view(np.uint8))
    assert abs(bits.mean() - 0.5) < 0.005


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_thread_count_independent(threads):
    lowband.set_num_threads(threads)
    assert np.array_equal(_core.philox(5, 6, 7, 8, 1 << 20), ref.philox_words(5, 6, 7, 8, 1 << 20))


def test_below_is_unbiased_and_in_range():
    draws = np.array([ref.philox_below(3, 0, 0, i, 1000, 7) for i in range(700)])
    assert draws.min() >= 0 and draws.max() < 7
    counts = np.bincount(draws, minlength=7)
    assert counts.min() > 60  # expected 100 each


@pytest.mark.parametrize("bad,exc", [(-1, ValueError), (1 << 64, ValueError), (1.5, TypeError), (None, TypeError)])
def test_bad_seed(bad, exc):
    with pytest.raises(exc, match="seed"):
        _core.philox(bad, 0, 0, 0, 4)


def test_bad_step():
    with pytest.raises(ValueError, match="step"):
        _core.philox(0, 1 << 56, 0, 0, 4)
