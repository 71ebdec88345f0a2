"""Just One Byte (per gradient) (Zelikman et al. 2023): distributed
zeroth-order (SPSA/MeZO) training where the machines share seeds, so each
one sends only the projected-gradient scalars of its perturbations and
every machine replays everybody's steps (``lowband.optim.SeedReplayZO``)."""
from __future__ import annotations

import numpy as np

from .. import optim as O
from .data import MLP, digits
from .engines import run_workers
from .framework import Check, Curve, Experiment, Result, progress

THRESHOLDS = {
    "target_loss": 0.8,             # seed replay brings the training loss from ln 10 = 2.30 to <= 0.8
    "max_bytes_ratio": 0.01,        # replay bytes <= 1% of sending the perturbed vectors (d = 650)
    "max_fp16_loss_ratio": 1.05,    # fp16 scalars (the authors' code): loss within 5% of fp64 ones
    "max_replay_difference": 0.0,   # replay and full-vector exchange: bit-identical parameters
}

SIZES = {
    "smoke": {"rounds": 50, "samples": 4, "batch": 32, "lr": 100.0, "eps": 1e-3, "eval_every": 10},
    "quick": {"rounds": 300, "samples": 8, "batch": 64, "lr": 100.0, "eps": 1e-3, "eval_every": 20},
    "full": {"rounds": 2000, "samples": 8, "batch": 64, "lr": 100.0, "eps": 1e-3, "eval_every": 50},
}

LABELS = {"replay": "seed replay, fp64 scalars", "replay_fp16": "seed replay, fp16 scalars",
          "full": "full-vector exchange (reference)", "sgd": "first-order SGD (dense allreduce)"}


def _worker(comm, arm, p, seed, show):
    xtr, ytr, xte, yte = digits()
    m = MLP((64, 10))                       # multinomial logistic regression, d = 650
    x = np.zeros(m.n)
    if arm == "sgd":
        opt = O.SGD(x, 0.5, comm=comm)
    else:
        opt = O.SeedReplayZO(x, comm, lr=p["lr"], eps=p["eps"], samples=p["samples"], seed=seed,
                             mode="full" if arm == "full" else "replay",
                             scalar_dtype="float16" if arm == "replay_fp16" else "float64")
    rng = np.random.default_rng([seed, comm.rank])
    shard = np.arange(comm.rank, len(ytr), comm.world_size)
    rec = ([], [], [], [])

    def record(t):
        ev = (m.loss(x, xtr, ytr), m.accuracy(x, xte, yte)) if comm.rank == 0 else (None, None)
        for lst, v in zip(rec, (t, *ev, comm.bytes_sent)):
            lst.append(v)

    record(0)
    R = p["rounds"]
    for t in progress(range(1, R + 1), f"one-byte: {arm}", R, show and comm.rank == 0):
        idx = rng.choice(shard, p["batch"])
        xb, yb = xtr[idx], ytr[idx]
        if arm == "sgd":
            opt.step(m.loss_grad(x, xb, yb)[1])
        else:
            opt.step(lambda w: m.loss(w, xb, yb))
        if t % p["eval_every"] == 0 or t == R:
            record(t)
    return (*rec, x.copy())


def run(config):
    p = config.params
    arms, metrics, table, finals = {}, {}, {}, {}
    for arm, label in LABELS.items():
        results, sent = run_workers(config, _worker, arm, p, config.seed, config.progress)
        steps, loss, acc, nbytes, x = results[0]
        if any(not np.array_equal(r[4], x) for r in results[1:]):
            raise RuntimeError(f"one-byte: the replicas of arm {arm!r} disagree")
        finals[arm] = x
        arms[arm] = Curve(label, steps, loss, acc, nbytes)
        per_round = sent[0] / (config.workers - 1) / p["rounds"]
        metrics.update({f"{arm}_loss": loss[-1], f"{arm}_accuracy": acc[-1], f"{arm}_bytes": int(sent[0]),
                        f"{arm}_payload_bytes_per_round": per_round})
        table[label] = {"training loss": loss[-1], "test accuracy": acc[-1], "bytes sent per worker": int(sent[0]),
                        "payload bytes per worker per round": per_round}
    metrics["initial_loss"] = arms["replay"].loss[0]
    metrics["replay_vs_full_max_difference"] = float(np.max(np.abs(finals["replay"] - finals["full"])))
    metrics["bytes_ratio"] = metrics["replay_bytes"] / metrics["full_bytes"]
    metrics["fp16_loss_ratio"] = metrics["replay_fp16_loss"] / metrics["replay_loss"]
    return Result(metrics, arms, table=table, notes=[
        f"multinomial logistic regression on scikit-learn digits (d = 650), {config.workers} machines, "
        f"{p['samples']} perturbations per machine per round, each evaluated on the machine's own "
        f"minibatch of {p['batch']}; eps {p['eps']}, lr {p['lr']} (the authors' rule keeps eps in the "
        f"step: effective step lr*eps = {p['lr'] * p['eps']:g})",
        "payload bytes per round: what one machine sends to each peer (the scalars and the lowband "
        "header); the paper quantizes each scalar to 8 bits, the authors' code sends fp16"])


def judge(m, t):
    return [
        Check("reaches_loss", "seed-replay training loss after the run", m["replay_loss"], t["target_loss"],
              m["replay_loss"] <= t["target_loss"],
              "too few rounds at this size: zeroth-order steps need many more rounds than first-order ones"),
        Check("one_scalar_per_sample", "replay bytes / full-vector bytes", m["bytes_ratio"],
              t["max_bytes_ratio"], m["bytes_ratio"] <= t["max_bytes_ratio"], "the header dominates"),
        Check("replay_is_exact", "max |x_replay - x_full|", m["replay_vs_full_max_difference"],
              t["max_replay_difference"], m["replay_vs_full_max_difference"] <= t["max_replay_difference"],
              "the replayed perturbations differ from the generated ones"),
        Check("fp16_scalars", "fp16-scalar loss / fp64-scalar loss", m["fp16_loss_ratio"],
              t["max_fp16_loss_ratio"], m["fp16_loss_ratio"] <= t["max_fp16_loss_ratio"],
              "fp16 rounding of the projected gradients matters at this step size"),
    ]


EXPERIMENT = Experiment(
    name="one-byte", title="Just One Byte (seed-replay zeroth-order)",
    paper="Zelikman et al. 2023 (arXiv 2306.10015)",
    claim="With shared seeds, zeroth-order training reaches the stated loss while each machine sends one "
          "scalar per perturbation, and replaying the scalars gives exactly the parameters that sending "
          "the perturbed vectors would.",
    thresholds=THRESHOLDS, sizes=SIZES, run=run, judge=judge, engines=("sim", "torch"), workers=4,
    setup="Machines exchange only their projected-gradient scalars (allgather) and replay every "
          "machine's perturbations from the shared seed.")
