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


# The sizes a bare ``--sizes`` runs: 1 Ki to 64 Mi elements.
DEFAULT_SIZES = (1 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20)
_UNITS = {"": 1, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text):
    """Elements from ``"4096"``, ``"64Ki"``, ``"16Mi"`` or ``"1Gi"`` (``K``/``M``/``G``
    are the same binary units); ValueError naming the text otherwise."""
    t = str(text).strip()
    digits = t.rstrip("KkMmGgIi")
    unit = t[len(digits):].lower()
    if not digits.isdigit() or unit not in _UNITS:
        raise ValueError(f"size: expected elements such as 4096, 64Ki or 16Mi, got {text!r}")
    n = int(digits) * _UNITS[unit]
    if n < 1:
        raise ValueError(f"size: expected at least 1 element, got {text!r}")
    return n


def parse_sizes(text):
    """A comma-separated list of sizes (see parse_size), in the order given."""
    parts = [p for p in str(text).split(",") if p.strip()]
    if not parts:
        raise ValueError(f"sizes: expected a comma-separated list such as 1Ki,1Mi,16Mi, got {text!r}")
    return [parse_size(p) for p in parts]


def format_size(n):
    """``n`` elements in the largest binary unit dividing it: 1024 -> "1Ki"."""
    for unit, mult in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def run(suites=None, size=16 << 20, threads=2, reps=5, quick=False, out=sys.stdout,
        measured_elsewhere=True, others=None):
    """Times every case of `suites` on vectors of `size` elements; prints one table
    and returns its rows.  measured_elsewhere=False skips the suites that measure
    in other processes at a fixed size (``rows``), as a sweep over sizes does
    after its first size.  others: the comparison implementations to time
    (None: all of them; a thread sweep times only torch after its first count)."""
    lowband.set_num_threads(threads)
    ctx = Context(size, threads, quick)
    rows = []
    header = [False]

    def emit(row):
        row.setdefault("size", size)
        rows.append(row)
        if not header[0]:
            print(_HEADER, file=out)
            print("-" * len(_HEADER), file=out)
            header[0] = True
        print_row(row, out)

    for suite in suites or default_suites():
        mod = importlib.import_module(f"lowband.bench.{suite}")
        if hasattr(mod, "rows"):   # a suite that measures elsewhere (e.g. in spawned ranks)
            if measured_elsewhere:
                for row in mod.rows(ctx, reps):
                    emit(row)
            continue
        for case in mod.cases(ctx):
            row = {"suite": suite, "case": case.name, "size": size, "nbytes": case.nbytes,
                   "note": case.note}
            row["lowband_ms"] = time_median(case.lowband, reps) * 1e3
            for other, fn in case.others.items():
                if fn is None or (others is not None and other not in others):
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
            emit(row)
    return rows


def run_sizes(suites=None, sizes=DEFAULT_SIZES, threads=2, reps=5, quick=False, out=sys.stdout):
    """run() at each of `sizes` (one table per size, then a summary of the
    ratios by size); the suites measured in other processes run once, at the
    first size.  Returns the rows of every size (each row has its "size")."""
    rows = []
    for i, size in enumerate(sizes):
        print(f"\n== size {format_size(size)} ({size} elements) ==", file=out)
        rows += run(suites, size, threads, reps, quick, out, measured_elsewhere=i == 0)
    print_summary(rows, sizes, out)
    return rows


def run_threads(suites=None, size=16 << 20, thread_counts=(1, 2), reps=5, quick=False,
                out=sys.stdout):
    """run() at each of `thread_counts` (one table per count; NumPy, which runs on
    one thread whatever the count, is timed at the first count only), then a
    table of lowband's speedup over its time at the first count.  The suites
    measured in other processes are left out.  Returns the rows of every count
    (each row has its "threads")."""
    rows = []
    for i, threads in enumerate(thread_counts):
        print(f"\n== threads {threads} ==", file=out)
        part = run(suites, size, threads, reps, quick, out, measured_elsewhere=False,
                   others=None if i == 0 else ("torch",))
        for row in part:
            row["threads"] = threads
        rows += part
    print_scaling(rows, thread_counts, out)
    return rows


