"""Decentralized training over a lowband communicator: one node per rank,
messages only along the edges of a ``Topology``.

``Topology``      undirected graphs (ring, 2-D torus, exponential, complete,
                  seeded random regular, or any symmetric adjacency) with the
                  Metropolis-Hastings mixing matrix W (symmetric, doubly
                  stochastic), its spectral gap 1 - max(|lambda_2|,
                  |lambda_n|), the Laplacian and DADAO's graph quantities.
``DPSGD``         D-PSGD (Lian et al. 2017, arXiv 1705.09056):
                  x_i <- sum_j W_ij x_j - lr g_i(x_i); with a ``compressor``,
                  CHOCO-SGD's compressed gossip (Koloskova et al. 2019,
                  arXiv 1902.00340).
``DADAO``         DADAO (Nabli and Oyallon, ICML 2023, arXiv 2208.00779):
                  gradient and gossip events on independent Poisson clocks,
                  simulated in event time.
``DIMAT``         DIMAT (Saadati et al., CVPR 2024, arXiv 2404.08079):
                  neighbours' MLPs aligned by activation matching
                  (Hungarian assignment of hidden units), then averaged
                  with W's weights; local SGD between merges.
``final_merge``   one global average at the end of decentralized training
                  ("A Single Merging Suffices").

Messages travel with ``comm.neighbor_exchange`` (``lowband.sim``): each
payload counted once per neighbour; ``Cluster.link_bytes`` holds the bytes
per directed link.  Every rank makes the same sequence of
``neighbor_exchange`` calls (a rank with nothing to send in an event passes
``neighbors=[]``).
"""
from __future__ import annotations

import math

import numpy as np

from ._payload import Dense
from ._validate import check_finite_number, check_int, check_seed
from .compressors import from_spec
from .optim import Optimizer, _check_lr, _check_params
from .sim import decoded

__all__ = ["Topology", "DPSGD", "DADAO", "DIMAT", "final_merge", "mlp_forward", "mlp_permute",
           "mlp_align", "dadao_events"]


# --------------------------------------------------------------------------
# Topologies
# --------------------------------------------------------------------------

