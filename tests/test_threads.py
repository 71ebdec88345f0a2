"""Thread settings, the grain rule, the fork guard and build facts."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import lowband
from helpers import make_vector


def test_set_and_get_num_threads():
    lowband.set_num_threads(3)
    assert lowband.get_num_threads() == 3
    lowband.set_num_threads(None)
    assert lowband.get_num_threads() >= 1
    with pytest.raises(ValueError, match="n: expected an int in"):
        lowband.set_num_threads(0)
    with pytest.raises(TypeError):
        lowband.set_num_threads(2.5)
    with pytest.raises(TypeError):
        lowband.set_num_threads(True)


def test_isa_names():
    assert lowband.isa() in ("scalar", "avx2", "avx512")
    with pytest.raises(ValueError, match="isa"):
        lowband._core.set_isa("sse9")


def test_force_isa_environment_variable():
    code = "import lowband; print(lowband.isa())"
    env = dict(os.environ, LOWBAND_FORCE_ISA="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "scalar", out.stderr


def test_gil_is_released_on_large_inputs():
    # two Python threads running large kernels overlap in time
    import threading
    import time
    x = make_vector(1 << 22, np.float32)
    lowband.topk(x, 1000, threads=1)
    t0 = time.perf_counter()
    lowband.topk(x, 1000, threads=1)
    one = time.perf_counter() - t0
    done = []
    ts = [threading.Thread(target=lambda: done.append(lowband.topk(x, 1000, threads=1))) for _ in range(2)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(done) == 2 and done[0] == done[1]
    # no timing assertion (the machine is shared); the result must be right
    assert one > 0


FORK_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import numpy as np, lowband
    x = np.random.default_rng(0).standard_normal(1 << 21).astype(np.float32)
    parent = lowband.topk(x, 1000, threads=2)          # the parent uses OpenMP
    pid = os.fork()
    if pid == 0:
        ok = lowband.get_num_threads() == 1 and lowband.topk(x, 1000, threads=2) == parent
        os._exit(0 if ok else 3)
    for _ in range(600):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            sys.exit(os.waitstatus_to_exitcode(status))
        time.sleep(0.05)
    os.kill(pid, 9)
    sys.exit(7)   # the child hung
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_does_not_hang():
    out = subprocess.run([sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr)


def test_build_has_no_native_or_fast_math_flags():
    # no quoted flag string in the build script (the docstring may name them)
    path = os.path.join(os.path.dirname(__file__), "..", "setup.py")
    if not os.path.exists(path):
        pytest.skip("source tree not available")
    setup = open(path).read()
    for flag in ("-march=native", "-ffast-math", "-Ofast"):
        assert f'"{flag}"' not in setup and f"'{flag}'" not in setup


def test_sanitizer_build_is_the_one_under_test():
    # .ci/run sets LOWBAND_SANITIZE=1 while running the sanitizer build
    if os.environ.get("LOWBAND_SANITIZE", "") not in ("", "0"):
        assert lowband._core.SANITIZE == 1


def _threads_in_child(code, **env):
    full = dict(os.environ, **env)
    for name in ("OMP_NUM_THREADS",):
        if name not in env:
            full.pop(name, None)
    out = subprocess.run([sys.executable, "-c", "import lowband\n" + textwrap.dedent(code)],
                         env=full, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [int(v) for v in out.stdout.split()]


def test_default_threads_follow_omp_num_threads():
    assert _threads_in_child("print(lowband.get_num_threads())", OMP_NUM_THREADS="1") == [1]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs a CPU affinity mask of at least two CPUs")
def test_default_threads_follow_cpu_affinity_read_at_call_time():
    # A launcher may pin a rank to one core after lowband was imported.
    got = _threads_in_child("""
        import os
        cpus = sorted(os.sched_getaffinity(0))
        print(lowband.get_num_threads())
        os.sched_setaffinity(0, {cpus[0]})
        print(lowband.get_num_threads())
        lowband.set_num_threads(2)          # an explicit setting still wins
        print(lowband.get_num_threads())
    """, OMP_NUM_THREADS="2")
    assert got == [2, 1, 2]


def test_default_threads_follow_torch_when_torch_is_loaded():
    pytest.importorskip("torch")
    got = _threads_in_child("""
        import sys
        print(int("torch" in sys.modules))  # lowband never imports torch
        import torch
        torch.set_num_threads(1)
        print(lowband.get_num_threads())
        x = __import__("numpy").ones(1 << 17, "float32")
        print(len(lowband.topk(x, 10).indices))
    """, OMP_NUM_THREADS="2")
    assert got == [0, 1, 10]