def print_scaling(rows, thread_counts, out):
    """Tables of lowband's speedup over its first thread count, and of its time
    over a copy's, a line per case and a column per thread count."""
    cases = []
    for r in rows:
        if (r["suite"], r["case"]) not in cases:
            cases.append((r["suite"], r["case"]))
    by = {(r["suite"], r["case"], r["threads"]): r for r in rows}
    base = thread_counts[0]
    cols = [f"{t} thr" for t in thread_counts]
    for title, value in ((f"speedup over {base} thread{'s' if base > 1 else ''} (lowband)",
                          lambda r, b: b["lowband_ms"] / r["lowband_ms"]),
                         ("x copy (lowband / copy; <1 is faster)", lambda r, b: _ratio(r, "copy"))):
        print(f"\n{title}", file=out)
        print(f"{'case':<44} " + " ".join(f"{c:>8}" for c in cols), file=out)
        for suite, case in cases:
            first = by.get((suite, case, base))
            vals = [value(by[(suite, case, t)], first) if first and (suite, case, t) in by else None
                    for t in thread_counts]
            print(f"{suite + ': ' + case:<44} " + " ".join(f"{_fmt(v, '8.2f'):>8}" for v in vals),
                  file=out)
    out.flush()


def _ratio(row, what):
    lb, other = row.get("lowband_ms"), row.get(f"{what}_ms")
    if not lb or not other:
        return None
    return lb / other if what == "copy" else other / lb


def print_summary(rows, sizes, out):
    """Tables of x copy, speedup vs numpy and vs torch: a line per case, a
    column per size ("-" where a case has no such comparison)."""
    cases = []
    for r in rows:
        key = (r["suite"], r["case"])
        if key not in cases:
            cases.append(key)
    by = {(r["suite"], r["case"], r.get("size")): r for r in rows}
    cols = [format_size(s) for s in sizes]
    for what, title in (("copy", "x copy (lowband / copy; <1 is faster)"),
                        ("numpy", "speedup vs numpy (numpy / lowband)"),
                        ("torch", "speedup vs torch (torch / lowband)")):
        lines = []
        for suite, case in cases:
            vals = [_ratio(by[(suite, case, s)], what) if (suite, case, s) in by else None for s in sizes]
            if any(v is not None for v in vals):
                lines.append(f"{suite + ': ' + case:<44} " + " ".join(f"{_fmt(v, '8.2f'):>8}" for v in vals))
        if lines:
            print(f"\n{title}", file=out)
            print(f"{'case':<44} " + " ".join(f"{c:>8}" for c in cols), file=out)
            for line in lines:
                print(line, file=out)
    out.flush()


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


_HEADER = (f"{'case':<34} {'lowband':>9} {'GB/s':>6} {'numpy':>9} {'vs np':>6} {'torch':>9} "
           f"{'vs torch':>8} {'copy':>8} {'x copy':>6}  targets")


def print_row(row, out):
    lb = row["lowband_ms"]
    np_ms, t_ms, c_ms = row.get("numpy_ms"), row.get("torch_ms"), row.get("copy_ms")
    targets = ", ".join(f"{t['target']} {'ok' if t['met'] else 'MISSED'} ({t['ratio']:.2f})"
                        for t in row["targets"])
    print(f"{row['suite'] + ': ' + row['case']:<34} {lb:>8.2f}m {_fmt(row['gbps'], '6.1f')} "
          f"{_fmt(np_ms, '8.2f')}m {_fmt(np_ms and np_ms / lb, '6.1f')} {_fmt(t_ms, '8.2f')}m "
          f"{_fmt(t_ms and t_ms / lb, '8.1f')} {_fmt(c_ms, '7.2f')}m {_fmt(c_ms and lb / c_ms, '6.2f')}  "
          f"{targets}", file=out)
    out.flush()