class Topology:
    """An undirected graph on n nodes (no self-loops) and its mixing matrix.

    ``Topology(adjacency, name=...)`` takes any symmetric 0/1 matrix; the
    constructors ``ring``, ``torus``, ``exponential``, ``complete`` and
    ``random_regular`` build the usual ones.  Attributes: ``n``,
    ``adjacency`` (bool), ``edges`` (i < j, sorted), ``degrees``,
    ``mixing`` (Metropolis-Hastings: W_ij = 1/(1 + max(deg_i, deg_j)) on
    edges, the diagonal completing each row to 1; a ring gets 1/3, a torus
    1/5), ``spectral_gap``, ``laplacian``; ``neighbors(i)``.
    """

    def __init__(self, adjacency, name="custom"):
        A = np.asarray(adjacency)
        if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] < 1:
            raise ValueError(f"adjacency: expected a square n x n matrix, got shape {A.shape}")
        if not np.all((A == 0) | (A == 1)):
            raise ValueError("adjacency: expected 0/1 entries")
        A = A.astype(bool)
        if not np.array_equal(A, A.T):
            raise ValueError("adjacency: expected a symmetric matrix (an undirected graph)")
        if A.diagonal().any():
            raise ValueError("adjacency: expected no self-loops (a zero diagonal)")
        self.adjacency = A
        self.name = str(name)
        self.n = A.shape[0]
        self.degrees = A.sum(1).astype(int)
        self.edges = [(int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(A, 1)))]
        deg = self.degrees
        W = np.zeros((self.n, self.n))
        for i, j in self.edges:
            W[i, j] = W[j, i] = 1.0 / (1 + max(deg[i], deg[j]))
        W[np.diag_indices(self.n)] = 1.0 - W.sum(1)
        self.mixing = W
        self.laplacian = np.diag(deg).astype(float) - A.astype(float)

    # -- constructors ----------------------------------------------------
    @classmethod
    def ring(cls, n):
        """i ~ i +- 1 (mod n)."""
        n = check_int(n, "n", 1)
        return cls._from_pairs(n, [(i, (i + 1) % n) for i in range(n)], f"ring({n})")

    @classmethod
    def torus(cls, rows, cols):
        """The rows x cols 2-D torus (node r*cols + c; wrap-around in both
        directions)."""
        rows, cols = check_int(rows, "rows", 1), check_int(cols, "cols", 1)
        pairs = []
        for r in range(rows):
            for c in range(cols):
                i = r * cols + c
                pairs += [(i, r * cols + (c + 1) % cols), (i, ((r + 1) % rows) * cols + c)]
        return cls._from_pairs(rows * cols, pairs, f"torus({rows}x{cols})")

    @classmethod
    def exponential(cls, n):
        """The static exponential graph (Ying et al. 2021, arXiv 2110.13363),
        symmetrised: i ~ i + 2^k (mod n) for k < ceil(log2 n)."""
        n = check_int(n, "n", 1)
        K = max(0, math.ceil(math.log2(n))) if n > 1 else 0
        return cls._from_pairs(n, [(i, (i + 2 ** k) % n) for i in range(n) for k in range(K)],
                               f"exponential({n})")

    @classmethod
    def complete(cls, n):
        n = check_int(n, "n", 1)
        return cls(~np.eye(n, dtype=bool), f"complete({n})")

    @classmethod
    def random_regular(cls, n, degree, seed=0):
        """A connected random ``degree``-regular graph (the pairing model,
        redrawn until simple and connected), reproducible from ``seed``."""
        n = check_int(n, "n", 2)
        degree = check_int(degree, "degree", 1, n - 1)
        if n * degree % 2:
            raise ValueError(f"degree: n * degree must be even, got n={n}, degree={degree}")
        rng = np.random.default_rng(check_seed(seed))
        for _ in range(10000):
            stubs = rng.permutation(np.repeat(np.arange(n), degree)).reshape(-1, 2)
            if np.any(stubs[:, 0] == stubs[:, 1]):
                continue
            A = np.zeros((n, n), dtype=bool)
            keys = {(min(a, b), max(a, b)) for a, b in stubs.tolist()}
            if len(keys) != len(stubs):
                continue
            for a, b in keys:
                A[a, b] = A[b, a] = True
            t = cls(A, f"random_regular({n}, {degree}, seed={seed})")
            if t.connected:
                return t
        raise ValueError(f"degree: no connected simple {degree}-regular graph on {n} nodes found")

    @classmethod
    def _from_pairs(cls, n, pairs, name):
        A = np.zeros((n, n), dtype=bool)
        for i, j in pairs:
            if i != j:
                A[i, j] = A[j, i] = True
        return cls(A, name)

    # -- queries -----------------------------------------------------------
    def neighbors(self, i):
        i = check_int(i, "i", 0, self.n - 1)
        return [int(j) for j in np.nonzero(self.adjacency[i])[0]]

    @property
    def connected(self):
        seen, todo = {0}, [0]
        while todo:
            for j in self.neighbors(todo.pop()):
                if j not in seen:
                    seen.add(j)
                    todo.append(j)
        return len(seen) == self.n

    @property
    def spectral_gap(self):
        """1 - max(|lambda_2(W)|, |lambda_n(W)|): the per-step contraction
        of gossip is 1 - gap (0 for one node: averaging is immediate)."""
        if self.n == 1:
            return 1.0
        ev = np.sort(np.abs(np.linalg.eigvalsh(self.mixing)))[::-1]
        return float(1.0 - ev[1])

    # -- DADAO's graph quantities ------------------------------------------
    def dadao_constants(self):
        """DADAO's communication-rate rule for uniformly sampled edges:
        L_norm = Laplacian / |E|; chi1 = 1/lambda_2^+(L_norm); chi2 =
        max over edges of (1/2)(e_i - e_j)^T L_norm^+ (e_i - e_j);
        comm_rate = sqrt(2 chi1 chi2) (edge events per unit time).
        Returns {"chi1", "chi2", "comm_rate"}."""
        if not self.edges or not self.connected:
            raise ValueError(f"topology: DADAO needs a connected graph with edges, got {self.name}")
        Ln = self.laplacian / len(self.edges)
        ev = np.linalg.eigvalsh(Ln)
        chi1 = 1.0 / ev[1]
        pinv = np.linalg.pinv(Ln)
        chi2 = max(0.5 * (pinv[i, i] + pinv[j, j] - 2 * pinv[i, j]) for i, j in self.edges)
        return {"chi1": float(chi1), "chi2": float(chi2), "comm_rate": float(math.sqrt(2 * chi1 * chi2))}

    def __repr__(self):
        return f"Topology({self.name}, n={self.n}, edges={len(self.edges)}, gap={self.spectral_gap:.4g})"


