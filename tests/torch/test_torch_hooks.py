"""DDP communication hooks on real gloo ranks: identical replicas, the same
results as lowband.sim.Cluster running the same algorithm on the recorded
gradients, byte counters equal to the bytes handed to torch, bitwise
checkpoint resume, torch's allreduce_hook when compression is off, torch's
powerSGD_hook for one step from the same Q, no_sync, several buckets."""
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
pytest.importorskip("sklearn")

import lowband  # noqa: E402
import lowband.sim as sim  # noqa: E402
from _dist import CountingDist, spawn  # noqa: E402
import _train  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

SMALL = dict(hidden=16)
MIN = 64      # min_numel: every weight matrix of the small model is compressed
CONFIGS = {
    # name: (kind, hook options, DDP options, micro-steps)
    "topk_ef": ("compression", dict(compressor="topk:0.05", feedback="ef", start_iter=2, min_numel=MIN),
                dict(bucket_cap_mb=0.001), 1),
    "sign_ef": ("compression", dict(compressor="sign", feedback="ef", start_iter=2, min_numel=MIN),
                dict(gradient_as_bucket_view=True), 1),
    "randomk_ef": ("compression", dict(compressor="randomk:0.1", feedback="ef", start_iter=2, min_numel=MIN),
                   dict(static_graph=True), 1),
    "fp16": ("compression", dict(compressor="fp16", feedback="none", start_iter=2, min_numel=MIN), {}, 1),
    "topk_ef21": ("compression", dict(compressor="topk:0.1", feedback="ef21", start_iter=2, min_numel=MIN),
                  dict(bucket_cap_mb=0.001, find_unused_parameters=True), 1),
    "sign_econtrol": ("compression", dict(compressor="sign", feedback="econtrol", eta=0.5, start_iter=2,
                                          min_numel=MIN), {}, 1),
    "blockwise_nosync": ("compression", dict(compressor="blockwise:4", feedback="ef", start_iter=2,
                                             min_numel=MIN), {}, 4),
    "topk_torch": ("compression", dict(compressor="topk:0.05", feedback="ef", start_iter=2, min_numel=MIN,
                                       backend="torch"), dict(bucket_cap_mb=0.001), 1),
    "randomk_torch": ("compression", dict(compressor="randomk:0.1", feedback="ef", start_iter=2, min_numel=MIN,
                                          backend="torch"), dict(static_graph=True), 1),
    "fp16_torch": ("compression", dict(compressor="fp16", feedback="none", start_iter=2, min_numel=MIN,
                                       backend="torch"), {}, 1),
    "blockwise_torch": ("compression", dict(compressor="blockwise:4", feedback="ef", start_iter=2, min_numel=MIN,
                                            backend="torch"), {}, 4),
    "threshold_ef": ("compression", dict(compressor="threshold:0.002", feedback="ef", start_iter=2, min_numel=MIN),
                     dict(bucket_cap_mb=0.001), 1),
    "threshold_torch": ("compression", dict(compressor="threshold:0.002", feedback="ef", start_iter=2,
                                            min_numel=MIN, backend="torch"), dict(bucket_cap_mb=0.001), 1),
    "chunked_ef": ("compression", dict(compressor="chunked:32:2", feedback="ef", start_iter=2, min_numel=MIN),
                   dict(bucket_cap_mb=0.001), 1),
    "chunked_torch": ("compression", dict(compressor="chunked:32:2", feedback="ef", start_iter=2, min_numel=MIN,
                                          backend="torch"), dict(bucket_cap_mb=0.001), 1),
    "sign_torch": ("compression", dict(compressor="sign", feedback="ef", start_iter=2, min_numel=MIN,
                                       backend="torch"), dict(gradient_as_bucket_view=True), 1),
    # one bucket, several compressed tensors: the grouped top-k calls
    # (ErrorFeedback.step_group, lowband.topk_group) against the same hook
    # compressing tensor by tensor, through DDP's bucket rebuild (start_iter 0)
    "topk_ef_group": ("compression", dict(compressor="topk:0.05", feedback="ef", start_iter=0,
                                          min_numel=MIN), {}, 1),
    "topk_ef_one_by_one": ("compression", dict(compressor="topk:0.05", feedback="ef", start_iter=0,
                                               min_numel=MIN, grouped=False), {}, 1),
    "topk_group": ("compression", dict(compressor="topk:7", feedback="none", start_iter=1,
                                       min_numel=MIN), {}, 1),
    "topk_one_by_one": ("compression", dict(compressor="topk:7", feedback="none", start_iter=1,
                                            min_numel=MIN, grouped=False), {}, 1),
    "powersgd": ("powersgd", dict(rank=2, start_iter=2), dict(bucket_cap_mb=0.001), 1),
    "off": ("compression", dict(compressor="topk:0.05", start_iter=1000), {}, 1),
    "allreduce_hook": ("allreduce_hook", None, {}, 1),
}
STEPS = 6


