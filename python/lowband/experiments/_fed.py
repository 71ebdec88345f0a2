"""Shared pieces of the federated experiments: heterogeneous client splits
of scikit-learn's digits and a training loop over ``lowband.federated``
methods (one client per rank, the server model replicated)."""
from __future__ import annotations

import functools

import numpy as np

from .. import federated as fed
from .data import MLP, digits
from .engines import run_workers
from .framework import Curve, progress

__all__ = ["label_split", "dirichlet_split", "digits_split", "train_federated", "rounds_to",
           "one_blas_thread", "with_one_blas_thread"]


def one_blas_thread():
    """A context in which BLAS uses one thread: the simulator runs one
    Python thread per rank, and a multi-threaded BLAS call in each of them
    oversubscribes the cores many times over (threadpoolctl, which
    scikit-learn installs; without it, nothing changes)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(1)


def with_one_blas_thread(run):
    """An experiment's ``run(config)`` that runs ``run`` inside
    ``one_blas_thread()``."""
    @functools.wraps(run)
    def wrapped(config):
        with one_blas_thread():
            return run(config)
    return wrapped


def label_split(y, clients, classes_per_client=2, seed=0):
    """Client i holds the classes (c_i + k) mod 10 for k < classes_per_client
    (c_i = i * classes_per_client mod 10); each class's samples are dealt
    out among the clients that hold it.  Returns index arrays."""
    rng = np.random.default_rng(seed)
    holders = {c: [] for c in range(10)}
    for i in range(clients):
        for k in range(classes_per_client):
            holders[(i * classes_per_client + k) % 10].append(i)
    parts = [[] for _ in range(clients)]
    for c, hs in holders.items():
        idx = rng.permutation(np.nonzero(y == c)[0])
        for h, chunk in zip(hs, np.array_split(idx, max(1, len(hs)))):
            parts[h].extend(chunk.tolist())
    return [np.array(sorted(p), dtype=np.int64) for p in parts]


def dirichlet_split(y, clients, alpha, seed=0, min_size=5):
    """Each class split among the clients by Dirichlet(alpha) proportions
    (redrawn until every client holds at least ``min_size`` samples)."""
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts = [[] for _ in range(clients)]
        for c in range(10):
            idx = rng.permutation(np.nonzero(y == c)[0])
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(idx)).astype(int)[:-1]
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.array(sorted(p), dtype=np.int64) for p in parts]
    raise RuntimeError("dirichlet_split: could not give every client min_size samples")


def _worker(comm, method, args, kwargs, split, hidden, rounds, batch, eval_every, seed, label, show):
    xtr, ytr, xte, yte = digits()
    model = MLP((64, 10) if not hidden else (64, hidden, 10))
    idx = split[comm.rank]
    rng = np.random.default_rng([seed, 17, comm.rank])

    def grad(y):
        b = rng.choice(idx, min(batch, len(idx)), replace=False)
        return model.loss_grad(y, xtr[b], ytr[b])[1]

    x = model.init(seed)
    opt = getattr(fed, method)(x, comm, *args, **kwargs)
    rec = ([], [], [], [])

    def record(r):
        if comm.rank == 0:
            for lst, v in zip(rec, (r, model.loss(x, xtr, ytr), model.accuracy(x, xte, yte),
                                    opt.bytes_up // comm.world_size)):
                lst.append(v)
    record(0)
    for r in progress(range(1, rounds + 1), label, rounds, enabled=show and comm.rank == 0):
        opt.round(grad)
        if r % eval_every == 0 or r == rounds:
            record(r)
    return rec, x.copy(), opt.bytes_up, opt.bytes_down


def digits_split(config, alpha=None):
    """One index array into digits' training set per worker
    (``config.workers``, seeded by ``config.seed``): ``label_split`` with 2
    classes per client, or ``dirichlet_split`` with ``alpha`` when given."""
    ytr = digits()[1]
    if alpha is None:
        return label_split(ytr, config.workers, 2, config.seed)
    return dirichlet_split(ytr, config.workers, alpha, config.seed)


def train_federated(config, label, method, *args, split, rounds, batch=32, eval_every=5, hidden=0,
                    **kwargs):
    """Run ``lowband.federated.<method>(params, comm, *args, **kwargs)`` for
    ``rounds`` rounds with one client per rank on ``split`` (index arrays of
    the digits training set).  Returns (Curve of training loss, test
    accuracy and uplink bytes per client, final params, total uplink bytes,
    total downlink bytes)."""
    results, _ = run_workers(config, _worker, method, args, kwargs, split, hidden, rounds, batch,
                             eval_every, config.seed, f"{config.name}: {label}", config.progress)
    (steps, loss, acc, nbytes), x, up, down = results[0]
    if any(not np.array_equal(r[1], x) for r in results[1:]):
        raise RuntimeError(f"{config.name}: the server replicas of arm {label!r} disagree")
    return Curve(label, steps, loss, acc, nbytes), x, up, down


def rounds_to(curve, target):
    """The first recorded round whose test accuracy reaches ``target``
    (inf when none does)."""
    for s, a in zip(curve.steps, curve.accuracy):
        if a >= target:
            return s
    return float("inf")