def _check_topology(topology, comm):
    if not isinstance(topology, Topology):
        raise TypeError(f"topology: expected a lowband.decentral.Topology, got {type(topology).__name__}")
    if topology.n != comm.world_size:
        raise ValueError(f"topology: expected {comm.world_size} nodes (one per rank), got {topology.n}")
    return topology


# --------------------------------------------------------------------------
# D-PSGD and CHOCO-SGD
# --------------------------------------------------------------------------

class DPSGD(Optimizer):
    """Decentralized SGD on ``topology`` (W = ``topology.mixing``).

    ``compressor=None`` (D-PSGD, Lian et al. 2017): each step sends x_i to
    every neighbour (dense) and sets x_i <- sum_j W_ij x_j - lr grad, the
    gradient taken at the x_i before gossip.

    ``compressor`` given (CHOCO-SGD, Koloskova et al. 2019): x_i <- x_i -
    lr grad; q_i = C(x_i - xhat_i) goes to the neighbours; every node adds
    q_j to its copy xhat_j for j in N(i) and itself; x_i <- x_i + gamma
    sum_j W_ij (xhat_j - xhat_i).  The copies start at 0; randomised
    compressors use step = t.  With the identity and gamma = 1 this is
    adapt-then-combine D-PSGD.
    """

    def __init__(self, params, comm, topology, lr, *, compressor=None, gamma=1.0):
        super().__init__(params, comm)
        self.topology = _check_topology(topology, self.comm)
        self.lr = _check_lr(lr)
        self.compressor = None if compressor is None else from_spec(compressor)
        self.gamma = check_finite_number(gamma, "gamma", 0.0, 1.0, lo_open=True)
        self.neighbors = topology.neighbors(self.comm.rank)
        self.weights = topology.mixing[self.comm.rank]
        if self.compressor is not None:
            self.hat = self._new_state("hat")
            self.hat_neighbors = np.zeros((len(self.neighbors), self.flat.size), dtype=self.flat.dtype)
            self._arrays["hat_neighbors"] = self.hat_neighbors

    def _hyper(self):
        return {"lr": self.lr, "topology": self.topology.name,
                "compressor": None if self.compressor is None else self.compressor.spec,
                "gamma": self.gamma}

    def step(self, grad):
        g = self._grad(grad)
        x, f = self.flat, self.flat.dtype.type
        if self.compressor is None:
            got = self.comm.neighbor_exchange(Dense(x.copy()), self.neighbors)
            mixed = f(self.weights[self.comm.rank]) * x
            for j in self.neighbors:
                mixed += f(self.weights[j]) * decoded(got[j]).astype(x.dtype, copy=False)
            x[:] = mixed - f(self.lr) * g
        else:
            x -= f(self.lr) * g
            c = self.compressor
            q = c.compress(x - self.hat, step=self.t) if c.randomized else c.compress(x - self.hat)
            got = self.comm.neighbor_exchange(q, self.neighbors)
            self.hat += decoded(q).astype(x.dtype, copy=False)
            corr = np.zeros_like(x)
            for k, j in enumerate(self.neighbors):
                self.hat_neighbors[k] += decoded(got[j]).astype(x.dtype, copy=False)
                corr += f(self.weights[j]) * (self.hat_neighbors[k] - self.hat)
            x += f(self.gamma) * corr
        self.t += 1


