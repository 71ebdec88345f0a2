"""Data and models for the experiments.  Everything ships with a package
or is generated: scikit-learn's digits and breast cancer, synthetic
heterogeneous least squares, and a character corpus made of the Python
standard library's own source text (no download).  Models are small NumPy
networks over one flat float64 parameter vector (what ``lowband.optim``
updates), with hand-written gradients."""
from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["digits", "breast_cancer", "LeastSquares", "MLP", "CharMLP", "stdlib_corpus",
           "worker_batches", "train_data_parallel"]


# --------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def digits(seed=0, test_fraction=0.25):
    """(x_train, y_train, x_test, y_test): scikit-learn's 8x8 digits scaled
    to [0, 1], a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data = load_digits()
    x = (data.data / 16.0).astype(np.float64)
    xtr, xte, ytr, yte = train_test_split(x, data.target, test_size=test_fraction, random_state=seed,
                                          stratify=data.target)
    return xtr, ytr, xte, yte


@functools.lru_cache(maxsize=2)
def breast_cancer():
    """(A, y): scikit-learn's breast cancer features standardised, labels
    in {-1, +1}."""
    from sklearn.datasets import load_breast_cancer
    data = load_breast_cancer()
    a = data.data.astype(np.float64)
    a = (a - a.mean(axis=0)) / a.std(axis=0)
    return a, 2.0 * data.target.astype(np.float64) - 1.0


class LeastSquares:
    """f(x) = (1/W) sum_i ||A_i x - b_i||^2 / (2 m), W workers whose local
    optima differ (``spread``) so that every local gradient is non-zero at
    the global optimum; ``scales`` multiply worker i's rows (different
    smoothness constants L_i)."""

    def __init__(self, W=4, d=100, m=200, spread=1.0, seed=0, scales=None):
        rng = np.random.default_rng(seed)
        self.W, self.d, self.m = W, d, m
        scales = np.ones(W) if scales is None else np.asarray(scales, dtype=np.float64)
        self.A = [s * rng.standard_normal((m, d)) / np.sqrt(d) for s in scales]
        centre = rng.standard_normal(d)
        self.b = [a @ (centre + spread * rng.standard_normal(d)) + 0.1 * rng.standard_normal(m)
                  for a in self.A]
        big_a, big_b = np.vstack(self.A), np.concatenate(self.b)
        self.x_star = np.linalg.lstsq(big_a, big_b, rcond=None)[0]
        self.L = float(np.linalg.eigvalsh(big_a.T @ big_a / (W * m))[-1])
        self.L_i = [float(np.linalg.eigvalsh(a.T @ a / m)[-1]) for a in self.A]
        self.f_star = self.loss(self.x_star)

    def grad(self, rank, x):
        a = self.A[rank]
        return a.T @ (a @ x - self.b[rank]) / self.m

    def loss(self, x):
        return float(np.mean([np.sum((a @ x - b) ** 2) / (2 * self.m) for a, b in zip(self.A, self.b)]))

    def full_grad(self, x):
        return np.mean([self.grad(r, x) for r in range(self.W)], axis=0)

    def distance(self, x):
        """||x - x*|| / ||x*||."""
        return float(np.linalg.norm(x - self.x_star) / np.linalg.norm(self.x_star))


def stdlib_corpus(chars=200_000, modules=("inspect", "os", "argparse", "typing", "functools")):
    """Text of the standard library's own source (the ``inspect`` and ``os``
    modules first), as int codes over a 96-symbol alphabet: printable ASCII
    32..126 -> 1..95, newline -> 0, anything else -> the code of '?'.
    Returns (codes uint8, alphabet str)."""
    import importlib
    parts, total = [], 0
    for name in modules:
        path = importlib.import_module(name).__file__
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        parts.append(text)
        total += len(text)
        if total >= chars:
            break
    text = "\n".join(parts)[:chars]
    raw = np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8).astype(np.int64)
    codes = np.where(raw == 10, 0, np.where((raw >= 32) & (raw <= 126), raw - 31, ord("?") - 31))
    alphabet = "\n" + "".join(chr(c) for c in range(32, 127))
    return codes.astype(np.uint8), alphabet


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------

def _softmax_xent(logits, y):
    """(mean cross-entropy, dlogits / n, probabilities)."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(-np.mean(np.log(p[np.arange(n), y] + 1e-300)))
    d = p.copy()
    d[np.arange(n), y] -= 1
    return loss, d / n, p


