"""Builds and runs tests/c/test_core.c: the core links and works without
Python (and, with LOWBAND_SANITIZE=1 set, under ASan + UBSan)."""
import glob
import os
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@pytest.mark.kernel
def test_c_core_program(tmp_path):
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "core", "*.c")))
    if not sources:
        pytest.skip("C sources not available (installed without the source tree)")
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if not shutil.which(cc):
        pytest.skip(f"no C compiler ({cc})")
    flags = ["-std=c11", "-O2", "-fopenmp", "-pthread", "-ffp-contract=off", "-Wall", "-Werror",
             "-Wno-unused-function"]
    env = dict(os.environ)
    if os.environ.get("LOWBAND_SANITIZE", "") not in ("", "0"):
        flags += ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-g"]
    env.pop("LD_PRELOAD", None)
    exe = str(tmp_path / "test_core")
    cmd = [cc, *flags, "-I", os.path.join(ROOT, "csrc"), *sources,
           os.path.join(ROOT, "tests", "c", "test_core.c"), "-lm", "-o", exe]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([exe], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "PASSED" in run.stdout
