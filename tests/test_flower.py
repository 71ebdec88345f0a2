"""lowband.flower: a federated method run by Flower's simulation runtime
(4 virtual clients on Ray) ends with the same model as on
lowband.sim.Cluster(4)."""
import numpy as np
import pytest

from lowband import federated
from lowband.sim import Cluster

N, D, ROUNDS = 4, 6, 3
TARGETS = np.random.default_rng(0).standard_normal((N, D))


class Grads:
    """grad_factory(client, round): a stochastic gradient whose noise
    depends only on (client, round, call), so any engine sees the same."""

    def __call__(self, k, r):
        rng = np.random.default_rng([k, r])
        return lambda y: (y - TARGETS[k]) * (1 + k) + 0.1 * rng.standard_normal(D)


KW = dict(lr=0.05, local_steps=3, clients_per_round=2, seed=5)


def cluster_result(method, *args):
    def worker(comm):
        x = np.zeros(D)
        opt = getattr(federated, method)(x, comm, *args, **KW)
        for r in range(ROUNDS):
            opt.round(Grads()(comm.rank, r))
        return x, opt.bytes_up
    return Cluster(N).run(worker)[0]


@pytest.mark.slow
@pytest.mark.parametrize("method,args", [("Scafcom", ("topk:2",))])
def test_flower_simulation_matches_the_cluster(method, args):
    pytest.importorskip("flwr.simulation")
    pytest.importorskip("ray")
    from lowband.flower import FlowerRun
    run = FlowerRun(method, np.zeros(D), N, ROUNDS, Grads(), *args, **KW)
    got = run.run(backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
    want, up = cluster_result(method, *args)
    np.testing.assert_array_equal(got, want)
    assert run.bytes_up == up and run.wire_up == up


def test_flower_run_bad_input():
    # checked before Flower is imported: runs without flwr installed
    from lowband.flower import FlowerRun
    with pytest.raises(TypeError, match="method: expected a lowband.federated method"):
        FlowerRun("Adam", np.zeros(D), N, 1, Grads())
    with pytest.raises(TypeError, match="grad_factory: expected a callable"):
        FlowerRun("FedAvg", np.zeros(D), N, 1, 3, lr=0.1, local_steps=1)
    with pytest.raises(ValueError, match="clients_per_round"):
        FlowerRun("FedAvg", np.zeros(D), N, 1, Grads(), lr=0.1, local_steps=1, clients_per_round=9)
