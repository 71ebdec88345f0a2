"""Federated learning over a lowband communicator: one client per rank.

Every method is one client's object (``comm.rank`` is the client id,
``comm.world_size`` the number of clients N) holding a replica of the
server state.  ``round(grad_fn)`` runs one communication round:

1. The S = ``clients_per_round`` participants are drawn with
   ``sample_clients(N, S, seed, round)`` (``numpy.random.default_rng([seed,
   round]).choice(N, S, replace=False)``, sorted): every rank draws the same
   set, so sampling is reproducible and needs no message.
2. A participant runs ``local_steps`` (K) local steps from the server model,
   calling ``grad_fn(y)`` (this client's stochastic gradient at y, an array
   of params' shape and dtype) and builds its uplink payload.
3. Every rank calls ``comm.allgather`` once: a participant sends its payload,
   a non-participant sends an empty ``Dense`` (zero elements, a 28-byte
   header) and contributes zero weight.  So every rank makes the same
   collective calls whoever is sampled.
4. Every rank applies the same server update to its replica from the
   participants' payloads, added in rank order; the replicas stay
   bit-identical.  Non-participants keep their client state (control
   variates, momenta) and adopt the new server model.

``client_update(grad_fn)`` and ``server_update(payloads, chosen)`` are the
two halves of a round, for engines that move the messages themselves
(``lowband.flower``).

Byte accounting.  ``comm``'s counters hold what this replicated-server
implementation moves (allgather: each payload counted once per other rank).
Each object also keeps the star-topology counts a parameter server would
see, identical on every rank: ``bytes_up`` (the encoded sizes of the
participants' payloads) and ``bytes_down`` (per participant, the dense
server state it must receive: the model, plus the control variate for the
SCAFFOLD family), and ``last_round`` ({"clients", "up", "down"}) for the most
recent round.

Methods (papers):

``FedAvg``    McMahan et al. 2017 (arXiv 1602.05629): x += eta_g * sum_S
              w_i (y_i - x) / sum_S w_i, client weights ``weights`` (None:
              uniform); optional uplink ``compressor`` (FedAvg + top-k).
``Scaffold``  Karimireddy et al. 2020 (arXiv 1910.06378), option II control
              variates; uplink (dy, dc) dense.
``Scallion``  Huang, Li, Li, ICLR 2024 (arXiv 2308.08165): one compressed
              vector C((x - y_K)/(K eta_l) - c) up, unbiased C, scale alpha.
``Scafcom``   same paper: biased C (top-k) with local momentum beta.
``FedSpeed``  Sun et al., ICLR 2023 (arXiv 2302.10429): prox-correction and
              perturbed (SAM-interpolated) local gradients.
``FedSB``     Fed-SB (arXiv 2502.15436): LoRA-SB adapters W0 + B R A with B,
              A frozen; only R (r x r per layer) travels; the mean of R is
              the exact aggregate.
"""
from __future__ import annotations

import numpy as np

from ._payload import Dense
from ._validate import check_finite_number, check_int, check_seed, k_from_ratio
from .compressors import RandomK, from_spec
from .optim import Optimizer, _check_lr
from .sim import decoded

__all__ = ["sample_clients", "FedAvg", "Scaffold", "Scallion", "Scafcom", "FedSpeed", "FedSB",
           "lora_sb_init"]


def sample_clients(num_clients, clients_per_round, seed, round):
    """The sorted ids of the clients that take part in ``round``:
    ``default_rng([seed, round]).choice(N, S, replace=False)`` (all N, in
    order, when S == N)."""
    N = check_int(num_clients, "num_clients", 1)
    S = check_int(clients_per_round, "clients_per_round", 1, N)
    seed = check_seed(seed)
    round = check_int(round, "round", 0)
    if S == N:
        return np.arange(N)
    return np.sort(np.random.default_rng([seed, round]).choice(N, S, replace=False))


