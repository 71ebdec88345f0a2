"""Command line: ``python -m lowband bench [...]`` runs the benchmarks;
``python -m lowband info`` prints the build facts;
``python -m lowband reproduce [...]`` runs the papers' claims as
experiments (``lowband.experiments``)."""
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m lowband {bench,info,reproduce} [options]\n"
              "  bench      time the kernels against NumPy, torch and a copy (see bench --help)\n"
              "  info       print version, instruction set and threads\n"
              "  reproduce  run the papers' claims as experiments, with reports and plots "
              "(see reproduce --help)")
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
    if cmd == "info":
        _info()
        return 0
    print(f"python -m lowband: unknown command {cmd!r} (expected bench, info or reproduce)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
