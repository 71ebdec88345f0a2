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


def dpsgd_twin(W, X0, grads, steps, lr, compressor=None, gamma=1.0):
    """D-PSGD / CHOCO-SGD for all nodes at once: X is n x d, one row per node."""
    X = X0.copy()
    n = len(X)
    hat = np.zeros_like(X)
    C = None if compressor is None else lowband.from_spec(compressor)
    for t in range(steps):
        G = np.stack([grads[i](X[i]) for i in range(n)])
        if C is None:
            X = W @ X - lr * G
        else:
            X = X - lr * G
            Q = np.stack([_comp(C, X[i] - hat[i], t) for i in range(n)])
            hat = hat + Q
            X = X + gamma * (W @ hat - hat)
    return X


def dadao_twin(topology, L, mu, grads, t_end, seed, comm_rate, x0):
    """DADAO for all nodes in one process: rows of six n x d arrays."""
    from lowband.decentral import dadao_events
    n = topology.n
    nu = mu / 2
    a, at, eta, th = np.sqrt(nu / L) / 4, np.sqrt(nu / L) / 8, np.sqrt(nu / L) / 8, np.sqrt(L / nu) / 2
    M = np.array([[-eta, eta, 0, 0, 0, 0], [eta, -eta, 0, 0, 0, 0], [0, 0, -a, a, 0, 0],
                  [0, -th * nu, -th, 0, -th, 0], [0, 0, 0, 0, -a, a], [0, 0, 0, 0, at, -at]])
    S = np.zeros((n, 6, len(x0)))
    S[:, 0] = x0
    last = np.zeros(n)
    k = topology.dadao_constants()
    chi1s = k["chi1"] / comm_rate if comm_rate > 0 else 0.0
    gam, gamt, dl = 1 / (4 * L), 1 / (4 * np.sqrt(L * nu)), np.sqrt(nu / L) / 4
    bet, bett = 0.5, 2 * chi1s * np.sqrt(L / nu)

    lam, V = np.linalg.eig(M)            # exp(M dt) = V diag(exp(lam dt)) V^-1
    Vinv = np.linalg.inv(V)

    def integrate(i, t):
        S[i] = ((V * np.exp(lam * (t - last[i]))) @ Vinv).real @ S[i]
        last[i] = t
    for t, i, j in dadao_events(n, topology.edges, t_end, n, comm_rate, seed):
        if j < 0:
            integrate(i, t)
            r = grads[i](S[i, 0].copy()) - nu * S[i, 0] - S[i, 3]
            S[i, 0] -= gam * r
            S[i, 1] -= gamt * r
            S[i, 3] += (dl + 1) * r
        else:
            integrate(i, t)
            integrate(j, t)
            m = (S[i, 2] + S[i, 4]) - (S[j, 2] + S[j, 4])
            S[i, 4] -= bet * m
            S[i, 5] -= bett * m
            S[j, 4] += bet * m
            S[j, 5] += bett * m
    return S[:, 0]


def co2_twin(x0, grads, steps, lr, H, outer_lr, mu, staleness, gap_penalty=None, clip=None):
    """CO2 with plain SGD inner steps, all workers in one loop."""
    n = len(grads)
    X = np.tile(x0, (n, 1))
    theta, m = x0.copy(), np.zeros_like(x0)
    start = x0.copy()
    flight = None                      # (average, the anchor its round started from)
    for t in range(1, steps + 1):
        for i in range(n):
            X[i] = X[i] - lr * grads[i](X[i].copy())
        if t % H:
            continue
        avg = X.sum(0) / n
        if staleness == 0:
            use = (avg, start.copy())
        else:
            use, flight = flight, (avg, start.copy())
        if use is not None:
            d = theta - use[0]
            if gap_penalty == "adaptive":
                size = np.linalg.norm(d)
                d = d / (1 + (np.linalg.norm(theta - use[1]) / size if size > 0 else 0))
            elif gap_penalty is not None:
                d = d / gap_penalty
            m = mu * m + d
            if clip is not None:
                m = np.clip(m, -clip, clip)
            theta = theta - outer_lr * m
        X[:] = theta
        start = theta.copy()
    return X
