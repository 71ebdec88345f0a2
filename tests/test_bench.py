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


@pytest.mark.parametrize("text, n", [("4096", 4096), ("1Ki", 1024), ("64ki", 65536), ("16Mi", 16 << 20),
                                     ("2M", 2 << 20), ("1Gi", 1 << 30)])
def test_parse_size(text, n):
    assert harness.parse_size(text) == n
    assert harness.parse_size(harness.format_size(n)) == n


@pytest.mark.parametrize("text", ["", "Mi", "1.5Mi", "16Ti", "-4", "0", "16 Mi"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="size"):
        harness.parse_size(text)


def test_cli_sizes_parsing():
    a = harness.parse_args(["sparsify", "--sizes", "1Ki,64Ki,16Mi"])
    assert a.sizes == [1024, 65536, 16 << 20] and a.suites == ["sparsify"]
    a = harness.parse_args(["sparsify", "--sizes"])           # bare: the default sweep
    assert a.sizes == list(harness.DEFAULT_SIZES) and a.suites == ["sparsify"]
    assert harness.DEFAULT_SIZES[0] == 1 << 10 and harness.DEFAULT_SIZES[-1] == 64 << 20
    a = harness.parse_args(["--sizes", "sparsify,quantize", "feedback"])   # bare, then suites
    assert a.sizes == list(harness.DEFAULT_SIZES) and a.suites == ["sparsify", "quantize", "feedback"]
    a = harness.parse_args(["--size", "4Mi"])                 # --size still works, with units too
    assert a.sizes is None and a.size == 4 << 20
    assert harness.parse_args(["--size", "4096"]).size == 4096
    with pytest.raises(SystemExit):
        harness.parse_args(["--sizes", "1Ki,nosuch"])
    with pytest.raises(SystemExit):
        harness.parse_args(["--size", "12Qi"])


def test_cli_sizes_runs_each_size():
    out = io.StringIO()
    assert harness.main(["sparsify", "feedback", "--sizes", "1Ki,4Ki", "--reps", "1", "--threads", "1",
                         "--quick"], out=out) == 0
    text = out.getvalue()
    assert "== size 1Ki (1024 elements) ==" in text and "== size 4Ki (4096 elements) ==" in text
    assert "x copy (lowband / copy; <1 is faster)" in text
    summary = text[text.index("x copy (lowband"):]
    line = next(s for s in summary.splitlines() if s.startswith("sparsify: topk 1%"))
    assert len(line.split()[-2:]) == 2 and all(v != "-" for v in line.split()[-2:])


def test_cli_threads_list_prints_the_speedup_over_the_first_count():
    out = io.StringIO()
    assert harness.main(["sparsify", "--size", "4Ki", "--threads", "1,2", "--reps", "1", "--quick"],
                        out=out) == 0
    text = out.getvalue()
    assert "== threads 1 ==" in text and "== threads 2 ==" in text
    table = text[text.index("speedup over 1 thread (lowband)"):]
    line = next(s for s in table.splitlines() if s.startswith("sparsify: topk 1%"))
    assert line.split()[-2] == "1.00" and float(line.split()[-1]) > 0
    # NumPy does not depend on the thread count: timed at the first count only
    rows = harness.run_threads(["sparsify"], size=1 << 12, thread_counts=(1, 2), reps=1, quick=True,
                               out=io.StringIO())
    assert {r["threads"] for r in rows} == {1, 2}
    assert all(("numpy_ms" in r) == (r["threads"] == 1) for r in rows if r["case"] == "topk 1%")


@pytest.mark.parametrize("bad", ["0", "1,x", "", "2,-1"])
def test_cli_threads_rejects_bad_counts(bad):
    with pytest.raises(SystemExit):
        harness.parse_args(["--threads", bad])
    with pytest.raises(SystemExit):
        harness.parse_args(["--threads", "1,2", "--sizes", "1Ki,2Ki"])


@pytest.mark.parametrize("size", [1 << 10])
def test_full_suites_run_at_the_smallest_size(size):
    rows = harness.run(["sparsify", "feedback", "quantize"], size=size, threads=1, reps=1, out=io.StringIO())
    assert rows and all(r["size"] == size and r["lowband_ms"] > 0 for r in rows)
