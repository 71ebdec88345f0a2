"""Deep Gradient Compression (Lin et al., ICLR 2018): at 99.9% sparsity,
momentum correction, momentum-factor masking, local gradient clipping and
the sparsity warm-up keep data-parallel SGD's accuracy; top-k of the raw
gradient without them does not."""
from __future__ import annotations

import numpy as np

from .. import optim as O
from ..compressors import TopK
from ..sparsify import aggregate
from .data import MLP, digits, train_data_parallel
from ._loops import run_arms
from .framework import Check, Experiment, Result

THRESHOLDS = {
    "density": 0.001,            # 99.9% sparsity after the warm-up
    "max_accuracy_drop": 0.01,   # DGC within 1 point of dense momentum SGD
    "naive_gap": 0.02,           # naive top-k at least 2 points behind DGC
    "max_bytes_fraction": 0.1,   # DGC sends under a tenth of dense SGD's bytes (warm-up included)
}

SIZES = {
    "smoke": {"steps": 150, "hidden": 32, "batch": 32, "lr": 0.05, "warmup_steps": 8, "eval_every": 50},
    "quick": {"steps": 600, "hidden": 128, "batch": 32, "lr": 0.05, "warmup_steps": 30, "eval_every": 50},
    "full": {"steps": 3000, "hidden": 256, "batch": 32, "lr": 0.05, "warmup_steps": 100, "eval_every": 100},
}

ARMS = {"dense": "dense momentum SGD", "dgc": "DGC 99.9%", "naive": "naive top-k 99.9%"}


class NaiveTopK(O.Optimizer):
    """The naive arm: top-k of the raw local gradient, no memory, no
    warm-up; allgather, mean, then momentum SGD on the average."""

    def __init__(self, params, comm, lr, momentum, ratio):
        super().__init__(params, comm)
        self.sgd = O.SGD(params, lr, momentum)
        self.topk = TopK(ratio=ratio)

    def step(self, grad):
        self.sgd.step(aggregate(self.comm.allgather(self.topk.compress(self._grad(grad))), op="mean"))
        self.t += 1


def _make(arm, mlp, p, world_size):
    lr, ratio = p["lr"], THRESHOLDS["density"]
    if arm == "dense":
        return lambda x, comm: O.SGD(x, lr, 0.9, comm=comm)
    if arm == "dgc":
        # the paper's local clipping threshold is rescaled by W^-1/2
        return lambda x, comm: O.DGCSGD(x, comm, lr, 0.9, ratio=ratio, tensors=mlp.shapes,
                                        clip=5.0 / np.sqrt(world_size), warmup_steps=p["warmup_steps"])
    return lambda x, comm: NaiveTopK(x, comm, lr, 0.9, ratio)


def _worker(comm, arm, p, seed, show):
    mlp = MLP((64, p["hidden"], 10))
    return train_data_parallel(comm, mlp, digits(), _make(arm, mlp, p, comm.world_size), p["steps"],
                               p["batch"], p["eval_every"], seed, label=f"dgc: {arm}", show=show)


def run(config):
    p = config.params
    arms, metrics, table = run_arms(config, "dgc", _worker, ARMS, p, config.seed, config.progress,
                                    accuracy_first=True)
    metrics["bytes_fraction"] = metrics["dgc_bytes"] / metrics["dense_bytes"]
    n = MLP((64, p["hidden"], 10)).n
    return Result(metrics, arms, table=table, notes=[
        f"MLP 64-{p['hidden']}-10 ({n} parameters) on scikit-learn digits, {config.workers} workers, "
        f"batch {p['batch']} per worker, momentum 0.9, lr {p['lr']}",
        f"DGC: weights compressed at density {THRESHOLDS['density']} after a warm-up of 4 stages x "
        f"{p['warmup_steps']} steps (75%, 93.75%, 98.4%, 99.6% sparsity), sampled top-k, masking on, "
        f"local clipping 5/sqrt(W); biases dense", "naive: exact top-k of the raw gradient, no memory"])


def judge(m, t):
    return [
        Check("dgc_matches_dense", "DGC accuracy within max_accuracy_drop of dense SGD",
              [m["dgc_accuracy"], m["dense_accuracy"]], t["max_accuracy_drop"],
              m["dgc_accuracy"] >= m["dense_accuracy"] - t["max_accuracy_drop"],
              "the warm-up takes a large share of a short run and the memory has little time "
              "to catch up; the full size gives it more steps"),
        Check("naive_behind", "naive top-k at least naive_gap below DGC",
              [m["naive_accuracy"], m["dgc_accuracy"]], t["naive_gap"],
              m["naive_accuracy"] <= m["dgc_accuracy"] - t["naive_gap"],
              "on a small, easy problem even the 0.1% largest raw gradient entries carry enough signal"),
        Check("dgc_bytes", "DGC bytes / dense bytes below max_bytes_fraction", m["bytes_fraction"],
              t["max_bytes_fraction"], m["bytes_fraction"] < t["max_bytes_fraction"],
              "the dense warm-up stages and the dense biases dominate a short run"),
    ]


EXPERIMENT = Experiment(
    name="dgc", title="Deep Gradient Compression", paper="Lin et al., ICLR 2018 (arXiv 1712.01887)",
    claim="At 99.9% gradient sparsity, DGC (momentum correction, momentum-factor masking, local "
          "clipping, sparsity warm-up) trains to within 1 point of dense momentum SGD's accuracy, "
          "while top-k of the raw gradient without them falls clearly behind.",
    thresholds=THRESHOLDS, sizes=SIZES, run=run, judge=judge, engines=("sim", "torch"), workers=4,
    setup="Data-parallel training of a ReLU MLP on scikit-learn's digits; every worker trains on "
          "its own shard; the replicas stay identical (checked).")