def run_configs(rank, world, names, steps):
    out = {}
    for name in names:
        kind, opts, ddp_opts, micro = CONFIGS[name]
        record = []
        with CountingDist() as counting:
            params, _, summary, _ = _train.train(rank, world, kind, steps, opts=opts, ddp_opts=ddp_opts,
                                                 record=record, micro=micro, **SMALL)
        out[name] = (params, summary, (counting.sent, counting.calls), record)
    return out


@pytest.fixture(scope="module")
def two_ranks():
    return spawn(run_configs, 2, list(CONFIGS), STEPS, timeout=300)


def test_replicas_identical_and_bytes_counted(two_ranks):
    for name, (kind, opts, _, micro) in CONFIGS.items():
        a, b = two_ranks[0][name], two_ranks[1][name]
        assert _train.params_equal(a[0], b[0]), name
        if a[1] is not None:
            for rank in range(2):
                summary, (sent, calls), record = two_ranks[rank][name][1:]
                # every torch collective of the run is the hook's (DDP's own
                # broadcast of the initial parameters aside)
                assert summary["comm"][0] == summary["bytes_sent"], name
                assert summary["iter"] == STEPS, name
                assert summary["bytes_dense"] == sum(sum(g.nbytes for g in call[1]) for call in record), name
                assert summary["bytes_sent"] < summary["bytes_dense"] or name == "off", name
                # the future resolves to bucket.buffer() itself: decompressed in place
                assert all(call[4] for call in record), name
                init_bytes = sum(p.nbytes for p in a[0])
                assert sent - summary["bytes_sent"] <= init_bytes + 4096, name


def test_compression_off_equals_allreduce_hook_bitwise(two_ranks):
    for rank in range(2):
        assert _train.params_equal(two_ranks[rank]["off"][0], two_ranks[rank]["allreduce_hook"][0])
        for mine, theirs in zip(two_ranks[rank]["off"][3], two_ranks[rank]["allreduce_hook"][3]):
            assert all(np.array_equal(x, y) for x, y in zip(mine[2], theirs[2]))


@pytest.mark.parametrize("name", ["topk_ef", "topk"])
def test_grouped_hook_equals_the_per_tensor_hook(two_ranks, name):
    for rank in range(2):
        pa, sa, _, ra = two_ranks[rank][name + "_group"]
        pb, sb, _, rb = two_ranks[rank][name + "_one_by_one"]
        assert _train.params_equal(pa, pb), name
        assert sa["bytes_sent"] == sb["bytes_sent"]
        assert len(ra) == len(rb)
        # several compressed tensors shared a bucket, so the grouped call ran
        assert max(sum(g.ndim >= 2 and g.size >= MIN for g in call[1]) for call in ra) >= 2
        for ca, cb in zip(ra, rb):
            for x, y in zip(ca[2], cb[2]):
                np.testing.assert_array_equal(x, y)


# -- the same algorithm on lowband.sim.Cluster ------------------------------------

