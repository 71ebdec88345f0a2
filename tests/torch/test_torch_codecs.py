"""backend="torch" codecs of compression_hook against the C core, in one
process (no process group): the same codes, scales and decoded values bit
for bit, the same message size as the payload's arrays, the same selected
indices for the sparsifiers, and a clear ValueError for what it lacks."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lowband  # noqa: E402
from lowband.wire import encoded_size  # noqa: E402
from lowband.compressors import from_spec  # noqa: E402
from lowband.feedback import ErrorFeedback  # noqa: E402
from lowband.torch import _codecs  # noqa: E402
from lowband.torch._codecs import TorchSlot, _Quant, _select, sparse_messages  # noqa: E402

QUANT_SPECS = ["sign", "sign:rms", "sign:none", "sign:l1:block=16", "sign:rms:block=10",
               "blockwise:4", "blockwise:8:block=32", "blockwise:1", "blockwise:2:block=7",
               "blockwise:3:rounding=stochastic", "blockwise:1:rounding=stochastic:seed=3",
               "qsgd:4", "qsgd:1", "qsgd:8:block=32:seed=5"]
SIZES = [1, 100, 1001]


def vector(n, dtype, seed):
    x = np.random.default_rng(seed).standard_normal(n).astype(dtype)
    x[n // 3:n // 3 + min(n // 4, 40)] = 0      # whole zero blocks (zero scales)
    return x


@pytest.mark.parametrize("spec", QUANT_SPECS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantizers_equal_the_c_core_bitwise(spec, dtype):
    c_comp, t_comp = from_spec(spec), from_spec(spec)
    quant = _Quant(t_comp)
    for n in SIZES:
        for rep in range(2):        # twice: the step counters advance alike
            x = vector(n, dtype, n + rep)
            p = c_comp.compress(x)
            msg, dec = quant.encode(torch.from_numpy(x), t_comp)
            want = p.arrays["scales"].tobytes() + p.arrays["codes"].tobytes()
            assert msg.numel() == len(want) == quant.size(n), (spec, n)
            assert msg.numpy().tobytes() == want, (spec, n, rep)
            ref = p.dequantize()
            np.testing.assert_array_equal(dec.numpy(), ref, err_msg=f"{spec} n={n}")
            np.testing.assert_array_equal(quant.decode(msg, n, dec.dtype).numpy(), ref)
    assert t_comp.step == c_comp.step


@pytest.mark.parametrize("spec", ["sign:rms:block=10", "blockwise:4", "blockwise:2:rounding=stochastic", "qsgd:4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantizers_on_half_tensors_equal_the_c_core(spec, dtype):
    pytest.importorskip("ml_dtypes")
    c_comp, t_comp = from_spec(spec), from_spec(spec)
    quant = _Quant(t_comp)
    x = torch.from_numpy(vector(300, np.float32, 7)).to(dtype)
    p = c_comp.compress(x)
    msg, dec = quant.encode(x, t_comp)
    assert msg.numpy().tobytes() == p.arrays["scales"].tobytes() + p.arrays["codes"].tobytes()
    assert dec.dtype == dtype
    np.testing.assert_array_equal(dec.float().numpy(), p.dequantize().astype(np.float32))


SPARSE_SPECS = ["topk:7", "chunked:16:3", "chunked:100:1", "threshold:1.2"]


@pytest.mark.parametrize("spec", SPARSE_SPECS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparsifiers_select_what_the_c_core_selects(spec, dtype):
    for n in (50, 1001):
        x = vector(n, dtype, n)
        p = from_spec(spec).compress(x)
        st = TorchSlot(spec, "none", torch.from_numpy(x), comm=None)
        idx = _select(st, torch.from_numpy(x))
        np.testing.assert_array_equal(idx.numpy(), p.indices.astype(np.int64), err_msg=spec)
        np.testing.assert_array_equal(x[idx.numpy()], p.values)
        if hasattr(st, "k"):
            assert st.k == p.nnz


@pytest.mark.parametrize("spec", SPARSE_SPECS)
@pytest.mark.parametrize("feedback", ["ef", "none"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_messages_are_the_c_cores_wire_bytes(spec, feedback, dtype):
    # the torch backend's message is the C path's payload: lowband.encode
    # gives the same bytes (header, smallest index encoding, CRC-32C), and
    # error feedback keeps the same residual, step after step
    n = 1001
    c = from_spec(spec)
    ef = ErrorFeedback(c, ((n,), dtype)) if feedback == "ef" else None
    st = TorchSlot(spec, feedback, torch.from_numpy(np.zeros(n, dtype)), comm=None)
    for rep in range(3):
        x = vector(n, dtype, 10 + rep)
        want = ef.step(x) if ef is not None else c.compress(x)
        g = torch.from_numpy(x.copy())
        got = sparse_messages([(st, g)])[0]
        assert isinstance(got, lowband.Sparse) and got.shape == (n,) and got.dtype == dtype
        wire = lowband.encode(got)
        assert wire == lowband.encode(want), (spec, feedback, rep)
        assert len(wire) == encoded_size(want)
        np.testing.assert_array_equal(g.numpy(), x)      # the gradient is left alone
        if ef is not None:
            np.testing.assert_array_equal(st.error.numpy(), ef.error.reshape(-1))
    assert st.t == 3


def test_chunked_ties_go_to_the_lower_index():
    x = np.array([1, -1, 1, 0, 0, 0, 2, -2, 0.5, 0.5], np.float32)
    p = from_spec("chunked:4:2").compress(x)
    st = TorchSlot("chunked:4:2", "none", torch.from_numpy(x), comm=None)
    np.testing.assert_array_equal(_select(st, torch.from_numpy(x)).numpy(), p.indices)


@pytest.mark.parametrize("spec", ["sign:two_means", "topk:0.01+lut2bit", "terngrad", "natural",
                                  "chunked:4x4:2", "sampled:0.01", "minifloat:e3m0"])
def test_unsupported_specs_raise_at_construction(spec):
    import lowband.torch as lt
    with pytest.raises(ValueError, match=r"backend='torch' implements topk.*blockwise.*qsgd") as info:
        lt.hooks.CompressionState(compressor=spec, backend="torch")
    assert repr(from_spec(spec).spec) in str(info.value)
    with pytest.raises(ValueError, match="feedback: backend='torch' implements 'ef' and 'none'"):
        lt.hooks.CompressionState(compressor="blockwise:4", feedback="ef21", backend="torch")
    assert _codecs.SUPPORTED
