"""Training loops with the NumPy MoE layers: gradient accumulation,
evaluation forwards, simulated data-parallel workers, the token-weighted
global balancer and its once-per-step synchronisation."""
import numpy as np
import pytest

from lowband import moe, sim

H, F, E = 4, 5, 4


def batch(seed, T=10):
    return np.random.default_rng(seed).standard_normal((T, H))


def test_backward_accumulates_until_zero_grad():
    layer = moe.MoELayer(H, F, E, 2, seed=1, aux_coef=0.1, z_coef=0.01)
    xs = [batch(1), batch(2)]
    gs = []
    for x in xs:                                   # separately
        out = layer.forward(x)
        layer.zero_grad()
        layer.backward(np.cos(out))
        gs.append({n: g.copy() for n, g in layer.grads.items()})
    layer.zero_grad()
    for x in xs:                                   # accumulated
        out = layer.forward(x)
        layer.backward(np.cos(out))
    for n, g in layer.grads.items():
        np.testing.assert_allclose(g, gs[0][n] + gs[1][n], rtol=1e-13, atol=1e-15)
    layer.zero_grad()
    assert all(not g.any() for g in layer.grads.values())


def test_eval_forwards_leave_the_balancer_alone():
    layer = moe.ChainOfExperts(H, F, E, 2, 1, seed=2, aux_scope="global")
    x = batch(3)
    train_out = layer.forward(x, micro_batch=0)
    counts = [b.counts for b in layer.balancers]
    assert layer.aux_loss > 0
    layer.eval()
    assert not layer.training
    eval_out = layer.forward(batch(4))
    assert layer.aux_loss == 0.0
    for b, c in zip(layer.balancers, counts):
        assert np.array_equal(b.counts, c) and b.tokens == 10
    np.testing.assert_array_equal(layer.forward(x), train_out)    # same function of x
    layer.train()
    layer.forward(batch(4), micro_batch=1)
    assert layer.balancers[0].tokens == 20
    assert eval_out.shape == x.shape


def test_simulated_data_parallel_workers_equal_the_concatenated_batch():
    """Two workers with different padding; comm= wires the balancers; the
    mean of the workers' gradients equals one worker on both batches."""
    xs = [batch(10, 8), batch(11, 8)]
    masks = [np.array([True] * 8), np.array([True] * 5 + [False] * 3)]

    def worker(comm):
        layer = moe.MoELayer(H, F, E, 2, seed=5, aux_scope="global", aux_coef=0.5, comm=comm)
        r = comm.rank
        layer.forward(xs[r], masks[r], micro_batch=0)
        layer.backward(np.zeros((8, H)))           # the auxiliary gradient only
        return layer.grads["router"].copy(), layer.aux_loss

    res = sim.Cluster(2).run(worker)
    single = moe.MoELayer(H, F, E, 2, seed=5, aux_scope="global", aux_coef=0.5)
    single.forward(np.concatenate(xs), np.concatenate(masks), micro_batch=0)
    single.backward(np.zeros((16, H)))
    np.testing.assert_allclose((res[0][0] + res[1][0]) / 2, single.grads["router"], rtol=1e-12)
    np.testing.assert_allclose((res[0][1] + res[1][1]) / 2, single.aux_loss, rtol=1e-12)
    assert single.grads["router"].any()


def test_world_size_weights_by_valid_tokens():
    """E = 4, k = 1: worker A has 3 valid tokens, worker B 1; with world_size
    the mean of their gradients is the concatenated batch's gradient."""
    rng = np.random.default_rng(6)
    za, zb = rng.standard_normal((3, 4)), rng.standard_normal((1, 4))
    ra, rb = moe.route(za, 1), moe.route(zb, 1)
    total = ra.counts() + rb.counts()

    def allreduce_for(mine):
        def allreduce(a):
            other = np.append(rb.counts() if mine is ra else ra.counts(), 1 if mine is ra else 3)
            return a + other
        return allreduce
    grads = []
    for r in (ra, rb):
        lb = moe.LoadBalancer(4, 1, allreduce_for(r), world_size=2)
        lb.accumulate(r)
        grads.append(lb.loss(r)[1])
        assert np.array_equal(lb.counts, total) and lb.tokens == 4
    lb1 = moe.LoadBalancer(4, 1)
    r1 = moe.route(np.concatenate([za, zb]), 1)
    lb1.accumulate(r1)
    g1 = lb1.loss(r1)[1]
    np.testing.assert_allclose(np.concatenate(grads) / 2, g1, rtol=1e-12)
    plain = moe.LoadBalancer(4, 1, allreduce_for(ra))          # no world_size: unweighted
    plain.accumulate(ra)
    assert not np.allclose(plain.loss(ra)[1] / 2, g1[:3])


def test_sync_step_uses_the_whole_step_and_one_allreduce():
    calls = []

    def allreduce(a):
        calls.append(a.copy())
        return a * 2                               # two identical workers
    lb = moe.LoadBalancer(E, 2, allreduce, world_size=2, sync="step")
    rs = [moe.route(batch(20 + m) @ np.ones((H, E)) * np.arange(1, E + 1), 2) for m in range(3)]
    for m, r in enumerate(rs):
        lb.accumulate(r, micro_batch=m)
    with pytest.raises(RuntimeError, match="sync"):
        lb.loss(rs[0], micro_batch=0)
    lb.sync()
    lb.sync()
    assert len(calls) == 1 and calls[0].shape == (E + 3,)
    ref = moe.LoadBalancer(E, 2)
    for m, r in enumerate(rs):
        ref.accumulate(r, micro_batch=m)
    for m, r in enumerate(rs):                     # f of the whole step for every micro-batch
        loss, g = lb.loss(r, micro_batch=m)
        f_all = ref.fractions
        P = r.aux_scores().mean(axis=0)
        assert abs(loss - E * (f_all * P).sum()) < 1e-12
    with pytest.raises(RuntimeError, match="reset"):
        lb.accumulate(rs[0], micro_batch=9)
    lb.reset()
    lb.accumulate(rs[0], micro_batch=0)


def test_comm_argument_checks():
    with pytest.raises(TypeError, match="comm: give comm, or allreduce"):
        moe.LoadBalancer(4, 1, lambda a: a, comm=object())
    with pytest.raises(TypeError, match="comm: expected a communicator"):
        moe.LoadBalancer(4, 1, comm=object())
    with pytest.raises(ValueError, match="sync"):
        moe.LoadBalancer(4, 1, sync="epoch")


def test_chain_of_experts_defaults_are_the_authors():
    coe = moe.ChainOfExperts(H, F, E, 2, 2, seed=7)
    assert coe.renormalize is False
    coe.forward(batch(8))
    for r in coe.routings:                         # the selected softmax scores, not renormalised
        np.testing.assert_allclose(r.weights, np.take_along_axis(r.scores, r.experts, 1))
        assert (r.weights.sum(axis=1) < 1).all()


def test_a_loss_of_one_does_not_prove_balance():
    """Flat router probabilities give 1 even when every token picks the same
    two experts (the documented caveat); the counts show the imbalance."""
    T, E = 64, 8
    z = np.zeros((T, E))
    z[:, :2] = 1e-9                                # every token: experts 0 and 1
    r = moe.route(z, 2)
    loss, grad = moe.load_balancing_loss(r)
    assert abs(loss - 1.0) < 1e-6
    assert np.array_equal(r.counts(), [T, T, 0, 0, 0, 0, 0, 0])
    assert (grad[:, :2] > 0).all() and (grad[:, 2:] < 0).all()   # still pushes them apart
