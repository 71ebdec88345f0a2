"""Command line: ``python -m lowband bench [...]`` runs the benchmarks;
``python -m lowband info`` prints the build facts; ``python -m lowband fuzz
--inputs N [--seed S]`` fuzzes the wire decoder."""
import os
import sys

import lowband


def _info():
    print(f"lowband {lowband.__version__}")
    print(f"isa: {lowband.isa()}  threads: {lowband.get_num_threads()}  "
          f"sanitizer build: {bool(lowband._core.SANITIZE)}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m lowband {bench,info,fuzz} [options]\n"
              "  bench   time the kernels against NumPy, torch and a copy (see bench --help)\n"
              "  info    print version, instruction set and threads\n"
              "  fuzz    fuzz lowband.decode (see fuzz --help)")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "bench":
        if "OPENBLAS_NUM_THREADS" not in os.environ:
            # lowband uses no BLAS, but NumPy's idle OpenBLAS pool competes
            # with the timed kernels for cores: run the benchmark with one.
            env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
            os.execve(sys.executable, [sys.executable, "-m", "lowband", *argv], env)
        from lowband.bench.harness import main as bench_main
        return bench_main(rest)
    if cmd == "info":
        _info()
        return 0
    if cmd == "fuzz":
        from lowband._fuzz import main as fuzz_main
        return fuzz_main(rest)
    print(f"python -m lowband: unknown command {cmd!r} (expected bench, info or fuzz)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
