"""The wire-format fuzz runs: 100,000 mutations of valid payloads of every
kind (bit flips, truncation, extension, random bytes), then the
structure-aware generator of lowband._fuzz (valid headers, extreme shapes,
truncations, CRC-valid but semantically wrong sections), decoded with no
exception other than FormatError.  .ci/run also runs both under the
AddressSanitizer + UBSan build, where an out-of-bounds read or undefined
behaviour aborts the run; there the structured run takes 200,000 inputs
(300,000 with the mutations)."""
import numpy as np
import pytest

from lowband import Dense, Quantized, Sparse, _core, _fuzz
from fuzzing import corpus, fuzz


def check(p):
    # every accepted payload is usable: it decodes to a dense tensor (a
    # mutated header may describe a huge empty tensor; receivers bound that
    # with decode(max_size=...), tested in test_wire.py)
    assert isinstance(p, (Sparse, Quantized, Dense))
    if p.size <= 1 << 24:
        dense = p.dequantize() if isinstance(p, Quantized) else p.to_dense()
        assert np.asarray(dense).size == p.size


@pytest.mark.fuzz
def test_fuzz_100k_mutations():
    seeds = corpus()
    accepted = fuzz(seeds, 100_000, seed=2026, fix_crc=0.6, check=check)
    assert accepted > 100   # value-only mutations with a fixed CRC are valid payloads


@pytest.mark.fuzz
def test_structured_fuzz():
    n = 200_000 if _core.SANITIZE else 20_000
    report = _fuzz.run(n, seed=8, structured_share=0.8)
    assert report["inputs"] == n
    assert report["unexpected"] == []
    assert report["accepted"] > n // 20 and report["rejected"] > n // 20   # both paths exercised


def test_fuzz_command_reports(capsys):
    # the command line (batches in child processes) on a small run
    assert _fuzz.main(["--inputs", "300", "--batch", "150", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    assert "inputs: 300 (accepted" in out and "crashes: 0" in out
    assert "unexpected exceptions: 0" in out and "slowest input:" in out and "peak memory" in out
