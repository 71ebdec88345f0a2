"""Flower as the engine of ``lowband.federated``: the same methods, with a
Flower ``ServerApp`` as the server and one ``ClientApp`` per client.

Needs Flower (``pip install 'lowband[flower]'``, which brings
``flwr[simulation]`` and Ray); ``import lowband`` never imports it.

``FlowerRun(method, params, num_clients, rounds, grad_factory, **kwargs)``
builds ``server_app`` and ``client_app`` for ``lowband.federated.<method>``
(a class or its name) with the keyword arguments ``kwargs``:

- the server waits for ``num_clients`` nodes and gives client id k to the
  k-th node id in sorted order;
- each round it draws the participants with the method's own seeded
  sampling (``sample_clients``), sends each one a ``train`` message whose
  ConfigRecord holds the client id, the round and the server state (the
  model, and ``c`` for the SCAFFOLD family) as ``lowband.encode`` bytes;
- the client rebuilds its method object, restores its own state arrays from
  the node's ``context.state`` (control variates, momenta), runs
  ``client_update(grad_factory(client, round))`` and replies with the
  encoded uplink payload (``"up"``: the real compressed bytes), saving its
  state back;
- the server applies ``server_update`` to the replies sorted by client id,
  the order ``lowband.sim.Cluster`` adds them in.

So with a ``grad_factory`` that depends only on (client, round) the final
model equals, bit for bit, the one ``lowband.sim.Cluster`` gives for the
same method, seed and data (tested).  ``run()`` runs Flower's simulation
runtime and returns the final model; ``bytes_up`` / ``bytes_down`` are the
server object's star-topology counts, ``wire_up`` the bytes of the ``up``
entries Flower actually carried.
"""
from __future__ import annotations

import numpy as np

from . import federated as _fed
from ._validate import check_int
from .wire import decode, encode

__all__ = ["FlowerRun"]


class _Solo:
    """A one-client stand-in for a communicator: the Flower engine moves
    the messages itself, so no collective is ever called on it."""

    def __init__(self, rank, world_size):
        self.rank, self.world_size = rank, world_size

    def _refuse(self, *args, **kwargs):
        raise RuntimeError("lowband.flower: collectives are not available inside a Flower app")

    allreduce = allgather = alltoall = broadcast = barrier = compressed_allreduce = _refuse


def _method(method):
    cls = getattr(_fed, method, None) if isinstance(method, str) else method
    if not (isinstance(cls, type) and issubclass(cls, _fed._Federated)):
        raise TypeError(f"method: expected a lowband.federated method (FedAvg, Scaffold, Scallion, Scafcom, "
                        f"FedSpeed, FedSB) or its name, got {method!r}")
    return cls


class FlowerRun:
    """A lowband.federated method as a Flower ServerApp and ClientApp
    (module doc)."""

    def __init__(self, method, params, num_clients, rounds, grad_factory, *args, **kwargs):
        self.cls = _method(method)
        self.params = np.array(params, copy=True)
        self.num_clients = check_int(num_clients, "num_clients", 1)
        self.rounds = check_int(rounds, "rounds", 0)
        if not callable(grad_factory):
            raise TypeError(f"grad_factory: expected a callable grad_factory(client, round) -> grad_fn, "
                            f"got {type(grad_factory).__name__}")
        self.grad_factory = grad_factory
        self.args, self.kwargs = args, kwargs
        self.result = None
        self.server = None
        self.wire_up = 0
        # fail early on bad hyper-parameters
        self._make(0)
        from flwr.clientapp import ClientApp
        from flwr.serverapp import ServerApp
        self.server_app = ServerApp()
        self.server_app.main()(self._server_main)
        self.client_app = ClientApp()
        self.client_app.train()(self._client_train)

    def _make(self, client):
        return self.cls(self.params.copy(), _Solo(client, self.num_clients), *self.args, **self.kwargs)

    @property
    def bytes_up(self):
        return self.server.bytes_up if self.server else 0

    @property
    def bytes_down(self):
        return self.server.bytes_down if self.server else 0

    # -- the server ------------------------------------------------------------
    def _server_main(self, grid, context):
        import time
        from flwr.app import ConfigRecord, Message, RecordDict
        deadline = time.monotonic() + 300
        nodes = sorted(grid.get_node_ids())
        while len(nodes) < self.num_clients:
            if time.monotonic() > deadline:
                raise TimeoutError(f"lowband.flower: {len(nodes)} of {self.num_clients} nodes connected")
            time.sleep(0.2)
            nodes = sorted(grid.get_node_ids())
        nodes = nodes[:self.num_clients]
        server = self._make(0)
        self.server = server
        for r in range(self.rounds):
            chosen = server.clients()
            state = {k: encode(_dense(v)) for k, v in server.server_state().items()}
            msgs = [Message(RecordDict({"lowband": ConfigRecord({"client": int(k), "round": r, **state})}),
                            dst_node_id=nodes[int(k)], message_type="train") for k in chosen]
            replies = list(grid.send_and_receive(msgs))
            got = {}
            for m in replies:
                if m.has_error():
                    raise RuntimeError(f"lowband.flower: a client failed in round {r}: {m.error}")
                rec = m.content["lowband"]
                got[int(rec["client"])] = rec["up"]
            if sorted(got) != [int(k) for k in chosen]:
                raise RuntimeError(f"lowband.flower: round {r}: replies from {sorted(got)}, "
                                   f"expected {[int(k) for k in chosen]}")
            self.wire_up += sum(len(got[int(k)]) for k in chosen)
            server.server_update([decode(got[int(k)]) for k in chosen], chosen)
        self.result = server.flat.reshape(self.params.shape).copy()

    # -- a client ----------------------------------------------------------------
    def _client_train(self, msg, context):
        from flwr.app import ConfigRecord, Message, RecordDict
        rec = msg.content["lowband"]
        k, r = int(rec["client"]), int(rec["round"])
        obj = self._make(k)
        saved = context.state["lowband"] if "lowband" in context.state else None
        for name, arr in obj._arrays.items():
            if name in obj._server_arrays:
                arr[:] = decode(rec[name]).array.reshape(arr.shape)
            elif saved is not None and name in saved:
                arr[:] = decode(saved[name]).array.reshape(arr.shape)
        obj.flat[:] = decode(rec["params"]).array.reshape(-1)
        obj.t = r
        payload = obj.client_update(self.grad_factory(k, r))
        context.state["lowband"] = ConfigRecord({n: encode(_dense(a)) for n, a in obj.client_state().items()})
        return Message(RecordDict({"lowband": ConfigRecord({"client": k, "up": encode(payload)})}), reply_to=msg)

    # -- running -------------------------------------------------------------------
    def run(self, backend_config=None):
        """Run Flower's simulation runtime (Ray) with ``num_clients`` nodes;
        returns the final model."""
        from flwr.simulation import run_simulation
        config = backend_config or {"client_resources": {"num_cpus": 1}}
        run_simulation(self.server_app, self.client_app, num_supernodes=self.num_clients,
                       backend_config=config)
        if self.result is None:
            raise RuntimeError("lowband.flower: the simulation ended without a result (see Flower's log)")
        return self.result


def _dense(a):
    from ._payload import Dense
    return Dense(np.ascontiguousarray(a))
