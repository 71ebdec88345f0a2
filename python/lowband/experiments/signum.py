"""signSGD / Signum with majority vote (Bernstein et al., ICML 2018 and ICLR
2019): each worker sends the sign of its momentum (1 bit per coordinate),
the vote is the sign of the sum of signs; on IID data it tracks SGD with
momentum at a thirty-second of the payload, and the vote tolerates a
minority of sign-flipping workers."""
from __future__ import annotations

import numpy as np

from .. import optim as O
from ..quantize import sign
from .._payload import Dense
from .data import MLP, digits, train_data_parallel
from ._loops import run_arms
from .framework import Check, Experiment, Result

THRESHOLDS = {
    "max_loss_ratio": 2.0,        # Signum-MV's final training loss <= 2 x SGD-momentum's
    "max_accuracy_drop": 0.02,    # and its test accuracy within 2 points
    "min_payload_ratio": 25.0,    # fp32 payload bytes / sign payload bytes per worker per step
    "flippers": 3,                # of 7 workers send the negated sign
    "max_flipper_accuracy_drop": 0.05,   # Signum-MV with the flippers stays within 5 points
}

SIZES = {
    "smoke": {"steps": 60, "hidden": 32, "batch": 32, "lr_sgd": 0.05, "lr_sign": 2e-3, "eval_every": 25},
    "quick": {"steps": 300, "hidden": 64, "batch": 32, "lr_sgd": 0.05, "lr_sign": 2e-3, "eval_every": 25},
    "full": {"steps": 2000, "hidden": 128, "batch": 32, "lr_sgd": 0.05, "lr_sign": 1e-3, "eval_every": 100},
}

LABELS = {"sgd": "SGD, momentum 0.9 (dense allreduce)", "signum": "Signum-MV (beta 0.9)",
          "signsgd": "signSGD-MV (beta 0)", "flippers": "Signum-MV, 3 of 7 workers flip their sign"}


class _Flipper:
    """An adversary: it runs Signum on the negated gradient, so it votes
    -sign(m); it applies the same vote as everyone (replicas agree)."""

    def __init__(self, opt):
        self.opt = opt
        self.params = opt.params

    def step(self, grad):
        self.opt.step(-grad)


def _worker(comm, arm, p, seed, show):
    def make(x, c):
        if arm == "sgd":
            return O.SGD(x, p["lr_sgd"], momentum=0.9, comm=c)
        opt = O.Signum(x, c, lr=p["lr_sign"], beta=0.0 if arm == "signsgd" else 0.9)
        if arm == "flippers" and c.rank < THRESHOLDS["flippers"]:
            return _Flipper(opt)
        return opt
    return train_data_parallel(comm, MLP((64, p["hidden"], 10)), digits(), make, p["steps"], p["batch"],
                               p["eval_every"], seed, label=f"signum: {arm}", show=show)


def run(config):
    p = config.params
    arms, metrics, table = run_arms(config, "signum", _worker, LABELS, p, config.seed, config.progress)
    n = MLP((64, p["hidden"], 10)).n
    v = np.zeros(n, np.float64)
    metrics["payload_ratio"] = Dense(v.astype(np.float32)).nbytes / sign(v, scale="none").nbytes
    metrics["loss_ratio"] = metrics["signum_loss"] / metrics["sgd_loss"]
    return Result(metrics, arms, table=table, notes=[
        f"MLP 64-{p['hidden']}-10 on scikit-learn digits, {config.workers} workers (odd: no ties), "
        f"batch {p['batch']} per worker, {p['steps']} steps; SGD lr {p['lr_sgd']}, sign methods lr "
        f"{p['lr_sign']}",
        "the signs travel by an allgather (each worker sends its d/8-byte payload to the W-1 others "
        "and votes locally in C on the packed bits); a parameter server would send d/8 bytes up and "
        "d/8 down, which is the papers' 32x: the payload ratio measures it, headers included",
        "the bytes column counts the allgather, which grows with W; the dense arm is a ring allreduce "
        "of float64 gradients (2(W-1)/W x 8d bytes)"])


def judge(m, t):
    return [
        Check("tracks_sgd_loss", "Signum-MV loss / SGD-momentum loss", m["loss_ratio"], t["max_loss_ratio"],
              m["loss_ratio"] <= t["max_loss_ratio"],
              "the sign step's fixed size per coordinate needs a decaying rate to settle as low"),
        Check("tracks_sgd_accuracy", "Signum-MV accuracy within max_accuracy_drop of SGD",
              [m["signum_accuracy"], m["sgd_accuracy"]], t["max_accuracy_drop"],
              m["signum_accuracy"] >= m["sgd_accuracy"] - t["max_accuracy_drop"],
              "the learning rate was not tuned per arm"),
        Check("one_bit_payload", "fp32 payload bytes / sign payload bytes", m["payload_ratio"],
              t["min_payload_ratio"], m["payload_ratio"] >= t["min_payload_ratio"],
              "headers dominate a model this small"),
        Check("tolerates_flippers", "accuracy with 3 of 7 sign-flippers within the drop of clean Signum-MV",
              [m["flippers_accuracy"], m["signum_accuracy"]], t["max_flipper_accuracy_drop"],
              m["flippers_accuracy"] >= m["signum_accuracy"] - t["max_flipper_accuracy_drop"],
              "with 3 of 7 against, the honest majority is one vote: the vote is often wrong where "
              "the honest workers' signs disagree"),
    ]


EXPERIMENT = Experiment(
    name="signum", title="signSGD / Signum with majority vote",
    paper="Bernstein et al., ICML 2018 (arXiv 1802.04434) and ICLR 2019 (arXiv 1810.05291)",
    claim="Signum with majority vote trains like SGD with momentum on IID data while each worker "
          "sends 1 bit per coordinate, and the vote tolerates a minority of workers that flip their sign.",
    thresholds=THRESHOLDS, sizes=SIZES, run=run, judge=judge, engines=("sim", "torch"), workers=7,
    setup="Data-parallel training of a ReLU MLP on scikit-learn's digits, every worker on its own "
          "IID shard; the replicas stay identical (checked).")
