"""Compressor objects: configurable, composable wrappers around the kernels.

Every compressor has ``compress(x) -> payload`` and
``decompress(payload, out=None) -> ndarray`` (shape of the payload), and two
properties that error feedback and aggregation rely on:

``summable``  payloads of different workers can be combined by summing their
              wire values directly (shared-seed random-k, fp16 casts);
``unbiased``  E[decompress(compress(x))] = x (QSGD, TernGrad, natural,
              stochastic rounding, rescaled random-k).

Randomised compressors carry a ``seed`` and a step counter: each
``compress`` call without ``step=`` uses the next step (workers that share
the seed and call in lockstep draw identical streams); ``step=`` pins it.

``Chain(sparsifier, quantizer)`` quantizes the values a sparsifier keeps
(top-k then 2-bit, top-k then fp16).  ``from_spec`` builds any compressor
from a string such as ``"topk:0.01+lut2bit"`` or ``"randomk:0.01:seed=7"``,
or from a dict, for configs and the command line.  ``c.spec`` gives the
canonical string back (``from_spec(c.spec)`` rebuilds ``c``).
"""
from __future__ import annotations

import importlib

import numpy as np

from . import _core
from ._payload import Dense, Quantized, Sparse
from ._validate import (check_choice, check_count, check_finite_number, check_int, check_ratio,
                        check_seed, check_step, check_threads, from_torch)

__all__ = [
    "Compressor", "TopK", "RandomK", "Threshold", "ChunkedTopK", "SampledTopK", "Identity",
    "Sign", "Signum", "Dither", "FedZip", "Blockwise", "QSGD", "TernGrad", "Natural", "MiniFloat", "Lut2Bit", "Cast",
    "Chain", "Zstd", "from_spec",
]


class Compressor:
    """Base class.  Subclasses implement ``_compress(x, step)``; ``name`` and
    ``_args`` (positional spec arguments, in order) drive ``spec``."""

    name = ""
    _args = ()          # positional spec arguments, in order
    _kwargs = ()        # keyword spec arguments (written as key=value)
    sparsifier = False  # produces a Sparse (usable as Chain's first stage)
    randomized = False
    summable = False
    unbiased = False

    def __init__(self, threads=None):
        self.threads = check_threads(threads)
        self.step = 0

    # -- the API ---------------------------------------------------------
    def compress(self, x, *, step=None):
        """The payload of x.  Randomised compressors use ``step`` when given,
        else their own counter (which then advances by one)."""
        if self.randomized and step is None:
            step = self.step
            self.step += 1
        elif step is not None:
            step = check_step(step)
        return self._compress(from_torch(x, "x"), step)

    def decompress(self, payload, out=None):
        """The dense tensor a payload stands for (into ``out`` if given)."""
        if isinstance(payload, Sparse):
            return payload.to_dense(out=out, threads=self.threads)
        if isinstance(payload, Quantized):
            return payload.dequantize(out=out, threads=self.threads)
        if isinstance(payload, Dense):
            return payload.to_dense(out=out)
        raise TypeError(f"payload: expected a Sparse, Quantized or Dense, got {type(payload).__name__}")

    def __call__(self, x, *, step=None):
        return self.compress(x, step=step)

    # -- description -----------------------------------------------------
    @property
    def spec(self):
        parts = [self.name] + [_fmt(getattr(self, a)) for a in self._args]
        parts += [f"{k}={_fmt(getattr(self, k))}" for k in self._kwargs
                  if getattr(self, k) != self._defaults().get(k)]
        return ":".join(parts)

    def _defaults(self):
        return {}

    def __repr__(self):
        return f"{type(self).__name__}({self.spec!r})"

    def __eq__(self, other):
        return type(self) is type(other) and self.spec == other.spec

    __hash__ = None


def _fmt(v):
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _count_or_ratio(k, ratio, name):
    if (k is None) == (ratio is None):
        raise TypeError(f"{name}: give exactly one of k= or ratio= (got k={k!r}, ratio={ratio!r})")
    if k is not None:
        return check_int(k, "k", 0), None
    return None, check_ratio(ratio)


# --------------------------------------------------------------------------
# Sparsifiers
# --------------------------------------------------------------------------

