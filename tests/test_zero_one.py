"""ZeroOneAdam (0/1 Adam) and OneBitLamb (1-bit LAMB) against NumPy ports of
DeepSpeed's optimizers (deepspeed/runtime/fp16/onebit/zoadam.py and
lamb.py: the same control flow, torch ops turned into NumPy, the engine's
backward allreduce toggle simulated), on 1, 2 and 4 ranks of
lowband.sim.Cluster."""
import math

import numpy as np
import pytest

import lowband
from lowband import sim
from lowband.optim import OneBitLamb, ZeroOneAdam
from helpers import make_vector

F64 = np.float64


class DeepSpeedZeroOneAdam:
    """A port of DeepSpeed's ZeroOneAdam.step for one tensor.  ``step`` gets
    every rank's local gradient through ``comm``; the engine averages it
    densely when ``enable_backward_allreduce`` is set (as DeepSpeed's
    engine does before calling the optimizer)."""

    def __init__(self, p, comm, lr, betas, eps, wd, var_freeze_step, var_update_scaler,
                 local_step_scaler, local_step_clipper, exchange="chunked"):
        self.p, self.comm, self.exchange = p, comm, exchange
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, wd
        self.var_freeze_step, self.var_update_scaler = var_freeze_step, var_update_scaler
        self.local_step_scaler, self.local_step_clipper = local_step_scaler, local_step_clipper
        self.initialize = False
        self.freeze_key = False
        self.reinitial_error_buffer = False
        self.enable_backward_allreduce = True
        self.size = comm.world_size
        self.state = {}

    def compressed_allreduce(self, t):
        if self.exchange == "deepspeed":
            return sim.deepspeed_compressed_allreduce(self.comm, t, self.state["worker_error"],
                                                      self.state["server_error"])
        return self.comm.compressed_allreduce(t, "sign:rms", self.state["worker_error"],
                                              self.state["server_error"])

    def engine_step(self, local_grad):
        grad = self.comm.allreduce(local_grad, "mean") if self.enable_backward_allreduce else local_grad
        self.step(grad)

    def step(self, grad):
        p, state = self.p, self.state
        if not state:
            state["step"] = 0
            state["exp_avg"] = np.zeros_like(p)
            state["exp_avg_sq"] = np.zeros_like(p)
        if not self.initialize or "worker_error" not in state:
            state.update(var_interval=1, var_counter=0, local_step_interval=1, local_step_counter=0,
                         lrs=0)
            if self.exchange == "deepspeed":
                N = sim.deepspeed_padded_size(p.size, self.size)
                state["worker_error"], state["server_error"] = np.zeros(N), np.zeros(N // self.size)
            else:
                b = sim.chunk_bounds(p.size, self.size)
                state["worker_error"] = np.zeros_like(p)
                state["server_error"] = np.zeros(b[self.comm.rank + 1] - b[self.comm.rank], p.dtype)
            state["momentum_accumulator"] = np.zeros_like(p)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        comm_buffer = state["momentum_accumulator"]
        beta1, beta2 = self.betas
        f = p.dtype.type
        state["step"] += 1
        if self.initialize:
            if self.freeze_key is False:
                if state["step"] % state["var_interval"] == 0:
                    exp_avg_sq *= f(beta2)
                    exp_avg_sq += f(1 - beta2) * (grad * grad)
                    exp_avg *= f(beta1)
                    exp_avg += f(1 - beta1) * grad
                else:
                    if self.size > 1:
                        grad_onebit = self.compressed_allreduce(grad)
                        exp_avg *= f(beta1)
                        exp_avg += f(1 - beta1) * grad_onebit
            else:
                exp_avg *= f(beta1)
                exp_avg += f(1 - beta1) * grad
                state["lrs"] += self.lr
        if not self.initialize:
            if self.size > 1:
                comm_buffer[:] = self.compressed_allreduce(comm_buffer)
        if self.initialize:
            update = exp_avg / (np.sqrt(exp_avg_sq) + f(self.eps))
            if self.wd > 0.0:
                update += f(self.wd) * p
            p += f(-self.lr) * update
            if self.freeze_key is True:
                comm_buffer += f(-self.lr) * update
            if state["step"] % state["local_step_interval"] == 0 and self.freeze_key:
                p += f(-1) * comm_buffer
                comm_buffer *= np.sqrt(exp_avg_sq) + f(self.eps)
                if self.size > 1:
                    comm_buffer[:] = self.compressed_allreduce(comm_buffer)
                exp_avg[:] = 0
                exp_avg += f(-1) * (comm_buffer / f(state["lrs"]))
                p += comm_buffer / (np.sqrt(exp_avg_sq) + f(self.eps))
                comm_buffer[:] = 0
                state["lrs"] = 0
            if self.freeze_key is False:
                if state["step"] % state["var_interval"] == 0:
                    state["var_counter"] += 1
                    if state["var_counter"] == self.var_update_scaler:
                        state["var_counter"] = 0
                        state["var_interval"] *= 2
                self.enable_backward_allreduce = (state["step"] + 1) % state["var_interval"] == 0
            else:
                state["local_step_counter"] += 1
                if state["local_step_counter"] == self.local_step_scaler:
                    state["local_step_counter"] = 0
                    state["local_step_interval"] = min(self.local_step_clipper,
                                                       state["local_step_interval"] * 2)
        if not self.initialize:
            self.freeze_key = False
            del state["worker_error"], state["server_error"]
            self.initialize = True
            return
        if state["step"] > self.var_freeze_step:
            self.freeze_key = True
            self.enable_backward_allreduce = False
        if self.freeze_key is True and self.reinitial_error_buffer is False:
            state["worker_error"][:] = 0
            state["server_error"][:] = 0
            self.reinitial_error_buffer = True


def run_pair(W, make_ours, make_port, grads, x0):
    """(our params per rank, the port's params per rank, our optimizers)."""
    def ours(comm):
        x = x0.copy()
        opt = make_ours(x, comm)
        for g in grads:
            opt.step(g[comm.rank])
        return x, opt

    def port(comm):
        x = x0.copy()
        opt = make_port(x, comm)
        opt.engine_step(np.zeros_like(x))          # DeepSpeed's first call only allocates
        for g in grads:
            opt.engine_step(g[comm.rank])
        return x

    res = sim.Cluster(W).run(ours)
    return [r[0] for r in res], sim.Cluster(W).run(port), [r[1] for r in res]


def gradients(W, n, steps, seed):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(n)
    return [[(base * (1 + 0.1 * t) + rng.standard_normal(n)).astype(F64) for _ in range(W)]
            for t in range(steps)]


@pytest.mark.parametrize("exchange", ["chunked", "deepspeed"])
@pytest.mark.parametrize("W", [1, 2, 4])
def test_zero_one_adam_matches_deepspeed(W, exchange):
    n, steps = 203, 40
    x0 = make_vector(n, F64, seed=1)
    grads = gradients(W, n, steps, W)
    hyper = dict(var_freeze_step=15, var_update_scaler=2, local_step_scaler=4, local_step_clipper=4)
    for wd in (0.0, 0.01):
        ours, port, opts = run_pair(
            W, lambda x, c: ZeroOneAdam(x, c, lr=1e-2, weight_decay=wd, exchange=exchange, **hyper),
            lambda x, c: DeepSpeedZeroOneAdam(x, c, 1e-2, (0.9, 0.999), 1e-8, wd, 15, 2, 4, 4, exchange),
            grads, x0)
        for r in range(W):
            np.testing.assert_array_equal(ours[r], port[r], err_msg=f"rank {r}, wd {wd}")
        assert opts[0].frozen and opts[0].local_step_interval == 4 and opts[0].var_interval == 8
        # phase B takes local steps: replicas agree only up to the last sync


def test_zero_one_adam_saves_bits():
    """Phase A: 1-bit rounds between exponentially rarer dense ones; phase
    B: one 1-bit round per local_step_interval steps."""
    W, n, steps = 4, 4096, 60
    grads = gradients(W, n, steps, 0)
    cluster = sim.Cluster(W)

    def fn(comm):
        x = np.zeros(n)
        opt = ZeroOneAdam(x, comm, lr=1e-3, var_freeze_step=20, var_update_scaler=2,
                          local_step_scaler=5, local_step_clipper=8)
        for g in grads:
            opt.step(g[comm.rank])

    cluster.run(fn)
    dense = sim.Cluster(W)
    dense.run(lambda comm: [comm.allreduce(g[comm.rank], "mean") for g in grads])
    # 7 dense rounds (s = 2, 3, 4, 6, 8, 12, 16) and 1-bit ones: 7.9x fewer bytes here
    assert cluster.bytes_sent[0] * 6 < dense.bytes_sent[0]


class DeepSpeedOneBitLamb:
    """A port of DeepSpeed's OnebitLamb.step for a list of tensors (views of
    one flat vector), ``freeze_step`` in DeepSpeed's counting."""

    def __init__(self, p, comm, layers, lr, betas, eps, wd, freeze_step, max_coeff=10.0,
                 min_coeff=0.01, coeff_beta=0.9, factor_max=4.0, factor_min=0.5,
                 factor_threshold=0.1, exchange="chunked"):
        self.flat, self.comm, self.exchange = p, comm, exchange
        bounds = np.concatenate([[0], np.cumsum(layers)])
        self.params = [p[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        self.lr, self.betas, self.eps, self.wd, self.freeze_step = lr, betas, eps, wd, freeze_step
        self.max_coeff, self.min_coeff, self.coeff_beta = max_coeff, min_coeff, coeff_beta
        self.factor_max, self.factor_min, self.factor_threshold = factor_max, factor_min, factor_threshold
        self.size = comm.world_size
        self.initialize = False
        self.lamb_freeze_key = False
        self.enable_backward_allreduce = True
        self.state = [{} for _ in self.params]
        self.exp_avg_flat = None
        self.worker_errors = self.server_errors = None

    def zero_errors(self):
        if self.exchange == "deepspeed":
            N = sim.deepspeed_padded_size(self.flat.size, self.size)
            return np.zeros(N), np.zeros(N // self.size)
        b = sim.chunk_bounds(self.flat.size, self.size)
        return np.zeros_like(self.flat), np.zeros(b[self.comm.rank + 1] - b[self.comm.rank])

    def allreduce(self, t, we, se):
        if self.exchange == "deepspeed":
            return sim.deepspeed_compressed_allreduce(self.comm, t, we, se)
        return self.comm.compressed_allreduce(t, "sign:rms", we, se)

    def engine_step(self, local_grad):
        grad = self.comm.allreduce(local_grad, "mean") if self.enable_backward_allreduce else local_grad
        bounds = np.concatenate([[0], np.cumsum([q.size for q in self.params])])
        self.step([grad[a:b] for a, b in zip(bounds[:-1], bounds[1:])])

    def step(self, grads):
        f = self.flat.dtype.type
        nrm = lambda a: float(np.sqrt(np.sum(a * a)))
        if self.lamb_freeze_key:
            exp_avg_last_step = [s["exp_avg"].copy() for s in self.state]
            if "scaling_coeff" not in self.state[0]:
                scales = [nrm(s["exp_avg"]) / np.sqrt(s["exp_avg"].size) for s in self.state]
                united = sum(scales) / len(scales)
                for s, sc in zip(self.state, scales):
                    s["scaling_coeff"] = united / sc
        if self.exp_avg_flat is None:
            self.exp_avg_flat = np.zeros_like(self.flat)
            b = np.concatenate([[0], np.cumsum([q.size for q in self.params])])
            for s, lo, hi in zip(self.state, b[:-1], b[1:]):
                s.update(step=0, lamb_coeff_freeze=0.0, last_factor=1.0,
                         exp_avg=self.exp_avg_flat[lo:hi], exp_avg_sq=np.zeros(hi - lo),
                         exp_avg_sq_fresh=np.zeros(hi - lo))
        if not self.initialize:
            self.lamb_freeze_key = True
        beta1, beta2 = self.betas
        for p, grad, state in zip(self.params, grads, self.state):
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            state["step"] += 1
            if self.lamb_freeze_key is False:
                exp_avg *= f(beta1)
                exp_avg += f(1 - beta1) * grad
                exp_avg_sq *= f(beta2)
                exp_avg_sq += f(1 - beta2) * (grad * grad)
                if state["step"] == self.freeze_step:
                    state["exp_avg_sq_fresh"][:] = exp_avg_sq
                if self.initialize:
                    weight_norm = nrm(p)
                    update = exp_avg / (np.sqrt(exp_avg_sq) + f(self.eps))
                    if self.wd > 0.0:
                        update += f(self.wd) * p
                    update_norm = nrm(update)
                    lamb_coeff = 1.0
                    if weight_norm != 0 and update_norm != 0:
                        lamb_coeff = weight_norm / update_norm
                        if lamb_coeff > self.max_coeff:
                            lamb_coeff = self.max_coeff
                        if lamb_coeff < self.min_coeff:
                            lamb_coeff = self.min_coeff
                    if lamb_coeff != 1.0:
                        state["lamb_coeff_freeze"] = (self.coeff_beta * state["lamb_coeff_freeze"]
                                                      + (1 - self.coeff_beta) * lamb_coeff)
                    p += f(-self.lr * lamb_coeff) * update
            else:
                if self.initialize:
                    exp_avg *= f(beta1)
                    exp_avg += f(1 - beta1) * grad
                    exp_avg *= f(state["scaling_coeff"])
        if self.initialize and self.worker_errors is None:
            self.worker_errors, self.server_errors = self.zero_errors()
        if self.lamb_freeze_key and self.size > 1:
            if not self.initialize:
                self.allreduce(self.exp_avg_flat, *self.zero_errors())
            else:
                self.exp_avg_flat[:] = self.allreduce(self.exp_avg_flat, self.worker_errors,
                                                      self.server_errors)
        if self.lamb_freeze_key and self.initialize:
            for j, (p, state) in enumerate(zip(self.params, self.state)):
                exp_avg, exp_avg_sq, fresh = state["exp_avg"], state["exp_avg_sq"], state["exp_avg_sq_fresh"]
                exp_avg /= f(state["scaling_coeff"])
                grad_reconstruct = (exp_avg - exp_avg_last_step[j] * f(beta1)) / f(1 - beta1)
                fresh *= f(beta2)
                fresh += f(1 - beta2) * (grad_reconstruct * grad_reconstruct)
                denom = np.sqrt(exp_avg_sq) + f(self.eps)
                update_prelim = exp_avg / denom
                update = update_prelim + f(self.wd) * p if self.wd > 0.0 else update_prelim
                update_norm = nrm(update)
                denom_real = np.sqrt(fresh) + f(self.eps)
                factor = float((denom / denom_real).max())
                if self.wd > 0.0:
                    update_ratio = min(1.0, nrm(update_prelim) / update_norm)
                    factor = factor * update_ratio + (1.0 - update_ratio)
                if factor > self.factor_max:
                    factor = self.factor_max
                if factor < self.factor_min:
                    factor = self.factor_min
                if factor > state["last_factor"] * (1.0 + self.factor_threshold):
                    factor = state["last_factor"] * (1.0 + self.factor_threshold)
                if factor < state["last_factor"] * (1.0 - self.factor_threshold):
                    factor = state["last_factor"] * (1.0 - self.factor_threshold)
                state["last_factor"] = factor
                lamb_coeff = state["lamb_coeff_freeze"] * factor
                p += f(-self.lr * lamb_coeff) * update
        if not self.initialize:
            self.lamb_freeze_key = False
            self.initialize = True
            return
        if self.lamb_freeze_key is False and self.state[-1]["step"] >= self.freeze_step:
            self.lamb_freeze_key = True
            self.enable_backward_allreduce = False


@pytest.mark.parametrize("exchange", ["chunked", "deepspeed"])
@pytest.mark.parametrize("W", [1, 2, 4])
def test_onebit_lamb_matches_deepspeed(W, exchange):
    layers = [60, 3, 140]
    n, steps = sum(layers), 30
    x0 = make_vector(n, F64, seed=2)
    x0[60:63] = 0.0                      # a zero layer: the trust ratio falls back to 1
    grads = gradients(W, n, steps, 10 + W)
    for wd in (0.0, 0.01):
        ours, port, opts = run_pair(
            W, lambda x, c: OneBitLamb(x, c, lr=1e-2, weight_decay=wd, freeze_step=10, layers=layers,
                                       exchange=exchange),
            lambda x, c: DeepSpeedOneBitLamb(x, c, layers, 1e-2, (0.9, 0.999), 1e-8, wd, freeze_step=11,
                                             exchange=exchange),
            grads, x0)
        for r in range(W):
            np.testing.assert_allclose(ours[r], port[r], rtol=1e-12, atol=1e-14, err_msg=f"rank {r} wd {wd}")
        assert opts[0].compressing and len(opts[0].scaling_coeff) == 3
        for x in ours[1:]:
            np.testing.assert_array_equal(x, ours[0])


def test_state_round_trip_and_bad_input():
    x0 = make_vector(50, F64, seed=3)
    grads = gradients(1, 50, 12, 1)

    def fn(comm):
        outs = []
        for cls, kw in ((ZeroOneAdam, dict(var_freeze_step=3, local_step_scaler=2)),
                        (OneBitLamb, dict(freeze_step=3, layers=[20, 30]))):
            a, b = x0.copy(), x0.copy()
            oa = cls(a, comm, lr=1e-2, **kw)
            for g in grads[:6]:
                oa.step(g[0])
            ob = cls(b, comm, lr=1e-2, **kw)
            ob.load_state_dict(oa.state_dict())
            b[:] = a
            for g in grads[6:]:
                oa.step(g[0])
                ob.step(g[0])
            outs.append((a, b))
        with pytest.raises(ValueError, match="layers"):
            OneBitLamb(x0.copy(), comm, freeze_step=1, layers=[10, 10])
        with pytest.raises(TypeError, match="freeze_step"):
            OneBitLamb(x0.copy(), comm)
        with pytest.raises(ValueError, match="var_update_scaler"):
            ZeroOneAdam(x0.copy(), comm, var_freeze_step=1, var_update_scaler=0)
        with pytest.raises(ValueError, match="momentum_mask"):
            ZeroOneAdam(x0.copy(), comm, var_freeze_step=1, momentum_mask=np.ones(3))
        with pytest.raises(TypeError, match="comm"):
            ZeroOneAdam(x0.copy(), None, var_freeze_step=1)
        return outs

    for a, b in sim.Cluster(1).run(fn)[0]:
        np.testing.assert_array_equal(a, b)
