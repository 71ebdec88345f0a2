"""The character-level language-model task shared by the DiLoCo family
(``diloco``, ``sparseloco``, ``streaming-diloco``): ``CharMLP`` on the
standard library's source text; each worker trains on its own contiguous
share of the training text (as DiLoCo's replicas read different shards);
validation loss and next-character accuracy on held-out text.

An arm is a plain dict (picklable, for the torch engine):
``{"kind": "dp" | "diloco" | "sparseloco" | "streaming", ...}`` with the
inner AdamW's ``lr`` and the outer optimizer's settings."""
from __future__ import annotations

import functools

import numpy as np

from .. import optim as O
from .data import CharMLP, stdlib_corpus
from .framework import Curve, progress

__all__ = ["model", "corpus", "lm_worker", "run_arm"]


def model(p):
    return CharMLP(context=p.get("context", 8), emb=p.get("emb", 16), hidden=p.get("hidden", 128))


@functools.lru_cache(maxsize=4)
def corpus(chars, context, seed, eval_size=2048):
    """(train codes, validation windows (x, y)): the last 10% of the text
    is held out; a fixed sample of ``eval_size`` positions is evaluated."""
    codes, _ = stdlib_corpus(chars)
    cut = int(0.9 * len(codes))
    train, val = codes[:cut], codes[cut:]
    rng = np.random.default_rng(seed + 12345)
    pos = rng.choice(np.arange(context, len(val)), size=min(eval_size, len(val) - context), replace=False)
    m = CharMLP(context=context)
    return train, m.windows(val, np.sort(pos))


def _make(arm, x, comm, shapes, layer_sizes):
    inner = functools.partial(O.AdamW, lr=arm["lr"], weight_decay=arm.get("wd", 0.0))
    kind = arm["kind"]
    if kind == "dp":
        return O.AdamW(x, lr=arm["lr"], weight_decay=arm.get("wd", 0.0), comm=comm)
    if kind == "diloco":
        return O.DiLoCo(x, comm, inner, arm["H"], outer_lr=arm.get("outer_lr", 0.7),
                        outer_momentum=arm.get("outer_momentum", 0.9), nesterov=arm.get("nesterov", True))
    if kind == "sparseloco":
        if arm.get("feedback", True):
            return O.DiLoCo.sparseloco(x, comm, inner, arm["H"], chunk=arm.get("chunk", 4096),
                                       k=arm.get("k", 128), beta=arm.get("beta", 0.95),
                                       tensors=shapes if arm.get("per_tensor", True) else None)
        return O.DiLoCo(x, comm, inner, arm["H"], outer_lr=1.0, outer_momentum=0.0, nesterov=False,
                        compressor=f"chunked:{arm.get('chunk', 4096)}:{arm.get('k', 128)}+lut2bit",
                        aggregate="contributor_mean", tensors=shapes)
    if kind == "streaming":
        blocks = arm.get("blocks")
        layers = layer_sizes if blocks is None else [len(b) for b in np.array_split(np.arange(sum(layer_sizes)),
                                                                                     blocks)]
        return O.DiLoCo.streaming(x, comm, inner, arm["H"], arm["fragments"], layers=layers,
                                  overlap=arm.get("overlap", 1), alpha=arm.get("alpha", 0.5),
                                  compressor=arm.get("compressor", "minifloat:e3m0"),
                                  outer_lr=arm.get("outer_lr", 0.7), outer_momentum=arm.get("outer_momentum", 0.9))
    raise ValueError(f"arm: unknown kind {kind!r}")