def twin(comm, records, opts, start_iter):
    """Replays one rank's recorded hook inputs through lowband's NumPy API on
    a sim communicator; returns the hook outputs it computes."""
    W = comm.world_size
    spec, feedback = opts["compressor"], opts.get("feedback", "ef")
    comp0 = lowband.from_spec(spec)
    state, outs, it = {}, [], 0
    for pidx, grads, _, is_last, _ in records:
        call = []
        for i, g in zip(pidx, grads):
            flat = g.reshape(-1)
            if it < start_iter or g.ndim < 2 or g.size < opts["min_numel"]:
                call.append(comm.allreduce(flat / np.float32(W)).reshape(g.shape))
                continue
            like = ((flat.size,), flat.dtype)
            if isinstance(comp0, (lowband.Sign, lowband.Blockwise)) and feedback in ("ef", "none"):
                if i not in state:
                    b = sim.chunk_bounds(flat.size, W)
                    state[i] = (lowband.from_spec(spec), np.zeros_like(flat),
                                np.zeros(b[comm.rank + 1] - b[comm.rank], flat.dtype))
                c, we, se = state[i]
                res = comm.compressed_allreduce(flat, c, we, se)
            elif feedback in ("ef21", "econtrol"):
                if i not in state:
                    fb = (lowband.EF21(spec, like) if feedback == "ef21"
                          else lowband.EControl(spec, like, opts["eta"]))
                    state[i] = (fb, np.zeros_like(flat))
                fb, srv = state[i]
                srv += sim.reduce_payloads(comm.allgather(fb.step(flat)), "mean")
                res = srv.copy()
            else:
                if i not in state:
                    state[i] = lowband.ErrorFeedback(spec, like) if feedback == "ef" else lowband.from_spec(spec)
                obj = state[i]
                p = obj.step(flat) if feedback == "ef" else obj.compress(flat)
                if isinstance(comp0, lowband.RandomK):
                    vals = comm.allreduce(p.values / np.float32(W))
                    res = lowband.Sparse(p.indices, vals, p.shape).to_dense()
                elif isinstance(comp0, lowband.Cast):
                    codes = comm.allreduce(p.codes.view(np.float16) / np.float16(W))
                    res = lowband.Quantized("float16", p.shape, p.dtype, {}, {"codes": codes.view(np.uint16)}).dequantize()
                else:
                    res = sim.reduce_payloads(comm.allgather(p), "mean")
            call.append(res.reshape(g.shape))
        outs.append(call)
        it += bool(is_last)
    return outs


@pytest.mark.parametrize("name", ["topk_ef", "sign_ef", "randomk_ef", "fp16", "topk_ef21", "sign_econtrol",
                                  "blockwise_nosync", "topk_ef_group", "topk_group"])
def test_hook_equals_the_sim_cluster(two_ranks, name):
    _, opts, _, _ = CONFIGS[name]
    records = [two_ranks[r][name][3] for r in range(2)]
    got = sim.Cluster(2).run(lambda comm: twin(comm, records[comm.rank], opts, opts["start_iter"]))
    for rank in range(2):
        assert len(got[rank]) == len(records[rank])
        for k, (want_call, rec) in enumerate(zip(got[rank], records[rank])):
            for t, (want, out) in enumerate(zip(want_call, rec[2])):
                np.testing.assert_array_equal(out, want, err_msg=f"{name} rank {rank} call {k} tensor {t}")


@pytest.mark.parametrize("name", ["topk", "randomk", "fp16", "sign", "blockwise", "threshold", "chunked"])
def test_torch_backend_matches_the_c_core(two_ranks, name):
    c_name = {"topk": "topk_ef", "randomk": "randomk_ef", "fp16": "fp16", "sign": "sign_ef",
              "blockwise": "blockwise_nosync", "threshold": "threshold_ef", "chunked": "chunked_ef"}[name]
    sparse = name in ("topk", "threshold", "chunked")
    for rank in range(2):
        a, b = two_ranks[rank][c_name], two_ranks[rank][name + "_torch"]
        assert a[1]["bytes_sent"] > 0 and b[1]["bytes_sent"] > 0
        assert len(a[3]) == len(b[3])
        for ca, cb in zip(a[3], b[3]):
            for x, y in zip(ca[2], cb[2]):
                if sparse:
                    np.testing.assert_array_equal(y, x)
                else:
                    np.testing.assert_allclose(y, x, rtol=2e-5, atol=1e-6)
        if sparse:
            # the same lowband.encode payloads through the same allgather:
            # the same bytes on the wire, the same mean, bit for bit
            assert b[1]["bytes_sent"] == a[1]["bytes_sent"], name
            assert b[2] == a[2], name
            assert _train.params_equal(a[0], b[0]), name


