"""Source checks of the C code (msgspec's test_cpylint idea): the core never
includes Python.h, and nothing inside a GIL-released region (LB_NOGIL(...)
or Py_BEGIN/END_ALLOW_THREADS) touches the Python C API."""
import glob
import os
import re

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CORE = sorted(glob.glob(os.path.join(ROOT, "csrc", "core", "*.[ch]")))
GLUE = sorted(glob.glob(os.path.join(ROOT, "csrc", "python", "*.c")))

pytestmark = pytest.mark.skipif(not CORE, reason="C sources not available")


def strip_comments(src):
    return re.sub(r"/\*.*?\*/|//[^\n]*", "", src, flags=re.S)


@pytest.mark.parametrize("path", CORE, ids=os.path.basename)
def test_core_is_python_free(path):
    src = strip_comments(open(path).read())
    assert "Python.h" not in src and not re.search(r"\bPy[A-Z_]\w*", src), path


def nogil_regions(src):
    """The argument text of every LB_NOGIL(work, stmt) call and every
    Py_BEGIN_ALLOW_THREADS ... Py_END_ALLOW_THREADS block."""
    for m in re.finditer(r"\bLB_NOGIL\s*\(", src):
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(src[i], 0)
            i += 1
        yield src[m.end():i - 1]
    for m in re.finditer(r"Py_BEGIN_ALLOW_THREADS(.*?)Py_END_ALLOW_THREADS", src, re.S):
        yield m.group(1)


@pytest.mark.parametrize("path", GLUE, ids=os.path.basename)
def test_no_python_api_without_the_gil(path):
    src = strip_comments(open(path).read())
    for region in nogil_regions(src):
        calls = re.findall(r"\b(Py\w+|_Py\w+)\s*\(", region)
        assert not calls, f"{os.path.basename(path)}: Python API {calls} inside a GIL-free region: {region!r}"


def test_glue_releases_the_gil_only_through_the_macro():
    for path in GLUE:
        src = strip_comments(open(path).read())
        assert "Py_BEGIN_ALLOW_THREADS" not in src, f"{path}: use LB_NOGIL (glue.h) instead"
