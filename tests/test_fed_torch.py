"""The federated and decentralized methods on torch.distributed (gloo, 3
processes) give the same models as on lowband.sim.Cluster(3)."""
import numpy as np
import pytest

from lowband import decentral, federated
from lowband.sim import Cluster
from fed_twins import LeastSquares


def scenario(comm):
    """Scafcom with partial participation, then D-PSGD with CHOCO gossip on
    a ring, then DADAO: every rank's final arrays."""
    prob = LeastSquares(comm.world_size, 5, seed=7)
    grad = prob.grad_fns()[comm.rank]
    x = np.zeros(5)
    opt = federated.Scafcom(x, comm, "topk:2", lr=0.05, local_steps=3, clients_per_round=2, seed=3)
    for _ in range(4):
        opt.round(grad)
    top = decentral.Topology.ring(comm.world_size)
    y = x.copy()
    d = decentral.DPSGD(y, comm, top, 0.05, compressor="topk:2", gamma=0.5)
    for _ in range(4):
        d.step(grad(y.copy()))
    z = np.zeros(5)
    dd = decentral.DADAO(z, comm, top, L=30.0, mu=0.1, seed=2)
    dd.run(lambda v: prob.full_grad(comm.rank, v), 3.0)
    return x, y, z


@pytest.mark.slow
def test_same_models_on_gloo_processes_and_on_the_cluster():
    pytest.importorskip("torch.distributed")
    from lowband.experiments.engines import run_workers
    from lowband.experiments.framework import Config
    got, _ = run_workers(Config(name="fed-torch", engine="torch", workers=3), scenario, timeout=300.0)
    want = Cluster(3).run(scenario)
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            np.testing.assert_array_equal(a, b)
