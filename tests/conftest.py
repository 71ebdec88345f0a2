"""Shared pytest configuration.  Helpers for all test files live in
helpers.py (this folder is on sys.path because it holds conftest.py)."""
import os

import numpy as np
import pytest

import lowband


@pytest.fixture(autouse=True)
def _reset_threads():
    """Each test starts with the default thread setting and the best ISA."""
    lowband.set_num_threads(None)
    yield
    lowband.set_num_threads(None)
    lowband._core.set_isa(None)


def available_isas():
    out = []
    for name in ("scalar", "avx2", "avx512"):
        try:
            lowband._core.set_isa(name)
            out.append(name)
        except ValueError:
            pass
    lowband._core.set_isa(None)
    return out


@pytest.fixture(params=available_isas())
def isa(request):
    """Runs the test once per instruction-set path this CPU supports."""
    lowband._core.set_isa(request.param)
    yield request.param
    lowband._core.set_isa(None)


def pytest_report_header(config):
    return (f"lowband {lowband.__version__}, isa={lowband.isa()}, "
            f"threads={lowband.get_num_threads()}, sanitize={lowband._core.SANITIZE}, "
            f"numpy {np.__version__}, LOWBAND_FORCE_ISA={os.environ.get('LOWBAND_FORCE_ISA', '')}")
