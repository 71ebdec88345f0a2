"""lowband.torch.optim: the torch optimizers on lowband.sim.Cluster ranks and
on 2 and 4 gloo processes, against lowband.optim's NumPy optimizers on the
same data, a NumPy port of DeepSpeed's 1-bit Adam, and checkpoints resumed
bit for bit."""
import io
import math
import os
import sys
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lowband import optim as np_optim  # noqa: E402
from lowband.sim import Cluster  # noqa: E402
from lowband.torch.optim import DGC, DiLoCo, OneBitAdam  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _dist import spawn  # noqa: E402

STEPS = 6


_SEED_LOCK = threading.Lock()


def _model():
    # simulated ranks are threads: seeding torch's global generator and
    # drawing the initial weights must not interleave between them
    with _SEED_LOCK:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _closure(model, rank, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x, y = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)

    def closure():
        model.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss
    return closure


def _sgd(ps):
    return torch.optim.SGD(ps, lr=0.1, momentum=0.9)


def make_torch(name, ps, **kw):
    if name == "onebit":
        return OneBitAdam(ps, lr=0.01, weight_decay=0.01, freeze_step=2, **kw)
    if name == "dgc":
        return DGC(ps, lr=0.1, momentum=0.9, ratio=0.1, weight_decay=1e-3, **kw)
    if name == "diloco":
        return DiLoCo(ps, _sgd, outer_lr=0.7, outer_momentum=0.9, sync_every=2, **kw)
    if name == "sparseloco":
        return DiLoCo.sparseloco(ps, _sgd, sync_every=2, chunk=16, k=4, **kw)
    if name == "streaming":
        return DiLoCo.streaming(ps, _sgd, sync_every=2, fragments=2, **kw)
    raise ValueError(name)


def make_numpy(name, flat, comm, shapes):
    inner = lambda x: np_optim.SGD(x, 0.1, 0.9)    # noqa: E731
    if name == "onebit":
        return np_optim.OneBitAdam(flat, comm, 0.01, weight_decay=0.01, freeze_step=2, exchange="deepspeed")
    if name == "dgc":
        return np_optim.DGCSGD(flat, comm, 0.1, 0.9, 0.1, weight_decay=1e-3, tensors=shapes)
    if name == "diloco":
        return np_optim.DiLoCo(flat, comm, inner, 2, outer_lr=0.7, outer_momentum=0.9)
    if name == "sparseloco":
        return np_optim.DiLoCo.sparseloco(flat, comm, inner, 2, chunk=16, k=4)
    if name == "streaming":
        layers = [int(np.prod(s)) for s in shapes]
        return np_optim.DiLoCo.streaming(flat, comm, inner, 2, 2, layers=layers)
    raise ValueError(name)


NAMES = ("onebit", "dgc", "diloco", "sparseloco", "streaming")


def torch_run(rank, name, steps, first=0, **kw):
    model = _model()
    ps = list(model.parameters())
    opt = make_torch(name, ps, **kw)
    for t in range(first, first + steps):
        opt.step(_closure(model, rank, t))
    return model, opt


def numpy_run(comm, name, steps, make=None):
    """lowband.optim's NumPy optimizer (``make``, default make_numpy) on a
    flat vector, gradients from the same torch model and data."""
    model = _model()
    ps = list(model.parameters())
    shapes = [tuple(p.shape) for p in ps]
    flat = np.concatenate([p.detach().numpy().reshape(-1) for p in ps])
    opt = (make or make_numpy)(name, flat, comm, shapes)
    for t in range(steps):
        with torch.no_grad():
            off = 0
            for p in ps:
                p.copy_(torch.from_numpy(flat[off:off + p.numel()]).view_as(p))
                off += p.numel()
        _closure(model, comm.rank, t)()
        opt.step(np.concatenate([p.grad.numpy().reshape(-1) for p in ps]))
    return flat


def resume_run(comm, name, first, last, make=None):
    """Steps 0..first-1 of optimizer ``name`` (``make``, default make_torch),
    a checkpoint, steps first..last-1; a fresh model and optimizer loaded
    from the checkpoint take the same steps.  Returns (model, resumed model,
    resumed optimizer)."""
    make = make or make_torch
    model = _model()
    opt = make(name, list(model.parameters()), comm=comm)
    for t in range(first):
        opt.step(_closure(model, comm.rank, t))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for t in range(first, last):
        opt.step(_closure(model, comm.rank, t))
    model2 = _model()
    opt2 = make(name, list(model2.parameters()), comm=comm)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    for t in range(first, last):
        opt2.step(_closure(model2, comm.rank, t))
    return model, model2, opt2


