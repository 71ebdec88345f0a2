"""Error-feedback objects against their twins, equivalences, state dicts."""
import numpy as np
import pytest

import lowband
from lowband import _reference as ref
from lowband import feedback as F
from helpers import FLOATS, assert_same, make_vector


def dense(p, n):
    return p.to_dense().reshape(-1) if not isinstance(p, np.ndarray) else p


def topk_ref(ratio):
    def compress(p, step):
        return lowband.Sparse(*ref.topk(p, lowband._validate.k_from_ratio(p.size, ratio)), p.size)
    return compress


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("spec", ["topk:0.01", "chunked:100:3", "randomk:0.05:seed=3", "threshold:1.5"])
def test_ef14_matches_twin(spec, dtype):
    n = 3000
    fb = F.ErrorFeedback(spec, np.zeros(n, dtype))
    comp = lowband.from_spec(spec)
    e = np.zeros(n, dtype)
    for t in range(6):
        g = make_vector(n, dtype, "heavy", seed=t)
        got = fb.step(g)
        want, e = ref.ef14_step(e, g, lambda p, s: comp.compress(p, step=s), lambda p: dense(p, n), t)
        assert got == want
        assert_same(fb.error, e)


@pytest.mark.parametrize("dtype", FLOATS)
def test_decayed_feedback_matches_twin(dtype):
    n = 2000
    fb = F.DecayedFeedback("topk:0.05", np.zeros(n, dtype), beta=0.95)
    e = np.zeros(n, dtype)
    comp = lowband.from_spec("topk:0.05")
    for t in range(5):
        g = make_vector(n, dtype, seed=t)
        got = fb.step(g)
        want, e = ref.ef14_step(e, g, lambda p, s: comp.compress(p), lambda p: dense(p, n), t, decay=0.95)
        assert got == want
        assert_same(fb.error, e)


def test_ef14_lr_rescaling():
    n = 100
    fb = F.ErrorFeedback("topk:5", np.zeros(n))
    g = make_vector(n, np.float64)
    fb.step(g, lr=0.1)
    e1 = fb.error.copy()
    fb.step(np.zeros(n), lr=0.05)   # residual doubles before compensation
    p = 2 * e1
    expect = p.copy()
    expect[ref.topk(p, 5)[0].astype(int)] = 0
    assert np.allclose(fb.error, expect)


@pytest.mark.parametrize("dtype", FLOATS)
def test_ef21_and_econtrol_match_twins(dtype):
    n = 1500
    comp = lowband.from_spec("topk:0.02")
    ef21 = F.EF21(comp, np.zeros(n, dtype))
    ec = F.EControl(comp, np.zeros(n, dtype), eta=0.3)
    h = np.zeros(n, dtype)
    h2, e2 = np.zeros(n, dtype), np.zeros(n, dtype)
    for t in range(6):
        g = make_vector(n, dtype, "heavy", seed=10 + t)
        c, h = ref.ef21_step(h, g, lambda p, s: comp.compress(p), lambda p: dense(p, n), t)
        assert ef21.step(g) == c
        assert_same(ef21.h, h)
        c2, h2, e2 = ref.econtrol_step(h2, e2, g, 0.3, lambda p, s: comp.compress(p), lambda p: dense(p, n), t)
        assert ec.step(g) == c2
        assert_same(ec.h, h2)
        assert_same(ec.e, e2)


def test_econtrol_with_eta_zero_is_ef21():
    n = 1000
    a, b = F.EF21("topk:0.01", np.zeros(n)), F.EControl("topk:0.01", np.zeros(n), eta=0.0)
    for t in range(8):
        g = make_vector(n, np.float64, seed=t)
        assert a.step(g) == b.step(g)
        assert_same(a.h, b.h)


def test_ef21w_equals_ef21_after_rescaling_for_topk():
    n, w = 800, 2.5
    a = F.EF21("topk:0.05", np.zeros(n))
    b = F.EF21W("topk:0.05", np.zeros(n), weight=w)
    for t in range(8):
        g = make_vector(n, np.float64, "heavy", seed=t)
        ca, cb = a.step(g), b.step(g)
        assert np.array_equal(ca.indices, cb.indices)
        assert np.allclose(ca.values, w * cb.values, rtol=1e-12)
        assert np.allclose(a.h, w * b.h, rtol=1e-10, atol=1e-12)