class _Federated(Optimizer):
    """Shared machinery: sampling, local steps, the allgather, counters."""

    #: dense server vectors a participant receives per round (model [+ c])
    _down_vectors = 1

    def __init__(self, params, comm, *, lr, local_steps, clients_per_round=None, seed=0,
                 server_lr=1.0):
        super().__init__(params, comm)
        self.lr = _check_lr(lr)
        self.local_steps = check_int(local_steps, "local_steps", 1)
        self.num_clients = self.comm.world_size
        S = self.num_clients if clients_per_round is None else clients_per_round
        self.clients_per_round = check_int(S, "clients_per_round", 1, self.num_clients)
        self.seed = check_seed(seed)
        self.server_lr = check_finite_number(server_lr, "server_lr", 0.0, lo_open=True)
        self.bytes_up = 0
        self.bytes_down = 0
        self.last_round = None

    def _hyper(self):
        return {"lr": self.lr, "local_steps": self.local_steps, "num_clients": self.num_clients,
                "clients_per_round": self.clients_per_round, "seed": self.seed,
                "server_lr": self.server_lr}

    def _extra_state(self):
        return {"bytes_up": self.bytes_up, "bytes_down": self.bytes_down}

    def _load_extra_state(self, extra):
        self.bytes_up = check_int(extra.get("bytes_up"), "state['extra']['bytes_up']", 0)
        self.bytes_down = check_int(extra.get("bytes_down"), "state['extra']['bytes_down']", 0)

    # -- pieces ------------------------------------------------------------
    def clients(self, round=None):
        """The participants of ``round`` (default: the next round)."""
        return sample_clients(self.num_clients, self.clients_per_round, self.seed,
                              self.t if round is None else round)

    def _gradient(self, grad_fn, y):
        return self._grad(grad_fn(y), "grad_fn(y)")

    def _local(self, grad_fn, correction=None):
        """K local SGD steps from the server model: y -= lr * (g(y) + correction)."""
        f = self.flat.dtype.type
        y = self.flat.copy()
        for _ in range(self.local_steps):
            g = self._gradient(grad_fn, y)
            if correction is not None:
                g = g + correction
            y -= f(self.lr) * g
        return y

    def _sum(self, payloads, size=None):
        """The decoded payloads added in rank order (float64 accumulation is
        not used: the params' dtype, like the twins)."""
        total = np.zeros(self.flat.size if size is None else size, dtype=self.flat.dtype)
        for p in payloads:
            total += decoded(p).astype(self.flat.dtype, copy=False)
        return total

    def round(self, grad_fn):
        """One communication round (module doc); returns the participants."""
        if not callable(grad_fn):
            raise TypeError(f"grad_fn: expected a callable grad_fn(y) -> ndarray, got {type(grad_fn).__name__}")
        chosen = self.clients()
        payload = self.client_update(grad_fn) if self.comm.rank in chosen else None
        empty = Dense(np.zeros(0, dtype=self.flat.dtype))
        got = self.comm.allgather(payload if payload is not None else empty)
        self.server_update([got[int(j)] for j in chosen], chosen)
        return chosen

    # -- the two halves of a round (what another engine, such as Flower, calls) --
    def client_update(self, grad_fn):
        """This client's part of the round: local steps from the current
        server state (params, and ``c`` for the SCAFFOLD family), client
        state updated; returns the uplink payload."""
        if not callable(grad_fn):
            raise TypeError(f"grad_fn: expected a callable grad_fn(y) -> ndarray, got {type(grad_fn).__name__}")
        return self._client(grad_fn)

    def server_update(self, payloads, chosen):
        """The server's part: apply the participants' payloads (in the order
        of ``chosen``, the sorted client ids) to the server state; counts
        the star-topology bytes and advances the round."""
        chosen = np.asarray(chosen, dtype=np.int64).reshape(-1)
        if len(payloads) != len(chosen) or len(chosen) == 0:
            raise ValueError(f"payloads: expected one payload per participant ({len(chosen)}), got {len(payloads)}")
        up = sum(p.nbytes for p in payloads)
        down = len(chosen) * self._down_vectors * Dense(self.flat).nbytes
        self.bytes_up += up
        self.bytes_down += down
        self.last_round = {"clients": [int(j) for j in chosen], "up": up, "down": down}
        self._server(list(payloads), chosen)
        self.t += 1

    #: names of the state arrays that belong to the server (replicated), the
    #: others belong to the client
    _server_arrays = ()

    def client_state(self):
        """Copies of this client's own state arrays."""
        return {k: v.copy() for k, v in self._arrays.items() if k not in self._server_arrays}

    def server_state(self):
        """Copies of the server state: "params" and the server's arrays."""
        out = {"params": self.flat.copy()}
        out.update({k: self._arrays[k].copy() for k in self._server_arrays})
        return out

    def _client(self, grad_fn):
        raise NotImplementedError

    def _server(self, payloads, chosen):
        raise NotImplementedError