def _flat(model):
    return np.concatenate([p.detach().numpy().reshape(-1) for p in model.parameters()])


def _assert_close(a, b, exact, what):
    if exact:
        assert a.tobytes() == b.tobytes(), f"{what}: max diff {np.abs(a - b).max()}"
    else:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=what)


# DiLoCo's inner step is torch's SGD on one side and lowband.optim.SGD on the
# other (same rule, torch may fuse the multiply-add): compared to 1e-5.
EXACT = {"onebit": True, "dgc": True, "diloco": False, "sparseloco": False, "streaming": False}


# ------------------------------------------------------------ on the simulator

@pytest.mark.parametrize("name", NAMES)
def test_sim_matches_numpy_optimizer(name):
    world = 2
    ref = Cluster(world).run(numpy_run, name, STEPS)
    runs = Cluster(world).run(lambda comm: torch_run(comm.rank, name, STEPS, comm=comm))
    got = [_flat(model) for model, _ in runs]
    for w in range(world):
        # Streaming DiLoCo mixes local and global values (alpha = 0.5): only
        # the global copy agrees across ranks
        same = runs[w][1].core.x_global if name == "streaming" else got[w]
        assert same.tobytes() == (runs[0][1].core.x_global if name == "streaming" else got[0]).tobytes(), \
            f"rank {w} differs"
        _assert_close(got[w], ref[w], EXACT[name], name)
    assert not np.array_equal(got[0], _flat(_model())), "the parameters did not move"


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_resume_bit_for_bit(name):
    def run(comm):
        model, model2, opt2 = resume_run(comm, name, 3, 6)
        return _flat(model), _flat(model2), opt2
    for a, b, opt2 in Cluster(2).run(run):
        assert a.tobytes() == b.tobytes()
        assert opt2.core.t == 6
        assert "process_group" not in opt2.param_groups[0]
        assert "process_group" not in str(opt2.state_dict()["param_groups"])


def test_params_are_views_of_the_flat_buffer():
    def run(comm):
        model = _model()
        ps = list(model.parameters())
        before = _flat(model)
        opt = DGC(ps, lr=0.1, comm=comm)
        assert np.array_equal(_flat(model), before)
        off = 0
        for p in ps:
            assert p.data_ptr() == opt.flat[off:].data_ptr()
            off += p.numel()
        ptr = opt.flat.data_ptr()
        opt.step(_closure(model, comm.rank, 0))
        assert opt.flat.data_ptr() == ptr
        assert np.array_equal(_flat(model), opt.flat.numpy())
    Cluster(2).run(run)


def test_lr_from_param_groups():
    def run(comm, lr):
        model = _model()
        opt = OneBitAdam(list(model.parameters()), lr=0.5, weight_decay=0.01, freeze_step=2, comm=comm)
        for t in range(3):
            opt.param_groups[0]["lr"] = lr
            opt.step(_closure(model, comm.rank, t))
        return _flat(model)
    a = Cluster(2).run(run, 0.01)[0]
    b = Cluster(2).run(lambda comm: _flat(torch_run(comm.rank, "onebit", 3, comm=comm)[0]))[0]
    assert a.tobytes() == b.tobytes()
    assert Cluster(2).run(run, 0.02)[0].tobytes() != b.tobytes()


def test_lr_scheduler_drives_the_core():
    def run(comm):
        model = _model()
        opt = DGC(list(model.parameters()), lr=0.1, ratio=0.1, comm=comm)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        rates = []
        for t in range(3):
            opt.step(_closure(model, comm.rank, t))
            rates.append(opt.core.lr)
            sched.step()
        return rates
    assert Cluster(2).run(run)[0] == [0.1, 0.05, 0.025]


