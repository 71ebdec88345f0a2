"""Full benchmark run: every suite, 16 Mi float32, 2 threads, JSON output.

    python benchmarks/run.py                       # all suites
    python benchmarks/run.py sparsify --reps 9     # one suite
    python benchmarks/run.py --json benchmarks/results/latest.json

The suites live in the package (lowband/bench/*.py) so that
`python -m lowband bench` runs the same code from an installed copy.
"""
import os
import sys

# lowband uses no BLAS; NumPy's idle OpenBLAS pool would compete for cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from lowband.bench.harness import main  # noqa: E402  (after the environment is set)

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--json" not in args:
        os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
        args += ["--json", os.path.join(os.path.dirname(__file__), "results", "latest.json")]
    sys.exit(main(args))