def test_no_sync_runs_the_hook_once_per_step(two_ranks):
    # 3 no_sync + 1 synced micro-steps: the hook saw STEPS synced backwards
    for rank in range(2):
        summary = two_ranks[rank]["blockwise_nosync"][1]
        assert summary["iter"] == STEPS


# -- checkpoints ---------------------------------------------------------------------

RESUME = ["topk_ef", "sign_ef", "powersgd", "topk_torch"]


def run_checkpointed(rank, world, names, steps, save_at):
    out = {}
    for name in names:
        kind, opts, ddp_opts, micro = CONFIGS[name]
        params, _, _, ckpt = _train.train(rank, world, kind, steps, opts=opts, ddp_opts=ddp_opts,
                                          save_at=save_at, micro=micro, **SMALL)
        out[name] = (params, pickle.dumps(ckpt))
    return out


def run_resumed(rank, world, names, ckpts, steps, start):
    import warnings
    out = {}
    for name in names:
        kind, opts, ddp_opts, micro = CONFIGS[name]
        ckpt = pickle.loads(ckpts[rank][name])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            params, _, _, _ = _train.train(rank, world, kind, steps, opts=opts, ddp_opts=ddp_opts,
                                           state=ckpt["hook"], model_state=ckpt, start=start, micro=micro,
                                           **SMALL)
        out[name] = params
    return out


@pytest.mark.slow
def test_checkpoint_resume_is_bitwise():
    full = spawn(run_checkpointed, 2, RESUME, 7, 4, timeout=300)
    ckpts = [{n: full[r][n][1] for n in RESUME} for r in range(2)]
    resumed = spawn(run_resumed, 2, RESUME, ckpts, 3, 4, timeout=300)
    for rank in range(2):
        for name in RESUME:
            assert _train.params_equal(resumed[rank][name], full[rank][name][0]), (name, rank)


# -- PowerSGD against torch's hook ---------------------------------------------------

