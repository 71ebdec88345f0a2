"""Natural dithering (Horvath et al. 2019, "Natural Compression for
Distributed Deep Learning"): random dithering onto power-of-two levels is
unbiased and has far lower variance than uniform (QSGD-style) dithering
with the same number of levels, so unbiased compressed SGD trains like
full-precision SGD at a few bits per coordinate."""
from __future__ import annotations

import numpy as np

from .. import optim as O
from ..quantize import dither
from ..sim import reduce_payloads
from .._payload import Dense
from .data import MLP, digits, train_data_parallel
from ._loops import run_arms
from .framework import Check, Experiment, Result

THRESHOLDS = {
    "levels": 8,                     # s for both partitions (max norm)
    "max_variance_ratio": 0.5,       # natural's relative variance <= 0.5 x linear's at equal s
    "max_mean_z2": 1.3,              # mean over coordinates of (bias / standard error)^2
                                     # (1 when unbiased; a max over thousands of z is not a test)
    "max_loss_ratio": 1.25,          # SGD on natural-dithered gradients: loss <= 1.25 x fp32 SGD's
    "max_bytes_fraction": 0.25,      # at <= 25% of the fp32 bytes
}

SIZES = {
    "smoke": {"steps": 60, "hidden": 32, "batch": 32, "lr": 0.05, "eval_every": 20, "draws": 100},
    "quick": {"steps": 300, "hidden": 64, "batch": 32, "lr": 0.05, "eval_every": 25, "draws": 400},
    "full": {"steps": 2000, "hidden": 128, "batch": 32, "lr": 0.05, "eval_every": 100, "draws": 1000},
}

LABELS = {"fp32": "SGD, fp32 gradients (allgather)", "natural": "SGD, natural dithering (s = 8)",
          "linear": "SGD, linear dithering (s = 8)"}


class _DitheredSGD:
    """SGD with momentum on the mean of every rank's dithered gradient
    (allgather of the payloads: unbiased compression needs no feedback)."""

    def __init__(self, x, comm, lr, partition, seed):
        self.params = x
        self.comm, self.partition, self.seed, self.t = comm, partition, seed, 0
        self.inner = O.SGD(x, lr, momentum=0.9)

    def step(self, g):
        if self.partition is None:
            p = Dense(g.astype(np.float32))
        else:
            p = dither(g, THRESHOLDS["levels"], partition=self.partition,
                       seed=self.seed + 1000 * self.comm.rank, step=self.t)
        self.t += 1
        avg = reduce_payloads(self.comm.allgather(p), "mean").astype(g.dtype)
        self.inner.step(avg)


def _worker(comm, arm, p, seed, show):
    part = {"fp32": None, "natural": "natural", "linear": "linear"}[arm]
    return train_data_parallel(comm, MLP((64, p["hidden"], 10)), digits(),
                               lambda x, c: _DitheredSGD(x, c, p["lr"], part, seed), p["steps"],
                               p["batch"], p["eval_every"], seed, label=f"dithering: {arm}", show=show)


def _gradient(p, seed):
    """A real gradient: the MLP's at its initialisation on one batch."""
    model = MLP((64, p["hidden"], 10))
    xtr, ytr, _, _ = digits()
    idx = np.random.default_rng(seed).choice(len(xtr), 64, replace=False)
    return model.loss_grad(model.init(seed), xtr[idx], ytr[idx])[1]


def run(config):
    p = config.params
    s = THRESHOLDS["levels"]
    g = _gradient(p, config.seed)
    metrics, stats = {}, {}
    for part in ("natural", "linear"):
        draws = np.stack([dither(g, s, partition=part, seed=config.seed, step=k).dequantize()
                          for k in range(p["draws"])])
        se = draws.std(axis=0) / np.sqrt(len(draws))
        live = se > 0
        z = (draws.mean(axis=0) - g)[live] / se[live]
        worst = float(np.mean(z * z))
        var = np.mean(np.sum((draws - g) ** 2, axis=1)) / np.sum(g * g)
        bpe = np.mean([8 * dither(g, s, partition=part, seed=1, step=k).nbytes / g.size for k in range(5)])
        metrics.update({f"{part}_rel_variance": var, f"{part}_bias_z2": worst, f"{part}_bits": bpe})
        stats[f"{part} dithering, s = {s}"] = {"relative variance E|D(g)-g|^2/|g|^2": var,
                                               "mean (bias / standard error)^2": worst,
                                               "bits per element (wire)": bpe}
    arms, trained, rows = run_arms(config, "dithering", _worker, LABELS, p, config.seed, config.progress)
    metrics.update(trained)
    table = {**stats, **rows}
    metrics["variance_ratio"] = metrics["natural_rel_variance"] / metrics["linear_rel_variance"]
    metrics["loss_ratio"] = metrics["natural_loss"] / metrics["fp32_loss"]
    metrics["bytes_fraction"] = metrics["natural_bytes"] / metrics["fp32_bytes"]
    return Result(metrics, arms, table=table, notes=[
        f"statistics: one real gradient (MLP 64-{p['hidden']}-10 at initialisation, 64 digits), "
        f"{p['draws']} seeded draws per partition, max norm",
        f"training: {config.workers} workers, batch {p['batch']} each, SGD lr {p['lr']} momentum 0.9 "
        f"on the mean of the allgathered payloads, {p['steps']} steps; no error feedback (unbiased)",
        "bits per element include the Elias-gamma codes and the payload header"])


def judge(m, t):
    return [
        Check("unbiased", "mean over coordinates of (bias / standard error)^2, both partitions",
              [m["natural_bias_z2"], m["linear_bias_z2"]], t["max_mean_z2"],
              max(m["natural_bias_z2"], m["linear_bias_z2"]) <= t["max_mean_z2"],
              "a biased rounding"),
        Check("natural_lower_variance", "natural / linear relative variance at equal levels",
              m["variance_ratio"], t["max_variance_ratio"], m["variance_ratio"] <= t["max_variance_ratio"],
              "the gradient's magnitudes are too uniform for power-of-two levels to help"),
        Check("trains_like_fp32", "natural-dithered SGD loss / fp32 SGD loss", m["loss_ratio"],
              t["max_loss_ratio"], m["loss_ratio"] <= t["max_loss_ratio"],
              "the dithering variance slows SGD at this learning rate"),
        Check("fraction_of_bytes", "natural-dithered bytes / fp32 bytes", m["bytes_fraction"],
              t["max_bytes_fraction"], m["bytes_fraction"] <= t["max_bytes_fraction"],
              "the gamma codes of the high levels are long"),
    ]


EXPERIMENT = Experiment(
    name="dithering", title="Natural dithering",
    paper="Horvath et al. 2019 (arXiv 1905.10988); BytePS",
    claim="Natural dithering is unbiased, has much lower variance than linear (QSGD-style) dithering "
          "with the same number of levels, and SGD on naturally dithered gradients trains like fp32 "
          "SGD at a fraction of the bits.",
    thresholds=THRESHOLDS, sizes=SIZES, run=run, judge=judge, engines=("sim", "torch"), workers=4,
    setup="Statistics of lowband.dither on a real MLP gradient, then data-parallel SGD on "
          "scikit-learn's digits with dithered gradients (no error feedback); the replicas stay "
          "identical (checked).")