class FedAvg(_Federated):
    """FedAvg (McMahan et al. 2017).  Participant i: K local SGD steps from
    x (lr ``lr``) to y_i, sends Delta_i = y_i - x (``compressor``: C(Delta_i),
    randomised compressors pinned to step = round).  Server: x += server_lr *
    sum_S w_i D(C(Delta_i)) / sum_S w_i, with ``weights`` (one per client,
    e.g. sample counts n_i; None: uniform) identical on every rank.
    Weighting by n_i and uniform weighting minimise different objectives."""

    def __init__(self, params, comm, *, lr, local_steps, clients_per_round=None, seed=0,
                 server_lr=1.0, weights=None, compressor=None):
        super().__init__(params, comm, lr=lr, local_steps=local_steps,
                         clients_per_round=clients_per_round, seed=seed, server_lr=server_lr)
        self.weights = _check_weights(weights, self.num_clients)
        self.compressor = None if compressor is None else from_spec(compressor)

    def _hyper(self):
        return {**super()._hyper(), "weights": None if self.weights is None else self.weights.tolist(),
                "compressor": None if self.compressor is None else self.compressor.spec}

    def _client(self, grad_fn):
        delta = self._local(grad_fn) - self.flat
        if self.compressor is None:
            return Dense(delta)
        return self.compressor.compress(delta, step=self.t) if self.compressor.randomized \
            else self.compressor.compress(delta)

    def _server(self, payloads, chosen):
        f = self.flat.dtype.type
        if self.weights is None:
            w = np.full(len(chosen), 1.0 / len(chosen))
        else:
            w = self.weights[chosen] / self.weights[chosen].sum()
        total = np.zeros_like(self.flat)
        for wi, p in zip(w, payloads):
            total += f(wi) * decoded(p).astype(self.flat.dtype, copy=False)
        self.flat += f(self.server_lr) * total


def _check_weights(weights, n):
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"weights: expected {n} client weights (one per rank), got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights: expected finite weights > 0, got {w.tolist()}")
    return w


class Scaffold(_Federated):
    """SCAFFOLD (Karimireddy et al. 2020), option II.  State: server c
    (replicated), client c_i (both start at 0).  Participant: y -= lr *
    (g(y) - c_i + c) for K steps; c_i+ = c_i - c + (x - y)/(K lr); sends
    dy = y - x and dc = c_i+ - c_i (one dense payload of 2d values).
    Server: x += server_lr * mean_S dy; c += (1/N) sum_S dc."""

    _down_vectors = 2
    _server_arrays = ("c",)

    def __init__(self, params, comm, *, lr, local_steps, clients_per_round=None, seed=0,
                 server_lr=1.0):
        super().__init__(params, comm, lr=lr, local_steps=local_steps,
                         clients_per_round=clients_per_round, seed=seed, server_lr=server_lr)
        self.c = self._new_state("c")
        self.c_client = self._new_state("c_client")

    def _client(self, grad_fn):
        f = self.flat.dtype.type
        y = self._local(grad_fn, self.c - self.c_client)
        c_new = self.c_client - self.c + (self.flat - y) / f(self.local_steps * self.lr)
        payload = Dense(np.concatenate([y - self.flat, c_new - self.c_client]))
        self.c_client[:] = c_new
        return payload

    def _server(self, payloads, chosen):
        f = self.flat.dtype.type
        n = self.flat.size
        total = self._sum(payloads, 2 * n)
        self.flat += f(self.server_lr) * (total[:n] / f(len(chosen)))
        self.c += total[n:] / f(self.num_clients)


class _Compressed(_Federated):
    """SCALLION / SCAFCOM: one compressed uplink vector delta_i per
    participant; server x -= server_lr K lr (c + mean_S D(delta_i)),
    c += (alpha/N) sum_S D(delta_i)."""

    _down_vectors = 2
    _server_arrays = ("c",)

    def __init__(self, params, comm, compressor, *, lr, local_steps, clients_per_round=None,
                 seed=0, server_lr=1.0):
        super().__init__(params, comm, lr=lr, local_steps=local_steps,
                         clients_per_round=clients_per_round, seed=seed, server_lr=server_lr)
        self.compressor = from_spec(compressor)
        self.c = self._new_state("c")
        self.c_client = self._new_state("c_client")

    def _hyper(self):
        return {**super()._hyper(), "compressor": self.compressor.spec, "alpha": self.alpha}

    def _compress(self, v):
        # randomised compressors use step = round: with a shared seed every
        # participant of a round draws the same coordinates (rand-k)
        if self.compressor.randomized:
            return self.compressor.compress(v, step=self.t)
        return self.compressor.compress(v)

    def _gbar(self, y):
        """(x - y_K)/(K lr): the average local corrected gradient."""
        return (self.flat - y) / self.flat.dtype.type(self.local_steps * self.lr)

    def _server(self, payloads, chosen):
        f = self.flat.dtype.type
        total = self._sum(payloads)
        self.flat -= f(self.server_lr * self.local_steps * self.lr) * (self.c + total / f(len(chosen)))
        self.c += f(self.alpha / self.num_clients) * total