def final_merge(params, comm):
    """One global average at the end of decentralized training ("A Single
    Merging Suffices"): params <- mean over ranks (a dense allreduce),
    in place; returns params."""
    p = _check_params(params)
    p.reshape(-1)[:] = comm.allreduce(p.reshape(-1).copy(), "mean")
    return p


# --------------------------------------------------------------------------
# DADAO
# --------------------------------------------------------------------------

def dadao_events(n, edges, t_end, grad_rate, comm_rate, seed):
    """The merged event list of DADAO up to time ``t_end``: gradient events
    (a Poisson process of rate ``grad_rate``, each at a uniform node) and
    communication events (rate ``comm_rate``, each on a uniform edge),
    drawn from independent streams of ``seed`` so that a longer horizon
    extends the same prefix.  Returns a list of (time, node i, node j)
    with j = -1 for a gradient event, sorted by time."""
    out = []
    for kind, rate, stream in (("grad", grad_rate, 1), ("comm", comm_rate, 2)):
        if rate <= 0:
            continue
        rng = np.random.default_rng([seed, stream])
        t = 0.0
        while True:
            t += rng.exponential(1.0 / rate)
            if t > t_end:
                break
            if kind == "grad":
                out.append((t, int(rng.integers(n)), -1))
            else:
                i, j = edges[int(rng.integers(len(edges)))]
                out.append((t, i, j))
    out.sort(key=lambda e: e[0])
    return out


def dadao_ode(L, mu):
    """DADAO's 6 x 6 linear dynamics between events on the stack
    [X, X~, Y, Y~, Z, Z~] (nu = mu/2): X' = eta(X~ - X), X~' = eta(X - X~),
    Y' = a(Y~ - Y), Y~' = -theta(nu X~ + Y + Z), Z' = a(Z~ - Z),
    Z~' = a~(Z - Z~), with a = sqrt(nu/L)/4, a~ = eta = sqrt(nu/L)/8,
    theta = sqrt(L/nu)/2."""
    nu = mu / 2
    a, at = 0.25 * math.sqrt(nu / L), 0.125 * math.sqrt(nu / L)
    eta, theta = 0.125 * math.sqrt(nu / L), 0.5 * math.sqrt(L / nu)
    M = np.zeros((6, 6))
    M[0, 0], M[0, 1], M[1, 0], M[1, 1] = -eta, eta, eta, -eta
    M[2, 2], M[2, 3] = -a, a
    M[3, 1], M[3, 2], M[3, 4] = -theta * nu, -theta, -theta
    M[4, 4], M[4, 5], M[5, 4], M[5, 5] = -a, a, at, -at
    return M


def _expm(A):
    """exp(A) of a small matrix: scaling and squaring with a degree-16
    Taylor polynomial (|A|/2^s <= 1/2: truncation below 1e-20)."""
    norm = float(np.abs(A).sum(0).max())
    s = max(0, math.ceil(math.log2(norm / 0.5))) if norm > 0 else 0
    B = A / (2.0 ** s)
    E = np.eye(len(A))
    term = np.eye(len(A))
    for k in range(1, 17):
        term = term @ B / k
        E = E + term
    for _ in range(s):
        E = E @ E
    return E


