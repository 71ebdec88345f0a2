"""DiLoCo (Douillard et al. 2023): replicas that take H local AdamW steps
between outer Nesterov steps on the averaged outer gradient train as well
as data-parallel AdamW at equal compute, while communicating H times less."""
from __future__ import annotations

from . import lm
from .framework import Check, Experiment, Result

THRESHOLDS = {
    "max_loss_ratio": 1.02,      # DiLoCo's validation loss <= 1.02 x data-parallel's
    "max_bytes_ratio": 1.05,     # bytes <= 1.05 / H x data-parallel's
}

SIZES = lm.SIZES


def run(config):
    p = config.params
    arms = {"dp": ("data-parallel AdamW (allreduce every step)", {"kind": "dp", "lr": p["lr"]}),
            "diloco": (f"DiLoCo H={p['H']} (outer Nesterov 0.7, 0.9)",
                       {"kind": "diloco", "lr": p["lr"], "H": p["H"]})}
    curves, m, table = lm.run_arms(config, arms)
    m["loss_ratio"] = m["diloco_loss"] / m["dp_loss"]
    m["bytes_ratio_times_H"] = m["diloco_bytes"] / m["dp_bytes"] * p["H"]
    return Result(m, curves, metric="validation loss", log_loss=False, table=table, notes=lm.notes(config))


def judge(m, t):
    return [
        Check("matches_dp", "DiLoCo val loss / data-parallel val loss", m["loss_ratio"], t["max_loss_ratio"],
              m["loss_ratio"] <= t["max_loss_ratio"],
              "at this scale the H local steps drift apart on the replicas' different text shares"),
        Check("h_times_fewer_bytes", "DiLoCo bytes / data-parallel bytes x H", m["bytes_ratio_times_H"],
              t["max_bytes_ratio"], m["bytes_ratio_times_H"] <= t["max_bytes_ratio"],
              "the outer step sends more than one dense allreduce per H steps"),
    ]


EXPERIMENT = Experiment(
    name="diloco", title="DiLoCo", paper="Douillard et al. 2023 (arXiv 2311.08105)",
    claim="DiLoCo (H local AdamW steps, outer Nesterov SGD on the averaged outer gradient) reaches "
          "data-parallel training's loss at equal compute while communicating H times less.",
    thresholds=THRESHOLDS, sizes=SIZES, run=run, judge=judge, engines=("sim", "torch"), workers=4,
    setup="A character-level language model on the standard library's own source text.")
