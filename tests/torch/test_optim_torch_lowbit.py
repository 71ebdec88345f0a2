"""lowband.torch.optim's Signum, ZeroOneAdam and OneBitLamb on
lowband.sim.Cluster ranks: bit for bit lowband.optim's NumPy optimizers on
the same model and data, and a checkpoint resumed bit for bit."""
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lowband import optim as np_optim  # noqa: E402
from lowband.sim import Cluster  # noqa: E402
from lowband.torch.optim import OneBitLamb, Signum, ZeroOneAdam  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_optim_torch import _flat, _model  # noqa: E402
from test_optim_torch import numpy_run as numpy_run_with, resume_run  # noqa: E402

STEPS = 8
NAMES = ("signum", "zoadam", "lamb")


def make_torch(name, ps, **kw):
    if name == "signum":
        return Signum(ps, lr=0.01, beta=0.9, weight_decay=1e-3, **kw)
    if name == "zoadam":
        return ZeroOneAdam(ps, lr=0.01, var_freeze_step=4, var_update_scaler=1, local_step_scaler=2,
                           local_step_clipper=2, **kw)
    return OneBitLamb(ps, lr=0.01, weight_decay=0.01, freeze_step=3, **kw)


def make_numpy(name, flat, comm, shapes):
    if name == "signum":
        return np_optim.Signum(flat, comm, 0.01, 0.9, 1e-3)
    if name == "zoadam":
        return np_optim.ZeroOneAdam(flat, comm, 0.01, var_freeze_step=4, var_update_scaler=1,
                                    local_step_scaler=2, local_step_clipper=2, exchange="deepspeed")
    return np_optim.OneBitLamb(flat, comm, 0.01, weight_decay=0.01, freeze_step=3, exchange="deepspeed",
                               layers=[int(np.prod(s)) for s in shapes])


def numpy_run(comm, name):
    return numpy_run_with(comm, name, STEPS, make_numpy)


@pytest.mark.parametrize("name", NAMES)
def test_sim_matches_numpy_optimizer_and_resumes(name):
    ref = Cluster(2).run(numpy_run, name)

    def run(comm):
        model, model2, _ = resume_run(comm, name, 4, STEPS, make_torch)
        return _flat(model), _flat(model2)

    for rank, (a, b) in enumerate(Cluster(2).run(run)):
        assert a.tobytes() == ref[rank].tobytes(), f"{name} rank {rank}: max diff {np.abs(a - ref[rank]).max()}"
        assert a.tobytes() == b.tobytes()
    assert not np.array_equal(ref[0], _flat(_model()))
