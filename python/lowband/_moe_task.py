"""A synthetic compositional task for comparing MoE and Chain-of-Experts.

P primitive maps f_p(u) = tanh(A_p u) (A_p random orthogonal times 1.5).  A
token of domain (a, b), a != b, carries one-hot codes of a and b followed by
a random u in R^dim; its target is f_b(f_a(u)): "apply a, then b".  A model
reads its prediction from the u-part of its output (the residual stream).

``train(model, task, ...)`` runs Adam on the mean squared error plus the
model's auxiliary losses and returns the test-loss history.  Everything is
small enough for a test (seconds on one core).
"""
from __future__ import annotations

import numpy as np


class CompositionalTask:
    def __init__(self, num_primitives=4, dim=8, seed=0):
        rng = np.random.default_rng(seed)
        self.P, self.dim = num_primitives, dim
        self.maps = []
        for _ in range(num_primitives):
            q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
            self.maps.append(1.5 * q)
        self.domains = [(a, b) for a in range(num_primitives) for b in range(num_primitives)
                        if a != b]
        self.d_model = 2 * num_primitives + dim

    @property
    def num_domains(self):
        return len(self.domains)

    def apply(self, p, u):
        return np.tanh(u @ self.maps[p].T)

    def batch(self, T, rng):
        """(x [T, d_model], target [T, dim], domain [T])."""
        d = rng.integers(self.num_domains, size=T)
        u = rng.standard_normal((T, self.dim))
        x = np.zeros((T, self.d_model))
        target = np.empty((T, self.dim))
        for i, (a, b) in enumerate(self.domains):
            rows = d == i
            x[rows, a] = 1.0
            x[rows, self.P + b] = 1.0
            target[rows] = self.apply(b, self.apply(a, u[rows]))
        x[:, 2 * self.P:] = u
        return x, target, d


class Adam:
    """Plain Adam over a dict of arrays (in place)."""

    def __init__(self, params, lr=3e-3, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = {n: np.zeros_like(p) for n, p in params.items()}
        self.v = {n: np.zeros_like(p) for n, p in params.items()}
        self.t = 0

    def step(self, grads):
        self.t += 1
        b1, b2 = self.betas
        for n, p in self.params.items():
            g = grads[n]
            self.m[n] = b1 * self.m[n] + (1 - b1) * g
            self.v[n] = b2 * self.v[n] + (1 - b2) * g * g
            mh = self.m[n] / (1 - b1 ** self.t)
            vh = self.v[n] / (1 - b2 ** self.t)
            p -= self.lr * mh / (np.sqrt(vh) + self.eps)


class Residual:
    """x + layer(x): puts a MoELayer on the residual stream like CoE."""

    def __init__(self, layer):
        self.layer = layer
        self.params, self.grads = layer.params, layer.grads

    @property
    def aux_loss(self):
        return self.layer.aux_loss

    def forward(self, x, mask=None):
        return x + self.layer.forward(x, mask)

    def zero_grad(self):
        self.layer.zero_grad()

    def backward(self, g):
        return g + self.layer.backward(g)


def mse(model, task, x, target):
    pred = model.forward(x)[:, 2 * task.P:]
    return float(((pred - target) ** 2).mean())


def train(model, task, steps=300, batch=256, lr=3e-3, seed=1, test_tokens=2048):
    """Trains ``model`` (forward/backward/params/grads/aux_loss) on the task
    with Adam; returns (test MSE before, test MSE after, history)."""
    rng = np.random.default_rng(seed)
    xt, yt, _ = task.batch(test_tokens, np.random.default_rng(seed + 1000))
    opt = Adam(model.params, lr=lr)
    before = mse(model, task, xt, yt)
    history = []
    for step in range(steps):
        x, y, _ = task.batch(batch, rng)
        out = model.forward(x)
        g = np.zeros_like(out)
        g[:, 2 * task.P:] = 2.0 * (out[:, 2 * task.P:] - y) / y.size
        model.zero_grad()
        model.backward(g)
        opt.step(model.grads)
        if (step + 1) % 50 == 0:
            history.append(mse(model, task, xt, yt))
    return before, mse(model, task, xt, yt), history
