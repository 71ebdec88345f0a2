"""A small DDP training run on scikit-learn's digits for the hook tests
(imported by the spawned ranks)."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from lowband.bench.torch import make_hook

_DATA = None


def digits():
    """(x_train, y_train, x_test, y_test) as tensors (fixed split)."""
    global _DATA
    if _DATA is None:
        from sklearn.datasets import load_digits
        d = load_digits()
        x = torch.tensor(d.data / 16.0, dtype=torch.float32)
        y = torch.tensor(d.target, dtype=torch.int64)
        perm = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
        x, y = x[perm], y[perm]
        _DATA = (x[:1500], y[:1500], x[1500:], y[1500:])
    return _DATA


def make_model(seed=0, hidden=64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def batch(rank, world, step, size=32):
    x, y, _, _ = digits()
    rng = np.random.default_rng(1000 * step + rank)
    idx = torch.from_numpy(rng.integers(0, len(y), size))
    return x[idx], y[idx]


def accuracy(model):
    _, _, x, y = digits()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(rank, world, kind, steps, *, opts=None, ddp_opts=None, lr=0.1, seed=0, state=None,
          model_state=None, start=0, save_at=None, hidden=64, record=None, micro=1, decay=False):
    """Train; returns (params, accuracy, state, extra).  ``save_at``: also
    return the checkpoint (model, optimizer, hook state pickled) after that
    many steps.  ``record``: a list that gets (inputs, outputs) of every hook
    call."""
    import pickle
    model = make_model(seed, hidden)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if model_state is not None:
        model.load_state_dict(model_state["model"])
        opt.load_state_dict(model_state["opt"])
    ddp = nn.parallel.DistributedDataParallel(model, **(ddp_opts or {}))
    hook_state, hook = make_hook(kind, **(opts or {}))
    if state is not None:
        hook_state = pickle.loads(state)
    if hook is not None:
        if record is not None:
            inner = hook

            index = {p: i for i, p in enumerate(model.parameters())}

            def recording(st, bucket):
                grads = [g.clone().numpy() for g in bucket.gradients()]
                fut = inner(st, bucket)
                value = fut.wait()
                in_place = value.data_ptr() == bucket.buffer().data_ptr() and value.shape == bucket.buffer().shape
                record.append(([index[p] for p in bucket.parameters()], grads,
                               [g.clone().numpy() for g in bucket.gradients()], bucket.is_last(), in_place))
                return fut
            ddp.register_comm_hook(hook_state if hook_state is not None else None, recording)
        else:
            ddp.register_comm_hook(hook_state, hook)
    loss_fn = nn.CrossEntropyLoss()
    checkpoint = None
    for step in range(start, start + steps):
        opt.zero_grad()
        for m in range(micro):
            x, y = batch(rank, world, step * micro + m)
            if m < micro - 1:
                with ddp.no_sync():
                    loss_fn(ddp(x), y).backward()
            else:
                loss_fn(ddp(x), y).backward()
        if decay:   # linear decay to zero over the run
            for group in opt.param_groups:
                group["lr"] = lr * (1 - step / (start + steps))
        opt.step()
        if save_at is not None and step + 1 == save_at:
            checkpoint = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                          "opt": pickle.loads(pickle.dumps(opt.state_dict())),
                          "hook": pickle.dumps(hook_state)}
    params = [p.detach().clone().numpy() for p in model.parameters()]
    summary = None
    if hook_state is not None and hasattr(hook_state, "bytes_sent"):
        summary = {"iter": hook_state.iter, "bytes_sent": hook_state.bytes_sent,
                   "bytes_dense": hook_state.bytes_dense, "comm": (hook_state.comm.bytes_sent,
                                                                   hook_state.comm.calls)}
    return params, accuracy(model), summary, checkpoint


def params_equal(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