def test_bad_arguments():
    def run(comm):
        model = _model()
        ps = list(model.parameters())
        with pytest.raises(ValueError, match="one parameter group"):
            DGC([{"params": ps[:2]}, {"params": ps[2:]}], lr=0.1, comm=comm)
        with pytest.raises(TypeError, match="float32 or all float64"):
            DGC([ps[0], torch.zeros(3, dtype=torch.float64, requires_grad=True)], lr=0.1, comm=comm)
        with pytest.raises(ValueError, match="freeze_step"):
            OneBitAdam(ps, freeze_step=-1, comm=comm)
        with pytest.raises(ValueError, match="inner_optimizer"):
            DiLoCo(ps, torch.optim.SGD(ps[:1], lr=0.1), comm=comm)
        with pytest.raises(TypeError, match="inner_optimizer"):
            DiLoCo(ps, 3, comm=comm)
        opt = DGC(ps, lr=0.1, comm=comm)
        with pytest.raises(ValueError, match="lowband"):
            opt.load_state_dict({"state": {}, "param_groups": opt.state_dict()["param_groups"]})
        ps[0].data = torch.zeros_like(ps[0])
        with pytest.raises(RuntimeError, match="params\\[0\\]"):
            opt.step(_closure(model, comm.rank, 0))
    Cluster(1).run(run)


# ------------------------------------------------- DeepSpeed's 1-bit Adam port

def deepspeed_onebit_adam(x0, grads, lr, betas, eps, wd, freeze_step):
    """NumPy transcription of DeepSpeed's OnebitAdam.step and
    NcclBackend.compressed_allreduce (deepspeed/runtime/fp16/onebit/adam.py,
    deepspeed/runtime/comm/nccl.py) for one flat float32 buffer, all ranks
    in lockstep; grads[t][w] is rank w's gradient at step t."""
    W, n = len(grads[0]), x0.size
    f = np.float32
    b1, b2 = betas
    divider = W * 8 // math.gcd(W, 8)
    corrected = n
    if n % (W * divider):
        corrected += W * divider - n % (W * divider)
    C = corrected // W
    x = [x0.astype(f).copy() for _ in range(W)]
    m = [np.zeros(n, f) for _ in range(W)]
    v = [np.zeros(n, f) for _ in range(W)]
    we = [np.zeros(corrected, f) for _ in range(W)]
    se = [np.zeros(C, f) for _ in range(W)]
    frozen = False
    for step, gs in enumerate(grads, 1):
        if not frozen:
            gbar = sum(gs[1:], gs[0].copy()) / f(W)
            for w in range(W):
                m[w] = f(b1) * m[w] + f(1 - b1) * gbar
                v[w] = f(b2) * v[w] + f(1 - b2) * gbar * gbar
        else:
            bufs, signs, scales = [], [], []
            for w in range(W):
                m[w] = f(b1) * m[w] + f(1 - b1) * gs[w]
                buf = np.concatenate([m[w], np.zeros(corrected - n, f)]) + we[w]
                scale = f(np.linalg.norm(buf.astype(np.float64)) / np.sqrt(corrected))
                sgn = np.where(buf >= 0, f(1), f(-1))
                we[w] = buf - scale * sgn
                bufs.append(buf)
                signs.append(sgn)
                scales.append(scale)
            out = np.empty(corrected, f)
            for j in range(W):
                c = np.zeros(C, f)
                for w in range(W):
                    c += signs[w][j * C:(j + 1) * C] * (scales[w] * f(1 / W))
                c += se[j]
                s2 = f(np.linalg.norm(c.astype(np.float64)) / np.sqrt(C))
                sgn = np.where(c >= 0, f(1), f(-1))
                se[j] = c - s2 * sgn
                out[j * C:(j + 1) * C] = s2 * sgn
            for w in range(W):
                m[w] = out[:n].copy()
        for w in range(W):
            update = m[w] / (np.sqrt(v[w]) + f(eps))
            if wd > 0:
                update += f(wd) * x[w]
            x[w] = x[w] - f(lr) * update
        if step >= freeze_step:
            frozen = True
    return x