def test_ef21_server_tracks_mean_h():
    n, W = 500, 3
    workers = [F.EF21("topk:0.1", np.zeros(n)) for _ in range(W)]
    server = F.EF21Server(np.zeros(n))
    for t in range(5):
        msgs = [wk.step(make_vector(n, np.float64, seed=t * W + i)) for i, wk in enumerate(workers)]
        g = server.update(msgs)
        assert np.allclose(g, np.mean([wk.h for wk in workers], axis=0))
    ws = [0.5, 1.0, 1.5]
    wworkers = [F.EF21W("topk:0.1", np.zeros(n), weight=w) for w in ws]
    wserver = F.EF21Server(np.zeros(n), weights=ws)
    for t in range(3):
        g = wserver.update([wk.step(make_vector(n, np.float64, seed=t + i)) for i, wk in enumerate(wworkers)])
        assert np.allclose(g, np.mean([w * wk.h for w, wk in zip(ws, wworkers)], axis=0))


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("masking", [False, True])
def test_dgc_matches_twin(nesterov, masking):
    n = 5000
    d = F.DGC(np.zeros(n, np.float32), 0.01, momentum=0.9, nesterov=nesterov, masking=masking, exact=True)
    u, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for t in range(6):
        g = make_vector(n, np.float32, seed=t)
        p = d.step(g)
        idx, sent, u, v = ref.dgc_step(u, v, g, 0.9, nesterov, masking,
                                       lambda vv: ref.topk(vv, 50)[0].astype(np.int64))
        assert np.array_equal(p.indices, idx) and np.array_equal(p.values, sent)
        assert_same(d.u, u)
        assert_same(d.v, v)


def test_dgc_warmup_schedule_and_sampled_bounds():
    n = 200000
    d = F.DGC(np.zeros(n, np.float32), 0.001, warmup_steps=2)
    assert [d.density(t) for t in range(10)] == [0.25, 0.25, 0.0625, 0.0625, 0.015625, 0.015625,
                                                 0.004, 0.004, 0.001, 0.001]
    for t in range(10):
        p = d.step(make_vector(n, np.float32, seed=t))
        k = round(d.density(t) * n)
        assert int(np.ceil(0.8 * k)) <= p.nnz <= int(1.3 * k)


def test_dgc_clipping():
    d = F.DGC(np.zeros(10), 0.5, clip=1.0, exact=True, momentum=0.0)
    p = d.step(np.full(10, 10.0))
    assert np.allclose(np.linalg.norm(p.to_dense()) ** 2 + np.linalg.norm(d.v) ** 2, 1.0)


@pytest.mark.parametrize("make", [
    lambda: F.ErrorFeedback("topk:0.1", np.zeros((10, 5), np.float32)),
    lambda: F.DecayedFeedback("chunked:10:2", np.zeros(50), beta=0.9),
    lambda: F.EF21("topk:3", np.zeros(50)),
    lambda: F.EF21W("topk:3", np.zeros(50), weight=2.0),
    lambda: F.EControl("topk:3", np.zeros(50), eta=0.1),
    lambda: F.DGC(np.zeros(50), 0.1, exact=True),
])
def test_state_dict_round_trip_and_refusals(make):
    a = make()
    shape = a.shape
    for t in range(3):
        a.step(make_vector(a.size, a.dtype, seed=t).reshape(shape))
    sd = a.state_dict()
    b = make()
    b.load_state_dict(sd)
    g = make_vector(a.size, a.dtype, seed=99).reshape(shape)
    assert a.step(g) == b.step(g)
    for name in a._state_names:
        assert_same(getattr(a, name), getattr(b, name))
    bad = {**sd, "arrays": {k: v.astype(np.float16) for k, v in sd["arrays"].items()}}
    with pytest.raises(TypeError, match="dtype"):
        b.load_state_dict(bad)
    bad = {**sd, "arrays": {k: v.reshape(-1)[:-1] for k, v in sd["arrays"].items()}}
    with pytest.raises(ValueError, match="shape"):
        b.load_state_dict(bad)
    with pytest.raises(ValueError, match="state_dict"):
        b.load_state_dict({**sd, "kind": "Nope"})
    with pytest.raises(ValueError, match="arrays"):
        b.load_state_dict({**sd, "arrays": {}})


def test_bad_arguments():
    with pytest.raises(TypeError, match="like"):
        F.ErrorFeedback("topk:0.1", np.zeros(5, np.int32))
    fb = F.ErrorFeedback("topk:0.1", np.zeros(5))
    with pytest.raises(ValueError, match="grad: expected shape"):
        fb.step(np.zeros(6))
    with pytest.raises(TypeError, match="grad: expected dtype float64"):
        fb.step(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="beta"):
        F.DecayedFeedback("topk:0.1", np.zeros(5), beta=1.5)
    with pytest.raises(ValueError, match="weight"):
        F.EF21W("topk:0.1", np.zeros(5), weight=0)
    with pytest.raises(ValueError, match="ratio"):
        F.DGC(np.zeros(5), 2.0)
    with pytest.raises(ValueError, match="spec"):
        F.EF21("bogus", np.zeros(5))


def test_concurrent_steps_on_one_object_are_serialised():
    import threading
    n = 300000
    g = make_vector(n, np.float32, seed=3)
    shared = F.ErrorFeedback("topk:0.01", np.zeros(n, np.float32))
    seq = F.ErrorFeedback("topk:0.01", np.zeros(n, np.float32))
    for _ in range(8):
        seq.step(g)
    ts = [threading.Thread(target=lambda: [shared.step(g) for _ in range(4)]) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert shared.t == 8
    assert_same(shared.error, seq.error)
