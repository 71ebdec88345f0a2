"""The C fast path of encode/decode (csrc/python/wire_glue.c) against the
Python encoder and parser of lowband/wire.py: on valid payloads and on
fuzzed bytes (structured and mutated), both decoders give the same payload
or the same FormatError message, and both encoders the same bytes."""
import numpy as np
import pytest

import lowband
from lowband import Dense, FormatError, Quantized, Sparse, _core, _payload, wire
from lowband._fuzz import _Gen, corpus, mutate, with_crc


def outcome(fn):
    try:
        p = fn()
    except (FormatError, ValueError, TypeError) as exc:
        return ("error", type(exc).__name__, str(exc))
    return ("ok", p)


def py_decode(data, expect_shape=None, expect_dtype=None, max_size=None, copy=True):
    buf = memoryview(data).cast("B")
    shape = None if expect_shape is None else _payload.normalize_shape(expect_shape)
    dtype = None if expect_dtype is None else np.dtype(expect_dtype)
    return wire._decode_py(buf, shape, dtype, max_size, copy)


def same(a, b):
    assert type(a) is type(b)
    assert a == b
    if not isinstance(a, Dense):
        assert a.nbytes == b.nbytes
        assert isinstance(a.values, Quantized) == isinstance(b.values, Quantized) \
            if isinstance(a, Sparse) else True
    if isinstance(a, Sparse):
        assert a.indices.dtype == b.indices.dtype and (a.seed, a.step) == (b.seed, b.step)


def test_fast_path_taken():
    # the common payloads decode in C (wire_decode returns their parts)
    x = np.random.default_rng(0).standard_normal(300).astype(np.float32)
    for p in (lowband.topk(x, 5), lowband.randomk(x, 9, seed=1), lowband.sign(x),
              lowband.sign(x, scale="none"), lowband.sign(x, scale="two_means", block=7),
              lowband.quantize(x, 4), lowband.quantize(x, 1, block=None),
              lowband.quantize(x, 8, rounding="stochastic", seed=2), Dense(x.reshape(3, 100)),
              Sparse(np.arange(4), lowband.quantize(x[:4], 2), x.shape)):
        b = lowband.encode(p)
        assert wire._encode_py(p) == b
        assert _core.wire_decode(b, True, None, -1, -1, _payload.C_WIRE_MASK) is not None
        same(lowband.decode(b), py_decode(b))


@pytest.mark.parametrize("copy", [True, False])
def test_decode_paths_agree_on_fuzz(copy):
    rng = np.random.default_rng(11 + copy)
    seeds = corpus()
    gen = _Gen(rng)
    accepted = 0
    for i in range(4000):
        if i < len(seeds):
            data = seeds[i]
        elif rng.random() < 0.5:
            data = gen.payload()
        else:
            data = mutate(rng, seeds[int(rng.integers(0, len(seeds)))])
            if len(data) > 4 and rng.random() < 0.7:
                data = with_crc(data[:-4])
        kw = {}
        r = rng.random()
        if r < 0.15:
            kw["max_size"] = int(rng.integers(0, 5000))
        elif r < 0.25:
            kw["expect_dtype"] = rng.choice(["float32", "float64", "float16"])
        elif r < 0.3:
            kw["expect_shape"] = (3001,)
        fast = outcome(lambda: lowband.decode(data, copy=copy, **kw))
        slow = outcome(lambda: py_decode(data, copy=copy, **kw))
        assert fast[0] == slow[0], (data.hex(), fast, slow)
        if fast[0] == "ok":
            same(fast[1], slow[1])
            assert wire._encode_py(fast[1]) == lowband.encode(fast[1]) == data
            accepted += 1
        else:
            assert fast == slow
    assert accepted > 200


def test_copy_false_views():
    # views where the Python parser gives views (aligned data), read-only for
    # bytes, writeable for a bytearray; copies otherwise and with copy=True
    rng = np.random.default_rng(1)
    views = 0
    for n, k in [(64, 8), (64, 7), (100, 9), (1000, 10), (7, 2)]:
        x = rng.standard_normal(n).astype(np.float32)
        for p in (lowband.topk(x, k), lowband.quantize(x, 4), Dense(x)):
            b = lowband.encode(p)
            for data in (b, bytearray(b)):
                raw = np.frombuffer(data, np.uint8)
                fast, slow = lowband.decode(data, copy=False), py_decode(data, copy=False)
                same(fast, slow)
                fa = [fast.array] if isinstance(fast, Dense) else (
                    [fast.values] if isinstance(fast, Sparse) else list(fast.arrays.values()))
                sa = [slow.array] if isinstance(slow, Dense) else (
                    [slow.values] if isinstance(slow, Sparse) else list(slow.arrays.values()))
                for a, b_ in zip(fa, sa):
                    assert np.shares_memory(a, raw) == np.shares_memory(b_, raw)
                    assert a.flags.writeable == b_.flags.writeable
                    views += np.shares_memory(a, raw)
                c = lowband.decode(data)
                arrays = [c.array] if isinstance(c, Dense) else (
                    [c.values] if isinstance(c, Sparse) else list(c.arrays.values()))
                assert all(a.flags.writeable and not np.shares_memory(a, raw) for a in arrays)
    assert views > 5


def test_subclassed_scheme_decodes_in_python():
    # a scheme class that does not declare c_wire itself is never decoded in C
    assert _payload.C_WIRE_MASK == 0b1110
    old = _payload._SCHEMES_BY_ID[2]

    class Custom(type(old)):
        pass

    try:
        _payload.register_scheme(Custom())
        assert not _payload.C_WIRE_MASK & 4
        x = np.arange(10, dtype=np.float32)
        b = lowband.encode(lowband.quantize(x, 4))
        assert _core.wire_decode(b, True, None, -1, -1, _payload.C_WIRE_MASK) is None
        assert lowband.decode(b) == lowband.quantize(x, 4)
    finally:
        _payload.register_scheme(old)
    assert _payload.C_WIRE_MASK == 0b1110
