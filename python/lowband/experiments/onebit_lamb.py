"""1-bit LAMB (Li et al. 2021): LAMB warm-up, then frozen variance, momenta
scaled to a common RMS and averaged by one 1-bit compressed allreduce,
with the per-layer trust ratios frozen from the warm-up; it keeps LAMB's
convergence in large-batch training at a fraction of the bytes."""
from __future__ import annotations


from .. import optim as O
from .data import MLP, digits, train_data_parallel
from ._loops import run_arms
from .framework import Check, Experiment, Result

THRESHOLDS = {
    "warmup_fraction": 0.2,       # freeze_step = 20% of the steps
    "max_loss_ratio": 1.25,       # 1-bit LAMB's final training loss <= 1.25 x LAMB's
    "max_accuracy_drop": 0.01,    # and its test accuracy within 1 point
    "max_bytes_fraction": 0.3,    # at under 30% of LAMB's bytes (paper: 4.6x less volume)
}

SIZES = {
    "smoke": {"steps": 60, "hidden": 32, "batch": 64, "lr": 1e-2, "eval_every": 20},
    "quick": {"steps": 200, "hidden": 64, "batch": 128, "lr": 1e-2, "eval_every": 20},
    "full": {"steps": 1000, "hidden": 256, "batch": 256, "lr": 1e-2, "eval_every": 50},
}

LABELS = {"lamb": "LAMB (dense allreduce)", "onebit": "1-bit LAMB, 20% warm-up"}


def _worker(comm, arm, p, seed, show):
    model = MLP((64, p["hidden"], 10))
    steps = p["steps"]
    freeze = steps if arm == "lamb" else int(THRESHOLDS["warmup_fraction"] * steps)

    def make(x, c):
        # freeze_step = steps: the warm-up rule throughout, i.e. DeepSpeed's LAMB
        return O.OneBitLamb(x, c, lr=p["lr"], freeze_step=freeze, layers=model.layer_sizes,
                            momentum_mask="auto")
    return train_data_parallel(comm, model, digits(), make, steps, p["batch"], p["eval_every"], seed,
                               label=f"onebit-lamb: {arm}", show=show)


def run(config):
    p = config.params
    arms, metrics, table = run_arms(config, "onebit-lamb", _worker, LABELS, p, config.seed, config.progress)
    metrics["loss_ratio"] = metrics["onebit_loss"] / metrics["lamb_loss"]
    metrics["bytes_fraction"] = metrics["onebit_bytes"] / metrics["lamb_bytes"]
    return Result(metrics, arms, table=table, notes=[
        f"MLP 64-{p['hidden']}-10 on scikit-learn digits, {config.workers} workers, batch {p['batch']} "
        f"per worker (large batch for this data set), lr {p['lr']}, {p['steps']} steps; trust ratios "
        "per weight matrix and bias",
        "the momentum mask (DeepSpeed's exp_avg_mask) is on for the always-zero pixels",
        "compression stage: one compressed allreduce of the whole momentum (signs with an RMS scale "
        "per chunk, worker and server error feedback), momenta scaled to a common RMS first"])


def judge(m, t):
    return [
        Check("tracks_lamb_loss", "1-bit LAMB loss / LAMB loss", m["loss_ratio"], t["max_loss_ratio"],
              m["loss_ratio"] <= t["max_loss_ratio"],
              "the variance and trust ratios frozen after a short warm-up fit the later run poorly"),
        Check("tracks_lamb_accuracy", "1-bit LAMB accuracy within max_accuracy_drop of LAMB",
              [m["onebit_accuracy"], m["lamb_accuracy"]], t["max_accuracy_drop"],
              m["onebit_accuracy"] >= m["lamb_accuracy"] - t["max_accuracy_drop"],
              "the compressed momentum adds noise that a short run does not average out"),
        Check("fraction_of_bytes", "1-bit LAMB bytes / LAMB bytes", m["bytes_fraction"],
              t["max_bytes_fraction"], m["bytes_fraction"] < t["max_bytes_fraction"],
              "the dense warm-up dominates"),
    ]


EXPERIMENT = Experiment(
    name="onebit-lamb", title="1-bit LAMB", paper="Li et al. 2021 (arXiv 2104.06069); DeepSpeed",
    claim="1-bit LAMB (LAMB warm-up, then frozen variance and frozen trust ratios with 1-bit "
          "compressed momentum) keeps LAMB's convergence in large-batch training at a fraction of the bytes.",
    thresholds=THRESHOLDS, sizes=SIZES, run=run, judge=judge, engines=("sim", "torch"), workers=4,
    setup="Data-parallel large-batch training of a ReLU MLP on scikit-learn's digits, every worker on "
          "its own IID shard, DeepSpeed's update rule (checked against a port in the test suite); the "
          "replicas stay identical (checked).")
