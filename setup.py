"""Build of lowband's one extension module, ``lowband._core``.

Sources: every ``csrc/core/*.c`` (the Python-free C core) and every
``csrc/python/*.c`` (the CPython/NumPy glue).  Flags: C11, -O3, OpenMP; never
-march=native or -ffast-math (wider instruction sets are picked at run time).

Environment toggles read at build time:
  LOWBAND_SANITIZE=1  build with AddressSanitizer + UndefinedBehaviorSanitizer
                      (-O1 -g); run Python with libasan preloaded, see README.
  LOWBAND_DEBUG=1     -O0 -g, assertions on.
  LOWBAND_NO_OPENMP=1 serial build (for compilers without OpenMP).
"""
import glob
import os

import numpy as np
from setuptools import Extension, setup


def _flag(name):
    return os.environ.get(name, "") not in ("", "0", "false", "False")


sources = sorted(glob.glob("csrc/core/*.c")) + sorted(glob.glob("csrc/python/*.c"))
compile_args = ["-std=c11", "-ffp-contract=off", "-Wall", "-Wextra", "-Wno-unused-parameter",
                "-Wno-missing-field-initializers", "-fvisibility=hidden"]
link_args = ["-pthread"]
macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]

if not _flag("LOWBAND_NO_OPENMP"):
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")

if _flag("LOWBAND_SANITIZE"):
    san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
           "-fno-omit-frame-pointer", "-g", "-O1"]
    compile_args += san
    link_args += ["-fsanitize=address,undefined"]
    macros.append(("LOWBAND_SANITIZE", "1"))
elif _flag("LOWBAND_DEBUG"):
    compile_args += ["-O0", "-g"]
else:
    compile_args += ["-O3"]
    macros.append(("NDEBUG", "1"))

ext = Extension(
    "lowband._core",
    sources=sources,
    include_dirs=["csrc", np.get_include()],
    define_macros=macros,
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    depends=sorted(glob.glob("csrc/**/*.h", recursive=True)),
)

setup(ext_modules=[ext])
