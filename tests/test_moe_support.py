"""Shared helpers of the MoE tests (finite differences, simulated workers),
and tests of those helpers so that a broken helper cannot hide a bug."""
import threading

import numpy as np

FD_EPS = 1e-6


def fd_grad(f, x, eps=FD_EPS):
    """Central finite differences of the scalar f at x (float64), every entry."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    flat, gf = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = f(x)
        flat[i] = old - eps
        down = f(x)
        flat[i] = old
        gf[i] = (up - down) / (2 * eps)
    return g


def assert_grad(analytic, f, x, rtol=1e-6, atol=1e-8, eps=FD_EPS):
    numeric = fd_grad(f, x, eps)
    np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=atol)


def logits(T, E, dtype=np.float64, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal((T, E))).astype(dtype)


class FakeWorld:
    """W workers as Python threads; allreduce sums int arrays over them
    (a threading.Barrier between the deposit and the read) and records every
    array that travelled."""

    def __init__(self, W):
        self.W = W
        self.barrier = threading.Barrier(W)
        self.slots = [None] * W
        self.sent = []
        self.lock = threading.Lock()

    def allreduce_for(self, rank):
        def allreduce(a):
            with self.lock:
                self.sent.append(np.array(a))
            self.slots[rank] = np.array(a)
            self.barrier.wait()
            total = np.sum(self.slots, axis=0)
            self.barrier.wait()
            return total
        return allreduce

    def run(self, fn):
        """fn(rank, allreduce) on W threads; returns the results by rank."""
        out = [None] * self.W
        errors = []

        def body(rank):
            try:
                out[rank] = fn(rank, self.allreduce_for(rank))
            except Exception as exc:  # pragma: no cover - surfaced below
                errors.append(exc)
                self.barrier.abort()

        ts = [threading.Thread(target=body, args=(r,)) for r in range(self.W)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if errors:
            raise errors[0]
        return out


def test_fd_grad_of_a_known_function():
    x = np.array([[0.3, -1.2], [2.0, 0.5]])
    analytic = 3 * x ** 2 * np.cos(x) - x ** 3 * np.sin(x)
    assert_grad(analytic, lambda v: float((np.cos(v) * v ** 3).sum()), x)
    try:
        assert_grad(analytic + 1e-3, lambda v: float((np.cos(v) * v ** 3).sum()), x)
    except AssertionError:
        pass
    else:  # pragma: no cover
        raise AssertionError("assert_grad accepted a wrong gradient")


def test_fake_world_sums_over_workers():
    world = FakeWorld(3)
    res = world.run(lambda rank, ar: ar(np.array([rank, 1], np.int64)))
    for r in res:
        assert r.tolist() == [3, 3]
    assert len(world.sent) == 3