class DADAO(Optimizer):
    """DADAO (Nabli and Oyallon 2023) for L-smooth, mu-strongly convex f_i.

    Each rank holds X (= params), X~, Y, Y~, Z, Z~ (all but X start at 0).
    ``run(grad_fn, t_end)`` plays the events of ``dadao_events`` up to
    ``t_end`` (the same list on every rank, from ``seed``):

    - between events a node's stack follows ``dadao_ode``, applied exactly
      as expm(M dt) when the node next takes part in an event;
    - gradient event at node i: r = grad_fn(X) - nu X - Y~; X -= gamma r;
      X~ -= gamma~ r; Y~ += (delta + delta~) r, with gamma = 1/(4L),
      gamma~ = 1/(4 sqrt(L nu)), delta = sqrt(nu/L)/4, delta~ = 1;
    - communication event on edge (i, j): i and j exchange Y + Z (one dense
      vector each way, ``neighbor_exchange``; the other ranks pass []);
      m = (Y + Z)_self - (Y + Z)_other; Z -= beta m; Z~ -= beta~ m, with
      beta = 1/2, beta~ = 2 chi1* sqrt(L/nu), chi1* = chi1 / comm_rate.

    Rates: gradient events at total rate n (one per node per unit time);
    communication events at ``comm_rate`` (default the rule
    sqrt(2 chi1 chi2) of ``Topology.dadao_constants``; 0 turns gossip off,
    and each X_i then goes to argmin f_i).  X is the value after the node's
    last event.  Counters: ``gradients`` (this node's), ``messages`` (sent).
    """

    def __init__(self, params, comm, topology, *, L, mu, seed=0, comm_rate=None):
        super().__init__(params, comm)
        self.topology = _check_topology(topology, self.comm)
        self.L = check_finite_number(L, "L", 0.0, lo_open=True)
        self.mu = check_finite_number(mu, "mu", 0.0, self.L, lo_open=True)
        self.seed = check_seed(seed)
        consts = topology.dadao_constants() if topology.edges else {"chi1": 0.0, "chi2": 0.0,
                                                                    "comm_rate": 0.0}
        self.chi1 = consts["chi1"]
        self.comm_rate = consts["comm_rate"] if comm_rate is None else \
            check_finite_number(comm_rate, "comm_rate", 0.0)
        nu = self.mu / 2
        self.nu = nu
        self.gamma, self.gamma_t = 1 / (4 * self.L), 1 / (4 * math.sqrt(self.L * nu))
        self.delta, self.delta_t = 0.25 * math.sqrt(nu / self.L), 1.0
        chi1_star = self.chi1 / self.comm_rate if self.comm_rate > 0 else 0.0
        self.beta, self.beta_t = 0.5, 2 * chi1_star * math.sqrt(self.L / nu)
        self.M = dadao_ode(self.L, self.mu)
        for name in ("X~", "Y", "Y~", "Z", "Z~"):
            self._new_state(name)
        self.time = 0.0          # the horizon reached by run()
        self.last = 0.0          # this node's last event time
        self.events_done = 0
        self.gradients = 0
        self.messages = 0

    def _hyper(self):
        return {"L": self.L, "mu": self.mu, "seed": self.seed, "comm_rate": self.comm_rate,
                "topology": self.topology.name}

    def _extra_state(self):
        return {"time": self.time, "last": self.last, "events_done": self.events_done,
                "gradients": self.gradients, "messages": self.messages}

    def _load_extra_state(self, extra):
        self.time, self.last = float(extra["time"]), float(extra["last"])
        self.events_done = int(extra["events_done"])
        self.gradients, self.messages = int(extra["gradients"]), int(extra["messages"])

    def _stack(self):
        a = self._arrays
        return [self.flat, a["X~"], a["Y"], a["Y~"], a["Z"], a["Z~"]]

    def _integrate(self, t):
        dt = t - self.last
        if dt > 0:
            E = _expm(self.M * dt)
            parts = self._stack()
            old = np.stack(parts).astype(np.float64)
            new = E @ old
            for p, v in zip(parts, new):
                p[:] = v
        self.last = t

    def run(self, grad_fn, t_end):
        """Play every event in (self.time, t_end]; returns the number played."""
        if not callable(grad_fn):
            raise TypeError(f"grad_fn: expected a callable grad_fn(x) -> ndarray, got {type(grad_fn).__name__}")
        t_end = check_finite_number(t_end, "t_end", self.time)
        events = dadao_events(self.topology.n, self.topology.edges, t_end, self.topology.n,
                              self.comm_rate, self.seed)
        me, a, f = self.comm.rank, self._arrays, self.flat.dtype.type
        empty = Dense(np.zeros(0, dtype=self.flat.dtype))
        played = 0
        for t, i, j in events[self.events_done:]:
            if j < 0:
                if i == me:
                    self._integrate(t)
                    x = self.flat
                    r = self._grad(grad_fn(x.copy()), "grad_fn(x)") - f(self.nu) * x - a["Y~"]
                    x -= f(self.gamma) * r
                    a["X~"] -= f(self.gamma_t) * r
                    a["Y~"] += f(self.delta + self.delta_t) * r
                    self.gradients += 1
            else:
                if me in (i, j):
                    other = j if me == i else i
                    self._integrate(t)
                    got = self.comm.neighbor_exchange(Dense(a["Y"] + a["Z"]), [other])
                    m = (a["Y"] + a["Z"]) - decoded(got[other]).astype(self.flat.dtype, copy=False)
                    a["Z"] -= f(self.beta) * m
                    a["Z~"] -= f(self.beta_t) * m
                    self.messages += 1
                else:
                    self.comm.neighbor_exchange(empty, [])
            played += 1
        self.events_done += played
        self.time = t_end
        self.t = self.events_done
        return played


