"""Command line: ``python -m lowband reproduce [...]`` runs the papers'
claims as experiments with reports and plots (``lowband.experiments``);
``python -m lowband bench [...]`` times the kernels; ``python -m lowband fuzz
--inputs N [--seed S]`` fuzzes the wire decoder; ``python -m lowband info``
prints the build facts."""
import os
import sys

import lowband


def _info():
    print(f"lowband {lowband.__version__}")
    print(f"isa: {lowband.isa()}  threads: {lowband.get_num_threads()}  "
          f"sanitizer build: {bool(lowband._core.SANITIZE)}")


def _with_one_blas_thread(argv):
    """Re-run this command with OPENBLAS_NUM_THREADS=1 unless it is set (the
    limit must be in place before NumPy loads BLAS)."""
    if "OPENBLAS_NUM_THREADS" not in os.environ:
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
        os.execve(sys.executable, [sys.executable, "-m", "lowband", *argv], env)


_USAGE = """usage: python -m lowband {reproduce,bench,fuzz,info} [options]
  reproduce  run the papers' claims as experiments, with reports and plots (see reproduce --help)
  bench      time the kernels against NumPy, torch and a copy (see bench --help)
  fuzz       fuzz lowband.decode with hostile bytes (see fuzz --help)
  info       print version, instruction set and threads"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "bench":
        # lowband uses no BLAS, but NumPy's idle OpenBLAS pool competes
        # with the timed kernels for cores: run the benchmark with one.
        _with_one_blas_thread(argv)
        from lowband.bench.harness import main as bench_main
        return bench_main(rest)
    if cmd == "reproduce":
        # the simulated workers are threads that each multiply small
        # matrices: a multi-threaded BLAS per worker makes them tens of
        # times slower
        _with_one_blas_thread(argv)
        from lowband.experiments import main as reproduce_main
        return reproduce_main(rest)
    if cmd == "fuzz":
        from lowband._fuzz import main as fuzz_main
        return fuzz_main(rest)
    if cmd == "info":
        _info()
        return 0
    print(f"python -m lowband: unknown command {cmd!r} (expected reproduce, bench, fuzz or info)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
