"""The signum, dithering, zero-one-adam, onebit-lamb and fedzip experiments run end
to end at their smoke size and report every check they declare."""
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from lowband import experiments  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("name", ["signum", "dithering", "zero-one-adam", "onebit-lamb", "fedzip"])
def test_smoke_run(name, tmp_path):
    summary = experiments.run_one(name, "smoke", out=str(tmp_path), progress=False)
    assert summary["verdict"] in ("holds", "partly holds", "does not hold")
    exp = experiments.load(name)
    assert set(exp.sizes) == {"smoke", "quick", "full"}
    assert (tmp_path / name / "report.md").exists() and (tmp_path / name / "results.json").exists()