def powersgd_one_step(rank, world, r):
    """Both hooks from the same Q at their first compressed step (iteration
    2, one bucket); returns both averaged gradients."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps
    import lowband.torch as lt
    import torch.nn as nn
    results = []
    qs = {}

    def q_for(i, g):
        n, m = g.shape[0], g.numel() // g.shape[0]
        if i not in qs:
            gen = torch.Generator().manual_seed(100 + i)
            qs[i] = torch.randn(m, min(n, m, r), generator=gen)
        return qs[i].clone()

    for which in ("torch", "lowband"):
        model = _train.make_model(0, 24)
        ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=100)
        index = {p: i for i, p in enumerate(model.parameters())}
        out = []
        if which == "torch":
            state = ps.PowerSGDState(None, matrix_approximation_rank=r, start_powerSGD_iter=2)

            def hook(st, bucket):
                if st.iter == 2:
                    grads = bucket.gradients()
                    chosen = [q_for(index[p], g) for p, g in zip(bucket.parameters(), grads) if g.dim() > 1
                              and ps._should_compress(g.shape[0], g.numel() // g.shape[0],
                                                      min(g.shape[0], g.numel() // g.shape[0], r), 2)[0]]
                    st.q_memory_dict[bucket.index()] = torch.cat([q.reshape(-1) for q in chosen])
                    st.p_memory_dict[bucket.index()] = torch.empty(sum(
                        g.shape[0] * q.shape[1] for g, q in zip([g for g in grads if g.dim() > 1], chosen)))
                fut = ps.powerSGD_hook(st, bucket)
                fut.wait()
                out.append([g.clone() for g in bucket.gradients()])
                return fut
        else:
            state = lt.hooks.PowerSGDState(rank=r, start_iter=2)

            def hook(st, bucket):
                if st.iter == 2:
                    for p, g in zip(bucket.parameters(), bucket.gradients()):
                        if st._compressible(g):
                            st._stp[st._slot(p)] = {"q": q_for(index[p], g), "error": torch.zeros(g.numel())}
                fut = lt.hooks.powersgd_hook(st, bucket)
                fut.wait()
                out.append([g.clone() for g in bucket.gradients()])
                return fut
        ddp.register_comm_hook(state, hook)
        for step in range(3):
            x, y = _train.batch(rank, world, step)
            ddp.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
        results.append([g.numpy() for g in out[-1]])
    return results


def powersgd_ranks(rank, world, ranks):
    return [powersgd_one_step(rank, world, r) for r in ranks]


def test_powersgd_step_equals_torchs_hook():
    for per_rank in spawn(powersgd_ranks, 2, [1, 2, 3]):
        for theirs, mine in per_rank:
            assert len(theirs) == len(mine) == 6
            for a, b in zip(theirs, mine):
                np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
            assert any(not np.allclose(a, 0) for a in mine)


# -- local checks (no process group needed) ------------------------------------------

def test_state_arguments_and_pickling():
    import lowband.torch as lt
    with pytest.raises(ValueError, match="feedback"):
        lt.hooks.CompressionState(feedback="sometimes")
    with pytest.raises(ValueError, match="backend"):
        lt.hooks.CompressionState(backend="cuda")
    with pytest.raises(ValueError, match="backend='torch' implements"):
        lt.hooks.CompressionState(compressor="topk:0.01+lut2bit", backend="torch")
    with pytest.raises(ValueError, match="start_iter"):
        lt.hooks.CompressionState(start_iter=-1)
    with pytest.raises(ValueError, match="rank"):
        lt.hooks.PowerSGDState(rank=0)
    s = lt.hooks.CompressionState(compressor="sign", start_iter=3)
    assert s.collective == "two_phase"
    assert lt.hooks.CompressionState(compressor="randomk:0.1").collective == "allreduce"
    assert lt.hooks.CompressionState(compressor="topk:0.1").collective == "allgather"
    assert lt.hooks.CompressionState(compressor="sign", feedback="ef21").collective == "allgather"
    with pytest.warns(UserWarning, match="default process group"):
        t = pickle.loads(pickle.dumps(s))
    assert t.state_dict() == s.state_dict() and t.process_group is None
    p = lt.hooks.PowerSGDState(rank=2)
    with pytest.raises(ValueError, match="expected a PowerSGDState state_dict"):
        p.load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="configuration"):
        lt.hooks.CompressionState(compressor="sign", start_iter=4).load_state_dict(s.state_dict())


# -- four ranks, and accuracy on digits ------------------------------------------------

FOUR = ["topk_ef", "sign_ef", "fp16", "powersgd", "topk_torch"]


@pytest.mark.slow
def test_four_ranks_identical_replicas():
    results = spawn(run_configs, 4, FOUR, 4, timeout=600)
    for name in FOUR:
        for rank in range(1, 4):
            assert _train.params_equal(results[rank][name][0], results[0][name][0]), (name, rank)
        for rank in range(4):
            summary = results[rank][name][1]
            assert summary["comm"][0] == summary["bytes_sent"] > 0 and summary["iter"] == 4


ACCURACY = {
    "none": ("none", None),
    "topk_ef": ("compression", dict(compressor="topk:0.01", feedback="ef", start_iter=10)),
    "sign_ef": ("compression", dict(compressor="sign", feedback="ef", start_iter=10)),
    "powersgd": ("powersgd", dict(rank=2, start_iter=10)),
}


def train_accuracy(rank, world, names, steps):
    out = {}
    for name in names:
        kind, opts = ACCURACY[name]
        params, acc, _, _ = _train.train(rank, world, kind, steps, opts=opts, lr=0.05, decay=True,
                                         ddp_opts=dict(bucket_cap_mb=0.01))
        out[name] = (params, acc)
    return out


@pytest.mark.slow
def test_digits_accuracy_within_one_point_of_plain_ddp():
    results = spawn(train_accuracy, 2, list(ACCURACY), 400, timeout=900)
    base = results[0]["none"][1]
    for name in ACCURACY:
        assert _train.params_equal(results[0][name][0], results[1][name][0]), name
        assert results[0][name][1] >= base - 0.01, (name, results[0][name][1], base)
