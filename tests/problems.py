"""Small deterministic problems for the optimizer and convergence tests:
heterogeneous least squares split over W workers, and a NumPy MLP on
scikit-learn's digits (bundled with scikit-learn, no download)."""
import numpy as np


# ---------------------------------------------------------------------------
# Least squares: f(x) = (1/W) sum_i f_i(x), f_i(x) = ||A_i x - b_i||^2 / (2 m)
# ---------------------------------------------------------------------------

class LeastSquares:
    """W workers, each with its own (A_i, b_i); the local optima differ
    (``spread``) so that at the global optimum every local gradient is
    non-zero (the heterogeneity that makes compression without feedback
    stall)."""

    def __init__(self, W=4, d=100, m=60, spread=1.0, seed=0, dtype=np.float64):
        rng = np.random.default_rng(seed)
        self.W, self.d, self.m = W, d, m
        self.A = [rng.standard_normal((m, d)) / np.sqrt(d) for _ in range(W)]
        centre = rng.standard_normal(d)
        self.b = [a @ (centre + spread * rng.standard_normal(d)) + 0.1 * rng.standard_normal(m)
                  for a in self.A]
        big_a, big_b = np.vstack(self.A), np.concatenate(self.b)
        self.x_star = np.linalg.lstsq(big_a, big_b, rcond=None)[0]
        hess = big_a.T @ big_a / (W * m)
        self.L = float(np.linalg.eigvalsh(hess)[-1])
        self.L_i = [float(np.linalg.eigvalsh(a.T @ a / m)[-1]) for a in self.A]
        self.dtype = np.dtype(dtype)
        self.A = [a.astype(dtype) for a in self.A]
        self.b = [b.astype(dtype) for b in self.b]

    def grad(self, rank, x):
        a = self.A[rank]
        return a.T @ (a @ x - self.b[rank]) / self.dtype.type(self.m)

    def loss(self, x):
        return float(np.mean([np.sum((a @ x - b) ** 2) / (2 * self.m) for a, b in zip(self.A, self.b)]))

    def distance(self, x):
        """||x - x*|| / ||x*||."""
        return float(np.linalg.norm(x - self.x_star) / np.linalg.norm(self.x_star))


# ---------------------------------------------------------------------------
# Digits MLP
# ---------------------------------------------------------------------------

def digits(seed=0, test_fraction=0.25):
    """(x_train, y_train, x_test, y_test): 8x8 digits scaled to [0, 1],
    a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data = load_digits()
    x = (data.data / 16.0).astype(np.float64)
    return train_test_split(x, data.target, test_size=test_fraction, random_state=seed,
                            stratify=data.target)


class MLP:
    """ReLU MLP with softmax cross-entropy over a flat parameter vector:
    weights (in, out) and biases per layer, packed in that order."""

    def __init__(self, sizes=(64, 64, 10), dtype=np.float64):
        self.sizes = tuple(sizes)
        self.dtype = np.dtype(dtype)
        self.shapes = []
        for i, o in zip(sizes[:-1], sizes[1:]):
            self.shapes += [(i, o), (o,)]
        self.n = sum(int(np.prod(s)) for s in self.shapes)

    def init(self, seed=0):
        rng = np.random.default_rng(seed)
        parts = []
        for s in self.shapes:
            parts.append(rng.standard_normal(s).ravel() * np.sqrt(2.0 / s[0]) if len(s) == 2
                         else np.zeros(s[0]))
        return np.concatenate(parts).astype(self.dtype)

    def unpack(self, flat):
        out, start = [], 0
        for s in self.shapes:
            size = int(np.prod(s))
            out.append(flat[start:start + size].reshape(s))
            start += size
        return out

    def loss_grad(self, flat, x, y):
        """(mean cross-entropy, flat gradient) on the batch (x, y)."""
        params = self.unpack(flat)
        acts, h = [x], x
        for li in range(0, len(params), 2):
            h = h @ params[li] + params[li + 1]
            if li + 2 < len(params):
                h = np.maximum(h, 0)
            acts.append(h)
        logits = acts[-1]
        logits = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        n = len(y)
        loss = float(-np.mean(np.log(p[np.arange(n), y] + 1e-300)))
        delta = p
        delta[np.arange(n), y] -= 1
        delta /= n
        grads = [None] * len(params)
        for li in range(len(params) - 2, -1, -2):
            a_in = acts[li // 2]
            grads[li] = a_in.T @ delta
            grads[li + 1] = delta.sum(axis=0)
            if li > 0:
                delta = (delta @ params[li].T) * (acts[li // 2] > 0)
        return loss, np.concatenate([g.ravel() for g in grads]).astype(self.dtype)

    def loss(self, flat, x, y):
        return self.loss_grad(flat, x, y)[0]

    def accuracy(self, flat, x, y):
        params = self.unpack(flat)
        h = x
        for li in range(0, len(params), 2):
            h = h @ params[li] + params[li + 1]
            if li + 2 < len(params):
                h = np.maximum(h, 0)
        return float(np.mean(h.argmax(axis=1) == y))


def worker_batches(x, y, rank, world_size, batch, steps, seed=0):
    """The (x, y) minibatches of one worker: its shard of the data (every
    W-th sample), reshuffled each epoch with a per-worker seed."""
    xs, ys = x[rank::world_size], y[rank::world_size]
    rng = np.random.default_rng([seed, rank])
    order = np.empty(0, dtype=np.int64)
    for _ in range(steps):
        if len(order) < batch:
            order = np.concatenate([order, rng.permutation(len(xs))])
        idx, order = order[:batch], order[batch:]
        yield xs[idx], ys[idx]