class _CountOrRatio(Compressor):
    sparsifier = True

    def __init__(self, k=None, *, ratio=None, threads=None):
        super().__init__(threads)
        self.k, self.ratio = _count_or_ratio(k, ratio, type(self).__name__)

    @property
    def amount(self):
        return self.ratio if self.ratio is not None else self.k

    def _kr(self, x):
        if self.k is not None:
            return dict(k=min(self.k, np.asarray(x).size))
        return dict(ratio=self.ratio)


class TopK(_CountOrRatio):
    """Exact top-k by magnitude: ``TopK(k)`` or ``TopK(ratio=0.01)``."""

    name = "topk"
    _args = ("amount",)

    def _compress(self, x, step):
        return _sparsify.topk(x, **self._kr(x), threads=self.threads)


class RandomK(_CountOrRatio):
    """Random-k with a shared seed (summable); ``rescale=True`` multiplies by
    n/k, which makes it unbiased."""

    name = "randomk"
    _args = ("amount",)
    _kwargs = ("seed", "rescale")
    randomized = True
    summable = True

    def __init__(self, k=None, *, ratio=None, seed=0, rescale=False, threads=None):
        super().__init__(k, ratio=ratio, threads=threads)
        self.seed = check_seed(seed)
        self.rescale = bool(rescale)

    @property
    def unbiased(self):
        return self.rescale

    def _defaults(self):
        return {"seed": 0, "rescale": False}

    def _compress(self, x, step):
        return _sparsify.randomk(x, **self._kr(x), seed=self.seed, step=step, rescale=self.rescale,
                       threads=self.threads)


class Threshold(Compressor):
    """Every element with |x| >= tau."""

    name = "threshold"
    _args = ("tau",)
    sparsifier = True

    def __init__(self, tau, *, threads=None):
        super().__init__(threads)
        self.tau = check_finite_number(tau, "tau", lo=0.0)

    def _compress(self, x, step):
        return _sparsify.threshold(x, self.tau, threads=self.threads)


class ChunkedTopK(Compressor):
    """Top-k_per_chunk inside each chunk (SparseLoCo); ``chunk`` an int or a
    (tile_rows, tile_cols) pair for 2-D tiles."""

    name = "chunked"
    _args = ("chunk_spec", "k_per_chunk")
    sparsifier = True

    def __init__(self, chunk, k_per_chunk, *, threads=None):
        super().__init__(threads)
        if isinstance(chunk, (tuple, list)):
            if len(chunk) != 2:
                raise ValueError(f"chunk: expected an int or a (rows, cols) pair, got {chunk!r}")
            self.chunk = (check_int(chunk[0], "chunk[0]", 1, _core.MAX_TILE),
                          check_int(chunk[1], "chunk[1]", 1, _core.MAX_TILE))
            size = self.chunk[0] * self.chunk[1]
        else:
            self.chunk = check_int(chunk, "chunk", 1, _core.MAX_CHUNK)
            size = self.chunk
        self.k_per_chunk = check_count(k_per_chunk, size, "k_per_chunk")

    @property
    def chunk_spec(self):
        return f"{self.chunk[0]}x{self.chunk[1]}" if isinstance(self.chunk, tuple) else str(self.chunk)

    def _compress(self, x, step):
        return _sparsify.topk_chunked(x, self.chunk, self.k_per_chunk, threads=self.threads)


class SampledTopK(Compressor):
    """DGC's approximate top-k (count within [0.8k, 1.3k])."""

    name = "sampled"
    _args = ("ratio",)
    _kwargs = ("sample_ratio", "seed")
    sparsifier = True
    randomized = True

    def __init__(self, ratio, *, sample_ratio=0.01, seed=0, threads=None):
        super().__init__(threads)
        self.ratio = check_ratio(ratio)
        self.sample_ratio = check_finite_number(sample_ratio, "sample_ratio", 0.0, 1.0, lo_open=True)
        self.seed = check_seed(seed)

    def _defaults(self):
        return {"sample_ratio": 0.01, "seed": 0}

    def _compress(self, x, step):
        return _sparsify.topk_sampled(x, self.ratio, sample_ratio=self.sample_ratio, seed=self.seed,
                            step=step, threads=self.threads)


class Identity(Compressor):
    """No compression: the tensor travels as a Dense payload."""

    name = "none"
    summable = True
    unbiased = True

    def _compress(self, x, step):
        return Dense(np.asarray(x))


