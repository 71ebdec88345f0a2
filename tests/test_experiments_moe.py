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
    ref = {n: np.zeros_like(g) for n, g in model.grads.items()}
    for x, y in batches:
        G.micro_step_grads(model, task, x, y, accum)
        for n in ref:
            ref[n] += model.grads[n]

    def rank(comm):
        layer = moe.MoELayer(task.d_model, 16, 4, 2, renormalize=True, aux_coef=coef / accum,
                             aux_scope="micro" if balance == 1 else "global",
                             allreduce=comm.allreduce, seed=5)
        local = G.Residual(layer)
        acc = {n: np.zeros_like(g) for n, g in local.grads.items()}
        r = comm.rank
        for x, y in batches:
            G.micro_step_grads(local, task, x[r * L:(r + 1) * L], y[r * L:(r + 1) * L], accum)
            for n in acc:
                acc[n] += local.grads[n]
        return {n: comm.allreduce(g, op="mean") for n, g in acc.items()}

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
