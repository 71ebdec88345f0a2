"""Pure-NumPy twins of lowband.federated and lowband.decentral: one loop over
all clients / nodes, no communicator, written from the papers' update rules
(the federated twins share only the documented sampling rule and the
compressor objects with the code under test)."""
import numpy as np

import lowband


class LeastSquares:
    """Heterogeneous least squares: client i minimises
    0.5/m ||A_i x - b_i||^2, with its own A_i, b_i (shifted optimum) and a
    stochastic gradient on a minibatch drawn from its own generator."""

    def __init__(self, n_clients, d=6, m=12, batch=4, hetero=2.0, seed=0, dtype=np.float64):
        rng = np.random.default_rng(seed)
        self.A = [rng.standard_normal((m, d)) * (1 + i % 3) for i in range(n_clients)]
        opt = [rng.standard_normal(d) * hetero for _ in range(n_clients)]
        self.b = [A @ o + 0.1 * rng.standard_normal(m) for A, o in zip(self.A, opt)]
        self.batch, self.seed, self.dtype, self.d, self.m = batch, seed, dtype, d, m

    def grad_fns(self):
        """Fresh per-client gradient callables (each its own RNG stream)."""
        def make(i):
            rng = np.random.default_rng([self.seed, 1000 + i])
            A, b = self.A[i], self.b[i]

            def g(x):
                idx = rng.choice(self.m, self.batch, replace=False) if self.batch else np.arange(self.m)
                Ab = A[idx]
                return (Ab.T @ (Ab @ x - b[idx]) / len(idx)).astype(self.dtype)
            return g
        return [make(i) for i in range(len(self.A))]

    def full_grad(self, i, x):
        return self.A[i].T @ (self.A[i] @ x - self.b[i]) / self.m

    def solution(self):
        H = sum(A.T @ A for A in self.A) / self.m
        r = sum(A.T @ b for A, b in zip(self.A, self.b)) / self.m
        return np.linalg.solve(H, r)

    def loss(self, x):
        return float(np.mean([0.5 * np.mean((A @ x - b) ** 2) for A, b in zip(self.A, self.b)]))


def sample(N, S, seed, r):
    if S == N:
        return list(range(N))
    return sorted(np.random.default_rng([seed, r]).choice(N, S, replace=False).tolist())


def _comp(compressor, v, r):
    p = compressor.compress(v, step=r) if compressor.randomized else compressor.compress(v)
    return compressor.decompress(p).reshape(-1).astype(v.dtype)


def fed_twin(method, x0, grads, rounds, *, lr, K, S=None, seed=0, server_lr=1.0, weights=None,
             compressor=None, alpha=None, beta=0.2, lam=0.1, rho=0.1, mix=0.5, prox=True):
    """The server model after ``rounds`` rounds of ``method`` with N =
    len(grads) clients, every client simulated in one loop."""
    N = len(grads)
    S = N if S is None else S
    x = x0.copy()
    d = x.size
    c = np.zeros(d)
    ci = [np.zeros(d) for _ in range(N)]
    v = [np.zeros(d) for _ in range(N)]
    gh = [np.zeros(d) for _ in range(N)]
    C = None if compressor is None else lowband.from_spec(compressor)
    for r in range(rounds):
        chosen = sample(N, S, seed, r)
        ups = []
        for i in chosen:
            y = x.copy()
            for _ in range(K):
                if method == "fedspeed":
                    g1 = grads[i](y)
                    nrm = np.linalg.norm(g1)
                    g2 = grads[i](y + rho / nrm * g1) if (rho and mix and nrm > 0) else g1
                    gt = (1 - mix) * g1 + mix * g2 if (rho and mix) else g1
                    y = y - lr * (gt - gh[i] + (y - x) / lam)
                elif method in ("scaffold", "scallion", "scafcom"):
                    y = y - lr * (grads[i](y) - ci[i] + c)
                else:
                    y = y - lr * grads[i](y)
            if method == "fedavg":
                dlt = y - x
                ups.append(dlt if C is None else _comp(C, dlt, r))
            elif method == "scaffold":
                cn = ci[i] - c + (x - y) / (K * lr)
                ups.append((y - x, cn - ci[i]))
                ci[i] = cn
            elif method == "scallion":
                dl = _comp(C, (x - y) / (K * lr) - c, r)
                ci[i] = ci[i] + alpha * dl
                ups.append(dl)
            elif method == "scafcom":
                gbar = (x - y) / (K * lr) + ci[i] - c
                v[i] = (1 - beta) * v[i] + beta * gbar
                dl = _comp(C, v[i] - ci[i], r)
                ci[i] = ci[i] + dl
                ups.append(dl)
            elif method == "fedspeed":
                if prox:
                    gh[i] = gh[i] - (y - x) / lam
                ups.append(y - lam * gh[i])
        if method == "fedavg":
            w = np.ones(N) if weights is None else np.asarray(weights, float)
            ws = w[chosen] / w[chosen].sum()
            x = x + server_lr * sum(wi * u for wi, u in zip(ws, ups))
        elif method == "scaffold":
            x = x + server_lr * sum(u[0] for u in ups) / len(chosen)
            c = c + sum(u[1] for u in ups) / N
        elif method in ("scallion", "scafcom"):
            a = 1.0 if method == "scafcom" else alpha
            tot = sum(ups)
            x = x - server_lr * K * lr * (c + tot / len(chosen))
            c = c + a / N * tot
        elif method == "fedspeed":
            x = x + server_lr * (sum(ups) / len(chosen) - x)
    return x