def _size_arg(text):
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None):
    """The bench command line as a Namespace; ``sizes`` is a list of sizes
    (``--sizes`` alone gives DEFAULT_SIZES) or None for the one ``--size``."""
    ap = argparse.ArgumentParser(prog="python -m lowband bench",
                                 description="Time lowband's kernels against NumPy, torch and a copy.")
    ap.add_argument("suites", nargs="*", help=f"suites to run (default: {default_suites()}; also: {sorted(set(discover_suites()) - set(default_suites()))})")
    ap.add_argument("--size", type=_size_arg, default=16 << 20,
                    help="elements per vector: 4096, 64Ki, 16Mi, ... (default 16Mi)")
    ap.add_argument("--sizes", nargs="?", const=",".join(format_size(s) for s in DEFAULT_SIZES),
                    metavar="LIST",
                    help="run at each of these sizes and print the ratios by size, e.g. 1Ki,1Mi,16Mi "
                         f"(alone: {','.join(format_size(s) for s in DEFAULT_SIZES)}); overrides --size")
    ap.add_argument("--threads", default="2", metavar="N|LIST",
                    help="threads for lowband and torch (default 2); a list such as 1,2,4,8,16 "
                         "runs at each count and prints each case's speedup over the first")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per implementation (median)")
    ap.add_argument("--quick", action="store_true", help="fewer cases (the quick version)")
    ap.add_argument("--json", help="also write the rows as JSON to this path")
    args = ap.parse_args(argv)
    if args.sizes is not None:
        try:
            args.sizes = parse_sizes(args.sizes)
        except ValueError as e:
            # `--sizes sparsify`: a bare --sizes followed by suite names
            names = [p for p in args.sizes.split(",") if p]
            if not names or set(names) - set(discover_suites()):
                ap.error(str(e))
            args.suites = names + args.suites
            args.sizes = list(DEFAULT_SIZES)
    text = str(args.threads)
    try:
        args.threads = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        args.threads = []
    if not args.threads or min(args.threads) < 1:
        ap.error(f"--threads: expected a count such as 2 or a list such as 1,2,4, got {text!r}")
    if len(args.threads) > 1 and args.sizes is not None:
        ap.error("--threads with a list and --sizes: choose one sweep")
    if len(args.threads) == 1:
        args.threads = args.threads[0]
    unknown = set(args.suites) - set(discover_suites())
    if unknown:
        ap.error(f"unknown suite(s) {sorted(unknown)}; known: {discover_suites()}")
    return args


def main(argv=None, out=sys.stdout):
    args = parse_args(argv)
    sizes = args.sizes or [args.size]
    print(f"lowband {lowband.__version__} | isa {lowband.isa()} | threads {args.threads} | "
          f"size{'s' if len(sizes) > 1 else ''} {','.join(format_size(s) for s in sizes)} | "
          f"numpy {np.__version__} | python {platform.python_version()} | "
          f"{os.cpu_count()} cpus | OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}",
          file=out)
    if isinstance(args.threads, list):
        rows = run_threads(args.suites or None, args.size, args.threads, args.reps, args.quick, out)
    elif args.sizes:
        rows = run_sizes(args.suites or None, sizes, args.threads, args.reps, args.quick, out)
    else:
        rows = run(args.suites or None, args.size, args.threads, args.reps, args.quick, out)
    missed = [f"{r['suite']}: {r['case']}{' @' + format_size(r['size']) if args.sizes else ''}"
              f"{' @' + str(r['threads']) + ' threads' if 'threads' in r else ''} {t['target']}"
              for r in rows for t in r["targets"] if not t["met"]]
    print(f"\n{len(rows)} cases; targets missed: {', '.join(missed) if missed else 'none'}", file=out)
    if args.json:
        meta = {"version": lowband.__version__, "isa": lowband.isa(), "threads": args.threads,
                "size": args.size if not args.sizes else None, "sizes": sizes,
                "numpy": np.__version__, "python": platform.python_version()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}", file=out)
    return 0