class Scallion(_Compressed):
    """SCALLION (Huang, Li, Li, ICLR 2024), for an unbiased ``compressor``
    (any lowband spec with ``unbiased``; e.g. "randomk:0.01:rescale=True",
    "qsgd:4").  Participant: y -= lr (g(y) - c_i + c) for K steps; delta_i =
    C((x - y)/(K lr) - c); c_i += alpha D(delta_i); sends delta_i.
    ``alpha`` defaults to 1/(1 + omega) where omega is known: 1 for the
    identity, k/n for rescaled random-k; give it for other compressors.  With
    the identity and alpha = 1 this is SCAFFOLD at half the uplink."""

    def __init__(self, params, comm, compressor, *, lr, local_steps, alpha=None,
                 clients_per_round=None, seed=0, server_lr=1.0):
        super().__init__(params, comm, compressor, lr=lr, local_steps=local_steps,
                         clients_per_round=clients_per_round, seed=seed, server_lr=server_lr)
        if not self.compressor.unbiased:
            raise ValueError(f"compressor: SCALLION needs an unbiased compressor, got "
                             f"{self.compressor.spec!r} (use Scafcom for biased ones such as top-k)")
        self.alpha = _default_alpha(self.compressor, self.flat.size) if alpha is None else \
            check_finite_number(alpha, "alpha", 0.0, 1.0, lo_open=True)

    def _client(self, grad_fn):
        y = self._local(grad_fn, self.c - self.c_client)
        payload = self._compress(self._gbar(y) - self.c)
        self.c_client += self.flat.dtype.type(self.alpha) * decoded(payload).astype(self.flat.dtype, copy=False)
        return payload


def _default_alpha(compressor, n):
    if compressor.spec == "none":
        return 1.0
    if isinstance(compressor, RandomK) and compressor.rescale:
        k = compressor.k if compressor.k is not None else k_from_ratio(n, compressor.ratio)
        return min(1.0, k / n)
    raise ValueError(f"alpha: no default for compressor {compressor.spec!r} (its variance omega is "
                     "unknown here); pass alpha = 1/(1 + omega)")


class Scafcom(_Compressed):
    """SCAFCOM (Huang, Li, Li, ICLR 2024), for any (biased) ``compressor``
    such as "topk:0.01".  Participant: K corrected local steps;
    gbar = (x - y)/(K lr) + c_i - c; v_i = (1 - beta) v_i + beta gbar;
    delta_i = C(v_i - c_i); c_i += D(delta_i); sends delta_i.  The server is
    SCALLION's with alpha = 1.  With the identity and beta = 1 this is
    SCAFFOLD."""

    def __init__(self, params, comm, compressor, *, lr, local_steps, beta=0.2,
                 clients_per_round=None, seed=0, server_lr=1.0):
        super().__init__(params, comm, compressor, lr=lr, local_steps=local_steps,
                         clients_per_round=clients_per_round, seed=seed, server_lr=server_lr)
        self.alpha = 1.0
        self.beta = check_finite_number(beta, "beta", 0.0, 1.0, lo_open=True)
        self.v = self._new_state("v")

    def _hyper(self):
        return {**super()._hyper(), "beta": self.beta}

    def _client(self, grad_fn):
        f = self.flat.dtype.type
        y = self._local(grad_fn, self.c - self.c_client)
        gbar = self._gbar(y) + self.c_client - self.c
        self.v *= f(1 - self.beta)
        self.v += f(self.beta) * gbar
        payload = self._compress(self.v - self.c_client)
        self.c_client += decoded(payload).astype(self.flat.dtype, copy=False)
        return payload


