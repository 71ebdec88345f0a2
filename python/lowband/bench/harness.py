"""Benchmark harness: lowband against NumPy, torch (CPU) and a plain copy.

Every kernel family has a suite module ``lowband/bench/<family>.py`` that
defines ``cases(ctx) -> list[Case]``; this harness discovers them, times every
implementation of every case on the same data in the same run (median of
``reps`` after a warm-up) and prints a table of medians and ratios:

    speedup vs numpy / torch  = their median / lowband's median  (>1: faster)
    x copy                    = lowband's median / the copy's     (<1: faster)

``GB/s`` is float32 input bytes per second.  Targets from the issues are
checked and reported (a benchmark never fails a test: timing on a shared
machine is noisy, compare ratios from one run).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

import lowband
import lowband.bench as _suites


@dataclass
class Case:
    """One benchmarked operation.

    name      row label, e.g. "topk 1%"
    lowband   zero-argument callable running lowband's kernel
    others    {"numpy": fn, "torch": fn, ...} doing the same work
    nbytes    input bytes (float32 payload) for the GB/s column
    copy      the roofline: a callable copying the same amount of data
    targets   {"numpy": 10.0} speedup at least, {"copy": 3.0} x-copy at most
    """

    name: str
    lowband: object
    others: dict = field(default_factory=dict)
    nbytes: int = 0
    copy: object = None
    targets: dict = field(default_factory=dict)
    note: str = ""


class Context:
    """What suites get: sizes, thread count, torch (or None), RNG, copy helper."""

    def __init__(self, size, threads, quick, seed=0):
        self.size = size
        self.threads = threads
        self.quick = quick
        self.rng = np.random.default_rng(seed)
        try:
            import torch
            torch.set_num_threads(threads)
            self.torch = torch
        except Exception:  # torch is optional
            self.torch = None
        self._data = {}

    def normal(self, n=None, dtype=np.float32, key="normal"):
        n = self.size if n is None else n
        k = (key, n, np.dtype(dtype).str)
        if k not in self._data:
            self._data[k] = self.rng.standard_normal(n, dtype=np.float64).astype(dtype)
        return self._data[k]

    def copier(self, src):
        """A callable copying `src` into a preallocated array (the roofline)."""
        dst = np.empty_like(src)
        return lambda: np.copyto(dst, src)


def time_median(fn, reps, warmup=2):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def discover_suites():
    names = []
    for mod in pkgutil.iter_modules(_suites.__path__):
        if not mod.name.startswith("_") and mod.name != "harness":
            names.append(mod.name)
    return sorted(names)


def default_suites():
    """The suites a plain ``bench`` runs: all but those that set
    ``RUN_BY_DEFAULT = False`` (e.g. ``busy``, which loads a core)."""
    return [s for s in discover_suites()
            if getattr(importlib.import_module(f"lowband.bench.{s}"), "RUN_BY_DEFAULT", True)]


def run(suites=None, size=16 << 20, threads=2, reps=5, quick=False, out=sys.stdout):
    lowband.set_num_threads(threads)
    ctx = Context(size, threads, quick)
    rows = []
    for suite in suites or default_suites():
        mod = importlib.import_module(f"lowband.bench.{suite}")
        for case in mod.cases(ctx):
            row = {"suite": suite, "case": case.name, "nbytes": case.nbytes, "note": case.note}
            row["lowband_ms"] = time_median(case.lowband, reps) * 1e3
            for other, fn in case.others.items():
                if fn is None:
                    continue
                row[f"{other}_ms"] = time_median(fn, max(1, reps if other != "numpy-slow" else 1)) * 1e3
            if case.copy is not None:
                row["copy_ms"] = time_median(case.copy, reps) * 1e3
            row["gbps"] = case.nbytes / (row["lowband_ms"] / 1e3) / 1e9 if case.nbytes else None
            checks = []
            for what, target in case.targets.items():
                if what == "copy":
                    if "copy_ms" in row:
                        ratio = row["lowband_ms"] / row["copy_ms"]
                        checks.append((f"<={target:g}x copy", ratio <= target, ratio))
                elif f"{what}_ms" in row:
                    ratio = row[f"{what}_ms"] / row["lowband_ms"]
                    checks.append((f">={target:g}x {what}", ratio >= target, ratio))
            row["targets"] = [{"target": t, "met": bool(m), "ratio": r} for t, m, r in checks]
            rows.append(row)
            print_row(row, out)
    return rows


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


_HEADER = (f"{'case':<34} {'lowband':>9} {'GB/s':>6} {'numpy':>9} {'vs np':>6} {'torch':>9} "
           f"{'vs torch':>8} {'copy':>8} {'x copy':>6}  targets")


def print_row(row, out):
    if not getattr(print_row, "_header_done", False):
        print(_HEADER, file=out)
        print("-" * len(_HEADER), file=out)
        print_row._header_done = True
    lb = row["lowband_ms"]
    np_ms, t_ms, c_ms = row.get("numpy_ms"), row.get("torch_ms"), row.get("copy_ms")
    targets = ", ".join(f"{t['target']} {'ok' if t['met'] else 'MISSED'} ({t['ratio']:.2f})"
                        for t in row["targets"])
    print(f"{row['suite'] + ': ' + row['case']:<34} {lb:>8.2f}m {_fmt(row['gbps'], '6.1f')} "
          f"{_fmt(np_ms, '8.2f')}m {_fmt(np_ms and np_ms / lb, '6.1f')} {_fmt(t_ms, '8.2f')}m "
          f"{_fmt(t_ms and t_ms / lb, '8.1f')} {_fmt(c_ms, '7.2f')}m {_fmt(c_ms and lb / c_ms, '6.2f')}  "
          f"{targets}", file=out)
    out.flush()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lowband bench",
                                 description="Time lowband's kernels against NumPy, torch and a copy.")
    ap.add_argument("suites", nargs="*", help=f"suites to run (default: {default_suites()}; also: {sorted(set(discover_suites()) - set(default_suites()))})")
    ap.add_argument("--size", type=int, default=16 << 20, help="elements per vector (default 16 Mi)")
    ap.add_argument("--threads", type=int, default=2, help="threads for lowband and torch (default 2)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per implementation (median)")
    ap.add_argument("--quick", action="store_true", help="fewer cases (the quick version)")
    ap.add_argument("--json", help="also write the rows as JSON to this path")
    args = ap.parse_args(argv)
    unknown = set(args.suites) - set(discover_suites())
    if unknown:
        ap.error(f"unknown suite(s) {sorted(unknown)}; known: {discover_suites()}")
    print(f"lowband {lowband.__version__} | isa {lowband.isa()} | threads {args.threads} | "
          f"size {args.size} | numpy {np.__version__} | python {platform.python_version()} | "
          f"{os.cpu_count()} cpus | OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    rows = run(args.suites or None, args.size, args.threads, args.reps, args.quick)
    missed = [f"{r['suite']}: {r['case']} {t['target']}" for r in rows for t in r["targets"] if not t["met"]]
    print(f"\n{len(rows)} cases; targets missed: {', '.join(missed) if missed else 'none'}")
    if args.json:
        meta = {"version": lowband.__version__, "isa": lowband.isa(), "threads": args.threads,
                "size": args.size, "numpy": np.__version__, "python": platform.python_version()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0