@pytest.mark.parametrize("n", [37, 64])
def test_onebit_adam_matches_deepspeed_port(n):
    W, steps = 2, 7
    rng = np.random.default_rng(n)
    x0 = rng.standard_normal(n).astype(np.float32)
    grads = [[rng.standard_normal(n).astype(np.float32) for _ in range(W)] for _ in range(steps)]
    expect = deepspeed_onebit_adam(x0, grads, 0.01, (0.9, 0.999), 1e-8, 0.01, 3)

    def run(comm):
        p = torch.nn.Parameter(torch.from_numpy(x0.copy()))
        opt = OneBitAdam([p], lr=0.01, weight_decay=0.01, freeze_step=3, comm=comm)
        for t in range(steps):
            p.grad = torch.from_numpy(grads[t][comm.rank])
            opt.step()
        padded = {37: 48, 64: 64}[n]        # a multiple of W * lcm(W, 8) = 16
        assert opt.core.worker_error.size == padded and opt.core.server_error.size == padded // 2
        return p.detach().numpy().copy()
    got = Cluster(W).run(run)
    for w in range(W):
        np.testing.assert_allclose(got[w], expect[w], rtol=2e-5, atol=2e-6)


# ----------------------------------------------------------- gloo processes

def gloo_worker(rank, world, names, steps, folder=None, mode="plain"):
    """Each optimizer for `steps` steps; mode "save": checkpoint after 3
    steps into folder, then continue; "resume": load that checkpoint in a
    fresh model and optimizer and run the remaining steps."""
    out = {}
    for name in names:
        path = None if folder is None else os.path.join(folder, f"{name}-{rank}.pt")
        if mode == "resume":
            model = _model()
            opt = make_torch(name, list(model.parameters()), deterministic=True)
            ck = torch.load(path, weights_only=True)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
            for t in range(3, steps):
                opt.step(_closure(model, rank, t))
        else:
            model = _model()
            opt = make_torch(name, list(model.parameters()), deterministic=True)
            for t in range(steps):
                if mode == "save" and t == 3:
                    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
                opt.step(_closure(model, rank, t))
            assert opt.process_group is None and opt.comm.world_size == world
        out[name] = _flat(model)
    if mode == "save":
        from lowband.torch import ProcessGroupCommunicator
        out["powersgd"] = powersgd_run(ProcessGroupCommunicator(deterministic=True))
    return out


def powersgd_run(comm):
    """lowband.PowerSGD for 3 steps on fixed per-rank gradients."""
    from lowband import PowerSGD
    shapes = [(12, 10), (10,), (8, 3, 3)]
    psgd = PowerSGD(shapes, comm, rank=2)
    rng = np.random.default_rng(comm.rank)
    return [psgd.step(rng.standard_normal(202).astype(np.float32)) for _ in range(3)]


@pytest.mark.slow
def test_gloo_two_ranks_match_sim_and_resume(tmp_path):
    """Every optimizer (and lowband.PowerSGD) on 2 gloo ranks equals the
    simulator, and a checkpoint resumed in fresh processes equals the
    uninterrupted run."""
    names = NAMES
    res = spawn(gloo_worker, 2, names, STEPS, str(tmp_path), "save", timeout=180)
    resumed = spawn(gloo_worker, 2, names, STEPS, str(tmp_path), "resume", timeout=180)
    for name in names:
        sim = Cluster(2).run(lambda comm: _flat(torch_run(comm.rank, name, STEPS, comm=comm)[0]))
        ref = Cluster(2).run(numpy_run, name, STEPS)
        for w in range(2):
            if name != "streaming":     # (its local values are mixed per rank)
                assert res[w][name].tobytes() == res[0][name].tobytes(), f"{name}: rank {w} differs"
            assert res[w][name].tobytes() == sim[w].tobytes(), f"{name}: gloo != sim"
            _assert_close(res[w][name], ref[w], EXACT[name], name)
            assert resumed[w][name].tobytes() == res[w][name].tobytes(), f"{name}: resume differs"
    sim = Cluster(2).run(powersgd_run)
    for w in range(2):
        for t in range(3):
            assert res[w]["powersgd"][t].tobytes() == sim[w][t].tobytes() == sim[0][t].tobytes()


@pytest.mark.slow
def test_gloo_four_ranks_match_sim():
    names = ("onebit", "dgc", "sparseloco")
    res = spawn(gloo_worker, 4, names, 4, timeout=180)
    for name in names:
        sim = Cluster(4).run(lambda comm: _flat(torch_run(comm.rank, name, 4, comm=comm)[0]))
        for w in range(4):
            assert res[w][name].tobytes() == res[0][name].tobytes(), f"{name}: rank {w} differs"
            assert res[w][name].tobytes() == sim[w].tobytes(), f"{name}: gloo != sim"