# --------------------------------------------------------------------------
# Quantizers (lowband.quantize functions)
# --------------------------------------------------------------------------

# the kernel modules, looked up once (not per call: a compress call on a
# small tensor costs a few microseconds); importlib because the package
# attribute `lowband.quantize` is the function
_sparsify = importlib.import_module(".sparsify", __package__)
_quantize = importlib.import_module(".quantize", __package__)


def _q():
    return _quantize


class Sign(Compressor):
    """Scaled sign, 1 bit per element: scale "l1" (EF-signSGD), "rms"
    (1-bit Adam), "two_means" (Seide et al.'s 1-bit SGD: the mean of each
    sign's elements) or "none"; per tensor or per ``block``."""

    name = "sign"
    _args = ("scale",)
    _kwargs = ("block",)

    def __init__(self, scale="l1", *, block=None, threads=None):
        super().__init__(threads)
        self.scale = check_choice(scale, "scale", ("l1", "rms", "none", "two_means"))
        self.block = None if block is None else check_int(block, "block", 1)

    def _defaults(self):
        return {"block": None}

    def _compress(self, x, step):
        return _q().sign(x, scale=self.scale, block=self.block, threads=self.threads)


class Signum(Compressor):
    """Signum (Bernstein et al., ICML 2018): the sign of a momentum of the
    inputs, m = beta * m + (1 - beta) * x, sent as ``sign(m, scale="none")``
    (1 bit per element, decoding to +-1); beta = 0 is signSGD.  The
    momentum is this object's state (bound to the first input's shape;
    ``reset()`` clears it).  Aggregate with ``lowband.majority_vote``."""

    name = "signum"
    _args = ("beta",)

    def __init__(self, beta=0.9, *, threads=None):
        super().__init__(threads)
        self.beta = check_finite_number(beta, "beta", 0.0, 1.0, hi_open=True)
        self.momentum = None

    def reset(self):
        self.momentum = None
        self.step = 0

    def _compress(self, x, step):
        arr = np.asarray(x)
        if arr.dtype.kind != "f":
            raise TypeError(f"x: expected a float array, got dtype {arr.dtype}")
        wd = arr.dtype if arr.dtype in (np.float32, np.float64) else np.dtype(np.float32)
        m = self.momentum
        if m is None:
            m = self.momentum = np.zeros(arr.shape, wd)
        elif m.shape != arr.shape or m.dtype != wd:
            raise ValueError(f"x: expected shape {m.shape} and dtype {m.dtype} (the momentum's), "
                             f"got {arr.shape} and {wd}")
        f = wd.type
        m *= f(self.beta)
        m += f(1 - self.beta) * arr.astype(wd, copy=False)
        return _q().sign(m, scale="none", threads=self.threads)


class Dither(Compressor):
    """Random dithering with natural (power-of-two) or linear levels
    (Horvath et al. 2019; BytePS), unbiased, Elias-gamma coded; see
    ``lowband.dither``."""

    name = "dither"
    _args = ("levels",)
    _kwargs = ("partition", "norm", "seed")
    randomized = True
    unbiased = True

    def __init__(self, levels, *, partition="natural", norm="max", seed=0, threads=None):
        super().__init__(threads)
        self.levels = check_int(levels, "levels", 1, 127)
        self.partition = check_choice(partition, "partition", ("natural", "linear"))
        self.norm = check_choice(norm, "norm", ("max", "l2"))
        self.seed = check_seed(seed)

    def _defaults(self):
        return {"partition": "natural", "norm": "max", "seed": 0}

    def _compress(self, x, step):
        return _q().dither(x, self.levels, partition=self.partition, norm=self.norm, seed=self.seed,
                           step=step, threads=self.threads)


class FedZip(Compressor):
    """FedZip's pipeline for one layer (top-z, 3-means, Huffman or gap
    coding of the cluster ids); see ``lowband.fedzip``."""

    name = "fedzip"
    _args = ("ratio",)
    _kwargs = ("encoding", "iters")

    def __init__(self, ratio=0.01, *, encoding="gaps", iters=4, threads=None):
        super().__init__(threads)
        self.ratio = check_finite_number(ratio, "ratio", 0.0, 1.0, lo_open=True)
        self.encoding = check_choice(encoding, "encoding", ("huffman", "gaps"))
        self.iters = check_int(iters, "iters", 0, 1000)

    def _defaults(self):
        return {"encoding": "gaps", "iters": 4}

    def _compress(self, x, step):
        return _q().fedzip(x, self.ratio, encoding=self.encoding, iters=self.iters,
                           threads=self.threads)


