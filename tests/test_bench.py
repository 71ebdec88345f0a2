"""The benchmark harness and every suite run end to end on tiny inputs (no
timing is asserted: this checks that each case computes and reports)."""
import io

import pytest

from lowband.bench import harness


@pytest.mark.parametrize("suite", harness.default_suites())
def test_suite_runs_on_tiny_inputs(suite):
    out = io.StringIO()
    rows = harness.run([suite], size=1 << 12, threads=1, reps=1, quick=True, out=out)
    assert rows and all(r["lowband_ms"] > 0 for r in rows)
    assert all(r["suite"] == suite for r in rows)
    assert out.getvalue().count("\n") >= len(rows)


def test_busy_suite_is_not_run_by_default():
    assert "busy" in harness.discover_suites()
    assert "busy" not in harness.default_suites()
