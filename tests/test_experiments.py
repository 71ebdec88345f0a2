"""``python -m lowband reproduce``: every experiment runs (the test-only
"smoke" size: the quick mode's code on fewer steps) and writes a valid
results.json, report.md and PNG plots; the verdict is the one its checks
give; wherever a check holds, the claimed direction is asserted again
from the measured numbers; --list works; the sim and torch engines give
the same numbers on the same seed."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("sklearn")

from lowband import experiments as E                      # noqa: E402
from lowband.experiments.framework import VERDICTS        # noqa: E402
from helpers import child_env                            # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PNG = b"\x89PNG\r\n\x1a\n"


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "lowband", "reproduce", *args], env=child_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_list():
    out = cli("--list")
    assert out.returncode == 0, out.stderr
    for name in E.names():
        assert name in out.stdout
        assert E.load(name).claim[:40] in out.stdout


def test_unknown_name_is_refused():
    out = cli("no-such-experiment", "--quick")
    assert out.returncode == 2 and "unknown experiment" in out.stderr


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One CLI run of every experiment at the smoke size."""
    out = tmp_path_factory.mktemp("reproduce")
    res = cli("--all", "--smoke", "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"reports and plots are in {out}" in res.stdout
    return str(out)


# For each check name: the claimed direction, from the measured numbers.
DIRECTIONS = {
    "dgc": {"dgc_matches_dense": lambda m: m["dgc_accuracy"] >= m["dense_accuracy"] - 0.01,
            "naive_behind": lambda m: m["naive_accuracy"] < m["dgc_accuracy"],
            "dgc_bytes": lambda m: m["dgc_bytes"] < m["dense_bytes"]},
    "error-feedback": {"no_feedback_stalls": lambda m: m["none_distance"] > m["ef21_distance"],
                       "ef14_converges": lambda m: m["ef14_distance"] < m["none_distance"],
                       "ef21_converges": lambda m: m["ef21_distance"] < m["none_distance"],
                       "econtrol_converges": lambda m: m["econtrol_distance"] < m["none_distance"],
                       "ef21w_faster": lambda m: m["ef21w_new_rounds"] < m["ef21_old_rounds"],
                       "econtrol_any_heterogeneity": lambda m: m["sweep_econtrol_max_distance"] < max(
                           v for k, v in m.items() if k.startswith("sweep_ef14_h"))},
    "onebit-adam": {"tracks_adam_loss": lambda m: m["onebit_loss"] <= 1.25 * m["adam_loss"],
                    "tracks_adam_accuracy": lambda m: m["onebit_accuracy"] >= m["adam_accuracy"] - 0.01,
                    "fraction_of_bytes": lambda m: m["onebit_bytes"] < m["adam_bytes"],
                    "error_feedback_needed": lambda m: m["no_ef_loss"] > m["onebit_loss"],
                    "warmup_needed": lambda m: m["no_warmup_loss"] > m["onebit_loss"]},
    "powersgd": {"matches_dense": lambda m: m["rank_2_accuracy"] >= m["dense_accuracy"] - 0.01,
                 "bytes_of_the_rank": lambda m: m["rank_2_bytes"] < m["dense_bytes"],
                 "rank1_trains": lambda m: m["rank_1_accuracy"] >= 0.9},
    "diloco": {"matches_dp": lambda m: m["diloco_loss"] <= 1.02 * m["dp_loss"],
               "h_times_fewer_bytes": lambda m: m["diloco_bytes"] < m["dp_bytes"]},
    "sparseloco": {"loss_at_or_below_diloco": lambda m: m["sparseloco_loss"] <= min(
                       m[k] for k in m if k.startswith("diloco_") and k.endswith("_loss")),
                   "accuracy_at_or_above_diloco": lambda m: m["sparseloco_accuracy"] >= m["diloco_accuracy"],
                   "under_half_a_bit": lambda m: m["sparseloco_payload_bits_per_param_per_sync"] < 0.5},
    "streaming-diloco": {"matches_diloco": lambda m: m["streaming_loss"] <= 1.02 * m["diloco_loss"],
                         "fragments_e3m0_match": lambda m: m["streaming_a0_loss"] <= 1.02 * m["diloco_loss"],
                         "lower_peak": lambda m: m["streaming_peak_bytes"] < m["diloco_peak_bytes"]},
    "one-byte": {"reaches_loss": lambda m: m["replay_loss"] < m["initial_loss"],
                 "one_scalar_per_sample": lambda m: m["replay_bytes"] < m["full_bytes"],
                 "replay_is_exact": lambda m: m["replay_vs_full_max_difference"] == 0,
                 "fp16_scalars": lambda m: m["replay_fp16_loss"] <= 1.05 * m["replay_loss"]},
    "global-lbl": {"mi_gain": lambda m: m["global_mi"] > m["micro_mi"],
                   "top_share_gain": lambda m: m["global_top_share"] > m["micro_top_share"],
                   "balance": lambda m: m["global_max_load"] <= 1.5,
                   "quality": lambda m: m["global_test_mse"] < m["micro_test_mse"]},
    "chain-of-experts": {"coe_beats_moe": lambda m: m["coe_val"] < m["moe_val"],
                         "coe_beats_moe_P8": lambda m: m["coe-P8_val"] < m["moe-P8_val"],
                         "inner_beats_outer": lambda m: m["coe_val"] < m["coe-outer_val"],
                         "per_iteration_routers": lambda m: m["coe_val"] < m["coe-shared-router_val"]},
    "signum": {"tracks_sgd_loss": lambda m: m["signum_loss"] <= 2.0 * m["sgd_loss"],
               "tracks_sgd_accuracy": lambda m: m["signum_accuracy"] >= m["sgd_accuracy"] - 0.02,
               "one_bit_payload": lambda m: m["payload_ratio"] >= 25,
               "tolerates_flippers": lambda m: m["flippers_accuracy"] >= m["signum_accuracy"] - 0.05},
    "dithering": {"unbiased": lambda m: max(m["natural_bias_z2"], m["linear_bias_z2"]) <= 1.3,
                  "natural_lower_variance": lambda m: m["natural_rel_variance"] < m["linear_rel_variance"],
                  "trains_like_fp32": lambda m: m["natural_loss"] <= 1.25 * m["fp32_loss"],
                  "fraction_of_bytes": lambda m: m["natural_bytes"] < m["fp32_bytes"]},
    "zero-one-adam": {"tracks_adam_loss": lambda m: m["zoadam_loss"] <= 1.25 * m["adam_loss"],
                      "tracks_adam_accuracy": lambda m: m["zoadam_accuracy"] >= m["adam_accuracy"] - 0.01,
                      "fraction_of_adam_bytes": lambda m: m["zoadam_bytes"] < m["adam_bytes"],
                      "fraction_of_onebit_bytes": lambda m: m["zoadam_bytes"] < m["onebit_bytes"]},
    "onebit-lamb": {"tracks_lamb_loss": lambda m: m["onebit_loss"] <= 1.25 * m["lamb_loss"],
                    "tracks_lamb_accuracy": lambda m: m["onebit_accuracy"] >= m["lamb_accuracy"] - 0.01,
                    "fraction_of_bytes": lambda m: m["onebit_bytes"] < m["lamb_bytes"]},
    "fedzip": {"ratio_at_1pct": lambda m: m["z1_upload"] * 100 <= m["dense_upload"],
               "accuracy_at_5pct": lambda m: m["z5_accuracy"] >= m["dense_accuracy"] - 0.02},
    "scafcom": {"scafcom_close": lambda m: m["scafcom_gap"] <= 0.03,
                "scafcom_saving": lambda m: m["scafcom_saving"] > 1,
                "scallion_close": lambda m: m["scallion_gap"] <= 0.03,
                "topk_fedavg_plateaus": lambda m: m["topk_fedavg_gap"] > 0,
                "beta_helps": lambda m: m["beta_gain"] >= 0},
    "fedspeed": {"fewer_rounds": lambda m: m["round_saving"] > 1,
                 "prox_matters": lambda m: m["ablation_ratio"] > 1},
    "dadao": {"converges": lambda m: m["dadao_error"] <= 1e-6,
              "linear": lambda m: m["decades"] > 0,
              "beats_dpsgd": lambda m: m["advantage"] > 1},
    "co2": {"stale_matches_sync": lambda m: m["stale_drop"] <= 0.02,
            "momentum_matches_sync": lambda m: m["momentum_drop"] <= 0.02,
            "stabilisers_help": lambda m: m["stabiliser_gain"] >= 0},
    "fed-sb": {"fedsb_vs_fedit_loss": lambda m: m["loss_ratio"] <= 1,
               "fedsb_bytes": lambda m: m["value_ratio"] > 1},
    "dimat": {"lower_post_merge_loss": lambda m: m["loss_gain"] > 0,
              "better_early_accuracy": lambda m: m["early_gain"] > 0,
              "final_merge_helps": lambda m: m["final_merge_gain"] > 0},
}


def test_every_experiment_has_its_directions():
    assert set(E.REGISTRY) == set(DIRECTIONS)
    for name, directions in DIRECTIONS.items():
        names = [c.name for c in E.load(name).judge(_any_metrics(), E.load(name).thresholds)]
        assert set(names) == set(directions), name


class _any_metrics(dict):
    """Metrics that read as 1.0 whatever the key (to list a judge's checks)."""

    def __missing__(self, key):
        return 1.0


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_experiment_outputs(smoke, name):
    folder = os.path.join(smoke, name)
    with open(os.path.join(folder, "results.json")) as f:
        res = json.load(f)
    exp = E.load(name)
    for key in ("name", "claim", "config", "thresholds", "metrics", "checks", "verdict", "bytes_sent", "arms"):
        assert key in res, key
    assert res["name"] == name and res["config"]["size"] == "smoke" and res["thresholds"] == json.loads(
        json.dumps(exp.thresholds))
    assert res["verdict"] in VERDICTS
    holds = [c["holds"] for c in res["checks"]]
    assert res["verdict"] == ("holds" if all(holds) else "does not hold" if not any(holds) else "partly holds")
    # the checks were judged from these metrics
    again = exp.judge(res["metrics"], exp.thresholds)
    assert [bool(c.holds) for c in again] == holds
    for arm in res["arms"].values():
        assert len(arm["steps"]) == len(arm["loss"]) == len(arm["bytes"]) >= 2
        assert all(np.isfinite(arm["loss"]))
        assert arm["bytes"] == sorted(arm["bytes"])           # cumulative
    with open(os.path.join(folder, "report.md")) as f:
        report = f.read()
    assert exp.claim in report and f"Verdict: {res['verdict']}" in report
    for k in exp.thresholds:
        assert f"`{k}`" in report
    for c in res["checks"]:
        if not c["holds"]:
            assert c["why"] and c["why"] in report
    assert res["plots"]
    for png in res["plots"]:
        with open(os.path.join(folder, png), "rb") as f:
            data = f.read()
        assert data[:8] == PNG and len(data) > 2000
        assert png in report
    # the claimed direction, wherever the report says the claim holds
    for c in res["checks"]:
        if c["holds"]:
            assert DIRECTIONS[name][c["name"]](res["metrics"]), c


def test_index(smoke):
    with open(os.path.join(smoke, "index.md")) as f:
        index = f.read()
    for name in E.names():
        assert f"{name}/report.md" in index


def test_heatmap_helper(tmp_path):
    from lowband.experiments.framework import plot_heatmap
    path = plot_heatmap(str(tmp_path / "h.png"), np.arange(6).reshape(2, 3) / 5, ["a", "b"], ["e0", "e1", "e2"],
                        title="load", xlabel="expert", ylabel="domain")
    with open(path, "rb") as f:
        assert f.read(8) == PNG
    with pytest.raises(ValueError, match="matrix"):
        plot_heatmap(str(tmp_path / "x.png"), np.zeros((3, 3)), ["a", "b"], ["e0", "e1", "e2"])


@pytest.mark.slow
def test_sim_and_torch_engines_agree():
    """DGC's arm on two gloo processes equals the in-process cluster, bit
    for bit (rank-ordered sums on both)."""
    pytest.importorskip("torch")
    from lowband.experiments import dgc
    from lowband.experiments.engines import run_workers
    from lowband.experiments.framework import Config
    p = {"steps": 12, "hidden": 16, "batch": 16, "lr": 0.05, "warmup_steps": 2, "eval_every": 4}
    out = {}
    for engine in ("sim", "torch"):
        cfg = Config(name="dgc", workers=2, engine=engine, progress=False, params=p)
        results, sent = run_workers(cfg, dgc._worker, "dgc", p, 0, False)
        out[engine] = results
        assert sent[0] > 0
    for rs, rt in zip(out["sim"], out["torch"]):
        assert np.array_equal(rs[4], rt[4])
    assert out["sim"][0][1] == out["torch"][0][1]             # the loss curve