class Blockwise(Compressor):
    """Symmetric blockwise absmax quantization to ``bits`` in {1,2,3,4,8},
    nearest or stochastic rounding (stochastic: unbiased, seeded)."""

    name = "blockwise"
    _args = ("bits",)
    _kwargs = ("block", "rounding", "seed")

    def __init__(self, bits, *, block=64, rounding="nearest", seed=0, threads=None):
        super().__init__(threads)
        self.bits = check_int(bits, "bits", 1, 8)
        self.block = check_int(block, "block", 1)
        self.rounding = check_choice(rounding, "rounding", ("nearest", "stochastic"))
        self.seed = check_seed(seed)

    randomized = property(lambda self: self.rounding == "stochastic")
    unbiased = property(lambda self: self.rounding == "stochastic")

    def _defaults(self):
        return {"block": 64, "rounding": "nearest", "seed": 0}

    def _compress(self, x, step):
        if self.rounding == "stochastic":
            return _q().quantize(x, self.bits, block=self.block, rounding="stochastic",
                                 seed=self.seed, step=step, threads=self.threads)
        return _q().quantize(x, self.bits, block=self.block, threads=self.threads)


class QSGD(Compressor):
    """QSGD with ``levels`` levels (unbiased)."""

    name = "qsgd"
    _args = ("levels",)
    _kwargs = ("block", "seed")
    randomized = True
    unbiased = True

    def __init__(self, levels, *, block=None, seed=0, threads=None):
        super().__init__(threads)
        self.levels = check_int(levels, "levels", 1)
        self.block = None if block is None else check_int(block, "block", 1)
        self.seed = check_seed(seed)

    def _defaults(self):
        return {"block": None, "seed": 0}

    def _compress(self, x, step):
        return _q().qsgd(x, self.levels, seed=self.seed, step=step, block=self.block,
                         threads=self.threads)


class TernGrad(Compressor):
    """TernGrad: ternary codes after clipping at ``clip`` standard deviations
    (2.5, the paper's; unbiased for the clipped gradient; ``clip=None``
    gives an unbiased estimate of x itself)."""

    name = "terngrad"
    _kwargs = ("seed", "clip")
    randomized = True

    def __init__(self, *, seed=0, clip=2.5, threads=None):
        super().__init__(threads)
        self.seed = check_seed(seed)
        self.clip = None if clip is None else check_finite_number(clip, "clip", 0.0, lo_open=True)

    unbiased = property(lambda self: self.clip is None)

    def _defaults(self):
        return {"seed": 0, "clip": 2.5}

    def _compress(self, x, step):
        return _q().terngrad(x, seed=self.seed, step=step, clip=self.clip, threads=self.threads)


class Natural(Compressor):
    """Natural compression: stochastic rounding to powers of two (unbiased)."""

    name = "natural"
    _kwargs = ("seed",)
    randomized = True
    unbiased = True

    def __init__(self, *, seed=0, threads=None):
        super().__init__(threads)
        self.seed = check_seed(seed)

    def _defaults(self):
        return {"seed": 0}

    def _compress(self, x, step):
        return _q().natural(x, seed=self.seed, step=step, threads=self.threads)


class MiniFloat(Compressor):
    """Tiny floats with a power-of-two scale per block (E3M0: Streaming DiLoCo)."""

    name = "minifloat"
    _args = ("format",)
    _kwargs = ("block",)

    def __init__(self, exp_bits=3, man_bits=0, *, block=128, threads=None):
        super().__init__(threads)
        self.exp_bits = check_int(exp_bits, "exp_bits", 1, 8)
        self.man_bits = check_int(man_bits, "man_bits", 0, 23)
        self.block = check_int(block, "block", 1)

    @property
    def format(self):
        return f"e{self.exp_bits}m{self.man_bits}"

    def _defaults(self):
        return {"block": 128}

    def _compress(self, x, step):
        return _q().minifloat(x, self.exp_bits, self.man_bits, block=self.block, threads=self.threads)


