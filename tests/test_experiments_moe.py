"""The MoE experiments of ``python -m lowband reproduce``: global-batch load
balancing (Demons in the Detail) and Chain-of-Experts.  The smoke size of
each runs here; its files and plots must be valid and every check the
report says holds is re-asserted from the measured numbers."""
import json
import os

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from lowband import moe
from lowband.experiments import run_one
from lowband.experiments import global_lbl as G
from lowband.sim import Cluster


def _png_ok(path):
    import matplotlib.image as mpimg
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, (path, img.shape)
    assert float(img[..., :3].std()) > 0.01, f"{path} looks blank"


def _outputs(summary, name, out):
    folder = os.path.join(str(out), name)
    with open(os.path.join(folder, "results.json")) as f:
        res = json.load(f)
    with open(os.path.join(folder, "report.md")) as f:
        report = f.read()
    assert res["name"] == name and res["verdict"] == summary["verdict"]
    assert f"Verdict: {res['verdict']}" in report
    for p in summary["plots"]:
        _png_ok(p)
    return res, report


# --------------------------------------------------------------------------
# global-lbl
# --------------------------------------------------------------------------

def test_specialisation_known_answers():
    E, D, k = 8, 4, 2
    perfect = np.zeros((D, E))
    for d in range(D):
        perfect[d, 2 * d:2 * d + 2] = 1.0      # each domain: its own two experts
    s = G.specialisation(perfect)
    assert s["mi"] == pytest.approx(1.0) and s["top_share"] == 1.0 and s["max_load"] == pytest.approx(1.0)
    s = G.specialisation(np.full((D, E), k / E))
    assert s["mi"] == pytest.approx(0.0, abs=1e-12) and s["top_share"] == k / E
    assert s["max_load"] == pytest.approx(1.0)
    skew = np.zeros((D, E))
    skew[:, :2] = 1.0                            # every domain on experts 0 and 1
    s = G.specialisation(skew)
    assert s["mi"] == pytest.approx(0.0, abs=1e-12) and s["max_load"] == pytest.approx(4.0)


@pytest.mark.parametrize("balance", [1, "global"])
def test_concatenated_ranks_equal_separate_ranks(balance):
    """The experiment runs the W ranks of a micro-step as one forward call:
    the same gradients as W separate ranks (lowband.sim.Cluster) with the
    LoadBalancer's all-reduce and data-parallel gradient averaging."""
    W, accum, L, coef = 4, 2, 8, 0.1
    task = G.DomainTask(seed=3)
    rng = np.random.default_rng(4)
    batches = [task.sequences(W, L, rng)[:2] for _ in range(accum)]
    model = G.make_model(task, balance=balance, ranks=W, seq_len=L, num_experts=4,
                         aux_coef=coef / accum, seed=5)
    model.zero_grad()
    for x, y in batches:                       # the layers accumulate the micro-steps
        G.micro_step_grads(model, task, x, y, accum)
    ref = {n: g.copy() for n, g in model.grads.items()}

    def rank(comm):
        layer = moe.MoELayer(task.d_model, 16, 4, 2, renormalize=True, aux_coef=coef / accum,
                             aux_scope="micro" if balance == 1 else "global",
                             allreduce=comm.allreduce, seed=5)
        local = G.Residual(layer)
        r = comm.rank
        for x, y in batches:
            G.micro_step_grads(local, task, x[r * L:(r + 1) * L], y[r * L:(r + 1) * L], accum)
        return {n: comm.allreduce(g, op="mean") for n, g in local.grads.items()}

    got = Cluster(W).run(rank)
    for n in ref:
        np.testing.assert_allclose(got[0][n], ref[n], rtol=1e-10, atol=1e-13, err_msg=n)


def test_train_is_deterministic():
    task = G.DomainTask(seed=1)
    a = G.train(task, "global", steps=12, eval_every=6, seed=7)
    b = G.train(task, "global", steps=12, eval_every=6, seed=7)
    assert a["history"] == b["history"] and a["freq"] == b["freq"]
    c = G.train(task, "global", steps=12, eval_every=6, seed=8)
    assert c["history"] != a["history"]


def test_global_lbl_smoke(tmp_path):
    s = run_one("global-lbl", "smoke", out=str(tmp_path), progress=False)
    res, report = _outputs(s, "global-lbl", tmp_path)
    assert {os.path.basename(p) for p in s["plots"]} >= {"loss.png", "expert_load.png",
                                                          "specialisation.png"}
    m, t = res["metrics"], res["thresholds"]
    checks = {c["name"]: c["holds"] for c in res["checks"]}
    assert set(checks) == {"mi_gain", "top_share_gain", "balance", "quality"}
    # the claimed direction, re-derived from the numbers, wherever the report says it holds
    if checks["mi_gain"]:
        assert m["global_mi"] >= m["micro_mi"] + t["min_mi_gain"]
        assert m["global_mi"] >= t["min_mi_ratio"] * m["micro_mi"]
    if checks["top_share_gain"]:
        assert m["global_top_share"] >= m["micro_top_share"] + t["min_top_share_gain"]
    if checks["balance"]:
        assert m["global_max_load"] <= t["max_load"]
    if checks["quality"]:
        assert m["global_test_mse"] < m["micro_test_mse"]
    # at this size the specialisation claim holds (the report says so)
    assert checks["mi_gain"] and checks["top_share_gain"], report
    assert len(res["arms"]["micro"]["loss"]) == len(res["arms"]["global"]["loss"]) > 5


