"""torch CPU tensors at every NumPy-level entry point of lowband: used in
place (no copy; bfloat16 through a uint16 view), ``out=`` tensors written
in place, tensors that require grad refused with a TypeError that says to
detach, and results equal to the NumPy path."""
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

import lowband  # noqa: E402
from lowband import moe, optim  # noqa: E402
from lowband._validate import as_float_array, from_torch, is_tensor  # noqa: E402
from lowband.powersgd import PowerSGD, orthogonalize  # noqa: E402
from lowband.sim import Cluster  # noqa: E402

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                "bfloat16": torch.bfloat16}


def _pair(n, name, seed=0):
    """(tensor, the same values as a NumPy array of lowband's dtype)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g, dtype=torch.float64).to(TORCH_DTYPES[name])
    a = t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16).copy() if name == "bfloat16" else t.numpy().copy()
    return t, a


def _same(x, y):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def _same_payload(p, q):
    assert lowband.encode(p) == lowband.encode(q)


def test_import_lowband_does_not_import_torch():
    code = "import sys, lowband, lowband.powersgd; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", list(TORCH_DTYPES))
def test_views_share_memory(name):
    t, a = _pair(257, name)
    view = from_torch(t)
    assert view.ctypes.data == t.data_ptr()
    assert view.dtype == a.dtype
    _same(view, a)
    arr = as_float_array(t, "x", lowband._validate.ANY_FLOAT_DTYPES)
    assert arr.ctypes.data == t.data_ptr()
    assert is_tensor(t) and not is_tensor(a)


@pytest.mark.parametrize("name", list(TORCH_DTYPES))
def test_requires_grad_is_refused(name):
    t = torch.zeros(8, dtype=TORCH_DTYPES[name], requires_grad=True)
    with pytest.raises(TypeError, match=r"x\.detach\(\)"):
        lowband.topk(t, 2)
    with pytest.raises(TypeError, match=r"detach\(\)"):
        lowband.sign(t)
    with pytest.raises(TypeError, match=r"detach\(\)"):
        lowband.Dense(t)
    lowband.topk(t.detach(), 2)


def test_non_numpy_tensors_refused():
    with pytest.raises(TypeError, match="x"):
        lowband.topk(torch.zeros(4, dtype=torch.complex64), 1)
    with pytest.raises(TypeError, match="got dtype int32"):
        lowband.topk(torch.zeros(4, dtype=torch.int32), 1)


@pytest.mark.parametrize("name", list(TORCH_DTYPES))
def test_selection_and_quantisation_equal_numpy(name):
    t, a = _pair(1000, name, seed=1)
    _same_payload(lowband.topk(t, 17), lowband.topk(a, 17))
    _same_payload(lowband.randomk(t, 9, seed=3), lowband.randomk(a, 9, seed=3))
    _same_payload(lowband.topk_chunked(t, 100, 3), lowband.topk_chunked(a, 100, 3))
    _same_payload(lowband.threshold(t, 1.0), lowband.threshold(a, 1.0))
    _same_payload(lowband.sign(t, block=64), lowband.sign(a, block=64))
    _same_payload(lowband.quantize(t, 4), lowband.quantize(a, 4))
    _same_payload(lowband.qsgd(t, 4, seed=2), lowband.qsgd(a, 4, seed=2))
    _same_payload(lowband.lut2bit(t), lowband.lut2bit(a))
    c = lowband.from_spec("topk:0.05")
    _same_payload(c.compress(t), c.compress(a))


@pytest.mark.parametrize("name", ["float32", "float64"])
def test_float_only_functions(name):
    t, a = _pair(500, name, seed=2)
    _same_payload(lowband.terngrad(t, seed=1), lowband.terngrad(a, seed=1))
    _same_payload(lowband.natural(t, seed=1), lowband.natural(a, seed=1))
    _same_payload(lowband.minifloat(t, 3, 0), lowband.minifloat(a, 3, 0))
    _same_payload(lowband.cast(t, "float16"), lowband.cast(a, "float16"))


@pytest.mark.parametrize("name", list(TORCH_DTYPES))
def test_out_tensors_are_written_in_place(name):
    t, a = _pair(300, name, seed=4)
    dt = TORCH_DTYPES[name]
    q = lowband.quantize(a, 8, block=32)
    out = torch.empty(300, dtype=dt)
    ptr = out.data_ptr()
    assert q.dequantize(out=out) is out and out.data_ptr() == ptr
    _same(from_torch(out), q.dequantize())
    d = lowband.Dense(t)
    out2 = torch.empty(300, dtype=dt)
    assert d.to_dense(out=out2) is out2
    _same(from_torch(out2), a)
    assert d.array.ctypes.data == t.data_ptr()        # the payload views the tensor
    if name in ("float32", "float64"):
        s = lowband.topk(a, 30)
        out3 = torch.full((300,), 7.0, dtype=dt)
        assert lowband.aggregate([s, s], op="mean", out=out3) is out3
        _same(from_torch(out3), lowband.aggregate([s, s], op="mean"))
        assert s.to_dense(out=out3) is out3


def test_out_tensor_checks():
    q = lowband.quantize(np.ones(8, np.float32), 8)
    with pytest.raises(TypeError, match="out"):
        q.dequantize(out=torch.empty(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="out"):
        q.dequantize(out=torch.empty(16)[::2])
    with pytest.raises(TypeError, match=r"out\.detach\(\)"):
        q.dequantize(out=torch.empty(8, requires_grad=True))


def test_payload_constructors_and_wire():
    idx = torch.tensor([1, 5, 9], dtype=torch.int64)
    vals = torch.tensor([1.0, -2.0, 3.0])
    s = lowband.Sparse(idx, vals, 12)
    _same_payload(s, lowband.Sparse(idx.numpy(), vals.numpy(), 12))
    wire = torch.frombuffer(bytearray(lowband.encode(s)), dtype=torch.uint8)
    _same_payload(lowband.decode(wire), s)
    codes = torch.tensor([1, 0, 3, 2, 3], dtype=torch.uint8)
    packed = lowband.pack_bits(codes, 2)
    _same(packed, lowband.pack_bits(codes.numpy(), 2))
    _same(lowband.unpack_bits(torch.from_numpy(packed), 2, 5), codes.numpy())


def test_feedback_with_tensors():
    t, a = _pair(400, "float32", seed=5)
    ef_t = lowband.ErrorFeedback("topk:0.1", t)
    ef_a = lowband.ErrorFeedback("topk:0.1", a)
    for _ in range(3):
        _same_payload(ef_t.step(t), ef_a.step(a))
    dgc_t, dgc_a = lowband.DGC(t, 0.05), lowband.DGC(a, 0.05)
    _same_payload(dgc_t.step(t), dgc_a.step(a))


def test_optimizer_updates_tensor_params_in_place():
    t, a = _pair(64, "float32", seed=6)
    g_t, g_a = _pair(64, "float32", seed=7)
    opt_t = optim.AdamW(t, lr=0.1)
    opt_a = optim.AdamW(a, lr=0.1)
    for _ in range(3):
        opt_t.step(g_t)
        opt_a.step(g_a)
    _same(t.numpy(), a)
    with pytest.raises(TypeError, match=r"params\.detach\(\)"):
        optim.SGD(torch.zeros(3, requires_grad=True), lr=0.1)


def test_sim_collectives_take_tensors():
    def worker(comm):
        x = torch.full((5,), float(comm.rank + 1))
        total = comm.allreduce(x)
        got = comm.allgather(x)
        return total, [g.array for g in got]
    for total, got in Cluster(2).run(worker):
        _same(total, np.full(5, 3.0, np.float32))
        _same(got[1], np.full(5, 2.0, np.float32))


@pytest.mark.parametrize("name", ["float32", "float64"])
def test_moe_with_tensors(name):
    dt = TORCH_DTYPES[name]
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(20, 6, generator=g, dtype=dt)
    x = torch.randn(20, 4, generator=g, dtype=dt)
    r_t, r_a = moe.route(logits, 2), moe.route(logits.numpy().copy(), 2)
    _same(r_t.experts, r_a.experts)
    _same(r_t.weights, r_a.weights)
    mask = torch.ones(20, dtype=torch.bool)
    mask[3] = False
    d_t = moe.dispatch(x, r_t, mask=mask)
    d_a = moe.dispatch(x.numpy().copy(), r_a, mask=mask.numpy())
    _same(d_t.tokens, d_a.tokens)
    out = torch.empty(20, 4, dtype=dt)
    assert d_t.combine(torch.from_numpy(d_t.tokens.copy()), out=out) is out
    _same(out.numpy(), d_a.combine(d_a.tokens))
    counts = torch.tensor([3, 1, 0, 2, 5, 1])
    _same(moe.bias_update(torch.zeros(6, dtype=dt), counts), moe.bias_update(np.zeros(6, x.numpy().dtype),
                                                                              counts.numpy()))


@pytest.mark.parametrize("name", ["float32", "float64"])
def test_powersgd_with_tensors(name):
    dt = TORCH_DTYPES[name]
    a = torch.randn(50, 3, dtype=dt)
    b = a.numpy().copy()
    ptr = a.data_ptr()
    assert orthogonalize(a) is a and a.data_ptr() == ptr
    _same(a.numpy(), orthogonalize(b))
    shapes = [(10, 8), (8,)]
    grads = [torch.randn(88, dtype=dt) for _ in range(2)]

    def worker(comm):
        p_t = PowerSGD([torch.zeros(10, 8, dtype=dt), torch.zeros(8, dtype=dt)], comm)
        p_a = PowerSGD(shapes, comm, dtype=grads[0].numpy().dtype)
        g = grads[comm.rank]
        out = torch.empty(88, dtype=dt)
        assert p_t.step(g, out=out) is out
        return out.numpy().copy(), p_a.step(g.numpy())
    for got, expect in Cluster(2).run(worker):
        _same(got, expect)


def test_moe_layer_with_tensors():
    layer_t = moe.MoELayer(6, 8, 4, 2, seed=1)
    layer_a = moe.MoELayer(6, 8, 4, 2, seed=1)
    x = torch.randn(10, 6, dtype=torch.float64)
    _same(layer_t.forward(x), layer_a.forward(x.numpy().copy()))
    g = torch.randn(10, 6, dtype=torch.float64)
    _same(layer_t.backward(g), layer_a.backward(g.numpy().copy()))
    with pytest.raises(TypeError, match=r"x\.detach\(\)"):
        layer_t.forward(x.requires_grad_())


def test_compressed_allreduce_with_tensor_errors():
    def worker(comm, as_tensor):
        from lowband.sim import chunk_bounds
        bounds = chunk_bounds(40, comm.world_size)
        x = torch.full((40,), float(comm.rank) - 0.5) + torch.arange(40) / 40
        we = torch.zeros(40)
        se = torch.zeros(bounds[comm.rank + 1] - bounds[comm.rank])
        if not as_tensor:
            x, we, se = x.numpy(), we.numpy(), se.numpy()
        out = comm.compressed_allreduce(x, "sign:rms", we, se)
        return np.asarray(out).copy(), np.asarray(we).copy(), np.asarray(se).copy()
    a = Cluster(2).run(worker, True)
    b = Cluster(2).run(worker, False)
    for ra, rb in zip(a, b):
        for u, v in zip(ra, rb):
            _same(u, v)
    assert np.abs(a[0][1]).sum() > 0          # the tensor error buffer was written in place