class Lut2Bit(Compressor):
    """SparseLoCo's 2-bit codes with a 4-entry table of bin means."""

    name = "lut2bit"

    def _compress(self, x, step):
        return _q().lut2bit(x, threads=self.threads)


class Cast(Compressor):
    """A cast to float16 or bfloat16 (summable: DDP's fp16 hook)."""

    name = "cast"
    _args = ("dtype",)
    summable = True

    def __init__(self, dtype="float16", *, threads=None):
        super().__init__(threads)
        self.dtype = check_choice(str(dtype), "dtype", ("float16", "bfloat16"))

    def _compress(self, x, step):
        return _q().cast(x, self.dtype, threads=self.threads)


class Chain(Compressor):
    """``Chain(first, then)``: a sparsifier whose kept values are quantized by
    ``then`` (e.g. top-k then 2-bit): the payload is a Sparse with Quantized
    values; ``decompress`` scatters the dequantized values."""

    name = "chain"

    def __init__(self, first, then, *, threads=None):
        super().__init__(threads)
        first, then = from_spec(first), from_spec(then)
        if not first.sparsifier:
            raise ValueError(f"first: expected a sparsifier (TopK, RandomK, ...), got {first.spec!r}")
        if then.sparsifier or isinstance(then, (Chain, Identity)):
            raise ValueError(f"then: expected a quantizer of the kept values, got {then.spec!r}")
        self.first, self.then = first, then

    summable = property(lambda self: self.first.summable and self.then.summable)
    unbiased = property(lambda self: self.first.unbiased and self.then.unbiased)
    randomized = property(lambda self: self.first.randomized or self.then.randomized)

    @property
    def spec(self):
        return f"{self.first.spec}+{self.then.spec}"

    def _compress(self, x, step):
        s = self.first.compress(x, step=step)
        q = self.then.compress(s.values, step=step)
        return Sparse._make(s.indices, q, s.shape, s.dtype, s.seed, s.step)


class Zstd(Compressor):
    """A lossless Zstandard stage after any compressor (spec ``...+zstd``):
    ``lowband.lossless.zstd(inner.compress(x), level)``."""

    name = "zstd"

    def __init__(self, inner, *, level=3, threads=None):
        super().__init__(threads)
        if isinstance(inner, Zstd):
            raise ValueError("inner: already a zstd stage")
        self.inner = from_spec(inner)
        self.level = check_int(level, "level", 1, 22)

    summable = False
    unbiased = property(lambda self: self.inner.unbiased)
    randomized = property(lambda self: self.inner.randomized)
    sparsifier = False

    @property
    def spec(self):
        return f"{self.inner.spec}+zstd" + (f":level={self.level}" if self.level != 3 else "")

    def _compress(self, x, step):
        from .lossless import zstd
        return zstd(self.inner.compress(x, step=step), self.level)


# --------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------

_REGISTRY = {c.name: c for c in (TopK, RandomK, Threshold, ChunkedTopK, SampledTopK, Identity, Sign, Signum, Dither, FedZip,
                                 Blockwise, QSGD, TernGrad, Natural, MiniFloat, Lut2Bit, Cast)}
_ALIASES = {"quantize": "blockwise", "fp16": ("cast", "float16"), "bf16": ("cast", "bfloat16"),
            "identity": "none", "dgc": "sampled", "topk_chunked": "chunked", "e3m0": ("minifloat", "e3m0")}


