"""SparseLoCo (Sarfi, Thérien, Lidin, Belilovsky 2025): DiLoCo whose outer
gradients go through decayed error feedback, per-tile top-k (3.1%) and
2-bit values, averaged over the replicas that sent each coordinate; the
paper reports a loss at or below DiLoCo's while sending under half a bit
per parameter per sync."""
from __future__ import annotations

from . import lm
from .framework import Check, Experiment, Result

THRESHOLDS = {
    "max_loss_ratio": 1.0,          # SparseLoCo val loss <= the best tuned DiLoCo's ("at or below")
    "max_accuracy_drop": 0.0,       # val accuracy >= the best tuned DiLoCo's
    "max_bits_per_param": 0.5,      # payload per replica per sync, bits per parameter
}

SIZES = lm.SIZES
OUTER_LRS = (0.4, 0.7, 1.0)     # DiLoCo tuned fairly: the best of these (momentum 0.9, Nesterov)


def run(config):
    p = config.params
    arms = {f"diloco_{lr}": (f"DiLoCo outer lr {lr}", {"kind": "diloco", "lr": p["lr"], "H": p["H"],
                                                      "outer_lr": lr}) for lr in OUTER_LRS}
    arms["sparseloco"] = ("SparseLoCo (per tensor, 3.1%, 2-bit, beta 0.95)",
                          {"kind": "sparseloco", "lr": p["lr"], "H": p["H"]})
    arms["sparseloco_flat"] = ("SparseLoCo, one flat vector (old lowband)",
                               {"kind": "sparseloco", "lr": p["lr"], "H": p["H"], "per_tensor": False})
    curves, m, table = lm.run_arms(config, arms)
    best = min(OUTER_LRS, key=lambda lr: m[f"diloco_{lr}_loss"])
    m["diloco_best_outer_lr"] = best
    m["diloco_loss"] = m[f"diloco_{best}_loss"]
    m["diloco_accuracy"] = m[f"diloco_{best}_accuracy"]
    m["loss_ratio"] = m["sparseloco_loss"] / m["diloco_loss"]
    m["n_params"] = lm.model(p).n
    return Result(m, curves, metric="validation loss", log_loss=False, table=table, notes=lm.notes(config) + [
        f"H = {p['H']} for every arm; DiLoCo's outer lr tuned over {OUTER_LRS} (momentum 0.9, Nesterov): "
        f"best {best}",
        "SparseLoCo: the authors' configuration (top-128 of 4096 per tile, 64x64 tiles within each "
        "tensor, 2-bit LUT values with per-tensor statistics, error-feedback decay 0.95, contributor "
        "mean, outer lr 1, no outer momentum); the flat arm tiles the whole parameter vector with one "
        "set of statistics"])


def judge(m, t):
    small = (f"best DiLoCo (outer lr {m['diloco_best_outer_lr']}) {m['diloco_loss']:.4g} / "
             f"{m['diloco_accuracy']:.4f}, SparseLoCo {m['sparseloco_loss']:.4g} / {m['sparseloco_accuracy']:.4f} "
             f"(loss / accuracy) after {m['sparseloco_syncs']} outer rounds of a "
             f"{m['n_params']}-parameter model: DiLoCo's Nesterov outer step (lr x momentum amplifies the "
             "averaged outer gradient several-fold per round) makes faster progress on a short run, "
             "while the paper's advantage is measured over hundreds of rounds of a 512M model")
    return [
        Check("loss_at_or_below_diloco", "SparseLoCo val loss / best DiLoCo val loss", m["loss_ratio"],
              t["max_loss_ratio"], m["loss_ratio"] <= t["max_loss_ratio"], small),
        Check("accuracy_at_or_above_diloco", "SparseLoCo val accuracy vs best DiLoCo's",
              [m["sparseloco_accuracy"], m["diloco_accuracy"]], t["max_accuracy_drop"],
              m["sparseloco_accuracy"] >= m["diloco_accuracy"] - t["max_accuracy_drop"], small),
        Check("under_half_a_bit", "SparseLoCo payload bits per parameter per sync",
              m["sparseloco_payload_bits_per_param_per_sync"], t["max_bits_per_param"],
              m["sparseloco_payload_bits_per_param_per_sync"] < t["max_bits_per_param"],
              "per-tensor payload headers and statistics weigh more on a 30k-parameter model"),
    ]


EXPERIMENT = Experiment(
    name="sparseloco", title="SparseLoCo", paper="Sarfi, Thérien, Lidin, Belilovsky 2025 (arXiv 2508.15706)",
    claim="SparseLoCo (top-k 3.1% per tile, 2-bit values, decayed error feedback) reaches a loss at "
          "or below DiLoCo's while sending under 0.5 bit per parameter per sync.",
    thresholds=THRESHOLDS, sizes=SIZES, run=run, judge=judge, engines=("sim", "torch"), workers=4,
    setup="A character-level language model on the standard library's own source text; DiLoCo "
          "tuned over its outer learning rate.")