# --------------------------------------------------------------------------
# DIMAT: activation-matched merging of MLPs
# --------------------------------------------------------------------------

def _check_sizes(sizes, n):
    if not isinstance(sizes, (list, tuple)) or len(sizes) < 2:
        raise TypeError(f"sizes: expected a list of layer widths [d_in, h_1, ..., d_out], got {sizes!r}")
    sizes = [check_int(s, "sizes[i]", 1) for s in sizes]
    want = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    if want != n:
        raise ValueError(f"params: an MLP {sizes} has {want} parameters, got {n}")
    return sizes


def _layers(flat, sizes):
    """Views (W (out x in), b (out)) of each layer in the flat vector."""
    out, o = [], 0
    for a, b in zip(sizes[:-1], sizes[1:]):
        W = flat[o:o + a * b].reshape(b, a)
        o += a * b
        out.append((W, flat[o:o + b]))
        o += b
    return out


def mlp_forward(params, sizes, X):
    """A ReLU MLP with layers (W, b) packed as [W_1 (h_1 x d_in, row-major),
    b_1, W_2, b_2, ...] in ``params``: returns (hidden activations after
    each ReLU, logits)."""
    flat = np.asarray(params).reshape(-1)
    sizes = _check_sizes(sizes, flat.size)
    h, hidden = np.asarray(X), []
    layers = _layers(flat, sizes)
    for k, (W, b) in enumerate(layers):
        h = h @ W.T + b
        if k < len(layers) - 1:
            h = np.maximum(h, 0)
            hidden.append(h)
    return hidden, h


def mlp_permute(params, sizes, perms):
    """A copy of ``params`` with hidden layer l's units reordered by
    ``perms[l]`` (new unit k = old unit perms[l][k]): rows of W_l and b_l,
    columns of W_{l+1}.  The network computes the same function."""
    flat = np.array(params, copy=True).reshape(-1)
    sizes = _check_sizes(sizes, flat.size)
    if len(perms) != len(sizes) - 2:
        raise ValueError(f"perms: expected {len(sizes) - 2} permutations (one per hidden layer), got {len(perms)}")
    layers = _layers(flat, sizes)
    for l, p in enumerate(perms):
        p = np.asarray(p)
        if sorted(p.tolist()) != list(range(sizes[l + 1])):
            raise ValueError(f"perms[{l}]: expected a permutation of {sizes[l + 1]} units")
        W, b = layers[l]
        W[:] = W[p]
        b[:] = b[p]
        W2, _ = layers[l + 1]
        W2[:] = W2[:, p]
    return flat