def _parse_value(text, keyword=False):
    """A spec value: bool, int, float, or str; ``none``/``null`` is None for
    keyword values only (``sign:none`` keeps the scale name "none")."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if keyword and low in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _amount(v, name):
    # an int is a count k, a float a ratio
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"spec: {name} needs a count (int) or a ratio (float), got {v!r}")
    return {"k": v} if isinstance(v, int) else {"ratio": v}


def _build(name, args, kwargs):
    alias = _ALIASES.get(name, name)
    if isinstance(alias, tuple):
        name, args = alias[0], [alias[1], *args]
    else:
        name = alias
    if name not in _REGISTRY:
        raise ValueError(f"spec: unknown compressor {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    cls = _REGISTRY[name]
    try:
        if cls in (TopK, RandomK):
            if not args and ("k" in kwargs or "ratio" in kwargs):
                return cls(**kwargs)
            if len(args) != 1:
                raise ValueError(f"spec: {name} takes one positional argument (k or ratio), got {len(args)}")
            return cls(**_amount(args[0], name), **kwargs)
        if cls is ChunkedTopK:
            if len(args) != 2:
                raise ValueError("spec: chunked takes chunk and k_per_chunk, e.g. chunked:4096:128 or chunked:64x64:128")
            chunk = args[0]
            if isinstance(chunk, str) and "x" in chunk:
                chunk = tuple(int(c) for c in chunk.split("x"))
            return cls(chunk, args[1], **kwargs)
        if cls is MiniFloat:
            if len(args) == 1 and isinstance(args[0], str):
                fmt = args[0].lower()
                if not (fmt.startswith("e") and "m" in fmt):
                    raise ValueError(f"spec: minifloat format must look like e3m0, got {args[0]!r}")
                e, m = fmt[1:].split("m")
                return cls(int(e), int(m), **kwargs)
            return cls(*args, **kwargs)
        return cls(*args, **kwargs)
    except TypeError as exc:
        raise ValueError(f"spec: bad arguments for {name}: {exc}") from None


def _from_string(text):
    stages = [s.strip() for s in text.split("+")]
    if not text.strip() or any(not s for s in stages):
        raise ValueError(f"spec: expected 'name[:arg...][+name...]', got {text!r}")
    last, *opts = stages[-1].split(":")
    if last.strip().lower() == "zstd":
        if len(stages) == 1:
            raise ValueError("spec: zstd is a last stage after a compressor, e.g. 'topk:0.01+zstd'")
        kwargs = {}
        for item in opts:
            if "=" not in item:
                raise ValueError(f"spec: zstd takes only level=N, got {item!r}")
            k, v = item.split("=", 1)
            kwargs[k.strip()] = _parse_value(v.strip(), keyword=True)
        try:
            return Zstd(_from_string("+".join(stages[:-1])), **kwargs)
        except TypeError as exc:
            raise ValueError(f"spec: bad arguments for zstd: {exc}") from None
    built = []
    for stage in stages:
        name, *rest = stage.split(":")
        args, kwargs = [], {}
        for item in rest:
            if "=" in item:
                k, v = item.split("=", 1)
                kwargs[k.strip()] = _parse_value(v.strip(), keyword=True)
            else:
                if kwargs:
                    raise ValueError(f"spec: positional argument {item!r} after keyword arguments in {stage!r}")
                args.append(_parse_value(item.strip()))
        built.append(_build(name.strip().lower(), args, kwargs))
    return _chain(built, text)


def _chain(stages, what):
    if len(stages) == 1:
        return stages[0]
    if len(stages) != 2:
        raise ValueError(f"spec: at most two stages (sparsifier+quantizer), got {len(stages)} in {what!r}")
    return Chain(stages[0], stages[1])


def from_spec(spec):
    """A compressor from a spec string (``"topk:0.01+lut2bit"``,
    ``"randomk:1000:seed=7:rescale=true"``, ``"sign:rms"``,
    ``"blockwise:4:block=64:rounding=stochastic"``, ``"chunked:64x64:128"``,
    ``"minifloat:e3m0:block=128"``, ``"fp16"``), a dict (``{"name": "topk",
    "ratio": 0.01, "then": {"name": "lut2bit"}}``), a list of stages, or a
    Compressor (returned unchanged).  Ints are counts, floats ratios."""
    if isinstance(spec, Compressor):
        return spec
    if isinstance(spec, str):
        return _from_string(spec)
    if isinstance(spec, dict):
        d = dict(spec)
        if "name" not in d:
            raise ValueError(f"spec: a dict spec needs a 'name' key, got {sorted(d)}")
        then = d.pop("then", None)
        name = str(d.pop("name")).lower()
        args = d.pop("args", [])
        first = _build(name, list(args), d)
        return first if then is None else Chain(first, from_spec(then))
    if isinstance(spec, (list, tuple)):
        return _chain([from_spec(s) for s in spec], spec)
    raise TypeError(f"spec: expected a str, dict, list or Compressor, got {type(spec).__name__}")
