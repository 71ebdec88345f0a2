"""Benchmark suite: kernels beside one CPU-bound process (no OpenMP stalls).

Starts one busy process (a Python spin loop) for the duration of the run and
times each kernel with threads=2 against the same call with threads=1.  The
target: a team of two is never more than 1.3x slower than one thread when a
core is taken by someone else (two DDP ranks on two cores hit exactly this).
Run it alone on an otherwise quiet machine: ``python -m lowband bench busy``.
"""
import atexit
import subprocess
import sys

import lowband
from lowband.bench.harness import Case

RUN_BY_DEFAULT = False  # it loads a core: only when named
_BUSY = []


def _start_busy():
    if not _BUSY:
        proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        _BUSY.append(proc)
        atexit.register(proc.kill)


def cases(ctx):
    _start_busy()
    x = ctx.normal(min(ctx.size, 4 << 20))
    copy = ctx.copier(x)
    out = []
    for name, fn in (("topk 1%", lambda t: lowband.topk(x, ratio=0.01, threads=t)),
                     ("sign", lambda t: lowband.sign(x, threads=t)),
                     ("quantize 4-bit", lambda t: lowband.quantize(x, 4, threads=t)),
                     ("quantize 4-bit stochastic",
                      lambda t: lowband.quantize(x, 4, rounding="stochastic", seed=1, threads=t))):
        out.append(Case(f"{name} t2/t1", lambda fn=fn: fn(2),
                        {"threads=1": lambda fn=fn: fn(1)}, x.nbytes, copy,
                        targets={"threads=1": 0.77},
                        note="threads=1 time / threads=2 time (>= 0.77: no stall)"))
    return out
