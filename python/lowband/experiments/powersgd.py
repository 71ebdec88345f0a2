"""PowerSGD (Vogels, Karimireddy, Jaggi, NeurIPS 2019): rank-r power
iteration of each weight matrix's gradient with error feedback and a
warm-started Q matches dense data-parallel SGD's accuracy while
communicating only the rank-r factors (``lowband.powersgd.PowerSGD``, the
steps of PyTorch's ``powerSGD_hook``)."""
from __future__ import annotations

import math

import numpy as np

from .. import optim as O
from ..powersgd import PowerSGD
from .data import MLP, digits, train_data_parallel
from .engines import run_workers
from .framework import Check, Curve, Experiment, Result

THRESHOLDS = {
    "rank": 2,                      # the rank whose claim is judged
    "max_accuracy_drop": 0.01,      # rank-r accuracy within 1 point of dense SGD
    "max_bytes_excess": 1.05,       # bytes <= 1.05 x the rank's share: ((n+m) r + biases) / (n m + biases)
    "rank1_min_accuracy": 0.9,      # rank 1 still trains (above 90%)
}

SIZES = {
    "smoke": {"steps": 120, "hidden": 32, "batch": 32, "lr": 0.05, "eval_every": 40, "ranks": (1, 2)},
    "quick": {"steps": 600, "hidden": 128, "batch": 32, "lr": 0.05, "eval_every": 50, "ranks": (1, 2, 4)},
    "full": {"steps": 3000, "hidden": 256, "batch": 32, "lr": 0.05, "eval_every": 100, "ranks": (1, 2, 4, 8)},
}


class PowerSGDMomentum(O.Optimizer):
    """Data-parallel momentum SGD on PowerSGD's mean approximation of the
    gradients (what DDP with ``powerSGD_hook`` and torch.optim.SGD does)."""

    def __init__(self, params, comm, shapes, lr, momentum, rank, seed=0):
        super().__init__(params, comm)
        self.sgd = O.SGD(params, lr, momentum)
        self.psgd = PowerSGD(list(shapes), comm, rank, dtype=params.dtype, seed=seed)

    def step(self, grad):
        self.sgd.step(self.psgd.step(self._grad(grad)))
        self.t += 1


def _worker(comm, arm, p, seed, show):
    mlp = MLP((64, p["hidden"], 10))
    if arm == "dense":
        make = lambda x, c: O.SGD(x, p["lr"], 0.9, comm=c)                       # noqa: E731
    else:
        r = int(arm.split("_")[1])
        make = lambda x, c: PowerSGDMomentum(x, c, mlp.shapes, p["lr"], 0.9, r, seed)  # noqa: E731
    return train_data_parallel(comm, mlp, digits(), make, p["steps"], p["batch"], p["eval_every"], seed,
                               label=f"powersgd: {arm}", show=show)


def _rank_share(shapes, r):
    """((n+m) r for the compressed matrices + the other elements) / all."""
    total = sum(math.prod(s) for s in shapes)
    sent = 0
    for s in shapes:
        if len(s) >= 2:
            n, m = s[0], math.prod(s[1:])
            k = min(n, m, r)
            sent += (n + m) * k if (n + m) * k * 2 < n * m else n * m
        else:
            sent += s[0]
    return sent / total


def run(config):
    p = config.params
    mlp = MLP((64, p["hidden"], 10))
    keys = ["dense"] + [f"rank_{r}" for r in p["ranks"]]
    arms, metrics, table = {}, {}, {}
    for key in keys:
        label = "dense momentum SGD" if key == "dense" else f"PowerSGD rank {key.split('_')[1]}"
        results, sent = run_workers(config, _worker, key, p, config.seed, config.progress)
        steps, loss, acc, nbytes, x = results[0]
        if any(not np.array_equal(r[4], x) for r in results[1:]):
            raise RuntimeError(f"powersgd: the replicas of arm {key!r} disagree")
        arms[key] = Curve(label, steps, loss, acc, nbytes)
        metrics.update({f"{key}_accuracy": acc[-1], f"{key}_loss": loss[-1], f"{key}_bytes": int(sent[0])})
        row = {"test accuracy": acc[-1], "training loss": loss[-1], "bytes sent per worker": int(sent[0])}
        if key != "dense":
            r = int(key.split("_")[1])
            metrics[f"{key}_bytes_ratio"] = sent[0] / metrics["dense_bytes"]
            metrics[f"{key}_rank_share"] = _rank_share(mlp.shapes, r)
            row.update({"bytes / dense": metrics[f"{key}_bytes_ratio"], "rank's share": metrics[f"{key}_rank_share"]})
        table[label] = row
    return Result(metrics, arms, table=table, notes=[
        f"MLP 64-{p['hidden']}-10 ({mlp.n} parameters) on scikit-learn digits, {config.workers} workers, "
        f"batch {p['batch']} per worker, momentum 0.9, lr {p['lr']}, {p['steps']} steps",
        "PowerSGD: error feedback, warm-started Q, each weight matrix compressed to rank r when "
        "(n + m) r * 2 < n m; biases averaged uncompressed in the first allreduce (torch's hook's rule)",
        "the rank's share: the elements PowerSGD puts on the wire (P, Q and the uncompressed tensors) "
        "over the dense gradient's; with a ring allreduce bytes scale the same way"])


def judge(m, t):
    key = f"rank_{t['rank']}"
    if f"{key}_accuracy" not in m:
        key = "rank_1"
    return [
        Check("matches_dense", f"PowerSGD {key.replace('_', ' ')} accuracy within max_accuracy_drop of dense",
              [m[f"{key}_accuracy"], m["dense_accuracy"]], t["max_accuracy_drop"],
              m[f"{key}_accuracy"] >= m["dense_accuracy"] - t["max_accuracy_drop"],
              "the low-rank error has not been fed back for long enough in a short run"),
        Check("bytes_of_the_rank", f"PowerSGD {key.replace('_', ' ')} bytes / dense bytes over the rank's share",
              m[f"{key}_bytes_ratio"] / m[f"{key}_rank_share"], t["max_bytes_excess"],
              m[f"{key}_bytes_ratio"] <= t["max_bytes_excess"] * m[f"{key}_rank_share"],
              "the ring allreduce pads each buffer to W chunks, which weighs on small P and Q buffers"),
        Check("rank1_trains", "PowerSGD rank 1 accuracy", m["rank_1_accuracy"], t["rank1_min_accuracy"],
              m["rank_1_accuracy"] >= t["rank1_min_accuracy"], "rank 1 is too coarse for this model"),
    ]


EXPERIMENT = Experiment(
    name="powersgd", title="PowerSGD", paper="Vogels, Karimireddy, Jaggi, NeurIPS 2019 (arXiv 1905.13727)",
    claim="Rank-r PowerSGD (error feedback, warm start) matches dense data-parallel SGD's accuracy while "
          "sending only the rank-r factors of each weight gradient.",
    thresholds=THRESHOLDS, sizes=SIZES, run=run, judge=judge, engines=("sim", "torch"), workers=4,
    setup="Data-parallel training of a ReLU MLP on scikit-learn's digits with lowband's PowerSGD (the "
          "steps of PyTorch's powerSGD_hook) over the engine's allreduce.")
