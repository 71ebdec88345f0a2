"""Grouped calls: lowband.topk_group, ErrorFeedback.step_group and
GroupedErrorFeedback give per tensor exactly the bytes of the separate
per-tensor calls (lowband.topk, ErrorFeedback.step), on 1 and 2 threads,
for lists of NumPy arrays and torch CPU tensors and for one flat buffer with
offsets; a failed group step leaves every state as it was; bad arguments
raise naming the argument."""
import numpy as np
import pytest

import lowband
from helpers import assert_same, make_vector

# empty and one-element segments, small ones, and one past LB_GROUP_BIG
# (262144 elements: run with the whole team, the small ones across it)
SHAPES = [(0,), (1,), (5,), (10, 100), (4099,), (65537,), (7, 42858 + 1)]
# ... plus one past the sampled top-k fast path (2**20 elements)
LARGE = SHAPES + [((1 << 20) + 7,)]


def tensors(dtype=np.float32, seed=0, kinds=("normal", "ties", "heavy"), shapes=SHAPES):
    out = []
    for i, shape in enumerate(shapes):
        n = int(np.prod(shape))
        out.append(make_vector(n, dtype, kinds[i % len(kinds)], seed + i).reshape(shape))
    return out


def assert_payloads(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        assert_same(a.indices, b.indices, f"tensor {i} indices")
        assert_same(a.values, b.values, f"tensor {i} values")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_topk_group_equals_per_tensor_topk(dtype, threads):
    xs = tensors(dtype, shapes=LARGE if dtype == np.float32 else SHAPES)
    before = [x.copy() for x in xs]
    got = lowband.topk_group(xs, ratio=0.01, threads=threads)
    assert_payloads(got, [lowband.topk(x, ratio=0.01) for x in xs])
    ks = [0, 1, 3, 1000, 17, 65537, 1, 5000][:len(xs)]
    assert_payloads(lowband.topk_group(xs, ks, threads=threads),
                    [lowband.topk(x, k) for x, k in zip(xs, ks)])
    for x, b in zip(xs, before):
        assert_same(x, b)


def test_topk_group_flat_buffer_with_offsets():
    xs = [x.reshape(-1) for x in tensors()]
    flat = np.concatenate(xs)
    offsets = np.concatenate([[0], np.cumsum([x.size for x in xs])])
    ratios = [0.5, 1.0, 0.2, 0.01, 0.01, 0.001, 0.0]
    got = lowband.topk_group(flat, ratio=ratios, offsets=offsets)
    want = [lowband.topk(x, ratio=r) for x, r in zip(xs, ratios)]
    assert_payloads(got, want)
    assert lowband.topk_group([], k=3) == []
    assert lowband.topk_group(np.zeros(0), k=[], offsets=[0]) == []


def test_topk_group_half_and_torch_inputs():
    torch = pytest.importorskip("torch")
    xs = [torch.randn(300, 20), torch.randn(5), torch.zeros(0)]
    got = lowband.topk_group(xs, ratio=0.1)
    assert_payloads(got, [lowband.topk(x, ratio=0.1) for x in xs])
    hs = [x.half() for x in xs]
    assert_payloads(lowband.topk_group(hs, k=[3, 2, 0]),
                    [lowband.topk(x, k) for x, k in zip(hs, [3, 2, 0])])


def test_topk_group_bad_input_names_the_argument():
    xs = [np.ones(10, np.float32), np.ones(4, np.float32)]
    with pytest.raises(ValueError, match=r"k\[1\]: expected at most 4 \(the size of tensors\[1\]\), got 5"):
        lowband.topk_group(xs, [3, 5])
    with pytest.raises(ValueError, match=r"k: expected at most 4 \(the size of tensors\[1\]\), got 6"):
        lowband.topk_group(xs, 6)
    with pytest.raises(ValueError, match=r"k: expected 2 values \(one per tensor\), got 3"):
        lowband.topk_group(xs, [1, 1, 1])
    with pytest.raises(TypeError, match="exactly one of k= or ratio="):
        lowband.topk_group(xs)
    with pytest.raises(ValueError, match=r"ratio\[0\]"):
        lowband.topk_group(xs, ratio=[1.5, 0.1])
    with pytest.raises(TypeError,
                       match=r"tensors\[1\]: expected dtype float32 \(as tensors\[0\]\), got float64"):
        lowband.topk_group([xs[0], np.ones(4)], 1)
    with pytest.raises(TypeError, match=r"tensors\[0\]: expected a float32"):
        lowband.topk_group([np.ones(3, np.int64)], 1)
    with pytest.raises(TypeError, match="tensors: expected a list of arrays"):
        lowband.topk_group(np.ones(10), 1)
    with pytest.raises(ValueError, match="offsets: expected boundaries from 0 to 10"):
        lowband.topk_group(np.ones(10), 1, offsets=[0, 5, 9])
    with pytest.raises(ValueError, match=r"offsets: expected non-decreasing values, got offsets\[2\] = 3"):
        lowband.topk_group(np.ones(10), 1, offsets=[0, 5, 3, 10])
    bad = [np.ones(10, np.float32), np.ones(70000, np.float32)]
    bad[1][123] = np.inf
    with pytest.raises(ValueError, match=r"tensors\[1\] has a non-finite value \(inf\) at flat index 123"):
        lowband.topk_group(bad, 1)


def feedbacks(spec, xs):
    return [lowband.ErrorFeedback(spec, x) for x in xs]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("spec", ["topk:0.01", "topk:3"])
def test_step_group_equals_separate_steps(threads, spec):
    shapes = LARGE if threads == 2 else SHAPES
    xs = tensors(np.float32, shapes=shapes)
    mine, theirs = feedbacks(spec, xs), feedbacks(spec, xs)
    for fb in mine:
        fb.threads = threads
    for step in range(3):
        gs = tensors(np.float32, seed=10 * step, shapes=shapes)
        got = lowband.ErrorFeedback.step_group(mine, gs)
        assert_payloads(got, [fb.step(g) for fb, g in zip(theirs, gs)])
        for a, b in zip(mine, theirs):
            assert_same(a.error, b.error)
            assert a.t == b.t == step + 1


def test_step_group_generic_compressors_and_torch_grads():
    torch = pytest.importorskip("torch")
    xs = [torch.randn(40, 30, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    for spec in ("sign", "topk:0.1+lut2bit"):
        mine, theirs = feedbacks(spec, xs), feedbacks(spec, xs)
        for _ in range(2):
            got = lowband.ErrorFeedback.step_group(mine, xs)
            want = [fb.step(g) for fb, g in zip(theirs, xs)]
            assert [lowband.encode(p) for p in got] == [lowband.encode(p) for p in want]
        for a, b in zip(mine, theirs):
            assert_same(a.error, b.error)


@pytest.mark.parametrize("spec", ["topk:0.01", "sign", "randomk:0.05", "blockwise:4", "topk:0.1+lut2bit"])
def test_grouped_error_feedback_equals_separate_objects(spec):
    xs = tensors(np.float32)
    group = lowband.GroupedErrorFeedback(spec, xs)
    theirs = feedbacks(spec, xs)
    for step in range(3):
        gs = tensors(np.float32, seed=10 * step + 1)
        grads = gs if step != 1 else np.concatenate([g.reshape(-1) for g in gs])   # a flat buffer
        got = group.step(grads)
        want = [fb.step(g) for fb, g in zip(theirs, gs)]
        assert [lowband.encode(p) for p in got] == [lowband.encode(p) for p in want]
        assert [p.shape for p in got] == [x.shape for x in xs]
    assert_same(group.error, np.concatenate([fb.error for fb in theirs]))
    assert_same(group.errors[3], theirs[3].error)
    clone = lowband.GroupedErrorFeedback(spec, [(x.shape, x.dtype) for x in xs])
    clone.load_state_dict(group.state_dict())
    assert_same(clone.error, group.error)
    other = lowband.GroupedErrorFeedback(spec, xs[::-1])
    with pytest.raises(ValueError, match="shapes"):
        other.load_state_dict(group.state_dict())


@pytest.mark.parametrize("spec", ["topk:0.01", "sign"])
def test_failed_group_step_changes_nothing(spec):
    xs = tensors(np.float32)
    fbs = feedbacks(spec, xs)
    group = lowband.GroupedErrorFeedback(spec, xs)
    lowband.ErrorFeedback.step_group(fbs, xs)
    group.step(xs)
    before = [fb.error.copy() for fb in fbs]
    gbefore = group.error.copy()
    gs = tensors(np.float32, seed=5)
    gs[6].reshape(-1)[4321] = np.nan
    with pytest.raises(ValueError, match=r"grads\[6\].*flat index 4321"):
        lowband.ErrorFeedback.step_group(fbs, gs)
    with pytest.raises(ValueError, match=r"grads\[6\].*flat index 4321"):
        group.step(gs)
    for fb, b in zip(fbs, before):
        assert_same(fb.error, b)
        assert fb.t == 1
    assert_same(group.error, gbefore)
    assert group.t == 1


def test_group_overflow_is_undone():
    fbs = [lowband.ErrorFeedback("topk:5", np.zeros(n, np.float32)) for n in (100, 3000)]
    big = [np.full(100, 3e38, np.float32), np.ones(3000, np.float32)]
    lowband.ErrorFeedback.step_group(fbs, big)   # the first residual keeps 95 entries of 3e38
    before = [fb.error.copy() for fb in fbs]
    with pytest.raises(ValueError, match=r"grads\[0\] is non-finite.*overflowed"):
        lowband.ErrorFeedback.step_group(fbs, big)
    for fb, b in zip(fbs, before):
        assert_same(fb.error, b)
        assert fb.t == 1


def test_step_group_bad_input_names_the_argument():
    fbs = feedbacks("topk:0.1", [np.zeros(10, np.float32), np.zeros(20, np.float32)])
    with pytest.raises(ValueError, match=r"grads: expected 2 \(one per feedback object\), got 1"):
        lowband.ErrorFeedback.step_group(fbs, [np.zeros(10, np.float32)])
    with pytest.raises(ValueError, match=r"grads\[1\]: expected shape \(20,\)"):
        lowband.ErrorFeedback.step_group(fbs, [np.zeros(10, np.float32)] * 2)
    with pytest.raises(TypeError, match=r"grads\[0\]: expected dtype float32"):
        lowband.ErrorFeedback.step_group(fbs, [np.zeros(10), np.zeros(20, np.float32)])
    with pytest.raises(TypeError, match=r"feedbacks\[1\]: expected an ErrorFeedback"):
        lowband.ErrorFeedback.step_group([fbs[0], "x"], [np.zeros(10, np.float32)] * 2)
    with pytest.raises(ValueError, match="more than once"):
        lowband.ErrorFeedback.step_group([fbs[0], fbs[0]], [np.zeros(10, np.float32)] * 2)
    group = lowband.GroupedErrorFeedback("topk:0.1", [np.zeros(10, np.float32), np.zeros(20, np.float32)])
    with pytest.raises(ValueError, match="grads: expected 2 tensors, got 1"):
        group.step([np.zeros(10, np.float32)])
    with pytest.raises(ValueError, match="offsets: expected boundaries from 0 to 29"):
        group.step(np.zeros(29, np.float32))
    with pytest.raises(TypeError, match=r"like: expected one dtype"):
        lowband.GroupedErrorFeedback("topk:0.1", [np.zeros(3), np.zeros(3, np.float32)])
    with pytest.raises(TypeError, match=r"like: expected a list"):
        lowband.GroupedErrorFeedback("topk:0.1", np.zeros(3))


def encoded(payloads):
    return [lowband.encode(p) for p in payloads]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantizer_and_randomk_groups_equal_per_tensor_calls(threads, dtype):
    xs = tensors(dtype)
    before = [x.copy() for x in xs]
    for opts in (dict(), dict(scale="rms", block=64), dict(scale="none"), dict(scale="two_means", block=100)):
        assert encoded(lowband.sign_group(xs, **opts, threads=threads)) == \
            encoded([lowband.sign(x, **opts) for x in xs]), opts
    for opts in (dict(bits=4), dict(bits=1, block=None), dict(bits=8, rounding="stochastic", seed=7, step=3)):
        assert encoded(lowband.quantize_group(xs, **opts, threads=threads)) == \
            encoded([lowband.quantize(x, **opts) for x in xs]), opts
    ks = [0, 1, 5, 17, 4099, 100, 3000]
    for opts in (dict(k=ks), dict(ratio=0.01, rescale=True)):
        got = lowband.randomk_group(xs, **opts, seed=5, step=9, threads=threads)
        k_of = ks if "k" in opts else [None] * len(xs)
        want = [lowband.randomk(x, k, ratio=opts.get("ratio"), seed=5, step=9,
                                rescale=opts.get("rescale", False)) for x, k in zip(xs, k_of)]
        assert_payloads(got, want)
        assert all(p.seed == 5 and p.step == 9 for p in got)
    for x, b in zip(xs, before):
        assert_same(x, b)


def test_quantizer_groups_on_torch_half_and_flat_inputs():
    torch = pytest.importorskip("torch")
    xs = [torch.randn(30, 20), torch.randn(5), torch.zeros(0)]
    for group in (xs, [x.half() for x in xs], [x.bfloat16() for x in xs]):
        assert encoded(lowband.sign_group(group)) == encoded([lowband.sign(x) for x in group])
        assert encoded(lowband.quantize_group(group, 2)) == encoded([lowband.quantize(x, 2) for x in group])
        assert encoded(lowband.randomk_group(group, k=[3, 2, 0], seed=1)) == \
            encoded([lowband.randomk(x, k, seed=1) for x, k in zip(group, [3, 2, 0])])
    flat = torch.cat([x.reshape(-1) for x in xs])
    got = lowband.quantize_group(flat, 3, offsets=[0, 600, 605, 605])
    assert encoded(got) == encoded([lowband.quantize(x.reshape(-1), 3) for x in xs])


def test_quantizer_groups_bad_input_names_the_argument():
    xs = [np.ones(10, np.float32), np.ones(4, np.float32)]
    xs[1][2] = np.nan
    for call in (lambda: lowband.sign_group(xs), lambda: lowband.quantize_group(xs, 4),
                 lambda: lowband.randomk_group(xs, k=4, seed=0)):
        with pytest.raises(ValueError, match=r"tensors\[1\] has a non-finite value \(nan\) at flat index 2"):
            call()
    with pytest.raises(ValueError, match="bits: expected one of 1, 2, 3, 4, 8, got 5"):
        lowband.quantize_group(xs, 5)
    with pytest.raises(ValueError, match="scale: expected one of"):
        lowband.sign_group(xs, scale="l3")
    with pytest.raises(TypeError, match="seed"):
        lowband.randomk_group(xs, k=1, seed=None)
    with pytest.raises(ValueError, match=r"k\[0\]: expected at most 10"):
        lowband.randomk_group(xs, k=[11, 1], seed=0)
    with pytest.raises(ValueError, match=r"tensors\[0\] rescaled by n/k = 1000.0 overflows"):
        lowband.randomk_group([np.full(1000, 1e36, np.float32)], k=1, seed=0, rescale=True)