# --------------------------------------------------------------------------
# chain-of-experts
# --------------------------------------------------------------------------

from lowband.experiments import chain_of_experts as C  # noqa: E402


def test_coe_matches_moe_compute_and_parameters():
    task = C.CompositionalTask(4, 8, seed=0)
    cfg = dict(C.BASE)
    m, c = C.build("moe", task, cfg, 1), C.build("coe", task, cfg, 1)
    E, H = cfg["num_experts"], task.d_model
    # the same experts and shared expert; CoE has one more router
    assert C.param_count(c) == C.param_count(m) + E * H
    assert C.expert_passes("moe", cfg) == (2, 1) and C.expert_passes("coe", cfg) == (2, 2)
    # the authors' configuration: no renormalisation, shared expert, inner residual
    assert c.k == 1 and c.iterations == 2 and c.inner_residual and not c.outer_residual
    assert m.layer.renormalize is False and m.layer.shared_expert and c.shared_expert
    with pytest.raises(ValueError, match="k_moe"):
        C.build("coe", task, dict(cfg, k_moe=3), 1)


def test_shared_router_stays_one_router():
    cfg = dict(C.BASE, router="shared", steps=5)
    r = C.run_config("coe", cfg, 0, eval_every=5)
    router = r["model"].params["router"]
    np.testing.assert_array_equal(router[0], router[1])
    assert not np.array_equal(router[0], C.build("coe", C.CompositionalTask(seed=0), cfg, 1).params["router"][0])
    per = C.run_config("coe", dict(cfg, router="per-iteration"), 0, eval_every=5)["model"]
    assert not np.array_equal(per.params["router"][0], per.params["router"][1])


def test_run_config_is_deterministic_and_learns():
    cfg = dict(C.BASE, steps=60)
    a = C.run_config("coe", cfg, 3, eval_every=30)
    b = C.run_config("coe", cfg, 3, eval_every=30)
    assert a["val"] == b["val"] and a["steps"] == [0, 30, 60]
    assert a["val"][-1] < 0.5 * a["val"][0]
    assert len(a["routing"]) == 2 and all(0 <= v <= 1 for d in a["routing"] for v in d.values())


def _coe_direction(res):
    """Re-derives every check the report says holds from the metrics."""
    m, t = res["metrics"], res["thresholds"]
    holds = {c["name"]: c["holds"] for c in res["checks"]}
    assert set(holds) == {"coe_beats_moe", "coe_beats_moe_P8", "inner_beats_outer",
                          "per_iteration_routers"}
    if holds["coe_beats_moe"]:
        assert m["coe_val"] <= t["max_loss_ratio"] * m["moe_val"]
    if holds["coe_beats_moe_P8"]:
        assert m["coe-P8_val"] <= t["max_loss_ratio"] * m["moe-P8_val"]
    if holds["inner_beats_outer"]:
        assert m["coe_val"] < m["coe-outer_val"]
    if holds["per_iteration_routers"]:
        assert m["coe_val"] < m["coe-shared-router_val"]
    return holds


def test_chain_of_experts_smoke(tmp_path):
    s = run_one("chain-of-experts", "smoke", out=str(tmp_path), progress=False)
    res, report = _outputs(s, "chain-of-experts", tmp_path)
    assert [os.path.basename(p) for p in s["plots"]] == ["val_loss.png"]
    _coe_direction(res)
    # every check that fails names its reason in the report
    for c in res["checks"]:
        if not c["holds"]:
            assert c["why"] and c["why"] in report
    assert res["metrics"]["params_ratio"] == pytest.approx(9904 / 9776)


@pytest.mark.slow
def test_quick_sizes_claimed_directions(tmp_path):
    """The quick runs the README and notebook show: the claims the reports say
    hold at this size, re-derived from the numbers."""
    s = run_one("global-lbl", "quick", out=str(tmp_path), progress=False)
    res, _ = _outputs(s, "global-lbl", tmp_path)
    assert res["verdict"] == "holds"
    assert res["metrics"]["global_mi"] > 1.5 * res["metrics"]["micro_mi"]
    s = run_one("chain-of-experts", "quick", out=str(tmp_path), progress=False)
    res, _ = _outputs(s, "chain-of-experts", tmp_path)
    holds = _coe_direction(res)
    # at quick size CoE wins on 56 compositions and loses on 12 (the report explains why)
    assert holds["coe_beats_moe_P8"] and not holds["coe_beats_moe"]
    assert res["verdict"] == "partly holds"