class _FlatModel:
    """A model over one flat float64 parameter vector holding its tensors
    (``self.shapes``) back to back."""

    @property
    def layer_sizes(self):
        return [math.prod(s) for s in self.shapes]

    def unpack(self, flat):
        out, start = [], 0
        for s in self.shapes:
            size = math.prod(s)
            out.append(flat[start:start + size].reshape(s))
            start += size
        return out


class MLP(_FlatModel):
    """ReLU MLP with softmax cross-entropy over a flat parameter vector:
    weight (in, out) then bias per layer, in that order (``shapes``)."""

    def __init__(self, sizes=(64, 64, 10)):
        self.sizes = tuple(sizes)
        self.shapes = []
        for i, o in zip(sizes[:-1], sizes[1:]):
            self.shapes += [(i, o), (o,)]
        self.n = sum(math.prod(s) for s in self.shapes)

    def init(self, seed=0):
        rng = np.random.default_rng(seed)
        parts = [rng.standard_normal(s).ravel() * np.sqrt(2.0 / s[0]) if len(s) == 2 else np.zeros(s[0])
                 for s in self.shapes]
        return np.concatenate(parts)

    def _forward(self, params, x):
        acts, h = [x], x
        for li in range(0, len(params), 2):
            h = h @ params[li] + params[li + 1]
            if li + 2 < len(params):
                h = np.maximum(h, 0)
            acts.append(h)
        return acts

    def loss_grad(self, flat, x, y):
        """(mean cross-entropy, flat gradient) on the batch (x, y)."""
        params = self.unpack(flat)
        acts = self._forward(params, x)
        loss, delta, _ = _softmax_xent(acts[-1], y)
        grads = [None] * len(params)
        for li in range(len(params) - 2, -1, -2):
            grads[li] = acts[li // 2].T @ delta
            grads[li + 1] = delta.sum(axis=0)
            if li > 0:
                delta = (delta @ params[li].T) * (acts[li // 2] > 0)
        return loss, np.concatenate([g.ravel() for g in grads])

    def loss(self, flat, x, y):
        logits = self._forward(self.unpack(flat), x)[-1]
        return _softmax_xent(logits, y)[0]

    def accuracy(self, flat, x, y):
        logits = self._forward(self.unpack(flat), x)[-1]
        return float(np.mean(logits.argmax(axis=1) == y))


class CharMLP(_FlatModel):
    """A character-level language model: the previous ``context`` symbols
    are embedded (``emb`` each), concatenated, passed through one tanh
    hidden layer and a softmax over the ``vocab`` symbols (Bengio et al.'s
    neural LM).  Tensors: embedding (vocab, emb), W1 (context*emb, hidden),
    b1, W2 (hidden, vocab), b2."""

    def __init__(self, vocab=96, context=8, emb=16, hidden=128):
        self.vocab, self.context, self.emb, self.hidden = vocab, context, emb, hidden
        self.shapes = [(vocab, emb), (context * emb, hidden), (hidden,), (hidden, vocab), (vocab,)]
        self.n = sum(math.prod(s) for s in self.shapes)

    def init(self, seed=0):
        rng = np.random.default_rng(seed)
        e, w1, b1, w2, b2 = self.shapes
        return np.concatenate([0.5 * rng.standard_normal(e).ravel(),
                               rng.standard_normal(w1).ravel() / np.sqrt(w1[0]), np.zeros(b1),
                               rng.standard_normal(w2).ravel() / np.sqrt(w2[0]), np.zeros(b2)])

    def windows(self, codes, positions):
        """(x: (n, context) previous symbols, y: (n,) next symbol)."""
        idx = positions[:, None] + np.arange(-self.context, 0)[None, :]
        return codes[idx].astype(np.int64), codes[positions].astype(np.int64)

    def _forward(self, params, x):
        emb, w1, b1, w2, b2 = params
        e = emb[x].reshape(len(x), -1)
        h = np.tanh(e @ w1 + b1)
        return e, h, h @ w2 + b2

    def loss_grad(self, flat, x, y):
        emb, w1, b1, w2, b2 = params = self.unpack(flat)
        e, h, logits = self._forward(params, x)
        loss, d, _ = _softmax_xent(logits, y)
        gw2, gb2 = h.T @ d, d.sum(axis=0)
        dh = (d @ w2.T) * (1 - h * h)
        gw1, gb1 = e.T @ dh, dh.sum(axis=0)
        de = (dh @ w1.T).reshape(len(x), self.context, self.emb)
        gemb = np.zeros_like(emb)
        np.add.at(gemb, x, de)
        return loss, np.concatenate([g.ravel() for g in (gemb, gw1, gb1, gw2, gb2)])

    def loss(self, flat, x, y):
        return _softmax_xent(self._forward(self.unpack(flat), x)[2], y)[0]

    def accuracy(self, flat, x, y):
        return float(np.mean(self._forward(self.unpack(flat), x)[2].argmax(axis=1) == y))

    def evaluate(self, flat, x, y):
        """(mean cross-entropy, accuracy) with one forward pass."""
        logits = self._forward(self.unpack(flat), x)[2]
        return _softmax_xent(logits, y)[0], float(np.mean(logits.argmax(axis=1) == y))


# --------------------------------------------------------------------------
# Data-parallel training loop
# --------------------------------------------------------------------------

def worker_batches(n, rank, world_size, batch, steps, seed=0):
    """Index minibatches of one worker: its shard (every W-th sample),
    reshuffled each epoch with a per-worker seed."""
    shard = np.arange(rank, n, world_size)
    rng = np.random.default_rng([seed, rank])
    order = np.empty(0, dtype=np.int64)
    for _ in range(steps):
        if len(order) < batch:
            order = np.concatenate([order, rng.permutation(shard)])
        idx, order = order[:batch], order[batch:]
        yield idx


def train_data_parallel(comm, model, data, make_opt, steps, batch, eval_every, seed=0, label="",
                        view="params", show=True):
    """Train ``model`` on ``data`` = (x_train, y_train, x_test, y_test),
    each rank on its shard, with ``make_opt(params, comm)``; every
    ``eval_every`` steps (and at the end) record, on the parameters
    ``getattr(opt, view)`` (identical on every rank), the training loss,
    the test accuracy and the bytes this rank has sent.  Returns
    (steps, losses, accuracies, bytes, final parameters)."""
    from .framework import progress
    xtr, ytr, xte, yte = data
    x = model.init(seed)
    opt = make_opt(x, comm)
    rec = ([], [], [], [])

    def record(t):
        # the replicas agree (checked by the caller on the final parameters):
        # rank 0 evaluates for everyone
        p = getattr(opt, view)
        ev = (model.loss(p, xtr, ytr), model.accuracy(p, xte, yte)) if comm.rank == 0 else (None, None)
        for lst, v in zip(rec, (t, *ev, comm.bytes_sent)):
            lst.append(v)

    record(0)
    batches = worker_batches(len(xtr), comm.rank, comm.world_size, batch, steps, seed)
    for t, idx in enumerate(progress(batches, label, steps, enabled=show and comm.rank == 0), 1):
        opt.step(model.loss_grad(x, xtr[idx], ytr[idx])[1])
        if t % eval_every == 0 or t == steps:
            record(t)
    return (*rec, getattr(opt, view).copy())
