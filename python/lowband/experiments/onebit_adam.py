"""1-bit Adam (Tang et al., ICML 2021): after a dense Adam warm-up, freeze
the variance and average the momentum with a 1-bit compressed allreduce
with error feedback; it tracks Adam's loss at a fraction of the bytes."""
from __future__ import annotations


from .. import optim as O
from .data import MLP, digits, train_data_parallel
from ._loops import run_arms
from .framework import Check, Experiment, Result

THRESHOLDS = {
    "warmup_fraction": 0.2,      # freeze_step = 20% of the steps (the paper: 15-25%)
    "max_loss_ratio": 1.25,      # 1-bit Adam's final training loss <= 1.25 x Adam's
    "max_accuracy_drop": 0.01,   # and its test accuracy within 1 point
    "max_bytes_fraction": 0.3,   # at under 30% of Adam's bytes (warm-up included)
    "ablation_loss_ratio": 2.0,  # without error feedback, or without warm-up: >= 2 x Adam's loss
}

SIZES = {
    "smoke": {"steps": 150, "hidden": 32, "batch": 32, "lr": 1e-3, "eval_every": 25},
    "quick": {"steps": 500, "hidden": 64, "batch": 32, "lr": 1e-3, "eval_every": 25},
    "full": {"steps": 3000, "hidden": 256, "batch": 32, "lr": 1e-3, "eval_every": 100},
}

LABELS = {"adam": "Adam (dense allreduce)", "onebit": "1-bit Adam, 20% warm-up",
          "no_ef": "1-bit Adam without error feedback", "no_warmup": "1-bit Adam without warm-up"}


def _worker(comm, arm, p, seed, show):
    steps = p["steps"]
    freeze = {"adam": steps, "onebit": int(THRESHOLDS["warmup_fraction"] * steps), "no_ef":
              int(THRESHOLDS["warmup_fraction"] * steps), "no_warmup": 0}[arm]

    def make(x, c):
        # freeze_step = steps: the warm-up rule throughout, i.e. DeepSpeed's Adam
        # (no bias correction) on densely averaged gradients
        return O.OneBitAdam(x, c, lr=p["lr"], freeze_step=freeze, error_feedback=arm != "no_ef",
                            momentum_mask="auto")
    return train_data_parallel(comm, MLP((64, p["hidden"], 10)), digits(), make, steps, p["batch"],
                               p["eval_every"], seed, label=f"onebit-adam: {arm}", show=show)


def run(config):
    p = config.params
    arms, metrics, table = run_arms(config, "onebit-adam", _worker, LABELS, p, config.seed, config.progress)
    metrics["loss_ratio"] = metrics["onebit_loss"] / metrics["adam_loss"]
    metrics["bytes_fraction"] = metrics["onebit_bytes"] / metrics["adam_bytes"]
    return Result(metrics, arms, table=table, notes=[
        f"MLP 64-{p['hidden']}-10 on scikit-learn digits, {config.workers} workers, batch {p['batch']} "
        f"per worker, lr {p['lr']}, betas (0.9, 0.999), {p['steps']} steps",
        "compression stage: momentum averaged by the two-phase 1-bit allreduce (signs with an RMS "
        "scale per chunk, worker and server error feedback); the momentum mask (DeepSpeed's "
        "exp_avg_mask) is on for the always-zero pixels"])


def judge(m, t):
    r = t["ablation_loss_ratio"]
    return [
        Check("tracks_adam_loss", "1-bit Adam loss / Adam loss", m["loss_ratio"], t["max_loss_ratio"],
              m["loss_ratio"] <= t["max_loss_ratio"],
              "the frozen variance from a short warm-up is a poor preconditioner later in the run"),
        Check("tracks_adam_accuracy", "1-bit Adam accuracy within max_accuracy_drop of Adam",
              [m["onebit_accuracy"], m["adam_accuracy"]], t["max_accuracy_drop"],
              m["onebit_accuracy"] >= m["adam_accuracy"] - t["max_accuracy_drop"],
              "the compressed momentum adds noise that a short run does not average out"),
        Check("fraction_of_bytes", "1-bit Adam bytes / Adam bytes", m["bytes_fraction"], t["max_bytes_fraction"],
              m["bytes_fraction"] < t["max_bytes_fraction"], "the dense warm-up dominates"),
        Check("error_feedback_needed", "loss without error feedback / Adam loss",
              m["no_ef_loss"] / m["adam_loss"], r, m["no_ef_loss"] >= r * m["adam_loss"],
              "on this problem the sign compression's bias happens to be harmless"),
        Check("warmup_needed", "loss without warm-up / Adam loss", m["no_warmup_loss"] / m["adam_loss"], r,
              m["no_warmup_loss"] >= r * m["adam_loss"],
              "the initial variance happens to be a usable preconditioner here"),
    ]


EXPERIMENT = Experiment(
    name="onebit-adam", title="1-bit Adam", paper="Tang et al., ICML 2021 (arXiv 2102.02888); DeepSpeed",
    claim="1-bit Adam (dense warm-up, then frozen variance and 1-bit compressed momentum with error "
          "feedback) tracks Adam's loss at a fraction of the bytes; without error feedback or without "
          "the warm-up it does not.",
    thresholds=THRESHOLDS, sizes=SIZES, run=run, judge=judge, engines=("sim", "torch"), workers=4,
    setup="Data-parallel training of a ReLU MLP on scikit-learn's digits; every worker trains on its "
          "own shard; the replicas stay identical (checked).")
