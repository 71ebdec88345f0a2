"""Wire-format fuzzing: ``python -m lowband fuzz --inputs N [--seed S]``.

``decode()`` treats bytes as hostile.  For every input it must either return
a payload that re-encodes to exactly the same bytes (the format is
canonical) and decodes to a tensor (finite for every table-decoded
quantization scheme), or raise ``FormatError``; any other exception, a
crash, or a sanitizer report is a bug.

Two generators feed it:

- ``mutate``: random corruptions of valid payloads of every kind (bit flips,
  truncation, extension, 8-byte overwrites, random bytes);
- ``structured``: inputs built field by field from the layout in
  docs/formats.md: valid headers with extreme shapes (0, 2**32, 2**40,
  2**62, (0, 2**63) ...), every payload kind, index encoding and
  quantization scheme, parameters at and beyond their bounds, sections of
  the right or a wrong length, sorted / unsorted / duplicate / out-of-range
  indices, scales that are zero, huge, Inf or NaN, codes in and out of
  range, truncations, all with a valid CRC-32C so they reach the parser.

``run()`` is the engine (used by tests/test_fuzz.py under the sanitizer
build); the command line splits the inputs into batches run in child
processes, so that a crash is reported (with the input that caused it)
instead of ending the run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

from . import _core
from ._payload import CODE_DTYPES, Dense, FormatError, Quantized, Sparse, scheme_by_id
from .quantize import (cast, lut2bit, minifloat, natural, qsgd, quantize, sign, terngrad)
from .sparsify import randomk, threshold, topk
from .wire import MAGIC, VERSION, decode, encode

__all__ = ["corpus", "mutate", "structured", "run", "main"]

_u64 = struct.Struct("<Q")
_f32 = struct.Struct("<f")
# dimensions: small ones often, the edges of every size check sometimes
_DIMS_SMALL = (0, 1, 2, 3, 5, 7, 8, 9, 16, 63, 64, 65, 100, 1000)
_DIMS_EDGE = (2**16, 2**20, 2**24 + 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**40, 2**61,
              2**62 - 1, 2**62, 2**63, 2**64 - 1)
_U64_EDGE = (0, 1, 2, 3, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256, 2**31, 2**32,
             2**40, 2**40 + 1, 2**56 - 1, 2**56, 2**63, 2**64 - 1)
_SCALES = (0.0, 1.0, 0.5, 1e-45, 1e-38, 2.0**-126, 3e36, 1e37, 1e38, float(np.finfo(np.float32).max),
           65504.0, 65520.0, float("inf"), float("-inf"), float("nan"), -1.0, -0.0)
_MAX_SECTION = 1 << 16   # generated sections stay small: fast and bounded


# --------------------------------------------------------------------------
# Seed payloads and mutations
# --------------------------------------------------------------------------

def corpus():
    """Encoded payloads of every kind: sparse with raw, delta-varint, bitmap
    and seeded indices, dense (0-d included), every quantization scheme, and
    sparse payloads whose values are quantized by every scheme."""
    rng = np.random.default_rng(5)
    x = rng.standard_t(1, 3001).astype(np.float32)
    small = rng.standard_normal(97)
    sparse = [topk(x, 30), topk(x, 2000), topk(x[:50], 3), topk(small.reshape(97, 1), 9),
              randomk(x, 40, seed=7, step=2), topk(x, 0), threshold(x, 2.0)]
    dense = [Dense(small), Dense(np.float32(3.0)), Dense(np.zeros((0, 3), np.float16))]
    quant = [sign(x), sign(small, scale="rms", block=16), quantize(x, 4), quantize(x, 3, block=7),
             quantize(x, 8, rounding="stochastic", seed=1), quantize(x, 1), qsgd(x, 5, seed=1),
             terngrad(x, seed=2), natural(x, seed=3), minifloat(x, 3, 0, block=128),
             minifloat(small, 2, 1, block=8), lut2bit(x), cast(small.astype(np.float32), "float16"),
             cast(small, "bfloat16")]
    base = topk(x, 64)
    nested = [Sparse(base.indices, q, x.shape) for q in
              (lut2bit(base.values), sign(base.values), quantize(base.values, 4, block=16),
               cast(base.values / np.float32(1e6), "float16"), minifloat(base.values, 3, 0, block=32),
               qsgd(base.values, 3, seed=1))]
    return [encode(p) for p in sparse + dense + quant + nested]


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
        b += rng.bytes(int(rng.integers(1, 16)))
    elif op == 3 and b:
        i = rng.integers(0, len(b))
        b[i:i + 8] = rng.bytes(8)
    else:
        b = bytearray(rng.bytes(int(rng.integers(0, 64))))
    return bytes(b)


def with_crc(body):
    """body followed by its CRC-32C: bytes that reach the parser."""
    return body + struct.pack("<I", _core.crc32c(body))


# --------------------------------------------------------------------------
# Structure-aware generation
# --------------------------------------------------------------------------

class _Gen:
    """Builds one input field by field (see docs/formats.md)."""

    def __init__(self, rng):
        self.rng = rng

    def chance(self, p):
        return self.rng.random() < p

    def pick(self, seq):
        return seq[int(self.rng.integers(0, len(seq)))]

    def u64(self):
        r = self.rng.random()
        if r < 0.5:
            return self.pick(_U64_EDGE)
        if r < 0.8:
            return int(self.rng.integers(0, 1000))
        return int.from_bytes(self.rng.bytes(8), "little")

    def shape(self):
        r = self.rng.random()
        ndim = 0 if r < 0.05 else 33 if r < 0.06 else int(self.rng.integers(1, 4))
        if ndim > 3:
            return tuple(1 for _ in range(ndim))
        edge = self.chance(0.3)
        return tuple(self.pick(_DIMS_EDGE) if edge and self.chance(0.5) else self.pick(_DIMS_SMALL)
                     for _ in range(ndim))

    def header(self, kind, code, shape):
        return (MAGIC + bytes([VERSION if not self.chance(0.01) else 2, kind, code, len(shape)])
                + b"".join(_u64.pack(s) for s in shape))

    def section(self, payload, exact=True):
        """A u64 length then the bytes; sometimes a wrong length."""
        n = len(payload)
        if not exact or self.chance(0.05):
            n = self.pick((0, max(n - 1, 0), n + 1, 2**63, 2**64 - 1, n * 2))
        return _u64.pack(n) + payload

    def data(self, nbytes, itemsize=1):
        """nbytes of element data (capped): random bytes, zeros, or floats
        from the extreme list."""
        nbytes = min(nbytes, _MAX_SECTION)
        r = self.rng.random()
        if r < 0.4:
            return self.rng.bytes(nbytes)
        if r < 0.6 or itemsize != 4:
            return bytes(nbytes)
        count = nbytes // 4
        vals = np.array([self.pick(_SCALES) for _ in range(min(count, 8))] or [0.0], np.float32)
        return np.resize(vals, count).astype("<f4").tobytes() + bytes(nbytes - 4 * count)

    def codes(self, n, bits, maxcode):
        """A packed stream of n codes, all valid (most often) or random."""
        n = min(n, _MAX_SECTION * 8 // max(bits, 1))
        if self.chance(0.3):
            return self.rng.bytes((n * bits + 7) // 8)
        c = self.rng.integers(0, maxcode + 1, n).astype(np.uint16)
        return _core.pack_bits(c, bits, None).tobytes() if n else b""

    def quant_body(self, size, code):
        sch = scheme_by_id(int(self.rng.integers(1, 11)) if not self.chance(0.02) else
                           self.pick((0, 11, 255)))
        wire_id = sch.wire_id if sch is not None else int(self.rng.integers(11, 256))
        out = [bytes([wire_id, code if not self.chance(0.05) else int(self.rng.integers(0, 6))])]
        spec = sch.params if sch is not None else ()
        nparams = len(spec) if not self.chance(0.03) else int(self.rng.integers(0, 5))
        out.append(bytes([nparams]))
        params = {}
        for i in range(nparams):
            name, kind = spec[i] if i < len(spec) else ("x", "u")
            if kind == "u":
                v = self.pick({"bits": (0, 1, 2, 3, 4, 5, 8, 9, 255), "levels": (0, 1, 2, 5, 127, 128),
                               "exp_bits": (0, 1, 2, 3, 5, 6), "man_bits": (0, 1, 3, 4),
                               "scale": (0, 1, 2, 3)}.get(name, (0, 1, 7, 8, 64, 2**40, 2**40 + 1)))
                v = v if not self.chance(0.05) else self.u64()
                params[name] = v
                tag = 0 if not self.chance(0.02) else 1
                out.append(bytes([tag]) + _u64.pack(v))
            else:
                out.append(bytes([1]) + struct.pack("<d", self.pick(_SCALES)))
        arrays = sch.arrays if sch is not None else ()
        narrays = len(arrays) if not self.chance(0.03) else int(self.rng.integers(0, 4))
        out.append(bytes([narrays]))
        lay = None
        if sch is not None:
            try:
                lay = sch.layout(params, size, CODE_DTYPES.get(code, np.dtype(np.float32)))
            except Exception:  # noqa: BLE001 - invalid parameters: any layout
                lay = None
        for i in range(narrays):
            name = arrays[i] if i < len(arrays) else "codes"
            if lay is not None and name in lay:
                adt, count = lay[name]
                nbytes = count * np.dtype(adt).itemsize
                if name == "codes" and hasattr(sch, "max_code") and nbytes <= _MAX_SECTION:
                    payload = self._scheme_codes(sch, params, count, size)
                elif name in ("scales", "table") and nbytes <= _MAX_SECTION:
                    payload = self.data(nbytes, 4)
                elif name == "top":
                    payload = struct.pack("<h", self.pick((-897, -896, -1, 0, 15, 16, 127, 128, 1023, 1024)))
                elif name == "exponents":
                    payload = bytes(self.rng.integers(-128, 128, min(count, _MAX_SECTION), dtype=np.int8))
                else:
                    payload = self.data(nbytes)
                out.append(self.section(payload, exact=len(payload) == nbytes))
            else:
                out.append(self.section(self.data(int(self.rng.integers(0, 64)))))
        return b"".join(out)

    def _scheme_codes(self, sch, params, nbytes, size):
        bits = {"sign": 1, "terngrad": 2, "natural": 8, "lut2bit": 2}.get(sch.name)
        if bits is None:
            try:
                bits = sch.bits(params) if hasattr(sch, "bits") else (
                    1 + params["exp_bits"] + params["man_bits"])
            except Exception:  # noqa: BLE001
                return self.rng.bytes(min(nbytes, _MAX_SECTION))
        maxcode = (1 << bits) - 1
        if sch.name in ("blockwise", "blockwise_sr", "qsgd", "sign", "terngrad"):
            maxcode = {"sign": 1, "terngrad": 2}.get(sch.name, maxcode)
            if sch.name == "qsgd":
                maxcode = 2 * params.get("levels", 1)
            elif sch.name.startswith("blockwise"):
                b = params.get("bits", 1)
                maxcode = 1 if b == 1 else 2 * ((1 << (b - 1)) - 1)
        out = self.codes(size, bits, min(maxcode, (1 << bits) - 1))
        return out if len(out) == nbytes or self.chance(0.1) else self.rng.bytes(min(nbytes, _MAX_SECTION))

    def indices(self, enc, nnz, size):
        """An index section for encoding `enc` (raw, varint, bitmap)."""
        k = min(nnz, 64 if self.chance(0.9) else 1024)
        hi = max(min(size, 2**64 - 1), 1)
        r = self.rng.random()
        if r < 0.6:   # valid: ascending and distinct (when the range allows)
            step = max(hi // max(k, 1), 1)
            idx = (np.arange(k, dtype=np.uint64) * np.uint64(step)
                   + self.rng.integers(0, step, k, dtype=np.uint64))
        elif r < 0.7:
            idx = np.sort(self.rng.integers(0, min(hi, 2**63 - 1), k, dtype=np.uint64))  # duplicates
        elif r < 0.8:
            idx = self.rng.integers(0, min(hi, 2**63 - 1), k, dtype=np.uint64)          # unsorted
        else:
            idx = np.arange(k, dtype=np.uint64) + np.uint64(min(hi, 2**62))            # out of range
        if enc == 0:
            width = "<u4" if size <= 0xFFFFFFFF else "<u8"
            return idx.astype(width).tobytes()
        if enc == 1:
            prev, out = 0, bytearray()
            for i in idx.tolist():
                d = (i - prev) & (2**64 - 1)
                prev = i
                while True:
                    b = d & 0x7F
                    d >>= 7
                    out.append(b | (0x80 if d else 0))
                    if not d:
                        break
            if self.chance(0.05):
                out += b"\x80\x00"   # over-long tail
            return bytes(out)
        nbytes = min((size + 7) // 8, _MAX_SECTION)
        bits = np.zeros(nbytes * 8, np.uint8)
        keep = idx[idx < nbytes * 8].astype(np.int64)
        bits[keep] = 1
        return np.packbits(bits, bitorder="little").tobytes()

    def sparse_body(self, size, code):
        r = self.rng.random()
        nnz = (self.pick((0, 1, 2, 3, 64)) if r < 0.5 else min(size, 256) if r < 0.7 else
               size + 1 if r < 0.75 else self.u64() if r < 0.85 else int(self.rng.integers(0, 300)))
        enc = int(self.rng.integers(0, 4)) if not self.chance(0.02) else int(self.rng.integers(4, 256))
        out = [_u64.pack(nnz & (2**64 - 1)), bytes([enc])]
        if enc == 3:
            step = self.pick((0, 1, 2**56 - 1, 2**56, 2**64 - 1)) if self.chance(0.5) else 0
            out.append(self.section(_u64.pack(self.u64()) + _u64.pack(step)))
        elif enc < 3:
            out.append(self.section(self.indices(enc, nnz, size)))
        vkind = 0 if self.chance(0.45) else 1 if not self.chance(0.03) else 2
        out.append(bytes([vkind]))
        if vkind == 0:
            item = CODE_DTYPES[code].itemsize if code in CODE_DTYPES else 4
            nbytes = nnz * item
            out.append(self.section(self.data(nbytes, item), exact=nbytes <= _MAX_SECTION))
        elif vkind == 1:
            out.append(self.quant_body(nnz, code))
        return b"".join(out)

    def payload(self):
        shape = self.shape()
        size = 1
        for s in shape:
            size *= s
        code = int(self.rng.integers(1, 5)) if not self.chance(0.02) else self.pick((0, 5, 255))
        kind = int(self.rng.integers(1, 4)) if not self.chance(0.02) else self.pick((0, 4, 255))
        body = [self.header(kind, code, shape)]
        if kind == 1:
            body.append(self.sparse_body(size, code))
        elif kind == 2:
            body.append(self.quant_body(size, code))
        else:
            item = CODE_DTYPES[code].itemsize if code in CODE_DTYPES else 4
            nbytes = size * item
            body.append(self.section(self.data(nbytes, item), exact=nbytes <= _MAX_SECTION))
        raw = b"".join(body)
        r = self.rng.random()
        if r < 0.08:
            raw = raw[:int(self.rng.integers(0, len(raw) + 1))]   # truncated, CRC still valid
        elif r < 0.11:
            raw += self.rng.bytes(int(self.rng.integers(1, 9)))    # trailing bytes
        return with_crc(raw)


def structured(rng):
    """One structure-aware input (bytes with a valid CRC-32C)."""
    return _Gen(rng).payload()


# --------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------

def check(p, data):
    """What an accepted input must satisfy; returns a problem or None."""
    if encode(p) != bytes(data):
        return "accepted bytes that do not re-encode to themselves"
    if p.size <= 1 << 16:
        dense = p.dequantize() if isinstance(p, Quantized) else p.to_dense()
        if np.asarray(dense).size != p.size:
            return "decoded to the wrong number of elements"
        q = p if isinstance(p, Quantized) else p.values if isinstance(p, Sparse) else None
        if isinstance(q, Quantized) and hasattr(q, "arrays") and q.scheme not in ("float16", "bfloat16"):
            vals = q.dequantize()
            if vals.size and not np.isfinite(vals.astype(np.float64)).all():
                return f"{q.scheme} payload decoded to a non-finite value"
    return None


def _describe(data):
    hexs = bytes(data[:160]).hex()
    return f"{len(data)} bytes: {hexs}{'...' if len(data) > 160 else ''}"


def run(inputs, seed=0, *, structured_share=0.5, max_size=1 << 26, trace=None):
    """Decodes `inputs` generated inputs (a share from ``structured``, the
    rest from ``mutate`` of the corpus with the CRC fixed 60% of the time).
    Returns a report dict: inputs, accepted, rejected, unexpected (a list of
    (description, error) for anything but FormatError or a failed check),
    slowest (seconds, description), peak_rss_mb, seconds.  Half of the
    inputs are decoded with ``max_size`` (what a receiver should pass), the
    others without.  ``trace``: a path written with each input before it is
    decoded (so a crash leaves the culprit there)."""
    rng = np.random.default_rng(seed)
    seeds = corpus()
    gen = _Gen(rng)
    report = {"inputs": 0, "accepted": 0, "rejected": 0, "unexpected": [], "slowest": (0.0, "")}
    tf = open(trace, "wb") if trace else None
    start = time.perf_counter()
    try:
        for _ in range(inputs):
            if rng.random() < structured_share:
                data = gen.payload()
            else:
                data = mutate(rng, seeds[int(rng.integers(0, len(seeds)))])
                if len(data) > 4 and rng.random() < 0.6:
                    data = with_crc(data[:-4])
            if tf is not None:
                tf.seek(0)
                tf.write(data)
                tf.truncate()
                tf.flush()
            limit = max_size if rng.random() < 0.5 else None
            t0 = time.perf_counter()
            problem = None
            try:
                p = decode(data, max_size=limit)
                problem = check(p, data)
                report["accepted"] += 1
            except FormatError:
                report["rejected"] += 1
            except Exception as exc:  # noqa: BLE001 - the bug being looked for
                problem = f"{type(exc).__name__}: {exc}"
            dt = time.perf_counter() - t0
            report["inputs"] += 1
            if problem is not None:
                report["unexpected"].append((_describe(data), problem))
            if dt > report["slowest"][0]:
                report["slowest"] = (dt, _describe(data))
    finally:
        if tf is not None:
            tf.close()
    report["seconds"] = time.perf_counter() - start
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def _worker(argv):
    a = argparse.ArgumentParser(prog="lowband._fuzz --worker")
    a.add_argument("--inputs", type=int)
    a.add_argument("--seed", type=int)
    a.add_argument("--trace")
    args = a.parse_args(argv)
    rep = run(args.inputs, seed=args.seed, trace=args.trace)
    print(json.dumps(rep))
    return 0


def main(argv=None):
    """``python -m lowband fuzz --inputs N [--seed S] [--batch B]``."""
    a = argparse.ArgumentParser(prog="python -m lowband fuzz",
                                description="Fuzz lowband.decode with mutated and structure-aware "
                                            "inputs; report crashes, unexpected exceptions, the "
                                            "slowest input and the peak memory.")
    a.add_argument("--inputs", type=int, default=100_000, help="inputs to decode (default 100000)")
    a.add_argument("--seed", type=int, default=0, help="seed of the whole run (default 0)")
    a.add_argument("--batch", type=int, default=50_000,
                   help="inputs per child process (a crash loses one batch; default 50000)")
    args = a.parse_args(argv)
    if args.inputs < 0 or args.batch < 1:
        a.error("--inputs must be >= 0 and --batch >= 1")
    total = {"inputs": 0, "accepted": 0, "rejected": 0, "unexpected": [], "crashes": [],
             "slowest": (0.0, ""), "peak_rss_mb": 0.0}
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "input")
        batches = -(-args.inputs // args.batch)
        for b in range(batches):
            n = min(args.batch, args.inputs - b * args.batch)
            bseed = args.seed * 1_000_003 + b
            cmd = [sys.executable, "-m", "lowband._fuzz", "--worker", "--inputs", str(n),
                   "--seed", str(bseed), "--trace", trace]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
            if proc.returncode != 0 or not line.startswith("{"):
                culprit = open(trace, "rb").read() if os.path.exists(trace) else b""
                total["crashes"].append({"batch_seed": bseed, "returncode": proc.returncode,
                                         "input": _describe(culprit),
                                         "stderr": proc.stderr[-1500:]})
                print(f"batch {b}: CRASH (exit {proc.returncode}) on {_describe(culprit)}", flush=True)
                continue
            rep = json.loads(line)
            for key in ("inputs", "accepted", "rejected"):
                total[key] += rep[key]
            total["unexpected"] += rep["unexpected"]
            if rep["slowest"][0] > total["slowest"][0]:
                total["slowest"] = tuple(rep["slowest"])
            total["peak_rss_mb"] = max(total["peak_rss_mb"], rep["peak_rss_mb"])
            print(f"batch {b + 1}/{batches}: {total['inputs']} inputs, "
                  f"{len(total['unexpected'])} unexpected, {len(total['crashes'])} crashes, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    secs = time.perf_counter() - start
    print(f"inputs: {total['inputs']} (accepted {total['accepted']}, rejected with FormatError "
          f"{total['rejected']}) in {secs:.1f} s ({total['inputs'] / max(secs, 1e-9):.0f}/s)")
    print(f"crashes: {len(total['crashes'])}")
    for c in total["crashes"]:
        print(f"  batch seed {c['batch_seed']}, exit {c['returncode']}: {c['input']}\n{c['stderr']}")
    print(f"unexpected exceptions: {len(total['unexpected'])}")
    for desc, err in total["unexpected"][:20]:
        print(f"  {err}\n    on {desc}")
    print(f"slowest input: {total['slowest'][0] * 1e3:.2f} ms, {total['slowest'][1]}")
    print(f"peak memory (largest child RSS): {total['peak_rss_mb']:.1f} MiB")
    return 1 if total["crashes"] or total["unexpected"] else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(_worker(sys.argv[2:]))
    sys.exit(main())
