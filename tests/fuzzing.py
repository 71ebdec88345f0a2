"""Mutation fuzzing of lowband.decode, shared by the wire tests.

decode() treats bytes as hostile: for any input it must either return a
payload that re-encodes to exactly the same bytes (the format is canonical)
or raise FormatError; anything else (another exception, a crash under the
sanitizer build) is a bug.
"""
import struct

import numpy as np

import lowband
from lowband import FormatError, _core
from helpers import make_vector


def mutate(rng, data):
    """One random corruption: bit flips, truncation, extension, an 8-byte
    overwrite, or unrelated random bytes."""
    b = bytearray(data)
    op = rng.integers(0, 5)
    if op == 0 and b:
        for _ in range(rng.integers(1, 4)):
            i = rng.integers(0, len(b))
            b[i] ^= 1 << rng.integers(0, 8)
    elif op == 1:
        b = b[:rng.integers(0, len(b) + 1)]
    elif op == 2:
        b += rng.integers(0, 256, rng.integers(1, 16), dtype=np.uint8).tobytes()
    elif op == 3 and b:
        i = rng.integers(0, len(b))
        b[i:i + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
    else:
        b = bytearray(rng.integers(0, 256, rng.integers(0, 64), dtype=np.uint8).tobytes())
    return bytes(b)


def corpus():
    """Encoded payloads of every kind: sparse with raw, delta-varint, bitmap
    and seeded indices, dense, every quantization scheme, and sparse payloads
    whose values are quantized by every scheme."""
    x = make_vector(3001, np.float32, "heavy", seed=5)
    small = make_vector(97, np.float64, seed=6)
    sparse = [lowband.topk(x, 30), lowband.topk(x, 2000), lowband.topk(make_vector(50), 3),
              lowband.topk(small.reshape(97, 1), 9), lowband.randomk(x, 40, seed=7, step=2),
              lowband.topk(x, 0), lowband.threshold(x, 2.0)]
    dense = [lowband.Dense(small), lowband.Dense(np.float32(3.0))]
    quant = [lowband.sign(x), lowband.sign(small, scale="rms", block=16), lowband.quantize(x, 4),
             lowband.quantize(x, 3, block=7), lowband.quantize(x, 8, rounding="stochastic", seed=1),
             lowband.quantize(x, 1), lowband.qsgd(x, 5, seed=1), lowband.terngrad(x, seed=2),
             lowband.natural(x, seed=3), lowband.minifloat(x, 3, 0, block=128),
             lowband.minifloat(small, 2, 1, block=8), lowband.lut2bit(x),
             lowband.cast(small.astype(np.float32), "float16"), lowband.cast(small, "bfloat16")]
    base = lowband.topk(x, 64)
    nested = [lowband.Sparse(base.indices, q, x.shape) for q in
              (lowband.lut2bit(base.values), lowband.sign(base.values), lowband.quantize(base.values, 4, block=16),
               lowband.cast(base.values / np.float32(1e6), "float16"), lowband.minifloat(base.values, 3, 0, block=32),
               lowband.qsgd(base.values, 3, seed=1))]
    return [lowband.encode(p) for p in sparse + dense + quant + nested]


def fuzz(seeds, iterations, seed=0, fix_crc=0.5, check=None):
    """Decodes `iterations` mutations of the seed byte strings; with
    probability `fix_crc` the checksum is recomputed so the mutation reaches
    the parser.  Returns how many mutations decoded (each re-encoded to the
    same bytes and passed `check`)."""
    rng = np.random.default_rng(seed)
    accepted = 0
    for _ in range(iterations):
        data = mutate(rng, seeds[rng.integers(0, len(seeds))])
        if len(data) > 4 and rng.random() < fix_crc:
            data = data[:-4] + struct.pack("<I", _core.crc32c(data[:-4]))
        try:
            p = lowband.decode(data)
        except FormatError:
            continue
        assert lowband.encode(p) == data
        if check is not None:
            check(p)
        accepted += 1
    return accepted