def mlp_align(reference, other, sizes, X):
    """``other`` with its hidden units permuted to match ``reference`` by
    activation matching on the batch X (DIMAT; Git Re-Basin's activation
    matching): layer by layer, the Pearson correlations of the reference's
    and other's (already aligned below) activations, and the assignment
    maximising their sum (``scipy.optimize.linear_sum_assignment``).
    Returns (aligned params, permutations)."""
    from scipy.optimize import linear_sum_assignment
    sizes = _check_sizes(sizes, np.asarray(reference).size)
    ref_hidden, _ = mlp_forward(reference, sizes, X)
    cur = np.array(other, copy=True).reshape(-1)
    perms = [np.arange(s) for s in sizes[1:-1]]
    for l in range(len(sizes) - 2):
        hid, _ = mlp_forward(cur, sizes, X)
        A, B = ref_hidden[l], hid[l]
        A = (A - A.mean(0)) / (A.std(0) + 1e-8)
        B = (B - B.mean(0)) / (B.std(0) + 1e-8)
        corr = A.T @ B / len(A)
        _, col = linear_sum_assignment(corr, maximize=True)
        step = [np.arange(s) for s in sizes[1:-1]]
        step[l] = col
        cur = mlp_permute(cur, sizes, step)
        perms[l] = perms[l][col]
    return cur, perms


class DIMAT(Optimizer):
    """DIMAT (Saadati et al., CVPR 2024) for a ReLU MLP (``sizes``, layout
    of ``mlp_forward``).  ``round(grad_fn, batch)``: ``local_steps`` SGD
    steps (lr) on this node's data, then a merge: every node sends its full
    model to its neighbours (dense, ``neighbor_exchange``), aligns each
    received model to its own by activation matching on its own ``batch``
    (``mlp_align``), and sets theta_i = sum_j W_ij P_j(theta_j) (W =
    ``topology.mixing``).  ``align=False`` merges without permutations
    (plain gossip averaging of models), the baseline."""

    def __init__(self, params, comm, topology, sizes, *, lr, local_steps=1, align=True):
        super().__init__(params, comm)
        self.topology = _check_topology(topology, self.comm)
        self.sizes = _check_sizes(sizes, self.flat.size)
        self.lr = _check_lr(lr)
        self.local_steps = check_int(local_steps, "local_steps", 0)
        self.align = bool(align)
        self.neighbors = topology.neighbors(self.comm.rank)
        self.weights = topology.mixing[self.comm.rank]

    def _hyper(self):
        return {"lr": self.lr, "local_steps": self.local_steps, "sizes": list(self.sizes),
                "align": self.align, "topology": self.topology.name}

    def merge(self, batch):
        """Exchange models with the neighbours and merge (class doc)."""
        x, f = self.flat, self.flat.dtype.type
        got = self.comm.neighbor_exchange(Dense(x.copy()), self.neighbors)
        merged = f(self.weights[self.comm.rank]) * x
        for j in self.neighbors:
            theta = decoded(got[j]).astype(x.dtype, copy=False)
            if self.align:
                theta, _ = mlp_align(x, theta, self.sizes, batch)
            merged += f(self.weights[j]) * theta.astype(x.dtype, copy=False)
        x[:] = merged

    def round(self, grad_fn, batch):
        """local_steps SGD steps with grad_fn(params), then ``merge(batch)``."""
        if not callable(grad_fn):
            raise TypeError(f"grad_fn: expected a callable grad_fn(x) -> ndarray, got {type(grad_fn).__name__}")
        f = self.flat.dtype.type
        for _ in range(self.local_steps):
            self.flat -= f(self.lr) * self._grad(grad_fn(self.flat.copy()), "grad_fn(x)")
        self.merge(batch)
        self.t += 1