class FedSpeed(_Federated):
    """FedSpeed (Sun et al., ICLR 2023).  Client state g_hat_i (starts at 0).
    Local step from y_0 = x: g1 = g(y); y' = y + rho g1/||g1||; g2 = g(y');
    g = (1 - alpha) g1 + alpha g2 (the perturbed gradient estimate);
    y -= lr (g - g_hat_i + (y - x)/lam).  After K steps: g_hat_i -= (y - x)/lam;
    sends x_hat_i = y - lam g_hat_i (dense).  Server: x += server_lr
    (mean_S x_hat_i - x).  ``prox_correction=False`` keeps g_hat_i = 0 (the
    ablation); ``rho=0`` drops the perturbation."""

    def __init__(self, params, comm, *, lr, local_steps, lam=0.1, rho=0.1, alpha=0.5,
                 prox_correction=True, clients_per_round=None, seed=0, server_lr=1.0):
        super().__init__(params, comm, lr=lr, local_steps=local_steps,
                         clients_per_round=clients_per_round, seed=seed, server_lr=server_lr)
        self.lam = check_finite_number(lam, "lam", 0.0, lo_open=True)
        self.rho = check_finite_number(rho, "rho", 0.0)
        self.alpha = check_finite_number(alpha, "alpha", 0.0, 1.0)
        self.prox_correction = bool(prox_correction)
        self.g_hat = self._new_state("g_hat")

    def _hyper(self):
        return {**super()._hyper(), "lam": self.lam, "rho": self.rho, "alpha": self.alpha,
                "prox_correction": self.prox_correction}

    def _client(self, grad_fn):
        f = self.flat.dtype.type
        x = self.flat
        y = x.copy()
        for _ in range(self.local_steps):
            g = self._gradient(grad_fn, y)
            if self.rho and self.alpha:
                norm = float(np.linalg.norm(g))
                g2 = self._gradient(grad_fn, y + f(self.rho / norm) * g) if norm > 0 else g
                g = f(1 - self.alpha) * g + f(self.alpha) * g2
            y -= f(self.lr) * (g - self.g_hat + (y - x) / f(self.lam))
        if self.prox_correction:
            self.g_hat -= (y - x) / f(self.lam)
        return Dense(y - f(self.lam) * self.g_hat)

    def _server(self, payloads, chosen):
        f = self.flat.dtype.type
        mean = self._sum(payloads) / f(len(chosen))
        self.flat += f(self.server_lr) * (mean - self.flat)


def lora_sb_init(grad, rank, lr=1.0):
    """LoRA-SB's initialisation of one adapted matrix from a gradient
    estimate ``grad`` (m x n): grad = U S V^T; B = U[:, :r], A = V^T[:r],
    R0 = -lr diag(S[:r]), so that B R0 A is the best rank-r approximation of
    the first full fine-tuning step -lr * grad.  Returns (B, R0, A)."""
    g = np.asarray(grad)
    if g.ndim != 2 or g.dtype.kind != "f":
        raise ValueError(f"grad: expected a 2-D float matrix, got {g.ndim}-D {g.dtype}")
    r = check_int(rank, "rank", 1, min(g.shape))
    lr = _check_lr(lr)
    U, s, Vt = np.linalg.svd(g.astype(np.float64), full_matrices=False)
    dt = g.dtype
    return (np.ascontiguousarray(U[:, :r], dtype=dt), (-lr * np.diag(s[:r])).astype(dt),
            np.ascontiguousarray(Vt[:r], dtype=dt))


class FedSB(FedAvg):
    """Fed-SB (arXiv 2502.15436): federated LoRA-SB.  Each adapted matrix is
    W0 + B R A with B (m x r) and A (r x n) frozen and identical on every
    client (``lora_sb_init``); ``params`` holds only the trainable R
    matrices, ``layers`` of them (r x r each, concatenated).  A round is
    FedAvg on R with uniform weights: the server's R is mean_S R_i, which is
    the exact aggregate because B mean(R_i) A = mean(B R_i A).  Per
    participant and round 4 r^2 bytes per layer (float32, plus a header)
    travel each way, whatever the number of clients; the full-rank delta
    (m n values) never travels.  ``grad_fn(R)`` returns the gradient with
    respect to R (B^T dL/dW A^T for one layer)."""

    def __init__(self, params, comm, *, rank, lr, local_steps, layers=1, clients_per_round=None,
                 seed=0, server_lr=1.0):
        super().__init__(params, comm, lr=lr, local_steps=local_steps,
                         clients_per_round=clients_per_round, seed=seed, server_lr=server_lr)
        self.rank = check_int(rank, "rank", 1)
        self.layers = check_int(layers, "layers", 1)
        if self.flat.size != self.layers * self.rank ** 2:
            raise ValueError(f"params: expected layers * rank**2 = {self.layers * self.rank ** 2} "
                             f"values (R matrices), got {self.flat.size}")

    def _hyper(self):
        return {**super()._hyper(), "rank": self.rank, "layers": self.layers}

    def R(self, layer=0):
        """The r x r matrix of ``layer`` (a view into params)."""
        layer = check_int(layer, "layer", 0, self.layers - 1)
        r2 = self.rank ** 2
        return self.flat[layer * r2:(layer + 1) * r2].reshape(self.rank, self.rank)

    def delta(self, B, A, layer=0):
        """The weight update B R A of ``layer``."""
        return np.asarray(B) @ self.R(layer) @ np.asarray(A)
