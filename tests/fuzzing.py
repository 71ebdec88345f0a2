"""Mutation fuzzing of lowband.decode, shared by the wire tests.

decode() treats bytes as hostile: for any input it must either return a
payload that re-encodes to exactly the same bytes (the format is canonical)
or raise FormatError; anything else (another exception, a crash under the
sanitizer build) is a bug.  The generators (mutations, structure-aware
inputs) and the seed corpus live in lowband._fuzz, which also backs
``python -m lowband fuzz``.
"""
import struct

import numpy as np

import lowband
from lowband import FormatError, _core
from lowband._fuzz import corpus, mutate, structured  # noqa: F401 - re-exported for the tests


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