def lm_worker(comm, arm, p, seed, show, label):
    """Train one arm on this rank; returns (steps, val losses, val accuracies,
    cumulative bytes sent, per-step bytes sent, final evaluated params)."""
    m = model(p)
    train, (xv, yv) = corpus(p["chars"], m.context, seed)
    share = np.array_split(np.arange(m.context, len(train)), comm.world_size)[comm.rank]
    rng = np.random.default_rng([seed, comm.rank, 7])
    x = m.init(seed)
    opt = _make(arm, x, comm, m.shapes, m.layer_sizes)
    view = "params" if arm["kind"] == "dp" else "x_global"
    steps, losses, accs, sent, per_step = [], [], [], [], []

    def record(t):
        # the replicas agree (checked on the final parameters): rank 0 evaluates
        loss, acc = m.evaluate(getattr(opt, view), xv, yv) if comm.rank == 0 else (None, None)
        steps.append(t)
        losses.append(loss)
        accs.append(acc)
        sent.append(comm.bytes_sent)

    record(0)
    last = 0
    T, batch, every = p["steps"], p["batch"], p["eval_every"]
    for t in progress(range(1, T + 1), label, T, show and comm.rank == 0):
        xb, yb = m.windows(train, rng.choice(share, size=batch))
        opt.step(m.loss_grad(x, xb, yb)[1])
        per_step.append(comm.bytes_sent - last)
        last = comm.bytes_sent
        if t % every == 0 or t == T:
            record(t)
    return steps, losses, accs, sent, per_step, getattr(opt, view).copy()


def run_arm(config, key, arm, label):
    """Run one arm on the engine; returns (Curve, metrics dict)."""
    from .engines import run_workers
    results, total = run_workers(config, lm_worker, arm, config.params, config.seed, config.progress,
                                 f"{config.name}: {key}")
    steps, losses, accs, sent, per_step, x = results[0]
    if any(not np.array_equal(r[5], x) for r in results[1:]):
        raise RuntimeError(f"{config.name}: the replicas of arm {key!r} disagree")
    n = model(config.params).n
    syncs = sum(1 for b in per_step if b > 0)
    out = {"loss": losses[-1], "accuracy": accs[-1], "bytes": int(total[0]),
           "peak_bytes": int(max(per_step) if per_step else 0), "syncs": syncs,
           "bits_per_param_per_sync": 8.0 * total[0] / n / max(syncs, 1),
           "best_loss": min(losses)}
    return Curve(label, steps, losses, accs, sent), out


SIZES = {
    "smoke": {"chars": 50_000, "steps": 90, "batch": 32, "eval_every": 30, "lr": 3e-3, "H": 15},
    "quick": {"chars": 200_000, "steps": 600, "batch": 64, "eval_every": 30, "lr": 3e-3, "H": 15},
    "full": {"chars": 400_000, "steps": 3000, "batch": 64, "eval_every": 100, "lr": 3e-3, "H": 15},
}


def run_arms(config, arms):
    """Run ``arms`` ({key: (label, arm dict)}) in order; returns (curves,
    metrics with keys "<key>_<metric>", report table)."""
    curves, metrics, table = {}, {}, {}
    W = config.workers
    n = model(config.params).n
    for key, (label, arm) in arms.items():
        curve, m = run_arm(config, key, arm, label)
        curves[key] = curve
        # payload per replica per sync: allgather sends one payload to each of
        # the W-1 peers; a ring allreduce sends 2(W-1)/W of the buffer
        per_replica = m["bytes"] / (W - 1) if arm.get("compressor", "x") is not None and arm["kind"] in (
            "sparseloco", "streaming") else m["bytes"]
        m["payload_bits_per_param_per_sync"] = 8.0 * per_replica / n / max(m["syncs"], 1)
        metrics.update({f"{key}_{k}": v for k, v in m.items()})
        table[label] = {"val loss": m["loss"], "val accuracy": m["accuracy"], "syncs": m["syncs"],
                        "bytes sent per worker": m["bytes"], "peak bytes in one step": m["peak_bytes"],
                        "payload bits/param/sync": m["payload_bits_per_param_per_sync"]}
    return curves, metrics, table


def notes(config):
    p = config.params
    m = model(p)
    return [f"CharMLP (context {m.context}, embedding {m.emb}, hidden {m.hidden}; {m.n} parameters, "
            f"tensors {m.shapes}) on {p['chars']:,} characters of the standard library's source "
            f"(inspect.py, os.py, ...), last 10% held out",
            f"{config.workers} workers, each on its own contiguous share of the training text, batch "
            f"{p['batch']} windows, inner AdamW lr {p['lr']} (wd 0), {p['steps']} inner steps per worker "
            f"for every arm (equal compute)",
            "validation loss and next-character accuracy on 2,048 held-out windows, evaluated on the "
            "global parameters"]
